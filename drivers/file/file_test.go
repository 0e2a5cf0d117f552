package file

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

var ctx = context.Background()

type user string

func (u user) UserDesc() string { return "block export '" + string(u) + "'" }

// newGraph returns a graph closed at the end of the test.
func newGraph(t *testing.T) *graph.Graph {
	t.Helper()
	g := graph.New(nil)
	t.Cleanup(func() { _ = g.Close() })
	return g
}

// makeFile creates a file of size bytes filled with pattern data.
func makeFile(t *testing.T, dir string, size int) (string, []byte) {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	p := filepath.Join(dir, "img")
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(1, uint64(size)))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, data
}

func addFile(t *testing.T, g *graph.Graph, name, path string, extra map[string]any) *graph.Node {
	t.Helper()
	opts := map[string]any{"driver": "file", "node-name": name, "filename": path}
	for k, v := range extra {
		opts[k] = v
	}
	n, err := g.Add(ctx, opts, qapi.JSON)
	if err != nil {
		t.Fatalf("Add(%v): %v", opts, err)
	}
	return n
}

func readAll(t *testing.T, n *graph.Node) []byte {
	t.Helper()
	b := make([]byte, n.SizeNow())
	if err := n.ReadAt(ctx, b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestOpenErrors(t *testing.T) {
	g := newGraph(t)
	dir := t.TempDir()
	cases := []struct {
		opts  map[string]any
		want  string
		errno error
	}{
		{map[string]any{"filename": "/nonexistent"}, "Could not open '/nonexistent': No such file or directory", unix.ENOENT},
		{map[string]any{"filename": dir}, "Could not open '" + dir + "': Is a directory", unix.EISDIR},
		{map[string]any{"filename": dir, "read-only": true}, "'file' driver requires '" + dir + "' to be a regular file", nil},
		{map[string]any{"filename": "/dev/null"}, "'file' driver requires '/dev/null' to be a regular file", nil},
		{map[string]any{"filename": "/dev/null", "pr-manager": "pr0"}, "No persistent reservation manager with id 'pr0'", nil},
		{map[string]any{"filename": "/dev/null", "aio": "native"}, "aio=native was specified, but it requires cache.direct=on, which was not specified.", nil},
		{map[string]any{"filename": "/dev/null", "locking": "maybe"}, "Parameter 'locking' does not accept value 'maybe'", nil},
		{map[string]any{"filename": "/dev/null", "bogus": 1}, "bogus", nil},
		{map[string]any{}, "filename", nil},
	}
	for _, c := range cases {
		opts := map[string]any{"driver": "file", "node-name": "x"}
		for k, v := range c.opts {
			opts[k] = v
		}
		_, err := g.Add(ctx, opts, qapi.JSON)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Add(%v) = %v, want %q", c.opts, err, c.want)
			continue
		}
		if c.errno != nil && !errors.Is(err, c.errno) {
			t.Errorf("Add(%v) = %v, not errors.Is %v", c.opts, err, c.errno)
		}
	}
}

func TestParseFilename(t *testing.T) {
	g := newGraph(t)
	p, data := makeFile(t, "", 4096)
	n := addFile(t, g, "f", "file:"+p, nil)
	if n.Filename() != p {
		t.Errorf("Filename() = %q, want %q", n.Filename(), p)
	}
	if !bytes.Equal(readAll(t, n), data) {
		t.Error("contents differ")
	}
	// Options with every member spelled, keyval style.
	kv, err := g.Add(ctx, map[string]any{
		"driver": "file", "node-name": "k", "filename": p, "locking": "off", "aio": "io_uring",
		"aio-max-batch": "16", "drop-cache": "off", "x-check-cache-dropped": "on", "read-only": "on",
	}, qapi.Keyval)
	if err != nil {
		t.Fatal(err)
	}
	if kv.SizeNow() != 4096 {
		t.Errorf("size %d", kv.SizeNow())
	}
}

// TestVectoredIO writes and reads with more buffers than IOV_MAX, of odd
// sizes, and with different splits on the way in and out.
func TestVectoredIO(t *testing.T) {
	g := newGraph(t)
	const size = 1 << 20
	p, want := makeFile(t, "", size)
	n := addFile(t, g, "f", p, nil)
	r := rand.New(rand.NewPCG(7, 7))
	for round := 0; round < 20; round++ {
		off := r.Int64N(size / 2)
		length := r.Int64N(size/2) + 1
		src := make([]byte, length)
		for i := range src {
			src[i] = byte(r.Uint32())
		}
		iov := split(r, src, 3000)
		if err := n.WriteV(ctx, off, iov, graph.WriteFlags(round%2)); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], src)
		got := make([]byte, length)
		if err := n.ReadV(ctx, off, split(r, got, 2500)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, src) {
			t.Fatalf("round %d: read back differs", round)
		}
	}
	if err := n.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	disk, _ := os.ReadFile(p)
	if !bytes.Equal(disk, want) {
		t.Fatal("file contents differ")
	}
}

