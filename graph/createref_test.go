package graph_test

import (
	"context"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

type holdCreateOpts struct {
	File  graph.ChildRef  `qapi:"file"`
	Inner *holdInnerOpts  `qapi:"inner,optional"`
	Extra *graph.ChildRef `qapi:"extra,optional"`
}

type holdInnerOpts struct {
	Data graph.ChildRef `qapi:"data"`
}

func init() {
	graph.Register(&graph.Driver{
		Name:             "test-hold",
		NewOptions:       func() any { return &fmtOpts{} },
		Open:             func(context.Context, *graph.OpenContext, any) (graph.Instance, error) { return nil, nil },
		NewCreateOptions: func() any { return &holdCreateOpts{} },
		Create:           func(context.Context, *graph.CreateContext, any) error { return nil },
	})
}

// TestPrepareCreateJobHolds: every existing node a create names, at any
// depth of its options, is held from PrepareCreateJob until release, so
// that blockdev-del answers QEMU's "in use" before the job has run.
func TestPrepareCreateJobHolds(t *testing.T) {
	g := graph.New(nil)
	defer g.Close()
	for _, n := range []string{"a", "b", "c"} {
		add(t, g, map[string]any{"driver": "test-mem", "node-name": n})
	}
	_, release, err := g.PrepareCreateJob(map[string]any{"driver": "test-hold", "file": "a",
		"inner": map[string]any{"data": "b"}, "extra": "c"}, qapi.JSON, "options")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b", "c"} {
		wantErr(t, g.Delete(ctx, n), "Block device "+n+" is in use")
	}
	release()
	for _, n := range []string{"a", "b", "c"} {
		if err := g.Delete(ctx, n); err != nil {
			t.Fatalf("delete %s after release: %v", n, err)
		}
	}
}
