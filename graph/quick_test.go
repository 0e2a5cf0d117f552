package graph_test

import (
	"context"
	"testing"

	"blockbackend/graph"
)

// quickNode is a test-fmt node that serves reads of its first half at once.
type quickNode struct {
	fmtNode
	calls int
}

func (q *quickNode) ReadQuick(off int64, iov [][]byte) bool {
	q.calls++
	if off >= 512<<10 {
		return false
	}
	for _, b := range iov {
		for i := range b {
			b[i] = 0x5a
		}
	}
	return true
}

func init() {
	graph.Register(&graph.Driver{
		Name:       "test-quick",
		NewOptions: func() any { return &fmtOpts{} },
		Open: func(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
			c, err := oc.OpenChild(ctx, "file", &o.(*fmtOpts).File, graph.RoleImage, false)
			if err != nil {
				return nil, err
			}
			lastQuick = &quickNode{fmtNode: fmtNode{file: c.Node()}}
			return lastQuick, nil
		},
	})
}

var lastQuick *quickNode

func TestReadQuick(t *testing.T) {
	g := graph.New(nil)
	defer g.Close()
	q := add(t, g, map[string]any{"driver": "test-quick", "node-name": "q",
		"file": map[string]any{"driver": "test-mem", "node-name": "m"}})
	m, err := g.FindNode("m")
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4096)
	if !q.ReadQuick(0, [][]byte{b}) || b[0] != 0x5a {
		t.Error("the driver's quick read was not used")
	}
	if q.ReadQuick(512<<10, [][]byte{b}) {
		t.Error("a quick read the driver declined was reported done")
	}
	calls := lastQuick.calls
	if q.ReadQuick(1<<20-100, [][]byte{b}) {
		t.Error("a quick read past the end was reported done")
	}
	if lastQuick.calls != calls {
		t.Error("a quick read past the end reached the driver")
	}
	if m.ReadQuick(0, [][]byte{b}) {
		t.Error("a driver without QuickReader served a quick read")
	}
}
