package qcow

import (
	"context"
	"testing"

	"blockbackend/graph"
	"blockbackend/graph/drivertest"
	"blockbackend/qmp/qapi"
)

// The conformance suite on qcow images made by our Create over the
// suite's memory file, plain and AES.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name    string
		enc     bool
		cb, l2b uint8 // a hand-made geometry instead of qemu-img's
	}{{"plain", false, 0, 0}, {"aes", true, 0, 0}, {"64k-l2-64", false, 16, 6}, {"512-l2-8k", false, 9, 13}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			addFormat := func(t *testing.T, g *graph.Graph) *graph.Node {
				opts := map[string]any{"driver": "qcow", "file": "f", "node-name": "q"}
				if tc.enc {
					opts["encrypt"] = map[string]any{"key-secret": "s0"}
				}
				n, err := g.Add(ctx, opts, qapi.JSON)
				if err != nil {
					t.Fatal(err)
				}
				return n
			}
			open := func(t *testing.T, g *graph.Graph, size int64) *graph.Node {
				if tc.enc {
					g.ImageTool = true
					if err := g.Objects.Add(map[string]any{"qom-type": "secret", "id": "s0", "data": "abc"}, qapi.JSON); err != nil {
						t.Fatal(err)
					}
				}
				name := "drivertest-mem:qcow-" + t.Name()
				drivertest.NewFile(name, 0)
				t.Cleanup(func() { drivertest.RemoveFile(name) })
				fn, err := g.Add(ctx, map[string]any{"driver": drivertest.DriverName, "filename": name, "node-name": "f"}, qapi.JSON)
				if err != nil {
					t.Fatal(err)
				}
				if tc.cb != 0 {
					// Another writer's layout: the L1 table at 512, its
					// exact size, no padding.
					h := &Header{Version: 1, Size: uint64(size), ClusterBits: tc.cb, L2Bits: tc.l2b, L1TableOffset: 512}
					end := int64(512 + 8*h.L1Entries())
					if err := fn.Truncate(ctx, end, true, "off"); err != nil {
						t.Fatal(err)
					}
					if err := fn.WriteAt(ctx, h.Marshal(), 0, 0); err != nil {
						t.Fatal(err)
					}
					return addFormat(t, g)
				}
				opts := map[string]any{"driver": "qcow", "file": "f", "size": size}
				if tc.enc {
					opts["encrypt"] = map[string]any{"format": "qcow", "key-secret": "s0"}
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
			drivertest.Run(t, drivertest.Config{Open: open, Reopen: reopen, Size: 4 << 20, Ops: 200})
		})
	}
}
