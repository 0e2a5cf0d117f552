package qcow2

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
)

// TestReadQuick checks which reads the quick path serves (zeros needing
// no I/O) and that it declines everything else, leaving it to ReadV.
func TestReadQuick(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	base := makeQemuImage(t, dir, "base.qcow2", "", "4M", "write -P 0x55 0 4M")
	p := makeQemuImage(t, dir, "a.qcow2", "", "4M",
		"write -P 0x11 0 64k", "write -z 128k 64k")
	_, n := openQcow2(t, p, false, nil)
	img := n.Instance().(*image)

	dirty := func(b []byte) []byte {
		for i := range b {
			b[i] = 0xee
		}
		return b
	}
	zeros := make([]byte, 64<<10)
	quick := func(off, length int64) bool {
		t.Helper()
		b := dirty(make([]byte, length))
		ok := n.ReadQuick(off, [][]byte{b[:length/2], b[length/2:]})
		if ok && !bytes.Equal(b, zeros[:length]) {
			t.Fatalf("ReadQuick(%d, %d) served non-zero bytes", off, length)
		}
		return ok
	}

	// The L2 table exists but is not cached after open: no I/O, so no.
	if quick(64<<10, 4096) {
		t.Fatal("ReadQuick served a read whose L2 slice is not cached")
	}
	if err := n.ReadAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		off, length int64
		want        bool
		what        string
	}{
		{0, 4096, false, "data cluster"},
		{60 << 10, 8 << 10, false, "data then unallocated"},
		{64 << 10, 4096, true, "unallocated cluster"},
		{128 << 10, 64 << 10, true, "zero cluster"},
		// Two mappings (kinds differ): left to ReadV, which is rare enough.
		{64 << 10, 128 << 10, false, "unallocated then zero cluster"},
		{4<<20 - 4096, 4096, true, "unallocated, last cluster"},
		{4<<20 - 4096, 8192, false, "past the end"},
	} {
		if got := quick(c.off, c.length); got != c.want {
			t.Errorf("%s: ReadQuick(%d, %d) = %v, want %v", c.what, c.off, c.length, got, c.want)
		}
	}

	// A lock held by another request: ReadQuick declines rather than wait.
	img.meta.Lock()
	held := quick(64<<10, 4096)
	img.meta.Unlock()
	if held {
		t.Error("ReadQuick served a read while meta was held")
	}
	img.resize.Lock()
	held = quick(64<<10, 4096)
	img.resize.Unlock()
	if held {
		t.Error("ReadQuick served a read during a resize")
	}

	// With a backing node, unallocated clusters read from it: not quick,
	// but zero clusters still are.
	over := filepath.Join(dir, "over.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, over)
	qemu(t, "qemu-io", "-f", "qcow2", "-c", "write -z 1M 64k", over)
	_, on := openQcow2(t, over, true, nil)
	if err := on.ReadAt(ctx, make([]byte, 4096), 1<<20); err != nil {
		t.Fatal(err)
	}
	if b := dirty(make([]byte, 4096)); on.ReadQuick(0, [][]byte{b}) {
		t.Error("ReadQuick served an unallocated cluster over a backing file")
	}
	if b := dirty(make([]byte, 4096)); !on.ReadQuick(1<<20, [][]byte{b}) || !bytes.Equal(b, zeros[:4096]) {
		t.Error("ReadQuick declined (or misread) a zero cluster over a backing file")
	}
}

// TestReadZerosNoAlloc checks that reading an empty image, and writing
// in place, allocate nothing on the heap.
func TestReadZerosNoAlloc(t *testing.T) {
	p := makeQemuImage(t, t.TempDir(), "a.qcow2", "", "4M", "write -P 0x11 0 64k")
	_, n := openQcow2(t, p, false, nil)
	ctx := context.Background()
	iov := [][]byte{make([]byte, 4096), make([]byte, 4096)}
	for _, c := range []struct {
		what string
		f    func() error
	}{
		{"read of zeros", func() error { return n.ReadV(ctx, 1<<20, iov) }},
		{"read of data", func() error { return n.ReadV(ctx, 0, iov) }},
		{"write in place", func() error { return n.WriteV(ctx, 4096, iov, 0) }},
		{"quick read", func() error { n.ReadQuick(2<<20, iov); return nil }},
	} {
		if err := c.f(); err != nil { // warm the caches
			t.Fatal(err)
		}
		if a := testing.AllocsPerRun(100, func() {
			if err := c.f(); err != nil {
				t.Fatal(err)
			}
		}); a != 0 {
			t.Errorf("%s: %v allocations per request, want 0", c.what, a)
		}
	}
}

// TestReadAcrossL1 reads ranges that start where no L2 table maps and
// end where one does (and the other way round): the L1-only check for
// empty ranges must not take them for zeros.
func TestReadAcrossL1(t *testing.T) {
	const span = 512 << 20 // one L1 entry with 64 KiB clusters
	p := makeQemuImage(t, t.TempDir(), "a.qcow2", "", "2G",
		"write -P 0x11 512M 4k", "write -P 0x22 1572860k 4k") // 1536M - 4k
	_, n := openQcow2(t, p, true, nil)
	ctx := context.Background()
	for _, c := range []struct {
		off int64
		pat byte
	}{{span - 4096, 0x11}, {3*span - 8192, 0x22}} {
		got := make([]byte, 3*4096)
		for i := range got {
			got[i] = 0xee
		}
		if err := n.ReadV(ctx, c.off, [][]byte{got[:5000], got[5000:]}); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, len(got))
		for i := 4096; i < 8192; i++ {
			want[i] = c.pat
		}
		if !bytes.Equal(got, want) {
			t.Errorf("read at %#x: %s", c.off, firstDiff(got, want))
		}
	}
}
