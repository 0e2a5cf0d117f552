package qcow2

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"blockbackend/graph"
)

func inst(t testing.TB, n *graph.Node) *image {
	t.Helper()
	img, ok := n.Instance().(*image)
	if !ok {
		t.Fatalf("node is %T", n.Instance())
	}
	return img
}

func TestWriteCompressed(t *testing.T) {
	dir := t.TempDir()
	for _, opts := range []map[string]any{
		{"cluster-size": 65536},
		{"cluster-size": 4096, "compression-type": "zstd"},
		{"cluster-size": 16384, "extended-l2": true},
		{"cluster-size": 512, "refcount-bits": 1},
	} {
		p := filepath.Join(dir, "c.qcow2")
		cs := int64(opts["cluster-size"].(int))
		size := 40*cs + 512
		createImage(t, p, size, opts)
		g, n := openQcow2(t, p, false, nil)
		img := inst(t, n)
		want := make([]byte, size)
		rng := rand.New(rand.NewSource(1))
		ctx := context.Background()
		for c := int64(0); c*cs < size; c++ {
			off := c * cs
			b := want[off:min(off+cs, size)]
			switch c % 3 {
			case 0:
				copy(b, bytes.Repeat([]byte("compressible "), int(cs)))
			case 1:
				rng.Read(b) // incompressible: written normally
			}
			if err := img.WriteCompressed(ctx, off, b); err != nil {
				t.Fatalf("%v cluster %d: %v", opts, c, err)
			}
		}
		// Overwrite some compressed clusters partially.
		for _, off := range []int64{3*cs + 100, 6 * cs} {
			b := []byte("overwritten")
			if err := n.WriteAt(ctx, b, off, 0); err != nil {
				t.Fatal(err)
			}
			copy(want[off:], b)
		}
		if got := readAll(t, n, 1<<20); !bytes.Equal(got, want) {
			t.Fatalf("%v: %s", opts, firstDiff(got, want))
		}
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		qemuCheck(t, p)
		out := qemu(t, "qemu-img", "check", p)
		if !strings.Contains(out, "compressed clusters") || strings.Contains(out, " 0.00% compressed") {
			t.Errorf("%v: no compressed clusters: %s", opts, out)
		}
		if got := qemuRaw(t, p); !bytes.Equal(got, want) {
			t.Fatalf("%v: qemu-img convert: %s", opts, firstDiff(got, want))
		}
	}
}

func TestTruncate(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	for _, opts := range []map[string]any{{"cluster-size": 4096}, {"cluster-size": 512}, {"cluster-size": 16384, "extended-l2": true}} {
		p := filepath.Join(dir, "t.qcow2")
		createImage(t, p, 1<<20, opts)
		g, n := openQcow2(t, p, false, nil)
		data := bytes.Repeat([]byte{0x5a}, 1<<20)
		if err := n.WriteAt(ctx, data, 0, 0); err != nil {
			t.Fatal(err)
		}
		// Grow far enough to need a larger L1 table.
		if err := n.Truncate(ctx, 64<<20, true, "off"); err != nil {
			t.Fatal(err)
		}
		if err := n.WriteAt(ctx, data[:4096], 60<<20, 0); err != nil {
			t.Fatal(err)
		}
		// Shrink to a size that cuts a cluster, then grow again: the cut
		// part must read zeros.
		if err := n.Truncate(ctx, 1000*512, true, "off"); err != nil {
			t.Fatal(err)
		}
		if err := n.Truncate(ctx, 2<<20, true, "off"); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, 2<<20)
		copy(want, data[:1000*512])
		if got := readAll(t, n, 1<<20); !bytes.Equal(got, want) {
			t.Fatalf("%v: %s", opts, firstDiff(got, want))
		}
		if err := n.Truncate(ctx, 1001, true, "off"); err == nil || !strings.Contains(err.Error(), "multiple of 512") {
			t.Errorf("odd size: %v", err)
		}
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		qemuCheck(t, p)
		if got := qemuRaw(t, p); !bytes.Equal(got, want) {
			t.Fatalf("%v: qemu-img: %s", opts, firstDiff(got, want))
		}
	}
	// Growing over a longer backing file: the new part reads zeros.
	base := makeQemuImage(t, dir, "base.qcow2", "", "4M", "write -P 0x77 0 4M")
	top := filepath.Join(dir, "top.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "1M")
	g, n := openQcow2(t, top, false, nil)
	if err := n.Truncate(ctx, 3<<20, true, "off"); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, n, 1<<20)
	if got[0] != 0x77 || got[1<<20] != 0 || got[3<<20-1] != 0 {
		t.Fatalf("grow over backing: %#x %#x %#x", got[0], got[1<<20], got[3<<20-1])
	}
	g.Close()
	qemuCheck(t, top)
}

