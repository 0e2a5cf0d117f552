package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func readTestImage(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func parseBytes(b []byte) (*Header, error) {
	return ParseHeader(bytes.NewReader(b), int64(len(b)))
}

// The images in testdata were made by qemu-img 7.2 (see the names).
func TestParseHeaderQemuImages(t *testing.T) {
	for _, tc := range []struct {
		file  string
		check func(*testing.T, *Header)
	}{
		{"v2.qcow2", func(t *testing.T, h *Header) {
			if h.Version != 2 || h.RefcountOrder != 4 || h.HeaderLength != 72 || h.ClusterBits != 12 {
				t.Errorf("v2: %+v", h)
			}
		}},
		{"v3.qcow2", func(t *testing.T, h *Header) {
			if h.Version != 3 || h.HeaderLength != 112 || h.Size != 1<<20 || len(h.FeatureNames) != 0 {
				t.Errorf("v3: %+v", h)
			}
		}},
		{"lazy-rc1.qcow2", func(t *testing.T, h *Header) {
			if h.CompatibleFeatures != CompatLazyRefcounts || h.RefcountOrder != 0 {
				t.Errorf("lazy: %+v", h)
			}
		}},
		{"extl2-zstd.qcow2", func(t *testing.T, h *Header) {
			if !h.ExtendedL2() || h.CompressionType != CompressionZstd || h.RefcountOrder != 6 ||
				h.IncompatibleFeatures != IncompatExtendedL2|IncompatCompression ||
				!reflect.DeepEqual(h.FeatureNames, DefaultFeatureNames) {
				t.Errorf("extl2: %+v", h)
			}
		}},
		{"backing.qcow2", func(t *testing.T, h *Header) {
			if h.BackingFile != "v3.qcow2" || h.BackingFormat != "qcow2" {
				t.Errorf("backing: %q %q", h.BackingFile, h.BackingFormat)
			}
		}},
		{"datafile.qcow2", func(t *testing.T, h *Header) {
			if !h.ExternalData() || !h.DataFileRaw() || h.DataFile != "datafile.raw" {
				t.Errorf("datafile: %+v", h)
			}
		}},
		{"bm.qcow2", func(t *testing.T, h *Header) {
			if h.Bitmaps == nil || h.Bitmaps.NbBitmaps != 1 || h.AutoclearFeatures&AutoclearBitmaps == 0 {
				t.Errorf("bitmaps: %+v", h.Bitmaps)
			}
		}},
		{"snap.qcow2", func(t *testing.T, h *Header) {
			if h.NbSnapshots != 1 {
				t.Errorf("snap: %+v", h)
			}
		}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			b := readTestImage(t, tc.file)
			h, err := parseBytes(b)
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, h)
			// Marshal reproduces QEMU's first cluster byte for byte up to
			// the end of what it encodes.
			enc := h.Marshal()
			if !bytes.Equal(enc, b[:len(enc)]) {
				t.Errorf("Marshal differs from qemu-img's header:\n%x\n%x", enc, b[:len(enc)])
			}
			img := append([]byte(nil), b...)
			copy(img, enc)
			h2, err := parseBytes(img)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(h, h2) {
				t.Errorf("round trip:\n%+v\n%+v", h, h2)
			}
		})
	}
}

func TestParseHeaderErrors(t *testing.T) {
	base := readTestImage(t, "v3.qcow2")
	type patch struct {
		off int
		val any
	}
	for _, tc := range []struct {
		patches []patch
		want    string
	}{
		{[]patch{{0, uint32(0x12345678)}}, "Image is not in qcow2 format"},
		{[]patch{{4, uint32(4)}}, "Unsupported qcow2 version 4"},
		{[]patch{{20, uint32(8)}}, "Unsupported cluster size: 2^8"},
		{[]patch{{20, uint32(22)}}, "Unsupported cluster size: 2^22"},
		{[]patch{{32, uint32(3)}}, "Unsupported encryption method 3"},
		{[]patch{{36, uint32(0x7fffffff)}}, "Active L1 table too large"},
		{[]patch{{36, uint32(0)}}, "L1 table is too small"},
		{[]patch{{40, uint64(0x12345)}}, "Active L1 table offset invalid"},
		{[]patch{{48, uint64(0x12345)}}, "Reference count table offset invalid"},
		{[]patch{{56, uint32(0xffffff)}}, "Reference count table too large"},
		{[]patch{{60, uint32(70000)}}, "Snapshot table too large"},
		{[]patch{{60, uint32(1)}, {64, uint64(0x123)}}, "Snapshot table offset invalid"},
		{[]patch{{72, uint64(1 << 10)}}, "Unsupported qcow2 feature(s): Unknown incompatible feature: 400"},
		{[]patch{{96, uint32(7)}}, "Reference count entry width too large; may not exceed 64 bits"},
		{[]patch{{100, uint32(100)}}, "qcow2 header too short"},
		{[]patch{{100, uint32(70000)}}, "qcow2 header exceeds cluster size"},
		{[]patch{{8, uint64(0x100000)}}, "Invalid backing file offset"},
		{[]patch{{8, uint64(1000)}, {16, uint32(2000)}}, "Backing file name too long"},
		{[]patch{{24, uint64(1 << 62)}}, "Image is too big"},
		{[]patch{{104, uint8(5)}, {72, uint64(1 << 3)}}, "qcow2: unknown compression type: 5"},
		{[]patch{{72, uint64(1 << 3)}}, "qcow2: Compression type incompatible feature bit must not be set"},
		{[]patch{{72, uint64(1 << 4)}}, "Unsupported subcluster size: 128"},
		{[]patch{{112, uint32(0xe2792aca)}, {116, uint32(100000)}}, "Header extension too large"},
	} {
		img := append([]byte(nil), base...)
		for _, p := range tc.patches {
			var w bytes.Buffer
			binary.Write(&w, binary.BigEndian, p.val)
			copy(img[p.off:], w.Bytes())
		}
		_, err := parseBytes(img)
		var fe *FormatError
		if !errors.As(err, &fe) || fe.Msg != tc.want {
			t.Errorf("%v: got %v, want %q", tc.patches, err, tc.want)
		}
	}
	// Truncated files never read outside.
	for n := 0; n < len(base); n += 7 {
		if _, err := parseBytes(base[:n]); err == nil && n < 12288 {
			t.Errorf("truncated to %d bytes: no error", n)
		}
	}
}

