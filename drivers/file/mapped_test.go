package file

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
)

// tmpfsDir is a fresh directory on tmpfs (/dev/shm), or skips the test.
func tmpfsDir(t *testing.T) string {
	t.Helper()
	var fs unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &fs); err != nil || fs.Type != tmpfsMagic {
		t.Skip("no tmpfs at /dev/shm")
	}
	d, err := os.MkdirTemp("/dev/shm", "bbfile")
	if err != nil {
		t.Skip(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func mappedNode(t *testing.T, g *graph.Graph, p string, extra map[string]any) (*graph.Node, *node) {
	t.Helper()
	n := addFile(t, g, "m", p, extra)
	inst := n.Instance().(*node)
	if inst.mapped == nil {
		t.Fatalf("%s on tmpfs is not mapped", p)
	}
	return n, inst
}

func TestMappedOnlyOnTmpfs(t *testing.T) {
	g := newGraph(t)
	p, _ := makeFile(t, "", 4096)
	var fs unix.Statfs_t
	if err := unix.Statfs(p, &fs); err == nil && fs.Type != tmpfsMagic {
		if n := addFile(t, g, "d", p, nil); n.Instance().(*node).mapped != nil {
			t.Error("a file outside tmpfs is mapped")
		}
	}
	tp, _ := makeFile(t, tmpfsDir(t), 4096)
	if n := addFile(t, g, "c", tp, map[string]any{"cache": map[string]any{"direct": true}}); n.Instance().(*node).mapped != nil {
		t.Error("cache.direct=on is mapped")
	}
}

// TestMappedSizeChanges: writes and zero-writes past the end, truncation
// both ways, and another process shrinking the file under us.
func TestMappedSizeChanges(t *testing.T) {
	g := newGraph(t)
	p, data := makeFile(t, tmpfsDir(t), 3*4096+100)
	n, inst := mappedNode(t, g, p, nil)
	if !bytes.Equal(readAll(t, n), data) {
		t.Fatal("read differs")
	}
	if v := inst.mapped.view.Load(); v.size != int64(len(data)) {
		t.Fatalf("known size %d, want %d", v.size, len(data))
	}
	// A write that grows the file goes through pwritev, then is mapped.
	// (Writes past the end come from format drivers allocating; the
	// calls below go to the driver, under the graph's size check.)
	tail := bytes.Repeat([]byte{7}, 5000)
	if err := inst.WriteV(ctx, int64(len(data)), [][]byte{tail}, 0); err != nil {
		t.Fatal(err)
	}
	if v := inst.mapped.view.Load(); v.size != int64(len(data)+len(tail)) {
		t.Fatalf("known size %d after growing write, want %d", v.size, len(data)+len(tail))
	}
	got := make([]byte, len(tail))
	if err := inst.ReadV(ctx, int64(len(data)), [][]byte{got}); err != nil || !bytes.Equal(got, tail) {
		t.Fatalf("read of the grown part: %v", err)
	}
	// Shrink by another descriptor: the known size is now too large, and
	// the pages past the new end are gone, so requests there (large enough
	// to be mapped) find them not resident and take the syscalls: reads
	// past the end read zeros, writes there grow the file again.
	if err := os.Truncate(p, 4096); err != nil {
		t.Fatal(err)
	}
	buf := bytes.Repeat([]byte{1}, 128<<10)
	if err := inst.ReadV(ctx, 0, [][]byte{buf}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:4096], data[:4096]) || !bytes.Equal(buf[4096:], make([]byte, len(buf)-4096)) {
		t.Fatal("read across a shrunk end is not the data then zeros")
	}
	big := bytes.Repeat([]byte{8}, 64<<10)
	if err := inst.WriteV(ctx, 6000, [][]byte{big}, 0); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Size() != 6000+int64(len(big)) {
		t.Fatalf("file size %d after writing past the end", st.Size())
	}
	got = make([]byte, len(big))
	if err := inst.ReadV(ctx, 6000, [][]byte{got}); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("read of the rewritten part: %v", err)
	}
	got = make([]byte, len(tail))
	// Grow past the first mapping: a new, larger one.
	far := int64(3 << 30)
	if err := inst.WriteV(ctx, far, [][]byte{tail}, 0); err != nil {
		t.Fatal(err)
	}
	if v := inst.mapped.view.Load(); int64(len(v.data)) < far+int64(len(tail)) || v.size != far+int64(len(tail)) {
		t.Fatalf("mapping of %d bytes, known size %d, after growing to %d", len(v.data), v.size, far+int64(len(tail)))
	}
	if err := inst.ReadV(ctx, far, [][]byte{got}); err != nil || !bytes.Equal(got, tail) {
		t.Fatalf("read at 3 GiB: %v", err)
	}
	// Truncate down and up through the node.
	if err := inst.Truncate(ctx, 4096, true, "off"); err != nil {
		t.Fatal(err)
	}
	if v := inst.mapped.view.Load(); v.size != 4096 {
		t.Fatalf("known size %d after truncate, want 4096", v.size)
	}
	if err := inst.Truncate(ctx, 1<<20, true, "off"); err != nil {
		t.Fatal(err)
	}
	if err := inst.WriteZeroes(ctx, 1<<20, 4096, 0); err != nil {
		t.Fatal(err)
	}
	if v := inst.mapped.view.Load(); v.size != 1<<20+4096 {
		t.Fatalf("known size %d after extending write-zeroes", v.size)
	}
}