func TestPreallocation(t *testing.T) {
	dir := t.TempDir()
	for _, mode := range []string{"metadata", "falloc", "full"} {
		p := filepath.Join(dir, mode+".qcow2")
		createImage(t, p, 3<<20, map[string]any{"cluster-size": 65536, "preallocation": mode})
		qemuCheck(t, p)
		out := qemu(t, "qemu-img", "map", "--output=json", p)
		if strings.Contains(out, `"data": false`) {
			t.Errorf("%s: unallocated ranges left: %s", mode, out)
		}
		if got := qemuRaw(t, p); !bytes.Equal(got, make([]byte, 3<<20)) {
			t.Errorf("%s: not zeros", mode)
		}
	}
}

func TestLazyRefcountsDirtyBit(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "l.qcow2")
	createImage(t, p, 1<<20, map[string]any{"cluster-size": 4096, "lazy-refcounts": true})
	flags := func() uint64 {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return binary.BigEndian.Uint64(b[72:])
	}
	g, n := openQcow2(t, p, false, nil)
	if flags()&IncompatDirty != 0 {
		t.Fatal("dirty before the first write")
	}
	if err := n.WriteAt(context.Background(), []byte("x"), 0, 0); err != nil {
		t.Fatal(err)
	}
	if flags()&IncompatDirty == 0 {
		t.Fatal("dirty bit not set by the first write")
	}
	// A crash now (the file as it is) leaves a dirty image: writable opens
	// are refused until the repair is available; read-only opens work.
	crashed := filepath.Join(dir, "crashed.qcow2")
	b, _ := os.ReadFile(p)
	os.WriteFile(crashed, b, 0o644)
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if flags()&IncompatDirty != 0 {
		t.Fatal("dirty bit still set after a clean close")
	}
	qemuCheck(t, p)
	gro, _ := openQcow2(t, crashed, true, nil)
	gro.Close()
	if DirtyRepair == nil {
		g2 := graph.New(nil)
		defer g2.Close()
		_, err := g2.Add(context.Background(), map[string]any{"driver": "qcow2", "node-name": "q",
			"file": map[string]any{"driver": "file", "filename": crashed}}, 0)
		if err == nil || !strings.Contains(err.Error(), "Could not repair dirty image") {
			t.Fatalf("dirty image opened writable: %v", err)
		}
	}
}

func TestCorruptBit(t *testing.T) {
	dir := t.TempDir()
	p := makeQemuImage(t, dir, "c.qcow2", "cluster_size=4096", "1M", "write -P 1 0 4k")
	// Point the first L2 entry at an unaligned offset.
	b, _ := os.ReadFile(p)
	h, err := ParseHeader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	l2 := int64(binary.BigEndian.Uint64(b[h.L1TableOffset:]) & OffsetMask)
	binary.BigEndian.PutUint64(b[l2:], FlagCopied|0x10200)
	os.WriteFile(p, b, 0o644)
	g, n := openQcow2(t, p, false, nil)
	buf := make([]byte, 512)
	if err := n.ReadAt(context.Background(), buf, 0); err == nil {
		t.Fatal("read of a corrupt mapping succeeded")
	}
	if err := n.WriteAt(context.Background(), buf, 8192, 0); err == nil {
		t.Fatal("write to an image marked corrupt succeeded")
	}
	g.Close()
	out := qemu(t, "qemu-img", "info", p)
	if !strings.Contains(out, "corrupt: true") {
		t.Fatalf("corrupt bit not set:\n%s", out)
	}
	g2 := graph.New(nil)
	defer g2.Close()
	_, err = g2.Add(context.Background(), map[string]any{"driver": "qcow2", "node-name": "q",
		"file": map[string]any{"driver": "file", "filename": p}}, 0)
	if err == nil || err.Error() != "qcow2: Image is corrupt; cannot be opened read/write" {
		t.Fatalf("writable open of a corrupt image: %v", err)
	}
	openQcow2(t, p, true, nil)
}

