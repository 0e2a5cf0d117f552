package qcow2

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand"
	"os"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// TestOpsDamagedImages: check, repair, snapshots and amend on randomly
// damaged images never panic (a deterministic companion of FuzzCheck).
func TestOpsDamagedImages(t *testing.T) {
	var origs [][]byte
	for _, o := range []string{"cluster_size=512", "cluster_size=512,refcount_bits=2", "cluster_size=16k,extended_l2=on", "cluster_size=512,compat=0.10"} {
		p := newImage(t, o, "64k", "write -P 1 0 8k", "write -z 16k 4k")
		must(t, "qemu-img", "snapshot", "-c", "s", p)
		orig, _ := os.ReadFile(p)
		origs = append(origs, orig)
	}
	rng := rand.New(rand.NewSource(2))
	for i := 0; i < 4000; i++ {
		b := bytes.Clone(origs[i%len(origs)])
		for j := 0; j < 1+rng.Intn(4); j++ {
			switch rng.Intn(4) {
			case 0:
				b[rng.Intn(len(b))] = byte(rng.Intn(256))
			case 1:
				o := rng.Intn(len(b)-8) &^ 7
				binary.BigEndian.PutUint64(b[o:], rng.Uint64()>>uint(rng.Intn(64)))
			case 2:
				b = b[:rng.Intn(len(b))]
			case 3:
				b = append(b, make([]byte, rng.Intn(100000))...)
			}
			if len(b) < 16 {
				break
			}
		}
		ctx := context.Background()
		h, err := ParseHeader(bytes.NewReader(b), int64(len(b)))
		if err == nil && h.L1Size <= 4096 && h.ClusterBits <= 16 && h.NbSnapshots <= 16 {
			st := &opsCrashStore{durable: bytes.Clone(b), cur: bytes.Clone(b), crashAt: -1}
			if _, err := checkImage(ctx, st, h, 0); err == nil {
				checkImage(ctx, st, h, graph.CheckFixLeaks|graph.CheckFixErrors)
			}
			if h, err := ParseHeader(bytes.NewReader(st.cur), int64(len(st.cur))); err == nil && h.L1Size < 4096 {
				switch i % 5 {
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
			}
		}
	}
}
