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
	// Shrink by another descriptor: reads past the new end read zeros (as
	// preadv past EOF does), writes there grow the file again.
	if err := os.Truncate(p, 4096); err != nil {
		t.Fatal(err)
	}
	buf := bytes.Repeat([]byte{1}, 8192)
	if err := inst.ReadV(ctx, 4096, [][]byte{buf}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, make([]byte, 8192)) {
		t.Fatal("read past a shrunk end is not zeros")
	}
	// The write faults in the mapping (its page is past the end), and
	// goes through pwritev, which extends the file.
	if err := inst.WriteV(ctx, 6000, [][]byte{tail}, 0); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Size() != 6000+int64(len(tail)) {
		t.Fatalf("file size %d after writing past the end", st.Size())
	}
	if v := inst.mapped.view.Load(); v.size != 6000+int64(len(tail)) {
		t.Fatalf("known size %d after the fault and the write, want %d", v.size, 6000+len(tail))
	}
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

// TestMappedFullTmpfs: a write into a hole of a full tmpfs faults in the
// mapping and must come back as ENOSPC from the syscall, as without it.
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
	n, _ := mappedNode(t, g, p, nil)
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