func TestInfoAndStatus(t *testing.T) {
	dir := t.TempDir()
	p := makeQemuImage(t, dir, "i.qcow2", "cluster_size=65536,lazy_refcounts=on,refcount_bits=8,compression_type=zstd", "4M",
		"write -P 1 0 64k", "write -z 128k 64k")
	_, n := openQcow2(t, p, true, nil)
	info := inst(t, n).Info()
	d := info["data"].(map[string]any)
	if info["type"] != "qcow2" || d["compat"] != "1.1" || d["lazy-refcounts"] != true || d["refcount-bits"] != 8 ||
		d["compression-type"] != "zstd" || d["corrupt"] != false || d["extended-l2"] != false {
		t.Fatalf("info: %v", info)
	}
	ctx := context.Background()
	ext, err := n.BlockStatus(ctx, 0, 4<<20)
	if err != nil || ext.Status != graph.StatusData|graph.StatusAllocated || ext.Length != 64<<10 || ext.Offset == 0 {
		t.Fatalf("data: %+v %v", ext, err)
	}
	ext, err = n.BlockStatus(ctx, 64<<10, 4<<20-64<<10)
	if err != nil || ext.Status != graph.StatusZero || ext.Length != 64<<10 {
		t.Fatalf("unallocated: %+v %v", ext, err)
	}
	ext, err = n.BlockStatus(ctx, 128<<10, 64<<10)
	if err != nil || ext.Status != graph.StatusZero|graph.StatusAllocated {
		t.Fatalf("zero: %+v %v", ext, err)
	}
}

func TestReopen(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "r.qcow2")
	createImage(t, p, 1<<20, map[string]any{"cluster-size": 4096, "lazy-refcounts": true})
	g, n := openQcow2(t, p, false, nil)
	ctx := context.Background()
	if err := n.WriteAt(ctx, []byte("data"), 0, 0); err != nil {
		t.Fatal(err)
	}
	// Read-only: everything written back, the dirty bit cleared.
	if err := g.Reopen(ctx, []map[string]any{{"driver": "qcow2", "node-name": "q", "read-only": true,
		"file": n.Child("file").Node().Name(), "l2-cache-size": 8192}}, 0); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if binary.BigEndian.Uint64(b[72:])&IncompatDirty != 0 {
		t.Fatal("dirty bit set after reopening read-only")
	}
	if err := g.Reopen(ctx, []map[string]any{{"driver": "qcow2", "node-name": "q", "read-only": false,
		"file": n.Child("file").Node().Name()}}, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte("more"), 8192, 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if err := n.ReadAt(ctx, buf, 8192); err != nil || string(buf) != "more" {
		t.Fatalf("after WithMetadata: %q %v", buf, err)
	}
	g.Close()
	qemuCheck(t, p)
}

func TestOverlapMarksCorrupt(t *testing.T) {
	dir := t.TempDir()
	p := makeQemuImage(t, dir, "o.qcow2", "cluster_size=4096", "1M", "write -P 1 0 4k")
	b := mustRead(t, p)
	h, _ := ParseHeader(bytes.NewReader(b), int64(len(b)))
	l2 := int64(binary.BigEndian.Uint64(b[h.L1TableOffset:]) & OffsetMask)
	// Guest cluster 0 now maps onto the refcount table.
	binary.BigEndian.PutUint64(b[l2:], FlagCopied|h.RefcountTableOffset)
	os.WriteFile(p, b, 0o644)
	g, n := openQcow2(t, p, false, nil)
	err := n.WriteAt(context.Background(), []byte("boom"), 0, 0)
	if err == nil || !strings.Contains(err.Error(), "overlaps with refcount table") {
		t.Fatalf("write over the refcount table: %v", err)
	}
	g.Close()
	if after := mustRead(t, p); !bytes.Equal(after[h.RefcountTableOffset:h.RefcountTableOffset+8], b[h.RefcountTableOffset:h.RefcountTableOffset+8]) {
		t.Fatal("refcount table overwritten")
	}
	if !strings.Contains(qemu(t, "qemu-img", "info", p), "corrupt: true") {
		t.Fatal("not marked corrupt")
	}
}

