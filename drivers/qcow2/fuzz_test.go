package qcow2

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// FuzzParseHeader feeds corrupted images to the header and snapshot table
// parsers: they must return an error or a header whose encoding parses
// again, never panic or read outside the file (bytes.Reader would fail).
func FuzzParseHeader(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.qcow2"))
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		h, err := ParseHeader(r, int64(len(b)))
		if err != nil {
			return
		}
		_, _, _ = ParseSnapshotTable(r, int64(len(b)), h.SnapshotsOffset, h.NbSnapshots, h.ClusterBits)
		enc := h.Marshal()
		if int64(len(enc)) > h.ClusterSize() {
			return
		}
		img := append([]byte(nil), b...)
		copy(img, enc)
		if _, err := ParseHeader(bytes.NewReader(img), int64(len(img))); err != nil {
			t.Fatalf("re-encoded header does not parse: %v", err)
		}
	})
}

// FuzzReadImage opens corrupted images read-only through the driver and
// reads them whole, with block status: errors are fine, panics and reads
// outside the file (the graph refuses those) are not.
func FuzzReadImage(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.qcow2"))
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		if len(b) <= 64<<10 {
			f.Add(b)
		}
	}
	var seq atomic.Int64
	f.Fuzz(func(t *testing.T, b []byte) {
		name := "fuzz" + itoa(seq.Add(1))
		crashFilesMu.Lock()
		crashFiles[name] = &crashFile{cur: b}
		crashFilesMu.Unlock()
		defer func() {
			crashFilesMu.Lock()
			delete(crashFiles, name)
			crashFilesMu.Unlock()
		}()
		g := graph.New(nil)
		defer g.Close()
		ctx := context.Background()
		n, err := g.Add(ctx, map[string]any{
			"driver": "qcow2", "node-name": "q", "read-only": true, "backing": nil,
			"file": map[string]any{"driver": "qcow2test-crash", "filename": name},
		}, qapi.JSON)
		if err != nil {
			return
		}
		size := min(n.SizeNow(), 8<<20)
		buf := make([]byte, 64<<10)
		for off := int64(0); off < size; off += int64(len(buf)) {
			_ = n.ReadAt(ctx, buf[:min(int64(len(buf)), size-off)], off)
			_, _ = n.BlockStatus(ctx, off, min(int64(len(buf)), size-off))
		}
	})
}
