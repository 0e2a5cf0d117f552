package qcow2

import (
	"context"
	"testing"

	"blockbackend/graph"
	"blockbackend/graph/drivertest"
	"blockbackend/qmp/qapi"
)

var _ graph.CompressedWriter = (*image)(nil)

// The conformance suite on qcow2 images made by our Create over the
// suite's memory file, in several layouts.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts map[string]any
	}{
		{"default", nil},
		{"v2-4k", map[string]any{"version": "v2", "cluster-size": 4096}},
		{"extl2-zstd", map[string]any{"extended-l2": true, "cluster-size": 32768, "compression-type": "zstd"}},
		{"512-rc1", map[string]any{"cluster-size": 512, "refcount-bits": 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			addFormat := func(t *testing.T, g *graph.Graph) *graph.Node {
				n, err := g.Add(ctx, map[string]any{"driver": "qcow2", "file": "f", "node-name": "q", "discard": "unmap"}, qapi.JSON)
				if err != nil {
					t.Fatal(err)
				}
				return n
			}
			open := func(t *testing.T, g *graph.Graph, size int64) *graph.Node {
				name := "drivertest-mem:qcow2-" + t.Name()
				drivertest.NewFile(name, 0)
				t.Cleanup(func() { drivertest.RemoveFile(name) })
				if _, err := g.Add(ctx, map[string]any{"driver": drivertest.DriverName, "filename": name, "node-name": "f"}, qapi.JSON); err != nil {
					t.Fatal(err)
				}
				opts := map[string]any{"driver": "qcow2", "file": "f", "size": size}
				for k, v := range tc.opts {
					opts[k] = v
				}
				run, err := g.PrepareCreate(opts, qapi.JSON, "options")
				if err != nil {
					t.Fatal(err)
				}
				if err := run(ctx); err != nil {
					t.Fatal(err)
				}
				return addFormat(t, g)
			}
			reopen := func(t *testing.T, g *graph.Graph, n *graph.Node) *graph.Node {
				if err := g.Delete(ctx, n.Name()); err != nil {
					t.Fatal(err)
				}
				return addFormat(t, g)
			}
			drivertest.Run(t, drivertest.Config{Open: open, Reopen: reopen, Resizable: true, Size: 4 << 20, Ops: 200})
		})
	}
}
