package blk

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	_ "blockbackend/drivers/file"
	_ "blockbackend/drivers/qcow2"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
	"blockbackend/vhostuser/virtq"
)

func testDevice(t *testing.T, o Options) (*Device, string) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "a.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	g := graph.New(nil)
	n, err := g.Add(context.Background(), map[string]any{"driver": "file", "node-name": "f", "filename": img}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	if o.LogicalBlockSize == 0 {
		o.LogicalBlockSize = 512
	}
	if o.NumQueues == 0 {
		o.NumQueues = 1
	}
	return NewDevice(context.Background(), n, o, slog.New(slog.DiscardHandler)), img
}

func header(typ uint32, sector uint64) []byte {
	h := make([]byte, 16)
	binary.LittleEndian.PutUint32(h, typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	return h
}

func chain(out, in [][]byte) *virtq.Chain {
	c := &virtq.Chain{Out: out, In: in, TailOK: len(in) > 0}
	for _, b := range out {
		c.OutLen += uint64(len(b))
	}
	for _, b := range in {
		c.InLen += uint64(len(b))
	}
	return c
}

func TestHandleReadWrite(t *testing.T) {
	d, img := testDevice(t, Options{Writable: true})
	data := bytes.Repeat([]byte("0123456789abcdef"), 64) // 1 KiB
	// Header and data in one buffer, data split over two more.
	buf := append(header(tOut, 8), data[:100]...)
	status := []byte{0xff}
	c := chain([][]byte{buf, data[100:700], data[700:]}, [][]byte{status})
	if w := d.Handle(0, c); w != 1 || status[0] != sOK {
		t.Fatalf("write: written %d status %d", w, status[0])
	}
	onDisk, _ := os.ReadFile(img)
	if !bytes.Equal(onDisk[8*512:8*512+1024], data) {
		t.Fatal("write did not land")
	}
	// Read back into buffers whose last one also holds the status byte.
	a, b := make([]byte, 300), make([]byte, 1024-300+1)
	c = chain([][]byte{header(tIn, 8)}, [][]byte{a, b})
	if w := d.Handle(0, c); w != 1025 || b[len(b)-1] != sOK {
		t.Fatalf("read: written %d status %d", w, b[len(b)-1])
	}
	if !bytes.Equal(append(a, b[:len(b)-1]...), data) {
		t.Fatal("read returned other data")
	}
}

func TestHandleErrors(t *testing.T) {
	d, _ := testDevice(t, Options{Writable: false, LogicalBlockSize: 4096})
	for _, tc := range []struct {
		name string
		c    *virtq.Chain
		want byte
	}{
		{"write to read-only", chain([][]byte{header(tOut, 0), make([]byte, 4096)}, [][]byte{{9}}), sIOErr},
		{"unaligned sector", chain([][]byte{header(tIn, 1)}, [][]byte{make([]byte, 4096), {9}}), sIOErr},
		{"short length", chain([][]byte{header(tIn, 0)}, [][]byte{make([]byte, 512), {9}}), sIOErr},
		{"past the end", chain([][]byte{header(tIn, 2048)}, [][]byte{make([]byte, 4096), {9}}), sIOErr},
		{"huge sector", chain([][]byte{header(tIn, 1<<62)}, [][]byte{make([]byte, 4096), {9}}), sIOErr},
		{"short header", chain([][]byte{make([]byte, 8)}, [][]byte{{9}}), sIOErr},
		{"unknown type", chain([][]byte{header(99, 0)}, [][]byte{{9}}), sUnsupp},
		{"discard read-only", chain([][]byte{header(tDiscard, 0), make([]byte, 16)}, [][]byte{{9}}), sIOErr},
	} {
		st := tc.c.In[len(tc.c.In)-1]
		d.Handle(0, tc.c)
		if st[len(st)-1] != tc.want {
			t.Errorf("%s: status %d, want %d", tc.name, st[len(st)-1], tc.want)
		}
	}
	// No writable tail: nothing is written anywhere.
	if w := d.Handle(0, &virtq.Chain{Out: [][]byte{header(tIn, 0)}, OutLen: 16}); w != 0 {
		t.Fatalf("chain without status buffer: written %d", w)
	}
}

func TestHandleDiscardZeroesID(t *testing.T) {
	d, img := testDevice(t, Options{Writable: true})
	if err := os.WriteFile(img, bytes.Repeat([]byte{0xaa}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	seg := func(sector uint64, n, flags uint32) []byte {
		b := make([]byte, 16)
		binary.LittleEndian.PutUint64(b, sector)
		binary.LittleEndian.PutUint32(b[8:], n)
		binary.LittleEndian.PutUint32(b[12:], flags)
		return b
	}
	st := []byte{9}
	d.Handle(0, chain([][]byte{header(tWriteZeroes, 0), append(seg(2, 2, 1), seg(10, 1, 0)...)}, [][]byte{st}))
	if st[0] != sOK {
		t.Fatalf("write zeroes status %d", st[0])
	}
	b, _ := os.ReadFile(img)
	if !bytes.Equal(b[1024:2048], make([]byte, 1024)) || !bytes.Equal(b[5120:5632], make([]byte, 512)) || b[2048] != 0xaa {
		t.Fatal("write zeroes wrote the wrong ranges")
	}
	d.Handle(0, chain([][]byte{header(tDiscard, 0), seg(0, 1, 1)}, [][]byte{st}))
	if st[0] != sUnsupp {
		t.Fatalf("discard with unmap flag: status %d, want UNSUPP", st[0])
	}
	id := make([]byte, 21)
	if w := d.Handle(0, chain([][]byte{header(tGetID, 0)}, [][]byte{id})); w != 21 || string(bytes.TrimRight(id[:20], "\x00")) != Serial || id[20] != sOK {
		t.Fatalf("GET_ID: %d %q", w, id)
	}
	var cfg [configSize]byte
	d.ReadConfig(cfg[:])
	if capa := binary.LittleEndian.Uint64(cfg[:]); capa != 2048 {
		t.Fatalf("capacity %d", capa)
	}
	if err := d.WriteConfig(32, []byte{0}); err != nil || d.writeback.Load() {
		t.Fatalf("wce write: %v", err)
	}
}

// TestHandleQuick: reads of an empty qcow2 range are served at once;
// reads of data, of a raw file, of a status byte sharing the last data
// buffer, and writes are left to Handle, with the chain untouched.
func TestHandleQuick(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "q.qcow2")
	g := graph.New(nil)
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Add(ctx, map[string]any{"driver": "file", "node-name": "f", "filename": p}, qapi.JSON); err != nil {
		t.Fatal(err)
	}
	create, err := g.PrepareCreate(map[string]any{"driver": "qcow2", "file": "f", "size": 1 << 20}, qapi.JSON, "options")
	if err != nil {
		t.Fatal(err)
	}
	if err := create(ctx); err != nil {
		t.Fatal(err)
	}
	n, err := g.Add(ctx, map[string]any{"driver": "qcow2", "node-name": "q", "file": "f"}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, bytes.Repeat([]byte{7}, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	d := NewDevice(ctx, n, Options{LogicalBlockSize: 512, NumQueues: 1, Writable: true}, slog.New(slog.DiscardHandler))
	buf, status := bytes.Repeat([]byte{0xee}, 4096), []byte{0xff}
	if w, ok := d.HandleQuick(0, chain([][]byte{header(tIn, 1024)}, [][]byte{buf, status})); !ok || w != 4097 || status[0] != sOK || !bytes.Equal(buf, make([]byte, 4096)) {
		t.Fatalf("empty range: ok %v written %d status %d", ok, w, status[0])
	}
	for name, c := range map[string]*virtq.Chain{
		"data":         chain([][]byte{header(tIn, 0)}, [][]byte{make([]byte, 4096), {0xff}}),
		"shared tail":  chain([][]byte{header(tIn, 1024)}, [][]byte{bytes.Repeat([]byte{0xff}, 4097)}),
		"write":        chain([][]byte{header(tOut, 1024), make([]byte, 512)}, [][]byte{{0xff}}),
		"out of range": chain([][]byte{header(tIn, 1<<20)}, [][]byte{make([]byte, 512), {0xff}}),
	} {
		last := c.In[len(c.In)-1]
		if _, ok := d.HandleQuick(0, c); ok || last[len(last)-1] != 0xff {
			t.Errorf("%s: served quickly (ok %v)", name, ok)
		}
	}
	raw, _ := testDevice(t, Options{})
	if _, ok := raw.HandleQuick(0, chain([][]byte{header(tIn, 0)}, [][]byte{make([]byte, 512), {0xff}})); ok {
		t.Error("a file node has no quick reads")
	}
}
