package qcow2

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"
	"testing"

	"blockbackend/graph"

	_ "blockbackend/drivers/file"
	_ "blockbackend/drivers/raw"
)

func qemuMeasure(t *testing.T, args ...string) graph.MeasureResult {
	t.Helper()
	out := must(t, "qemu-img", append([]string{"measure", "--output=json", "-O", "qcow2"}, args...)...)
	var r struct {
		Required       int64  `json:"required"`
		FullyAllocated int64  `json:"fully-allocated"`
		Bitmaps        *int64 `json:"bitmaps"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("qemu-img measure %v: %v: %s", args, err, out)
	}
	res := graph.MeasureResult{Required: r.Required, FullyAllocated: r.FullyAllocated, Bitmaps: -1}
	if r.Bitmaps != nil {
		res.Bitmaps = *r.Bitmaps
	}
	return res
}

func orderOf(bits int) uint32 {
	o := uint32(0)
	for 1<<o < bits {
		o++
	}
	return o
}

func TestMeasureSizes(t *testing.T) {
	for _, cb := range []uint32{9, 12, 16, 21} {
		for _, rb := range []int{1, 8, 16, 64} {
			for _, ext := range []bool{false, true} {
				if ext && cb < 14 {
					continue
				}
				for _, pre := range []string{"off", "metadata", "full"} {
					for _, size := range []int64{0, 3, 1 << 20, 100<<20 + 512, 1 << 30, 3 << 40} {
						if cb == 9 && size > 1<<30 {
							continue // qemu-img measure works, but slowly
						}
						p := measureParams{clusterBits: cb, refcountOrder: orderOf(rb), extendedL2: ext, prealloc: pre, v3: true}
						got, err := p.measure(context.Background(), size, nil)
						if err != nil {
							t.Fatal(err)
						}
						o := fmt.Sprintf("cluster_size=%d,refcount_bits=%d,preallocation=%s", 1<<cb, rb, pre)
						if ext {
							o += ",extended_l2=on"
						}
						want := qemuMeasure(t, "-o", o, "--size", fmt.Sprint(size))
						if got != want {
							t.Errorf("%s size %d: got %+v, want %+v", o, size, got, want)
						}
					}
				}
			}
		}
	}
}

func TestMeasureRawSource(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "s.raw")
	must(t, "qemu-img", "create", "-q", "-f", "raw", raw, "10M")
	must(t, "qemu-io", "-f", "raw", "-c", "write -P 1 4k 4k", "-c", "write -P 2 68k 4k",
		"-c", "write -P 3 124k 12k", "-c", "write -P 4 5M 1M", "-c", "write -P 5 9M 1k", raw)
	ctx := context.Background()
	g := graph.New(slog.New(slog.DiscardHandler))
	defer g.Close()
	src, err := g.OpenImage(ctx, raw, graph.ImageOptions{Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, cb := range []uint32{12, 16, 20} {
		for _, pre := range []string{"off", "falloc"} {
			p := measureParams{clusterBits: cb, refcountOrder: 4, prealloc: pre, v3: true}
			got, err := p.measure(ctx, 0, src)
			if err != nil {
				t.Fatal(err)
			}
			want := qemuMeasure(t, "-f", "raw", "-o", fmt.Sprintf("cluster_size=%d,preallocation=%s", 1<<cb, pre), raw)
			if got != want {
				t.Errorf("cluster_size %d prealloc %s: got %+v, want %+v", 1<<cb, pre, got, want)
			}
		}
	}
}
