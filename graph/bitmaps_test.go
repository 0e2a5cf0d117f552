package graph_test

import (
	"context"
	"reflect"
	"testing"

	"blockbackend/graph"
)

func dirty(b *graph.DirtyBitmap, size int64) []int64 {
	var out []int64
	for off := int64(0); off < size; off += b.Granularity() {
		if b.Get(off) {
			out = append(out, off/b.Granularity())
		}
	}
	return out
}

// In-memory bitmaps on a node without a bitmap store: writes and
// write-zeroes are recorded, discards only when they reach the driver
// (discard=unmap), nothing while disabled; truncate resizes; persistent
// bitmaps are refused.
func TestBitmapsOnAnyNode(t *testing.T) {
	ctx := context.Background()
	g := graph.New(nil)
	defer g.Close()
	n := add(t, g, map[string]any{"driver": "test-mem", "node-name": "m", "size": 1 << 20})
	gran := uint32(4096)
	if err := g.AddBitmap(ctx, graph.BitmapAddOptions{Node: "m", Name: "b", Granularity: &gran}); err != nil {
		t.Fatal(err)
	}
	wantErr(t, g.AddBitmap(ctx, graph.BitmapAddOptions{Node: "m", Name: "p", Persistent: true}),
		"Can't store persistent bitmaps to m: Operation not supported")
	wantErr(t, g.AddBitmap(ctx, graph.BitmapAddOptions{Node: "m", Name: "b"}), "Bitmap already exists: b")
	if err := n.WriteAt(ctx, []byte{1, 2}, 4095, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteZeroes(ctx, 40960, 4096, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.Discard(ctx, 81920, 4096); err != nil { // discard=ignore: not passed down
		t.Fatal(err)
	}
	b := n.Bitmaps()[0]
	if got := dirty(b, 1<<20); !reflect.DeepEqual(got, []int64{0, 1, 10}) {
		t.Fatalf("dirty %v", got)
	}
	if got := n.BitmapInfos(); len(got) != 1 || got[0].Count != 3*4096 || !got[0].Recording || got[0].Persistent {
		t.Fatalf("infos %+v", got)
	}
	if err := g.EnableBitmap("m", "b", false); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte{1}, 8192, 0); err != nil {
		t.Fatal(err)
	}
	if got := dirty(b, 1<<20); !reflect.DeepEqual(got, []int64{0, 1, 10}) {
		t.Fatalf("a disabled bitmap recorded: %v", got)
	}
	if err := g.ClearBitmap("m", "b"); err != nil {
		t.Fatal(err)
	}
	if got := b.Count(); got != 0 {
		t.Fatalf("count after clear %d", got)
	}
	if err := g.EnableBitmap("m", "b", true); err != nil {
		t.Fatal(err)
	}
	if err := n.Truncate(ctx, 2<<20, false, "off"); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte{1}, 2<<20-1, 0); err != nil {
		t.Fatal(err)
	}
	if got := dirty(b, 2<<20); !reflect.DeepEqual(got, []int64{511}) {
		t.Fatalf("after resize %v", got)
	}
	wantErr(t, g.RemoveBitmap(ctx, "m", "zz"), "Dirty bitmap 'zz' not found")
	wantErr(t, g.RemoveBitmap(ctx, "zz", "b"), "Node 'zz' not found")
	if err := g.RemoveBitmap(ctx, "m", "b"); err != nil {
		t.Fatal(err)
	}
	if n.BitmapInfos() != nil {
		t.Fatal("bitmap still listed")
	}
}
