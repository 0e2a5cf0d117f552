package file

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
	"blockbackend/permissions"
)

// directDir returns a directory on a file system that takes O_DIRECT, or
// skips the test.
func directDir(t *testing.T) string {
	t.Helper()
	for _, base := range []string{"", "/var/tmp"} {
		var dir string
		if base == "" {
			dir = t.TempDir()
		} else {
			d, err := os.MkdirTemp(base, "file-direct-")
			if err != nil {
				continue
			}
			t.Cleanup(func() { os.RemoveAll(d) })
			dir = d
		}
		p := filepath.Join(dir, "probe")
		if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
			continue
		}
		fd, err := unix.Open(p, unix.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			continue
		}
		unix.Close(fd)
		return dir
	}
	t.Skip("no file system here accepts O_DIRECT (tmpfs?): skipping cache.direct tests")
	return ""
}

func TestDirectUnaligned(t *testing.T) {
	t.Run("probed", func(t *testing.T) { testDirectUnaligned(t, false) })
	t.Run("4K", func(t *testing.T) { testDirectUnaligned(t, true) })
}

func testDirectUnaligned(t *testing.T, forced4K bool) {
	dir := directDir(t)
	g := newGraph(t)
	const size = 1<<20 + 1000 // not a multiple of any alignment
	p, want := makeFile(t, dir, size)
	n := addFile(t, g, "f", p, map[string]any{"cache": map[string]any{"direct": true}, "aio": "native"})
	inst := n.Instance().(*node)
	if !inst.direct || inst.align < 2 {
		t.Fatalf("direct=%v align=%d", inst.direct, inst.align)
	}
	t.Logf("O_DIRECT alignment: request %d, memory %d", inst.align, inst.memAlign)
	if forced4K {
		// Pretend the device has 4 KiB sectors: more of the bounce path.
		inst.align, inst.memAlign = 4096, 4096
		inst.bounce = newBouncePool(4096, 4096)
	}
	r := rand.New(rand.NewPCG(3, 3))
	backing := make([]byte, 3<<20)
	for round := 0; round < 120; round++ {
		off := r.Int64N(size)
		length := r.Int64N(min(size-off, 1<<20+5000)) + 1
		if round%10 == 0 {
			off = size - length // the unaligned tail
		}
		// A buffer at an odd address.
		shift := r.IntN(4096)
		src := backing[shift : shift+int(length)]
		seed := byte(r.Uint32())
		for i := range src {
			src[i] = byte(i*7) + seed
		}
		if err := n.WriteV(ctx, off, split(r, src, 50), graph.WriteFlags(round%3&1)); err != nil {
			t.Fatalf("round %d: write [%d,+%d): %v", round, off, length, err)
		}
		copy(want[off:], src)
		got := make([]byte, length+1)[1:]
		if err := n.ReadV(ctx, off, split(r, got, 50)); err != nil {
			t.Fatalf("round %d: read: %v", round, err)
		}
		if !bytes.Equal(got, src) {
			t.Fatalf("round %d: read back [%d,+%d) differs", round, off, length)
		}
	}
	fi, _ := os.Stat(p)
	if fi.Size() != size {
		t.Fatalf("file size changed to %d", fi.Size())
	}
	if !bytes.Equal(readAll(t, n), want) {
		t.Fatal("whole image differs")
	}
	// Aligned I/O goes straight through.
	buf := alignedSlice(make([]byte, 8192+4096), 4096, 8192)
	if err := n.ReadV(ctx, 4096, [][]byte{buf}); err != nil || !bytes.Equal(buf, want[4096:12288]) {
		t.Fatalf("aligned read: %v", err)
	}
	// Write-zeroes under O_DIRECT.
	if err := n.WriteZeroes(ctx, 1000, 5000, 0); err != nil {
		t.Fatal(err)
	}
	copy(want[1000:], make([]byte, 5000))
	if !bytes.Equal(readAll(t, n), want) {
		t.Fatal("image differs after write-zeroes")
	}
}

