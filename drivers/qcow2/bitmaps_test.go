package qcow2

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// qemuBitmaps is qemu-img info's list of bitmaps.
type qemuBitmap struct {
	Name        string   `json:"name"`
	Granularity int64    `json:"granularity"`
	Flags       []string `json:"flags"`
}

func qemuInfoBitmaps(t testing.TB, p string, extra ...string) []qemuBitmap {
	t.Helper()
	out := must(t, "qemu-img", append(append([]string{"info", "--output=json"}, extra...), p)...)
	var info struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps []qemuBitmap `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info %s: %v: %s", p, err, out)
	}
	return info.FormatSpecific.Data.Bitmaps
}

// onDiskEntries parses the bitmap directory of p.
func onDiskEntries(t testing.TB, p string) []bitmapDirEntry {
	t.Helper()
	st, h := openTestImage(t, p)
	if h.Bitmaps == nil {
		return nil
	}
	dir := make([]byte, h.Bitmaps.DirectorySize)
	if err := st.ReadAt(context.Background(), dir, int64(h.Bitmaps.DirectoryOffset)); err != nil {
		t.Fatal(err)
	}
	es, err := parseBitmapDirectory(dir, h.Bitmaps.NbBitmaps, 0)
	if err != nil {
		t.Fatal(err)
	}
	return es
}

func findBitmap(t testing.TB, n *graph.Node, name string) *graph.DirtyBitmap {
	t.Helper()
	for _, b := range n.Bitmaps() {
		if b.Name() == name {
			return b
		}
	}
	t.Fatalf("node %s has no bitmap %q", n.Name(), name)
	return nil
}

// dirtyChunks lists the dirty chunk indexes of b over size bytes.
func dirtyChunks(b *graph.DirtyBitmap, size int64) []int64 {
	var out []int64
	for off := int64(0); off < size; off += b.Granularity() {
		if b.Get(off) {
			out = append(out, off/b.Granularity())
		}
	}
	return out
}

func checkClean(t testing.TB, p string) {
	t.Helper()
	if qc := runQemuCheck(t, p); qc.Corruptions != 0 || qc.Leaks != 0 || qc.CheckErrors != 0 {
		t.Fatalf("qemu-img check %s: %+v", p, qc)
	}
}

func TestBitmapDirectoryRoundTrip(t *testing.T) {
	es := []bitmapDirEntry{
		{TableOffset: 0x30000, TableSize: 1, Flags: bmeAuto, Type: 1, GranBits: 16, Name: "b0"},
		{TableOffset: 0x40000, TableSize: 3, Flags: bmeInUse | bmeExtraDataComp, Type: 1, GranBits: 9, Name: "a longer name", Extra: []byte{1, 2, 3}},
		{Type: 7, GranBits: 31, Name: "x"},
	}
	buf := marshalBitmapDirectory(es)
	if len(buf)%8 != 0 {
		t.Fatalf("directory of %d bytes is not 8-aligned", len(buf))
	}
	got, err := parseBitmapDirectory(buf, uint32(len(es)), 0)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, es) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, es)
	}
	if _, err := parseBitmapDirectory(buf[:30], 2, 0); err == nil {
		t.Fatal("a truncated directory parsed")
	}
}

func FuzzBitmapDirectory(f *testing.F) {
	f.Add(marshalBitmapDirectory([]bitmapDirEntry{{TableOffset: 0x30000, TableSize: 1, Flags: 2, Type: 1, GranBits: 16, Name: "b0"}}), uint32(1))
	f.Add([]byte{}, uint32(3))
	f.Fuzz(func(t *testing.T, dir []byte, n uint32) {
		es, err := parseBitmapDirectory(dir, n%100, 0)
		if err != nil {
			return
		}
		again, err := parseBitmapDirectory(marshalBitmapDirectory(es), uint32(len(es)), 0)
		if err != nil || len(again) != len(es) {
			t.Fatalf("re-parse: %v", err)
		}
	})
}

// An image with bitmaps made by qemu-img, written through the driver:
// in_use while open, the enabled bitmap records exactly the written
// chunks, the disabled one keeps its clusters, and the image is clean
// after close with the bitmaps consistent.
func TestBitmapsTrackWrites(t *testing.T) {
	p := newImage(t, "", "64M")
	must(t, "qemu-img", "bitmap", "--add", p, "b0")
	must(t, "qemu-img", "bitmap", "--add", "-g", "128k", "--disable", p, "d0")

	g, n := openQcow2(t, p, false, map[string]any{"discard": "unmap"})
	for _, e := range onDiskEntries(t, p) {
		if e.Flags&bmeInUse == 0 {
			t.Fatalf("bitmap %s not in use on disk while open read-write: flags %#x", e.Name, e.Flags)
		}
	}
	if l := qemuInfoBitmaps(t, p, "-U"); len(l) != 2 || !reflect.DeepEqual(l[0].Flags, []string{"in-use", "auto"}) {
		t.Fatalf("qemu-img info -U while open: %+v", l)
	}
	ctx := context.Background()
	if err := n.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, bytes.Repeat([]byte{2}, 100<<10), 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteZeroes(ctx, 10<<20, 64<<10, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.Discard(ctx, 20<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	want := []int64{0, 16, 17, 160}
	for k := int64(320); k < 336; k++ {
		want = append(want, k)
	}
	if got := dirtyChunks(findBitmap(t, n, "b0"), 64<<20); !reflect.DeepEqual(got, want) {
		t.Fatalf("dirty chunks %v, want %v", got, want)
	}
	if got := dirtyChunks(findBitmap(t, n, "d0"), 64<<20); got != nil {
		t.Fatalf("the disabled bitmap recorded %v", got)
	}
	before := onDiskEntries(t, p)
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	checkClean(t, p)
	l := qemuInfoBitmaps(t, p)
	wantInfo := []qemuBitmap{{"b0", 65536, []string{"auto"}}, {"d0", 131072, []string{}}}
	if !reflect.DeepEqual(l, wantInfo) {
		t.Fatalf("qemu-img info after close: %+v, want %+v", l, wantInfo)
	}
	after := onDiskEntries(t, p)
	if after[1].TableOffset != before[1].TableOffset {
		t.Fatalf("the unchanged disabled bitmap moved: table %#x -> %#x", before[1].TableOffset, after[1].TableOffset)
	}

	// Read back (read-only open) what was stored.
	_, ro := openQcow2(t, p, true, nil)
	if got := dirtyChunks(findBitmap(t, ro, "b0"), 64<<20); !reflect.DeepEqual(got, want) {
		t.Fatalf("stored dirty chunks %v, want %v", got, want)
	}
}

// A read-only open neither marks nor rewrites anything.
func TestBitmapsReadOnlyOpen(t *testing.T) {
	p := newImage(t, "", "16M")
	must(t, "qemu-img", "bitmap", "--add", p, "b0")
	orig, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	g, n := openQcow2(t, p, true, nil)
	st := findBitmap(t, n, "b0").State()
	if !st.ReadOnly || !st.Enabled || st.Inconsistent {
		t.Fatalf("read-only bitmap state %+v", st)
	}
	if err := g.ClearBitmap("q", "b0"); err == nil || err.Error() != "Bitmap 'b0' is readonly and cannot be modified" {
		t.Fatalf("clear on a read-only image: %v", err)
	}
	g.Close()
	now, _ := os.ReadFile(p)
	if !bytes.Equal(orig, now) {
		t.Fatal("a read-only open changed the image")
	}
}

// A bitmap left in use (a process killed while the image was open) is
// inconsistent: kept, never used, removable.
func TestBitmapsInconsistent(t *testing.T) {
	p := newImage(t, "", "16M")
	must(t, "qemu-img", "bitmap", "--add", p, "b0")
	must(t, "qemu-img", "bitmap", "--add", p, "b1")
	g, _ := openQcow2(t, p, false, nil)
	// The state a crash leaves: copy the file while it is open.
	crashed := filepath.Join(t.TempDir(), "crashed.qcow2")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(crashed, data, 0o644); err != nil {
		t.Fatal(err)
	}
	g.Close()
	checkClean(t, crashed)

	g2, n := openQcow2(t, crashed, false, nil)
	st := findBitmap(t, n, "b0").State()
	if !st.Inconsistent || st.Enabled {
		t.Fatalf("state of a bitmap found in use: %+v", st)
	}
	infos := n.BitmapInfos()
	if len(infos) != 2 || !infos[0].Inconsistent || infos[0].Recording {
		t.Fatalf("BitmapInfos: %+v", infos)
	}
	for _, tc := range []struct {
		f    func() error
		want string
	}{
		{func() error { return g2.ClearBitmap("q", "b0") }, "Bitmap 'b0' is inconsistent and cannot be used"},
		{func() error { return g2.EnableBitmap("q", "b0", true) }, "Bitmap 'b0' is inconsistent and cannot be used"},
		{func() error { return g2.EnableBitmap("q", "b0", false) }, "Bitmap 'b0' is inconsistent and cannot be used"},
	} {
		if err := tc.f(); err == nil || err.Error() != tc.want {
			t.Fatalf("got %v, want %q", err, tc.want)
		}
	}
	if err := n.WriteAt(context.Background(), []byte{1}, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := g2.RemoveBitmap(context.Background(), "q", "b1"); err != nil {
		t.Fatal(err)
	}
	g2.Close()
	checkClean(t, crashed)
	l := qemuInfoBitmaps(t, crashed)
	if len(l) != 1 || l[0].Name != "b0" || !reflect.DeepEqual(l[0].Flags, []string{"in-use", "auto"}) {
		t.Fatalf("after close: %+v", l)
	}
}

// Bitmaps added through the graph (block-dirty-bitmap-add) are stored on
// close; a removed one frees its clusters; a resize is followed.
func TestBitmapsAddRemoveResize(t *testing.T) {
	p := newImage(t, "", "16M")
	g, n := openQcow2(t, p, false, nil)
	ctx := context.Background()
	gran := uint32(4096)
	for _, o := range []graph.BitmapAddOptions{
		{Node: "q", Name: "p1", Persistent: true},
		{Node: "q", Name: "p2", Persistent: true, Granularity: &gran, Disabled: true},
		{Node: "q", Name: "t1"},
	} {
		if err := g.AddBitmap(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.WriteAt(ctx, make([]byte, 8192), 4<<20, 0); err != nil {
		t.Fatal(err)
	}
	g.Close()
	checkClean(t, p)
	want := []qemuBitmap{{"p2", 4096, []string{}}, {"p1", 65536, []string{"auto"}}}
	if l := qemuInfoBitmaps(t, p); !reflect.DeepEqual(l, want) {
		t.Fatalf("qemu-img info: %+v, want %+v", l, want)
	}

	g, n = openQcow2(t, p, false, nil)
	if got := dirtyChunks(findBitmap(t, n, "p1"), 16<<20); !reflect.DeepEqual(got, []int64{64}) {
		t.Fatalf("p1 after reopen: %v", got)
	}
	if err := g.Resize(ctx, n, 32<<20); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte{1}, 30<<20, 0); err != nil {
		t.Fatal(err)
	}
	if err := g.RemoveBitmap(ctx, "q", "p2"); err != nil {
		t.Fatal(err)
	}
	checkCleanU := runQemuCheck(t, p, "-U")
	if checkCleanU.Corruptions != 0 {
		t.Fatalf("qemu-img check -U after remove: %+v", checkCleanU)
	}
	g.Close()
	checkClean(t, p)
	if l := qemuInfoBitmaps(t, p); len(l) != 1 || l[0].Name != "p1" {
		t.Fatalf("after remove: %+v", l)
	}
	_, ro := openQcow2(t, p, true, nil)
	if got := dirtyChunks(findBitmap(t, ro, "p1"), 32<<20); !reflect.DeepEqual(got, []int64{64, 480}) {
		t.Fatalf("p1 after resize: %v", got)
	}
}

// Version 2 images cannot store bitmaps; other formats cannot at all.
func TestBitmapsV2(t *testing.T) {
	p := newImage(t, "compat=0.10", "16M")
	g, _ := openQcow2(t, p, false, nil)
	err := g.AddBitmap(context.Background(), graph.BitmapAddOptions{Node: "q", Name: "p", Persistent: true})
	if err == nil || err.Error() != "Can't make bitmap 'p' persistent in 'q': Cannot store dirty bitmaps in qcow2 v2 files" {
		t.Fatalf("persistent bitmap on v2: %v", err)
	}
	if err := g.AddBitmap(context.Background(), graph.BitmapAddOptions{Node: "q", Name: "t"}); err != nil {
		t.Fatal(err)
	}
}

// The offline operations on an open image keep the bitmaps right: a
// snapshot leaves them stored at close; amend to version 2 drops them
// (as qemu-img amend does) and nothing is stored into the v2 image.
func TestBitmapsOfflineOps(t *testing.T) {
	ctx := context.Background()
	p := newImage(t, "", "16M")
	must(t, "qemu-img", "bitmap", "--add", p, "b0")
	g, n := openQcow2(t, p, false, nil)
	if err := n.WriteAt(ctx, []byte{1}, 0, 0); err != nil {
		t.Fatal(err)
	}
	img := n.Instance().(*image)
	if _, err := img.CreateSnapshot(ctx, graph.SnapshotInfo{Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte{1}, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	g.Close()
	checkClean(t, p)
	if l := qemuInfoBitmaps(t, p); len(l) != 1 || !reflect.DeepEqual(l[0].Flags, []string{"auto"}) {
		t.Fatalf("after a snapshot: %+v", l)
	}
	gro, ro := openQcow2(t, p, true, nil)
	if got := dirtyChunks(findBitmap(t, ro, "b0"), 16<<20); !reflect.DeepEqual(got, []int64{0, 16}) {
		t.Fatalf("dirty chunks %v", got)
	}
	gro.Close()

	g, n = openQcow2(t, p, false, nil)
	if err := n.Instance().(*image).Amend(ctx, &AmendOptions{Compat: "0.10"}, false); err != nil {
		t.Fatal(err)
	}
	g.Close()
	checkClean(t, p)
	if l := qemuInfoBitmaps(t, p); l != nil {
		t.Fatalf("bitmaps in a v2 image: %+v", l)
	}
	if _, h := openTestImage(t, p); h.Version != 2 || h.Bitmaps != nil {
		t.Fatalf("version %d, bitmaps %+v", h.Version, h.Bitmaps)
	}
}

// blockdev-reopen read-only stores the bitmaps (not in use on disk) and
// makes them read-only; back to read-write marks them in use again.
func TestBitmapsReopen(t *testing.T) {
	ctx := context.Background()
	p := newImage(t, "", "16M")
	must(t, "qemu-img", "bitmap", "--add", p, "b0")
	g, n := openQcow2(t, p, false, nil)
	if err := n.WriteAt(ctx, []byte{1}, 0, 0); err != nil {
		t.Fatal(err)
	}
	reopen := func(ro bool) {
		t.Helper()
		err := g.Reopen(ctx, []map[string]any{{"driver": "qcow2", "node-name": "q", "read-only": ro,
			"file": n.Child("file").Node().Name()}}, qapi.JSON)
		if err != nil {
			t.Fatalf("reopen read-only=%v: %v", ro, err)
		}
	}
	reopen(true)
	if l := qemuInfoBitmaps(t, p, "-U"); len(l) != 1 || !reflect.DeepEqual(l[0].Flags, []string{"auto"}) {
		t.Fatalf("after reopen read-only: %+v", l)
	}
	checkClean(t, p)
	if st := findBitmap(t, n, "b0").State(); !st.ReadOnly {
		t.Fatalf("bitmap not read-only after reopen: %+v", st)
	}
	reopen(false)
	if l := qemuInfoBitmaps(t, p, "-U"); len(l) != 1 || !reflect.DeepEqual(l[0].Flags, []string{"in-use", "auto"}) {
		t.Fatalf("after reopen read-write: %+v", l)
	}
	if err := n.WriteAt(ctx, []byte{1}, 2<<20, 0); err != nil {
		t.Fatal(err)
	}
	g.Close()
	checkClean(t, p)
	_, ro := openQcow2(t, p, true, nil)
	if got := dirtyChunks(findBitmap(t, ro, "b0"), 16<<20); !reflect.DeepEqual(got, []int64{0, 32}) {
		t.Fatalf("dirty chunks %v", got)
	}
}

// Images whose bitmap directory breaks the rules do not open, with
// QEMU's messages (qemu-img 7.2 refuses them the same way).
func TestBitmapsInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		poke func(p string, h *Header)
		want string
	}{
		{"table size", func(p string, h *Header) {
			poke32(t, p, int64(h.Bitmaps.DirectoryOffset)+8, 2)
		}, "Could not read bitmap 'b0' from image: Invalid argument"},
		{"granularity", func(p string, h *Header) {
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			f.WriteAt([]byte{40}, int64(h.Bitmaps.DirectoryOffset)+17)
			f.Close()
		}, "Bitmap 'b0' doesn't satisfy the constraints"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newImage(t, "", "16M")
			must(t, "qemu-img", "bitmap", "--add", p, "b0")
			_, h := openTestImage(t, p)
			tc.poke(p, h)
			_, errs, code := run(t, "qemu-img", "info", p)
			if code == 0 || !strings.Contains(errs, tc.want) {
				t.Fatalf("qemu-img info: exit %d: %s", code, errs)
			}
			for _, ro := range []bool{true, false} {
				g := graph.New(nil)
				_, err := g.Add(context.Background(), map[string]any{"driver": "qcow2", "node-name": "q", "read-only": ro,
					"file": map[string]any{"driver": "file", "filename": p}}, qapi.JSON)
				g.Close()
				if err == nil || err.Error() != tc.want {
					t.Fatalf("open read-only=%v: %v, want %q", ro, err, tc.want)
				}
			}
		})
	}
}

func poke32(t testing.TB, p string, off int64, v uint32) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [4]byte
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// block-dirty-bitmap-merge adds the bits of bitmaps of any granularity;
// a merged persistent bitmap is stored.
func TestBitmapsMerge(t *testing.T) {
	ctx := context.Background()
	p := newImage(t, "", "16M")
	g, n := openQcow2(t, p, false, nil)
	g4k, g128k := uint32(4096), uint32(128<<10)
	for _, o := range []graph.BitmapAddOptions{
		{Node: "q", Name: "fine", Granularity: &g4k},
		{Node: "q", Name: "coarse", Granularity: &g128k},
		{Node: "q", Name: "p", Persistent: true, Disabled: true},
	} {
		if err := g.AddBitmap(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.WriteAt(ctx, []byte{1}, 5<<20+70000, 0); err != nil {
		t.Fatal(err)
	}
	if err := g.ClearBitmap("q", "coarse"); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte{1}, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	if err := g.MergeBitmaps("q", "p", []graph.BitmapRef{{Name: "fine"}, {Node: "q", Name: "coarse"}}); err != nil {
		t.Fatal(err)
	}
	// fine: chunk 5M+64K (4K chunk) and 1M; coarse: 1M..1M+128K.
	if got := dirtyChunks(findBitmap(t, n, "p"), 16<<20); !reflect.DeepEqual(got, []int64{16, 17, 81}) {
		t.Fatalf("merged chunks %v", got)
	}
	g.Close()
	checkClean(t, p)
	_, ro := openQcow2(t, p, true, nil)
	if got := dirtyChunks(findBitmap(t, ro, "p"), 16<<20); !reflect.DeepEqual(got, []int64{16, 17, 81}) {
		t.Fatalf("stored chunks %v", got)
	}
}