// split cuts b into up to max buffers of random sizes, some empty.
func split(r *rand.Rand, b []byte, max int) [][]byte {
	var iov [][]byte
	for len(b) > 0 {
		if len(iov) == max-1 {
			return append(iov, b)
		}
		k := min(len(b), r.IntN(300))
		iov = append(iov, b[:k])
		b = b[k:]
	}
	return iov
}

// TestReadPastEOF: a file that shrank under the node reads zeros past its
// end.
func TestReadPastEOF(t *testing.T) {
	g := newGraph(t)
	p, data := makeFile(t, "", 8192)
	n := addFile(t, g, "f", p, nil)
	if err := os.Truncate(p, 5000); err != nil {
		t.Fatal(err)
	}
	got := bytes.Repeat([]byte{0xff}, 8192)
	if err := n.ReadV(ctx, 0, [][]byte{got[:3000], got[3000:6000], got[6000:]}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:5000], data[:5000]) || !bytes.Equal(got[5000:], make([]byte, 3192)) {
		t.Fatal("read past EOF did not give zeros")
	}
}

func TestAllocs(t *testing.T) {
	g := newGraph(t)
	p, _ := makeFile(t, "", 1<<16)
	n := addFile(t, g, "f", p, nil)
	inst := n.Instance().(*node)
	small := [][]byte{make([]byte, 512), make([]byte, 512)}
	large := make([][]byte, 100)
	for i := range large {
		large[i] = make([]byte, 64)
	}
	for _, iov := range [][][]byte{small, large} {
		if a := testing.AllocsPerRun(100, func() {
			if err := inst.ReadV(ctx, 0, iov); err != nil {
				t.Fatal(err)
			}
			if err := inst.WriteV(ctx, 4096, iov, 0); err != nil {
				t.Fatal(err)
			}
		}); a != 0 {
			t.Errorf("%d buffers: %v allocations per read+write, want 0", len(iov), a)
		}
	}
}

func TestZeroesAndDiscard(t *testing.T) {
	g := newGraph(t)
	const size = 1 << 20
	p, data := makeFile(t, "", size)
	n := addFile(t, g, "f", p, map[string]any{"discard": "unmap"})

	// Punch: the range reads zeros and becomes a hole.
	if err := n.WriteZeroes(ctx, 65536, 131072, graph.ZeroMayUnmap); err != nil {
		t.Fatal(err)
	}
	copy(data[65536:], make([]byte, 131072))
	if !bytes.Equal(readAll(t, n), data) {
		t.Fatal("punched range does not read as zeros")
	}
	st, err := n.BlockStatus(ctx, 65536, 131072)
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != graph.StatusZero|graph.StatusAllocated || st.Length != 131072 {
		t.Errorf("status of punched range = %+v", st)
	}

	// Zero range without unmap: zeros, still allocated (data).
	if err := n.WriteZeroes(ctx, 300000, 200000, graph.ZeroFUA); err != nil {
		t.Fatal(err)
	}
	copy(data[300000:], make([]byte, 200000))
	if !bytes.Equal(readAll(t, n), data) {
		t.Fatal("zeroed range does not read as zeros")
	}
	if st, _ := n.BlockStatus(ctx, 303104, 4096); st.Status&graph.StatusData == 0 {
		t.Errorf("zero range deallocated: %+v", st)
	}

	// Unaligned edges are zeroed exactly.
	if err := n.WriteZeroes(ctx, 700001, 3333, graph.ZeroMayUnmap); err != nil {
		t.Fatal(err)
	}
	copy(data[700001:], make([]byte, 3333))
	if !bytes.Equal(readAll(t, n), data) {
		t.Fatal("unaligned zeroing wrong")
	}

	// Discard: reads as zeros on Linux file systems.
	if err := n.Discard(ctx, 800*1024, 64*1024); err != nil {
		t.Fatal(err)
	}
	copy(data[800*1024:], make([]byte, 64*1024))
	if !bytes.Equal(readAll(t, n), data) {
		t.Fatal("discarded range wrong")
	}
	if n.SizeNow() != size {
		t.Errorf("size changed to %d", n.SizeNow())
	}
}