// TestDirectConcurrentUnaligned: goroutines write small unaligned pieces
// that share blocks; with read-modify-write serialised, nothing is lost.
func TestDirectConcurrentUnaligned(t *testing.T) {
	dir := directDir(t)
	g := newGraph(t)
	const size = 256 << 10
	p := filepath.Join(dir, "img")
	if err := os.WriteFile(p, make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
	n := addFile(t, g, "f", p, map[string]any{"cache": map[string]any{"direct": true}})
	const piece = 100
	const workers = 8
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			b := bytes.Repeat([]byte{byte(w + 1)}, piece)
			// Worker w owns pieces w, w+workers, ...: neighbours share
			// blocks with other workers.
			for i := w; i*piece+piece <= size; i += workers {
				// Every fourth piece goes through an aligned-looking
				// path too, by writing a block-sized aligned chunk
				// elsewhere in a region nobody else uses.
				if err := n.WriteV(ctx, int64(i*piece), [][]byte{b}, 0); err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := readAll(t, n)
	for i := 0; i*piece+piece <= size; i++ {
		w := i % workers
		if !bytes.Equal(got[i*piece:i*piece+piece], bytes.Repeat([]byte{byte(w + 1)}, piece)) {
			t.Fatalf("piece %d (worker %d) lost", i, w)
		}
	}
}

// TestDirectMixed: aligned whole-block writes and unaligned writes race on
// the same blocks. Both write the same first 10 bytes, so whatever the
// order every block must end up as the aligned block; a read-modify-write
// that is not serialised against the aligned write would put back the old
// rest of the block.
func TestDirectMixed(t *testing.T) {
	dir := directDir(t)
	g := newGraph(t)
	p := filepath.Join(dir, "img")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	n := addFile(t, g, "f", p, map[string]any{"cache": map[string]any{"direct": true}})
	inst := n.Instance().(*node)
	a := inst.align
	blocks := int64(1<<20) / a
	blk := alignedSlice(make([]byte, 2*a+4096), 4096, int(a))
	copy(blk, bytes.Repeat([]byte{7}, int(a)))
	copy(blk, "0123456789")
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := int64(0); i < blocks; i++ {
			if err := n.WriteV(ctx, i*a, [][]byte{[]byte("0123456789")}, 0); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := int64(0); i < blocks; i++ {
			if err := n.WriteV(ctx, i*a, [][]byte{blk}, 0); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	wg.Wait()
	got := readAll(t, n)
	for i := int64(0); i < blocks; i++ {
		if !bytes.Equal(got[i*a:(i+1)*a], blk) {
			t.Fatalf("block %d: an update was lost", i)
		}
	}
}

func TestTrackerOrder(t *testing.T) {
	var tr rangeTracker
	a := tr.acquire(0, 4096, false)
	b := tr.acquire(4096, 8192, false) // disjoint: no wait
	done := make(chan struct{})
	go func() {
		r := tr.acquire(0, 8192, true) // must wait for a and b
		tr.release(r)
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("serialising request did not wait")
	default:
	}
	tr.release(a)
	tr.release(b)
	<-done
}

// TestQemuImgMap compares BlockStatus with qemu-img's map of the same
// sparse file.
func TestQemuImgMap(t *testing.T) {
	qimg, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
	p := sparseFile(t)
	out, err := exec.Command(qimg, "map", "--output=json", "-f", "raw", p).Output()
	if err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	var qm []struct {
		Start   int64 `json:"start"`
		Length  int64 `json:"length"`
		Present bool  `json:"present"`
		Zero    bool  `json:"zero"`
		Data    bool  `json:"data"`
		Offset  *int64
	}
	if err := json.Unmarshal(out, &qm); err != nil {
		t.Fatalf("qemu-img map output %q: %v", out, err)
	}
	var want []extent
	for _, e := range qm {
		if !e.Present {
			t.Fatalf("qemu-img reports an absent extent: %+v", e)
		}
		want = append(want, extent{e.Start, e.Length, e.Data, e.Zero})
	}
	g := newGraph(t)
	n := addFile(t, g, "f", p, map[string]any{"read-only": true})
	if got := mapNode(t, n); !equalExtents(got, want) {
		t.Errorf("our map %v\nqemu-img %v", got, want)
	}
}

// TestQemuImgCreateCompat: an image we create looks to qemu-img like one
// it creates (size, allocation map).
func TestQemuImgCreateCompat(t *testing.T) {
	qimg, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
	dir := t.TempDir()
	ours, theirs := filepath.Join(dir, "ours"), filepath.Join(dir, "theirs")
	if err := createFile(t, map[string]any{"filename": ours, "size": 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qimg, "create", "-f", "raw", theirs, "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	m := func(p string) string {
		out, err := exec.Command(qimg, "map", "--output=json", "-f", "raw", p).Output()
		if err != nil {
			t.Fatal(err)
		}
		return string(out)
	}
	if a, b := m(ours), m(theirs); a != b {
		t.Errorf("map of our image:\n%s\nof qemu-img's:\n%s", a, b)
	}
	if a, b := blocks(t, ours), blocks(t, theirs); a != b {
		t.Errorf("allocated bytes: ours %d, qemu-img's %d", a, b)
	}
}

// TestQemuLockInterop: qemu-io sees our write lock, and we see its.
func TestQemuLockInterop(t *testing.T) {
	qio, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("qemu-io not installed (apt-get install qemu-utils)")
	}
	p, _ := makeFile(t, "", 1<<20)
	g := newGraph(t)
	n := addFile(t, g, "a", p, nil)
	const perm = permissions.ConsistentRead | permissions.Write
	const shared = permissions.ConsistentRead | permissions.WriteUnchanged | permissions.Resize
	u, err := g.AttachUser(user("ea"), n, "root", perm, shared)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(qio, "-f", "raw", "-c", "write 0 512", p).CombinedOutput()
	if err == nil || !bytes.Contains(out, []byte(`Failed to get "write" lock`)) {
		t.Errorf("qemu-io write on an image we hold for writing: %v: %s", err, out)
	}
	if out, err := exec.Command(qio, "-r", "-U", "-f", "raw", "-c", "read 0 512", p).CombinedOutput(); err != nil {
		t.Errorf("qemu-io -r -U: %v: %s", err, out)
	}
	g.DetachUser(u)

	// qemu-io holding the image writable (sharing everything): our user
	// that does not share write must fail.
	cmd := exec.Command(qio, "-f", "raw", p)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var qout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qout, &qout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		_ = cmd.Wait()
	}()
	var lerr error
	for i := 0; i < 100; i++ {
		var c *graph.Child
		if c, lerr = g.AttachUser(user("ea"), n, "root", perm, shared); lerr != nil {
			break
		}
		g.DetachUser(c)
		time.Sleep(50 * time.Millisecond)
	}
	if lerr == nil || lerr.Error() != `Failed to get shared "write" lock` {
		t.Errorf("our writer while qemu-io holds the image: %v (qemu-io said %q)", lerr, qout.String())
	}
}

// TestProbeByReads checks the fallback used where statx has no
// STATX_DIOALIGN: the answer must be an alignment the kernel takes.
func TestProbeByReads(t *testing.T) {
	dir := directDir(t)
	p, data := makeFile(t, dir, 65536)
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	align, mem := probeByReads(fd)
	t.Logf("probed alignment: request %d, memory %d", align, mem)
	if align < 512 || align > 4096 || mem < 512 || mem > 4096 {
		t.Fatalf("probe gave %d/%d", align, mem)
	}
	raw := make([]byte, 3*4096)
	buf := raw[alignOffset(raw, 4096)+int(mem%4096):][:align]
	if _, err := unix.Pread(fd, buf, align); err != nil || !bytes.Equal(buf, data[align:2*align]) {
		t.Fatalf("read at the probed alignment: %v", err)
	}
	// An empty file cannot answer: the probe falls back to 4096.
	e := filepath.Join(dir, "empty")
	if err := os.WriteFile(e, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	efd, err := unix.Open(e, unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if a, m := probeByReads(efd); a != 4096 || m != 4096 {
		t.Errorf("empty file: %d/%d, want 4096/4096", a, m)
	}
	if sanitizeAlign(0) != 1 || sanitizeAlign(3) != 4096 || sanitizeAlign(1<<20) != 4096 || sanitizeAlign(512) != 512 {
		t.Error("sanitizeAlign")
	}
}
