package drivertest_test

import (
	"bytes"
	"math/rand/v2"
	"testing"

	_ "blockbackend/drivers/raw"
	"blockbackend/graph"
	"blockbackend/graph/drivertest"
	"blockbackend/qmp/qapi"
)

func openMem(driver string) func(t *testing.T, g *graph.Graph, size int64) *graph.Node {
	return func(t *testing.T, g *graph.Graph, size int64) *graph.Node {
		name := "drivertest-mem:" + t.Name()
		drivertest.NewFile(name, size)
		t.Cleanup(func() { drivertest.RemoveFile(name) })
		proto := map[string]any{"driver": drivertest.DriverName, "filename": name}
		opts := proto
		if driver != "" {
			opts = map[string]any{"driver": driver, "file": proto}
		}
		opts["node-name"] = "n"
		opts["discard"] = "unmap"
		n, err := g.Add(t.Context(), opts, qapi.JSON)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
}

func reopenMem(t *testing.T, g *graph.Graph, n *graph.Node) *graph.Node {
	name := n.Filename()
	driver := n.DriverName()
	if err := g.Delete(t.Context(), n.Name()); err != nil {
		t.Fatal(err)
	}
	opts := map[string]any{"driver": drivertest.DriverName, "filename": name}
	if driver != drivertest.DriverName {
		opts = map[string]any{"driver": driver, "file": opts}
	}
	opts["node-name"] = "n"
	opts["discard"] = "unmap"
	n, err := g.Add(t.Context(), opts, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// The suite passes on the memory driver itself and on raw over it.
func TestConformanceMem(t *testing.T) {
	drivertest.Run(t, drivertest.Config{Open: openMem(""), Reopen: reopenMem, Resizable: true})
}

func TestConformanceRaw(t *testing.T) {
	drivertest.Run(t, drivertest.Config{Open: openMem("raw"), Reopen: reopenMem, Resizable: true})
}

func TestCrashKeepsFlushedData(t *testing.T) {
	f := drivertest.NewFile("crash", 1<<16)
	g := graph.New(nil)
	defer g.Close()
	n, err := g.Add(t.Context(), map[string]any{"driver": drivertest.DriverName, "filename": "crash", "node-name": "n"}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	stable := bytes.Repeat([]byte{1}, 8192)
	fua := bytes.Repeat([]byte{2}, 4096)
	lost := bytes.Repeat([]byte{3}, 32768)
	if err := n.WriteAt(t.Context(), stable, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(t.Context(), fua, 8192, graph.WriteFUA); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(t.Context(), lost, 16384, 0); err != nil {
		t.Fatal(err)
	}
	f.Crash(rand.New(rand.NewPCG(1, 2)))
	got := f.Bytes()
	if !bytes.Equal(got[:8192], stable) || !bytes.Equal(got[8192:12288], fua) {
		t.Fatal("a flushed or FUA write did not survive the crash")
	}
	kept := 0
	for s := 16384; s < 16384+32768; s += 512 {
		switch got[s] {
		case 3:
			kept++
			if !bytes.Equal(got[s:s+512], lost[:512]) {
				t.Fatalf("sector at %d is torn", s)
			}
		case 0:
		default:
			t.Fatalf("sector at %d holds %#x", s, got[s])
		}
	}
	if kept == 0 || kept == 64 {
		t.Fatalf("%d of 64 unflushed sectors survived; want some but not all", kept)
	}
}