// TestWriteZeroesExtends: write-zeroes past the end of a file that shrank
// grows it back, as a write would.
func TestWriteZeroesExtends(t *testing.T) {
	g := newGraph(t)
	p, _ := makeFile(t, "", 65536)
	n := addFile(t, g, "f", p, nil)
	if err := os.Truncate(p, 1000); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteZeroes(ctx, 4096, 61440, 0); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(p)
	if fi.Size() != 65536 {
		t.Errorf("size %d, want 65536", fi.Size())
	}
}

func blocks(t *testing.T, p string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestBlockStatusSparse(t *testing.T) {
	g := newGraph(t)
	p := sparseFile(t)
	n := addFile(t, g, "f", p, nil)
	got := mapNode(t, n)
	want := []extent{
		{0, 655360, false, true},
		{655360, 131072, true, false},
		{786432, 3407872 - 65536, false, true},
		{4194304 - 65536, 65536, true, false},
	}
	if !equalExtents(got, want) {
		t.Errorf("map = %v, want %v", got, want)
	}
}

// sparseFile is 4 MiB with data at [640K, 768K) and in the last 64 KiB.
func sparseFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(4 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 131072), 655360); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{2}, 65536), 4<<20-65536); err != nil {
		t.Fatal(err)
	}
	return p
}

type extent struct {
	Start, Length int64
	Data, Zero    bool
}

// mapNode walks BlockStatus as qemu-img map does, merging equal runs.
func mapNode(t *testing.T, n *graph.Node) []extent {
	t.Helper()
	var out []extent
	size := n.SizeNow()
	for off := int64(0); off < size; {
		st, err := n.BlockStatus(ctx, off, size-off)
		if err != nil {
			t.Fatal(err)
		}
		if st.Offset != off || st.File != n {
			t.Fatalf("extent at %d points at %d in %v", off, st.Offset, st.File)
		}
		e := extent{off, st.Length, st.Status&graph.StatusData != 0, st.Status&graph.StatusZero != 0}
		if k := len(out) - 1; k >= 0 && out[k].Data == e.Data && out[k].Zero == e.Zero {
			out[k].Length += e.Length
		} else {
			out = append(out, e)
		}
		off += st.Length
	}
	return out
}

