package qcow

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"blockbackend/graph"
	"blockbackend/graph/drivertest"
	"blockbackend/qmp/qapi"
)

func fuzzSeeds(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.qcow"))
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// FuzzParseHeader: the header parser returns an error or a header that
// encodes and parses again to the same values; never a panic.
func FuzzParseHeader(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		img := append([]byte(nil), b...)
		copy(img, h.Marshal())
		h2, err := ParseHeader(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			t.Fatalf("re-encoded header does not parse: %v", err)
		}
		if h.BackingFileOffset < HeaderSize {
			// A name overlapping the header (its padding) may change.
			h2.BackingFile = h.BackingFile
		}
		if *h2 != *h {
			t.Fatalf("re-encoded header differs: %+v vs %+v", h2, h)
		}
	})
}

// FuzzImage opens corrupted images through the driver (writable, over a
// memory file) and reads, maps and writes them: the L1/L2 tables and
// compressed entries come from the file. Errors are fine; panics, and
// requests outside the file (the graph refuses those), are not.
//
// Run it with -fuzzminimizetime 0s: minimizing the (tens of KiB) inputs
// that find new coverage takes minutes a piece with this binary's
// coverage counters, during which the fuzzer reports no executions.
func FuzzImage(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(fuzzOne)
}

var fuzzSeq atomic.Int64

func fuzzOne(t *testing.T, b []byte) {
	{
		seq := fuzzSeq.Add(1)
		ctx := context.Background()
		name := fmt.Sprintf("drivertest-mem:qcow-fuzz-%d", seq)
		drivertest.NewFile(name, int64(len(b)))
		defer drivertest.RemoveFile(name)
		g := graph.New(nil)
		g.ImageTool = true
		defer g.Close()
		_ = g.Objects.Add(map[string]any{"qom-type": "secret", "id": "s0", "data": "abc"}, qapi.JSON)
		fn, err := g.Add(ctx, map[string]any{"driver": drivertest.DriverName, "filename": name, "node-name": "f"}, qapi.JSON)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) > 0 {
			if err := fn.WriteAt(ctx, b, 0, 0); err != nil {
				t.Fatal(err)
			}
		}
		opts := map[string]any{"driver": "qcow", "node-name": "q", "file": "f", "backing": nil}
		if len(b) >= 40 && b[39] != 0 {
			opts["encrypt"] = map[string]any{"key-secret": "s0"}
		}
		n, err := g.Add(ctx, opts, qapi.JSON)
		if err != nil {
			return
		}
		size := min(n.SizeNow(), 1<<20)
		buf := make([]byte, 64<<10)
		for off := int64(0); off < size; off += int64(len(buf)) {
			l := min(int64(len(buf)), size-off)
			_ = n.ReadAt(ctx, buf[:l], off)
			_, _ = n.BlockStatus(ctx, off, l)
		}
		for _, off := range []int64{0, 1000, n.SizeNow() / 2, n.SizeNow() - 10} {
			if off >= 0 && off+10 <= n.SizeNow() {
				_ = n.WriteAt(ctx, []byte("0123456789"), off, 0)
			}
		}
		if cw := n.CompressedWriter(); cw != nil && n.SizeNow() >= 2*cw.ClusterSize() {
			_ = n.WriteCompressed(ctx, cw.ClusterSize(), make([]byte, cw.ClusterSize()))
		}
	}
}