// TestMappedFullTmpfs: writes into the holes of a file on a full tmpfs
// come back as ENOSPC, as without the mapping (holes have no page, so they
// are written with pwritev).
func TestMappedFullTmpfs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	p := filepath.Join(dir, "img")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 8<<20); err != nil {
		t.Fatal(err)
	}
	g := newGraph(t)
	n, _ := mappedNode(t, g, p, nil)
	buf := bytes.Repeat([]byte{9}, 64<<10)
	var err error
	for off := int64(0); off < 8<<20 && err == nil; off += int64(len(buf)) {
		err = n.WriteAt(ctx, buf, off, 0)
	}
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("filling a 1 MiB tmpfs: %v, want ENOSPC", err)
	}
	// What was written reads back.
	got := make([]byte, len(buf))
	if err := n.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back: %v", err)
	}
}

// TestMappedReadsLeaveHoles: reading a sparse file does not allocate it
// (a read fault on a tmpfs hole would).
func TestMappedReadsLeaveHoles(t *testing.T) {
	g := newGraph(t)
	p := filepath.Join(tmpfsDir(t), "sparse")
	if err := os.WriteFile(p, bytes.Repeat([]byte{3}, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 8<<20); err != nil {
		t.Fatal(err)
	}
	n, inst := mappedNode(t, g, p, nil)
	// A dense range is read through the mapping, at once (the residency
	// test must not walk the file: lseek(SEEK_HOLE) did).
	if err := n.ReadAt(ctx, make([]byte, 64<<10), 0); err != nil {
		t.Fatal(err)
	}
	if r := inst.mapped.reads.Load(); r != 1 {
		t.Fatalf("%d mapped reads after reading the data, want 1", r)
	}
	got := readAll(t, n)
	if !bytes.Equal(got[:64<<10], bytes.Repeat([]byte{3}, 64<<10)) || !bytes.Equal(got[64<<10:], make([]byte, 8<<20-64<<10)) {
		t.Fatal("read differs")
	}
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 > 64<<10 {
		t.Fatalf("reading the sparse file allocated it: %d bytes allocated", st.Blocks*512)
	}
	if r := inst.mapped.reads.Load(); r != 1 {
		t.Fatalf("%d mapped reads after reading holes too, want 1", r)
	}
}

// TestMappedConcurrent: writers and readers on disjoint and overlapping
// blocks at once (run with -race).
func TestMappedConcurrent(t *testing.T) {
	g := newGraph(t)
	p, _ := makeFile(t, tmpfsDir(t), 1<<20)
	n, _ := mappedNode(t, g, p, nil)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := bytes.Repeat([]byte{byte(w + 1)}, 4096)
			got := make([]byte, 4096)
			for i := range 200 {
				off := int64((w*64 + i%64) * 4096)
				if err := n.WriteAt(ctx, b, off, 0); err != nil {
					t.Error(err)
					return
				}
				if err := n.ReadAt(ctx, got, off); err != nil || !bytes.Equal(got, b) {
					t.Errorf("block %d: %v", off/4096, err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// TestMappedGuardRecoversFault: a copy that touches the mapping past the
// end of the file (which the residency test makes rare: a truncation
// racing with the copy) reports false and resyncs the known size, where
// it would otherwise kill the process with SIGBUS.
func TestMappedGuardRecoversFault(t *testing.T) {
	g := newGraph(t)
	p, _ := makeFile(t, tmpfsDir(t), 1<<20)
	_, inst := mappedNode(t, g, p, nil)
	m := inst.mapped
	if err := os.Truncate(p, 4096); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	v := m.view.Load()
	if m.guard(func() { copy(buf, v.data[512<<10:]) }) {
		t.Fatal("a copy past the end of the file did not fault")
	}
	if got := m.view.Load().size; got != 4096 {
		t.Fatalf("known size %d after the fault, want 4096", got)
	}
	if !m.guard(func() { copy(buf[:4096], m.view.Load().data) }) {
		t.Fatal("a copy inside the file faulted")
	}
}