func equalExtents(a, b []extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestTruncate(t *testing.T) {
	g := newGraph(t)
	p, data := makeFile(t, "", 65536)
	n := addFile(t, g, "f", p, nil)
	check := func(size int64, minAlloc, maxAlloc int64) {
		t.Helper()
		if n.SizeNow() != size {
			t.Errorf("size %d, want %d", n.SizeNow(), size)
		}
		if b := blocks(t, p); b < minAlloc || b > maxAlloc {
			t.Errorf("size %d: %d bytes allocated, want [%d, %d]", size, b, minAlloc, maxAlloc)
		}
	}
	if err := n.Truncate(ctx, 1<<20, true, "off"); err != nil {
		t.Fatal(err)
	}
	check(1<<20, 65536, 65536+65536)
	if err := n.Truncate(ctx, 2<<20, true, "falloc"); err != nil {
		t.Fatal(err)
	}
	check(2<<20, 65536+1<<20, 65536+1<<20+65536)
	if err := n.Truncate(ctx, 3<<20, false, "full"); err != nil {
		t.Fatal(err)
	}
	check(3<<20, 65536+2<<20, 65536+2<<20+65536)
	got := readAll(t, n)
	if !bytes.Equal(got[:65536], data) || !bytes.Equal(got[65536:], make([]byte, 3<<20-65536)) {
		t.Error("contents after growing are wrong")
	}
	if err := n.Truncate(ctx, 1<<20, false, "full"); err == nil ||
		!strings.Contains(err.Error(), "Cannot use preallocation for shrinking files") {
		t.Errorf("shrink with full = %v", err)
	}
	if err := n.Truncate(ctx, 4<<20, false, "metadata"); err == nil || !errors.Is(err, syscall.ENOTSUP) {
		t.Errorf("metadata = %v", err)
	}
	if err := n.Truncate(ctx, 1000, true, "off"); err != nil {
		t.Fatal(err)
	}
	check(1000, 0, 4096)
	if !bytes.Equal(readAll(t, n), data[:1000]) {
		t.Error("contents after shrinking are wrong")
	}
}

func TestAutoReadOnly(t *testing.T) {
	p, data := makeFile(t, "", 4096)
	if err := os.Chmod(p, 0o444); err != nil {
		t.Fatal(err)
	}
	if fd, err := unix.Open(p, unix.O_RDWR, 0); err == nil {
		unix.Close(fd)
		t.Skip("a 0444 file opens for writing here (running as root?): cannot test auto-read-only")
	}
	g := newGraph(t)
	if _, err := g.Add(ctx, map[string]any{"driver": "file", "node-name": "w", "filename": p}, qapi.JSON); err == nil ||
		!errors.Is(err, unix.EACCES) || !strings.Contains(err.Error(), "Permission denied") {
		t.Fatalf("writable open of a 0444 file = %v", err)
	}
	n := addFile(t, g, "f", p, map[string]any{"auto-read-only": true})
	if !n.ReadOnly() {
		t.Fatal("auto-read-only did not fall back to read-only")
	}
	if !bytes.Equal(readAll(t, n), data) {
		t.Fatal("contents differ")
	}
}

func TestReopen(t *testing.T) {
	g := newGraph(t)
	p, _ := makeFile(t, "", 65536)
	n := addFile(t, g, "f", p, map[string]any{"read-only": true})
	inst := n.Instance().(*node)
	lockFD := inst.lockFD
	buf := []byte("hello")
	if err := n.WriteAt(ctx, buf, 0, 0); !errors.Is(err, graph.ErrReadOnly) {
		t.Fatalf("write to read-only node = %v", err)
	}
	reopen := func(extra map[string]any) error {
		opts := map[string]any{"driver": "file", "node-name": "f", "filename": p}
		for k, v := range extra {
			opts[k] = v
		}
		return g.Reopen(ctx, []map[string]any{opts}, qapi.JSON)
	}
	if err := reopen(map[string]any{"read-only": false}); err != nil {
		t.Fatal(err)
	}
	if inst.readOnly {
		t.Fatal("descriptor still read-only")
	}
	if err := n.WriteAt(ctx, buf, 0, graph.WriteFUA); err != nil {
		t.Fatal(err)
	}
	if err := reopen(map[string]any{"read-only": true}); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, buf, 0, 0); !errors.Is(err, graph.ErrReadOnly) {
		t.Fatalf("write after reopen ro = %v", err)
	}
	// The file descriptor itself refuses writes too.
	if err := inst.WriteV(ctx, 0, [][]byte{buf}, 0); !errors.Is(err, unix.EBADF) {
		t.Fatalf("write on the read-only descriptor = %v", err)
	}
	got := make([]byte, 5)
	if err := n.ReadAt(ctx, got, 0); err != nil || string(got) != "hello" {
		t.Fatalf("read %q, %v", got, err)
	}
	for opt, v := range map[string]any{"filename": "/tmp/other", "locking": "off", "aio": "io_uring", "aio-max-batch": 3} {
		extra := map[string]any{"read-only": true, opt: v}
		if opt == "filename" {
			err := g.Reopen(ctx, []map[string]any{{"driver": "file", "node-name": "f", "filename": v, "read-only": true}}, qapi.JSON)
			if err == nil || err.Error() != "Cannot change the option 'filename'" {
				t.Errorf("changing filename: %v", err)
			}
			continue
		}
		if err := reopen(extra); err == nil || err.Error() != "Cannot change the option '"+opt+"'" {
			t.Errorf("changing %s: %v", opt, err)
		}
	}
	if err := reopen(map[string]any{"read-only": true, "drop-cache": false}); err != nil {
		t.Errorf("changing drop-cache: %v", err)
	}
	if inst.lockFD != lockFD {
		t.Error("the lock descriptor changed across reopen")
	}
}

func createFile(t *testing.T, opts map[string]any) error {
	t.Helper()
	d := graph.Lookup("file")
	co := d.NewCreateOptions()
	if err := qapi.Decode(opts, co, qapi.JSON); err != nil {
		return err
	}
	return d.Create(ctx, &graph.CreateContext{}, co)
}