func TestRefcountWidths(t *testing.T) {
	for order := uint32(0); order <= 6; order++ {
		g := Geometry{ClusterBits: 9, RefcountOrder: order}
		block := make([]byte, 512)
		n := g.RefcountBlockEntries()
		max := g.MaxRefcount()
		for i := int64(0); i < n; i++ {
			if err := SetRefcount(block, order, i, uint64(i*7919)&max); err != nil {
				t.Fatal(err)
			}
		}
		for i := int64(0); i < n; i++ {
			if got := GetRefcount(block, order, i); got != uint64(i*7919)&max {
				t.Fatalf("order %d entry %d: %d", order, i, got)
			}
		}
		if order < 6 {
			if err := SetRefcount(block, order, 0, max+1); !errors.Is(err, ErrRefcountOverflow) {
				t.Errorf("order %d: overflow not detected", order)
			}
		}
	}
	// Sub-byte widths: bit 0 is the least significant bit.
	b := make([]byte, 1)
	SetRefcount(b, 0, 0, 1)
	SetRefcount(b, 0, 3, 1)
	if b[0] != 0x09 {
		t.Errorf("1-bit layout: %#x", b[0])
	}
}

func TestCompressedDescriptor(t *testing.T) {
	for cb := uint32(9); cb <= 21; cb++ {
		g := Geometry{ClusterBits: cb}
		for _, tc := range []struct{ off, n int64 }{{0x1000, 1}, {0x12345, min(1000, g.ClusterSize())}, {0x200, g.ClusterSize()}, {0x1ff, 2}} {
			e, err := g.MakeCompressed(tc.off, tc.n)
			if err != nil {
				t.Fatal(err)
			}
			if e.Type(false, false) != ClusterCompressed {
				t.Fatal("not compressed")
			}
			off, n := g.CompressedSpan(e)
			if off != tc.off || n < tc.n || n-tc.n >= 512 {
				t.Errorf("cb %d: %#x+%d -> %#x+%d", cb, tc.off, tc.n, off, n)
			}
		}
	}
}

func TestL2Types(t *testing.T) {
	g := Geometry{ClusterBits: 16}
	tab := make([]byte, 64)
	g.SetL2(tab, 1, L2Entry{Entry: MakeStandard(0x30000, FlagCopied)})
	g.SetL2(tab, 2, L2Entry{Entry: FlagZero})
	g.SetL2(tab, 3, L2Entry{Entry: MakeStandard(0x40000, FlagZero)})
	want := []ClusterType{ClusterUnallocated, ClusterNormal, ClusterZeroPlain, ClusterZeroAlloc}
	for i, w := range want {
		if got := g.GetL2(tab, i).Type(false, false); got != w {
			t.Errorf("entry %d: %v, want %v", i, got, w)
		}
	}
	x := Geometry{ClusterBits: 16, ExtendedL2: true}
	e := L2Entry{Entry: MakeStandard(0x50000, FlagCopied), Bitmap: MakeBitmap(1<<0|1<<5, 1<<1)}
	x.SetL2(tab, 1, e)
	e = x.GetL2(tab, 1)
	for i, w := range map[int]SubclusterType{0: SubclusterNormal, 1: SubclusterZeroAlloc, 2: SubclusterUnallocatedAlloc, 5: SubclusterNormal} {
		if got := e.SubclusterType(i, false); got != w {
			t.Errorf("subcluster %d: %v, want %v", i, got, w)
		}
	}
	if (L2Entry{Bitmap: MakeBitmap(0, 1)}).SubclusterType(0, false) != SubclusterZeroPlain {
		t.Error("zero plain")
	}
	if (L2Entry{Bitmap: MakeBitmap(1, 0)}).SubclusterType(0, false) != SubclusterInvalid {
		t.Error("allocated without offset must be invalid")
	}
	if x.L2Entries() != 4096 || x.SubclusterSize() != 2048 {
		t.Error("extended geometry")
	}
}

func TestSnapshotTable(t *testing.T) {
	b := readTestImage(t, "snap.qcow2")
	h, err := parseBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	snaps, n, err := ParseSnapshotTable(bytes.NewReader(b), int64(len(b)), h.SnapshotsOffset, h.NbSnapshots, h.ClusterBits)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 1 || snaps[0].Name != "first" || snaps[0].ID != "1" || !snaps[0].HasDiskSize ||
		snaps[0].DiskSize != 1<<20 || !snaps[0].HasICount {
		t.Fatalf("%+v", snaps)
	}
	enc := MarshalSnapshotTable(snaps)
	if int64(len(enc)) != n || !bytes.Equal(enc, b[h.SnapshotsOffset:int64(h.SnapshotsOffset)+n]) {
		t.Errorf("snapshot table round trip differs")
	}
}
