package graph_test

import (
	"context"
	"testing"

	"blockbackend/graph"
)

// createOpts is a create-options struct naming an existing node, as
// qcow2's BlockdevCreateOptionsQcow2 does with "file".
type createOpts struct {
	File string `qapi:"file"`
	Size uint64 `qapi:"size"`
}

func init() {
	graph.Register(&graph.Driver{
		Name:             "test-create",
		NewOptions:       func() any { return &fmtOpts{} },
		Open:             func(context.Context, *graph.OpenContext, any) (graph.Instance, error) { return nil, nil },
		NewCreateOptions: func() any { return &createOpts{} },
		Create: func(ctx context.Context, cc *graph.CreateContext, o any) error {
			co := o.(*createOpts)
			n, err := cc.LookupNode(co.File)
			if err != nil {
				return err
			}
			hdr := make([]byte, 16)
			copy(hdr, "TESTFMT")
			hdr[8] = byte(co.Size >> 20)
			return n.WriteAt(ctx, hdr, 0, 0)
		},
	})
}

func TestCreate(t *testing.T) {
	g := graph.New(nil)
	defer g.Close()
	add(t, g, map[string]any{"driver": "test-mem", "node-name": "m"})
	if err := g.Create(ctx, "test-create", map[string]any{"driver": "test-create", "file": "m", "size": 3 << 20}); err != nil {
		t.Fatalf("Create: %v", err)
	}
	if string(lastMem.data[:7]) != "TESTFMT" || lastMem.data[8] != 3 {
		t.Errorf("Create did not write through the named node: % x", lastMem.data[:16])
	}
	for _, tc := range []struct {
		driver string
		opts   map[string]any
		want   string
	}{
		{"test-create", map[string]any{"file": "m", "size": 1, "bogus": 1}, "Parameter 'bogus' is unexpected"},
		{"test-create", map[string]any{"size": 1}, "Parameter 'file' is missing"},
		{"test-mem", map[string]any{"size": 1}, "Driver does not support blockdev-create"},
		{"vmdk", map[string]any{}, "Driver 'vmdk' is not built into blockbackend yet (see the feature table in README.md)"},
		{"nosuch", map[string]any{}, "Parameter 'driver' does not accept value 'nosuch'"},
	} {
		err := g.Create(ctx, tc.driver, tc.opts)
		if err == nil || err.Error() != tc.want {
			t.Errorf("Create(%s, %v) = %v, want %q", tc.driver, tc.opts, err, tc.want)
		}
	}
}