func TestCreate(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "new.img")
	const size = 4 << 20
	for _, c := range []struct {
		prealloc   string
		minA, maxA int64
	}{
		{"off", 4096, 4096},
		{"falloc", size, size + 65536},
		{"full", size, size + 65536},
	} {
		// Leave data behind first: create must truncate it away.
		if err := os.WriteFile(p, bytes.Repeat([]byte{9}, 8<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		err := createFile(t, map[string]any{"filename": p, "size": size, "preallocation": c.prealloc, "nocow": true})
		if err != nil {
			t.Fatalf("%s: %v", c.prealloc, err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() != size {
			t.Errorf("%s: size %d", c.prealloc, fi.Size())
		}
		if b := blocks(t, p); b < c.minA || b > c.maxA {
			t.Errorf("%s: %d bytes allocated, want [%d, %d]", c.prealloc, b, c.minA, c.maxA)
		}
		data, _ := os.ReadFile(p)
		if !bytes.Equal(data, make([]byte, size)) {
			t.Errorf("%s: new image is not all zeros", c.prealloc)
		}
	}
	if err := createFile(t, map[string]any{"filename": p, "size": 1024, "preallocation": "metadata"}); err == nil ||
		err.Error() != "Unsupported preallocation mode: metadata" {
		t.Errorf("metadata: %v", err)
	}
	if err := createFile(t, map[string]any{"filename": p, "size": 1024, "extent-size-hint": int64(8) << 30}); err == nil ||
		err.Error() != "Extent size hint is too large" {
		t.Errorf("extent-size-hint: %v", err)
	}
	if err := createFile(t, map[string]any{"filename": p, "size": 1024, "extent-size-hint": 65536}); err != nil {
		t.Errorf("extent-size-hint: %v", err)
	}
	if err := createFile(t, map[string]any{"filename": "/nonexistent/x", "size": 1024}); err == nil ||
		err.Error() != "Could not create '/nonexistent/x': No such file or directory" || !errors.Is(err, unix.ENOENT) {
		t.Errorf("bad directory: %v", err)
	}
	if err := createFile(t, map[string]any{"filename": p, "size": 0}); err != nil {
		t.Errorf("size 0: %v", err)
	}
}

func TestLocks(t *testing.T) {
	p, data := makeFile(t, "", 65536)
	g := newGraph(t)
	a := addFile(t, g, "a", p, nil)
	b := addFile(t, g, "b", p, nil)
	const perm = permissions.ConsistentRead | permissions.Write
	const shared = permissions.ConsistentRead | permissions.WriteUnchanged | permissions.Resize
	ua, err := g.AttachUser(user("ea"), a, "root", perm, shared)
	if err != nil {
		t.Fatal(err)
	}
	_, err = g.AttachUser(user("eb"), b, "root", perm, shared)
	if err == nil || err.Error() != `Failed to get "write" lock` {
		t.Fatalf("second writer = %v", err)
	}
	var le *permissions.LockError
	if !errors.As(err, &le) {
		t.Errorf("lock error %T does not unwrap to *permissions.LockError", err)
	}

	// Creating over the image in use fails with the lock error too.
	if err := createFile(t, map[string]any{"filename": p, "size": 1024}); err == nil ||
		err.Error() != `Failed to get "write" lock` {
		t.Fatalf("create over an image in use = %v", err)
	}

	// A read-only force-share node opens, takes its user and reads.
	c := addFile(t, g, "c", p, map[string]any{"read-only": true, "force-share": true})
	if _, err := g.AttachUser(user("ec"), c, "root", permissions.ConsistentRead, permissions.All); err != nil {
		t.Fatalf("force-share reader: %v", err)
	}
	if !bytes.Equal(readAll(t, c), data) {
		t.Error("force-share reader reads wrong data")
	}

	// After the first writer leaves, the second gets in.
	g.DetachUser(ua)
	if _, err := g.AttachUser(user("eb"), b, "root", perm, shared); err != nil {
		t.Fatalf("writer after the first left: %v", err)
	}

	// locking=off takes no locks and checks none.
	d := addFile(t, g, "d", p, map[string]any{"locking": "off"})
	if _, err := g.AttachUser(user("ed"), d, "root", perm, 0); err != nil {
		t.Fatalf("locking=off: %v", err)
	}
}

// TestCloseTwice: Close is idempotent and releases the locks.
func TestCloseTwice(t *testing.T) {
	p, _ := makeFile(t, "", 4096)
	g := newGraph(t)
	n := addFile(t, g, "a", p, nil)
	if _, err := g.AttachUser(user("ea"), n, "root", permissions.ConsistentRead|permissions.Write, 0); err != nil {
		t.Fatal(err)
	}
	inst := n.Instance().(*node)
	if err := inst.Close(); err != nil {
		t.Fatal(err)
	}
	if err := inst.Close(); err != nil {
		t.Fatal(err)
	}
	g2 := newGraph(t)
	m := addFile(t, g2, "b", p, nil)
	if _, err := g2.AttachUser(user("eb"), m, "root", permissions.ConsistentRead|permissions.Write, 0); err != nil {
		t.Fatalf("locks not released by Close: %v", err)
	}
}