func TestAutoclearBitmaps(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "bm.qcow2")
	if err := os.WriteFile(p, mustRead(t, "testdata/bm.qcow2"), 0o644); err != nil {
		t.Fatal(err)
	}
	g, n := openQcow2(t, p, false, nil)
	if err := n.WriteAt(context.Background(), []byte("x"), 0, 0); err != nil {
		t.Fatal(err)
	}
	g.Close()
	b := mustRead(t, p)
	h, err := ParseHeader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	// The bitmaps are maintained (bitmaps.go): the bit stays, the
	// bitmap is stored consistent and records the write, and qemu-img
	// check finds nothing.
	if h.AutoclearFeatures&AutoclearBitmaps == 0 || h.Bitmaps == nil {
		t.Fatalf("autoclear %#x, bitmaps %+v", h.AutoclearFeatures, h.Bitmaps)
	}
	checkClean(t, p)
	if l := qemuInfoBitmaps(t, p); len(l) != 1 || l[0].Name != "b0" || !reflect.DeepEqual(l[0].Flags, []string{"auto"}) {
		t.Fatalf("qemu-img info: %+v", l)
	}
	_, ro := openQcow2(t, p, true, nil)
	if !findBitmap(t, ro, "b0").Get(0) {
		t.Fatal("the write is not in the stored bitmap")
	}
}

// Preallocation with a backing file (extended L2 only): the backing file
// still shows through the reserved clusters.
func TestPreallocationOverBacking(t *testing.T) {
	dir := t.TempDir()
	base := makeQemuImage(t, dir, "base.qcow2", "", "2M", "write -P 0x5c 0 2M")
	p := filepath.Join(dir, "top.qcow2")
	createImage(t, p, 2<<20, map[string]any{"cluster-size": 65536, "extended-l2": true, "preallocation": "metadata",
		"backing-file": base, "backing-fmt": "qcow2"})
	qemuCheck(t, p)
	g, n := openQcow2(t, p, false, nil)
	if err := n.WriteAt(context.Background(), []byte("top"), 100000, 0); err != nil {
		t.Fatal(err)
	}
	g.Close()
	qemuCheck(t, p)
	want := bytes.Repeat([]byte{0x5c}, 2<<20)
	copy(want[100000:], "top")
	if got := qemuRaw(t, p); !bytes.Equal(got, want) {
		t.Fatalf("%s", firstDiff(got, want))
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
}

// TestWriteCompressedPacking writes clusters that compress to about 60%
// of their size, base64 text among them (few repeats: only Huffman coding
// shrinks it): the compressed data must pack across host cluster
// boundaries, as QEMU's does, rather than leave the rest of a cluster
// empty whenever the next one does not fit.
func TestWriteCompressedPacking(t *testing.T) {
	for _, ct := range []string{"zlib", "zstd"} {
		t.Run(ct, func(t *testing.T) { testCompressedPacking(t, ct) })
	}
}

func testCompressedPacking(t *testing.T, ct string) {
	dir := t.TempDir()
	p := filepath.Join(dir, "p.qcow2")
	const cs, clusters = 65536, 64
	createImage(t, p, cs*clusters, map[string]any{"cluster-size": cs, "compression-type": ct})
	g, n := openQcow2(t, p, false, nil)
	img := inst(t, n)
	ctx := context.Background()
	rng := rand.New(rand.NewSource(7))
	want := make([]byte, cs*clusters)
	var total int
	for c := 0; c < clusters; c++ {
		b := want[c*cs : (c+1)*cs]
		if c%2 == 0 {
			raw := make([]byte, cs*3/4)
			rng.Read(raw)
			base64.StdEncoding.Encode(b, raw)
		} else {
			rng.Read(b[:cs/2]) // half random, half zeros
		}
		comp, err := img.compress(b)
		if err != nil || comp == nil {
			t.Fatalf("cluster %d does not compress: %v", c, err)
		}
		total += len(comp)
		if err := img.WriteCompressed(ctx, int64(c*cs), b); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	// Header, L1, refcount table and block, one L2 table: 5 clusters of
	// metadata, and at most one partly used data cluster.
	if limit := int64(total) + 6*cs; st.Size() > limit {
		t.Errorf("image is %d bytes for %d bytes of compressed data (limit %d): clusters are not packed", st.Size(), total, limit)
	}
	qemuCheck(t, p)
	if got := qemuRaw(t, p); !bytes.Equal(got, want) {
		t.Fatalf("qemu-img convert: %s", firstDiff(got, want))
	}
}
