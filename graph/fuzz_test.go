package graph_test

import (
	"bytes"
	"encoding/json"
	"testing"

	_ "blockbackend/drivers/null"
	_ "blockbackend/drivers/qcow2"
	_ "blockbackend/drivers/raw"
	"blockbackend/graph"
	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// FuzzAdd feeds arbitrary BlockdevOptions to blockdev-add's code path, then
// uses and tears down whatever opened: no panic, and a failed add leaves
// nothing behind.
func FuzzAdd(f *testing.F) {
	for _, s := range []string{
		`{"driver": "null-co", "node-name": "n", "size": 4096, "read-zeroes": true}`,
		`{"driver": "raw", "node-name": "r", "offset": 512, "size": 1024, "file": {"driver": "null-co", "size": 4096}}`,
		`{"driver": "raw", "node-name": "r", "file": {"driver": "raw", "file": {"driver": "test-mem", "size": 0}}}`,
		`{"driver": "test-fmt", "node-name": "f", "read-only": true, "force-share": true, "file": {"driver": "test-mem"}}`,
		`{"driver": "raw", "node-name": "r", "file": "r"}`,
		`{"driver": "raw", "node-name": "r", "file": {"driver": "null-co", "node-name": "r"}}`,
		`{"driver": "null-co", "node-name": "n", "detect-zeroes": "unmap", "discard": "unmap", "cache": {"direct": true}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d := json.NewDecoder(bytes.NewReader(data))
		d.UseNumber()
		var opts map[string]any
		if d.Decode(&opts) != nil || opts == nil {
			return
		}
		g := graph.New(nil)
		defer g.Close()
		n, err := g.Add(ctx, opts, qapi.JSON)
		if err != nil {
			if len(g.Nodes()) != 0 {
				t.Fatalf("failed add left %d nodes: %v", len(g.Nodes()), err)
			}
			return
		}
		c, err := g.AttachUser(user("e"), n, "root", permissions.ConsistentRead, permissions.All)
		if err == nil {
			buf := make([]byte, 512)
			if n.SizeNow() >= 512 {
				_ = n.ReadAt(ctx, buf, 0)
				_ = n.WriteAt(ctx, buf, 0, 0)
			}
			_, _ = n.BlockStatus(ctx, 0, max(n.SizeNow(), 1))
			g.DetachUser(c)
		}
		_ = g.DumpGraph()
		_ = g.QueryNodes(false)
		if err := g.Delete(ctx, n.Name()); err != nil {
			t.Fatalf("delete: %v", err)
		}
		if len(g.Nodes()) != 0 {
			t.Fatalf("delete left %d nodes", len(g.Nodes()))
		}
	})
}
