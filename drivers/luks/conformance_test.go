package luks

import (
	"os"
	"testing"

	"blockbackend/graph"
	"blockbackend/graph/drivertest"
	"blockbackend/qmp/qapi"
)

// The conformance suite on luks over the memory file. A new LUKS payload
// reads as decrypted zeros (garbage), as in QEMU, so the harness writes
// zeros through the node first; for the same reason growing is not in the
// suite (new bytes are not zeros) and is tested on its own.
func TestConformance(t *testing.T) {
	open := func(t *testing.T, g *graph.Graph, size int64) *graph.Node {
		name := "drivertest-mem:luks-" + t.Name()
		drivertest.NewFile(name, 0)
		t.Cleanup(func() { drivertest.RemoveFile(name) })
		if err := g.Objects.Add(map[string]any{"qom-type": "secret", "id": "s", "data": pass}, qapi.JSON); err != nil {
			t.Fatal(err)
		}
		if _, err := g.Add(ctx, map[string]any{"driver": drivertest.DriverName, "filename": name, "node-name": "f"}, qapi.JSON); err != nil {
			t.Fatal(err)
		}
		run, err := g.PrepareCreate(map[string]any{"driver": "luks", "file": "f", "size": size, "key-secret": "s", "iter-time": 1}, qapi.JSON, "options")
		if err != nil {
			t.Fatal(err)
		}
		if err := run(ctx); err != nil {
			t.Fatal(err)
		}
		n := addOverMem(t, g)
		if err := n.WriteAt(ctx, make([]byte, size), 0, 0); err != nil {
			t.Fatal(err)
		}
		return n
	}
	reopen := func(t *testing.T, g *graph.Graph, n *graph.Node) *graph.Node {
		if err := g.Delete(ctx, n.Name()); err != nil {
			t.Fatal(err)
		}
		return addOverMem(t, g)
	}
	drivertest.Run(t, drivertest.Config{Open: open, Reopen: reopen, Size: 2 << 20, Ops: 100})
}

func addOverMem(t *testing.T, g *graph.Graph) *graph.Node {
	n, err := g.Add(ctx, map[string]any{"driver": "luks", "file": "f", "key-secret": "s", "node-name": "n", "discard": "unmap"}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestResize grows and shrinks the payload; data before the cut stays.
func TestResize(t *testing.T) {
	g := newGraph(t)
	img := t.TempDir() + "/r.luks"
	createLUKS(t, g, img, 1<<20, nil)
	n, err := openLUKS(t, g, "l", img, "s", false)
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(1<<20, 7)
	if err := n.WriteAt(ctx, data, 0, 0); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int64{3 << 20, 512 << 10, 2 << 20} {
		if err := g.Resize(ctx, n, size); err != nil {
			t.Fatal(err)
		}
		if n.SizeNow() != size {
			t.Fatalf("size %d after resize to %d", n.SizeNow(), size)
		}
	}
	got := make([]byte, 512<<10)
	if err := n.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if string(got) != string(data[:512<<10]) {
		t.Fatal("data changed by resize")
	}
	// A size that is not whole sectors: the file ends mid-sector, the
	// node shows the whole sector (as QEMU does), and a write there grows
	// the file; qemu-img reads the same bytes.
	if err := g.Resize(ctx, n, 1000); err != nil {
		t.Fatal(err)
	}
	if n.SizeNow() != 1024 {
		t.Fatalf("size %d after resize to 1000, want 1024 as QEMU", n.SizeNow())
	}
	tail := pattern(1024, 8)
	if err := n.WriteAt(ctx, tail[100:], 100, 0); err != nil {
		t.Fatal(err)
	}
	got = make([]byte, 1024)
	if err := n.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if string(got[100:]) != string(tail[100:]) || string(got[:100]) != string(data[:100]) {
		t.Fatal("read back after the partial-sector write differs")
	}
	if err := g.Delete(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	raw := img + ".raw"
	args := append([]string{"convert"}, secretArgs()...)
	args = append(args, "--image-opts", imageOpts(img), "-O", "raw", raw)
	if out, err := qemuTool(t, "qemu-img", args...); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if string(want) != string(got) {
		t.Fatalf("qemu-img reads %d bytes that differ from ours", len(want))
	}
}

// TestReopenReadOnly: blockdev-reopen switches read-only both ways.
func TestReopenReadOnly(t *testing.T) {
	g := newGraph(t)
	img := t.TempDir() + "/r.luks"
	createLUKS(t, g, img, 1<<20, nil)
	if _, err := g.Add(ctx, map[string]any{"driver": "file", "filename": img, "node-name": "f"}, qapi.JSON); err != nil {
		t.Fatal(err)
	}
	n, err := g.Add(ctx, map[string]any{"driver": "luks", "file": "f", "key-secret": "s", "node-name": "l"}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	reopen := func(ro bool) {
		t.Helper()
		err := g.Reopen(ctx, []map[string]any{{"driver": "luks", "node-name": "l", "file": "f", "key-secret": "s", "read-only": ro}}, qapi.JSON)
		if err != nil {
			t.Fatal(err)
		}
	}
	reopen(true)
	if err := n.WriteAt(ctx, make([]byte, 512), 0, 0); err == nil {
		t.Fatal("write to a node reopened read-only")
	}
	reopen(false)
	if err := n.WriteAt(ctx, make([]byte, 512), 0, 0); err != nil {
		t.Fatal(err)
	}
}
