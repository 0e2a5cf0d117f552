package file

import (
	"os"
	"path/filepath"
	"testing"

	"blockbackend/graph"
	"blockbackend/graph/drivertest"
)

func TestConformance(t *testing.T) { conformance(t, t.TempDir) }

// TestConformanceTmpfs runs the suite on tmpfs, where I/O goes through
// the file's mapping.
func TestConformanceTmpfs(t *testing.T) { conformance(t, func() string { return tmpfsDir(t) }) }

func conformance(t *testing.T, dir func() string) {
	open := func(t *testing.T, g *graph.Graph, size int64) *graph.Node {
		p := filepath.Join(dir(), "img")
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		return addFile(t, g, "conf", p, map[string]any{"discard": "unmap"})
	}
	reopen := func(t *testing.T, g *graph.Graph, n *graph.Node) *graph.Node {
		p := n.Filename()
		if err := g.Delete(ctx, n.Name()); err != nil {
			t.Fatal(err)
		}
		return addFile(t, g, "conf", p, map[string]any{"discard": "unmap"})
	}
	drivertest.Run(t, drivertest.Config{Open: open, Reopen: reopen, Resizable: true})
}
