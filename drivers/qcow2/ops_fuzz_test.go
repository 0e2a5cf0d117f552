package qcow2

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// FuzzCheck: check and repair never panic on a damaged image, and a
// repaired image checks clean or reports what it could not repair.
func FuzzCheck(f *testing.F) {
	// Seeds made by our own create code (no QEMU processes in the fuzz
	// workers), each with a snapshot and some data.
	for _, o := range []map[string]any{
		{"cluster-size": 512},
		{"cluster-size": 512, "refcount-bits": 2},
		{"cluster-size": 16384, "extended-l2": true},
		{"cluster-size": 512, "version": "v2"},
	} {
		p := filepath.Join(f.TempDir(), "seed.qcow2")
		createImage(f, p, 64<<10, o)
		st, h := openTestImage(f, p)
		if _, err := createSnapshot(context.Background(), st, h, graph.SnapshotInfo{Name: "s"}); err != nil {
			f.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<20 {
			return
		}
		ctx := context.Background()
		h, err := ParseHeader(bytes.NewReader(b), int64(len(b)))
		if err != nil || h.L1Size > 4096 || h.ClusterBits > 16 || h.NbSnapshots > 16 {
			return // big walks are slow, not interesting
		}
		st := &opsCrashStore{durable: bytes.Clone(b), cur: bytes.Clone(b), crashAt: -1}
		if _, err := checkImage(ctx, st, h, 0); err != nil {
			return
		}
		checkImage(ctx, st, h, graph.CheckFixLeaks|graph.CheckFixErrors)
		h, err = ParseHeader(bytes.NewReader(st.cur), int64(len(st.cur)))
		if err != nil || h.L1Size > 4096 {
			return
		}
		listSnapshots(ctx, st, h)
		// The metadata operations refuse what they cannot handle, but
		// never panic.
		switch len(b) % 5 {
		case 0:
			createSnapshot(ctx, st, h, graph.SnapshotInfo{Name: "x"})
		case 1:
			applySnapshot(ctx, st, h, "", "s")
		case 2:
			deleteSnapshot(ctx, st, h, "", "s")
		case 3:
			amendImage(ctx, st, h, &AmendOptions{Compat: "0.10"}, false)
		case 4:
			amendImage(ctx, st, h, &AmendOptions{RefcountBits: ptr(int64(8)), Size: ptr(qapi.Size(1 << 20))}, false)
		}
	})
}
