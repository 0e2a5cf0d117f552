package graph_test

import (
	"context"
	"errors"
	"sync"
	"syscall"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// noioSeen records OpenContext.NoIO for every node the test-noio
// drivers open, by node name.
var noioSeen sync.Map

func init() {
	graph.Register(&graph.Driver{
		Name: "test-noio-proto", Protocol: true,
		NewOptions: func() any { return &memOpts{Size: 1 << 20} },
		Open: func(_ context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
			noioSeen.Store(oc.NodeName(), oc.NoIO())
			return &memNode{data: make([]byte, o.(*memOpts).Size)}, nil
		},
	})
	graph.Register(&graph.Driver{
		Name:       "test-noio-fmt",
		NewOptions: func() any { return &fmtOpts{} },
		Open: func(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
			c, err := oc.OpenChild(ctx, "file", &o.(*fmtOpts).File, graph.RoleImage, false)
			if err != nil {
				return nil, err
			}
			noioSeen.Store(oc.NodeName(), oc.NoIO())
			return &fmtNode{file: c.Node()}, nil
		},
	})
}

// TestNoIO: ImageOptions.NoIO reaches every node of the open (format and
// its file child, with the format given or probed), and nothing else.
func TestNoIO(t *testing.T) {
	opts := func(prefix string) map[string]any {
		return map[string]any{"driver": "test-noio-fmt", "node-name": prefix + "f",
			"file": map[string]any{"driver": "test-noio-proto", "node-name": prefix + "p"}}
	}
	want := func(name string, v bool) {
		t.Helper()
		got, ok := noioSeen.Load(name)
		if !ok || got.(bool) != v {
			t.Errorf("node %s: NoIO %v (opened %v), want %v", name, got, ok, v)
		}
	}
	g := graph.New(nil)
	defer g.Close()
	if _, err := g.OpenImageOptions(ctx, opts("a"), qapi.JSON, graph.ImageOptions{ReadOnly: true, NoIO: true}); err != nil {
		t.Fatal(err)
	}
	want("af", true)
	want("ap", true)
	if _, err := g.OpenImageOptions(ctx, opts("b"), qapi.JSON, graph.ImageOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	want("bf", false)
	want("bp", false)
	add(t, g, opts("c"))
	want("cf", false)
	want("cp", false)
	if !errors.Is(graph.ErrNoIO, syscall.EPERM) {
		t.Errorf("ErrNoIO %v does not wrap EPERM", graph.ErrNoIO)
	}
}
