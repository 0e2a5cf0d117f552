package graph_test

import (
	"testing"

	"blockbackend/graph"
)

// TestQueryNodesOrderAndNames: QEMU lists nodes newest first, a format
// node's inline file child counting as older than the node (it is opened
// first), and names a node whose file child is not a protocol node by a
// json: filename of its options (tests/query_e2e_test.go checks both
// against qemu-storage-daemon).
func TestQueryNodesOrderAndNames(t *testing.T) {
	g := graph.New(nil)
	defer g.Close()
	add(t, g, map[string]any{"driver": "test-fmt", "node-name": "f", "file": map[string]any{"driver": "test-mem", "node-name": "m"}})
	add(t, g, map[string]any{"driver": "raw", "node-name": "r", "read-only": true,
		"file": map[string]any{"driver": "test-fmt", "node-name": "f2", "file": map[string]any{"driver": "test-mem", "node-name": "m2"}}})
	add(t, g, map[string]any{"driver": "test-mem", "node-name": "m3"})
	add(t, g, map[string]any{"driver": "raw", "node-name": "s", "offset": 512, "file": "m3"})
	var names, files []string
	for _, n := range g.QueryNodes(true) {
		names = append(names, n.NodeName)
		files = append(files, n.File)
	}
	wantNames := []string{"s", "m3", "r", "f2", "m2", "f", "m"}
	wantFiles := []string{
		`json:{"offset": 512, "driver": "raw", "file": {"driver": "test-mem"}}`, "",
		`json:{"driver": "raw", "file": {"driver": "test-fmt", "file": {"driver": "test-mem"}}}`,
		"", "", "", "",
	}
	for i := range wantNames {
		if i >= len(names) || names[i] != wantNames[i] || files[i] != wantFiles[i] {
			t.Fatalf("nodes %q files %q, want %q %q", names, files, wantNames, wantFiles)
		}
	}
}
