package qmp

import (
	"context"
	"reflect"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// bitmapCommands registers the dirty bitmap commands (QEMU 7.2's
// block-dirty-bitmap-add, -remove, -clear, -enable, -disable) on s, over
// g. The bitmaps live in the graph (graph/bitmaps.go); the formats that
// store persistent ones (qcow2) load and store them.
func bitmapCommands(s *Server, g *graph.Graph) {
	reg := func(name string, args any, h Handler) {
		s.Register(Command{Name: name, Handler: h, ArgType: reflect.TypeOf(args)})
	}
	reg("block-dirty-bitmap-add", bitmapAddArgs{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a bitmapAddArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return empty(g.AddBitmap(ctx, graph.BitmapAddOptions{
			Node: a.Node, Name: a.Name, Granularity: a.Granularity,
			Persistent: a.Persistent, Disabled: a.Disabled,
		}))
	})
	reg("block-dirty-bitmap-remove", bitmapArgs{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a bitmapArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return empty(g.RemoveBitmap(ctx, a.Node, a.Name))
	})
	reg("block-dirty-bitmap-clear", bitmapArgs{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a bitmapArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return empty(g.ClearBitmap(a.Node, a.Name))
	})
	reg("block-dirty-bitmap-merge", bitmapMergeArgs{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a bitmapMergeArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		refs := make([]graph.BitmapRef, len(a.Bitmaps))
		for i, b := range a.Bitmaps {
			refs[i] = graph.BitmapRef(b)
		}
		return empty(g.MergeBitmaps(a.Node, a.Target, refs))
	})
	for _, c := range []struct {
		name   string
		enable bool
	}{{"block-dirty-bitmap-enable", true}, {"block-dirty-bitmap-disable", false}} {
		reg(c.name, bitmapArgs{}, func(ctx context.Context, args map[string]any) (any, error) {
			var a bitmapArgs
			if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
				return nil, err
			}
			return empty(g.EnableBitmap(a.Node, a.Name, c.enable))
		})
	}
}

// bitmapArgs is BlockDirtyBitmap.
type bitmapArgs struct {
	Node string `qapi:"node"`
	Name string `qapi:"name"`
}

// bitmapAddArgs is BlockDirtyBitmapAdd.
type bitmapAddArgs struct {
	Node        string  `qapi:"node"`
	Name        string  `qapi:"name"`
	Granularity *uint32 `qapi:"granularity,optional"`
	Persistent  bool    `qapi:"persistent,optional"`
	Disabled    bool    `qapi:"disabled,optional"`
}

// bitmapMergeArgs is block-dirty-bitmap-merge's arguments.
type bitmapMergeArgs struct {
	Node    string      `qapi:"node"`
	Target  string      `qapi:"target"`
	Bitmaps []bitmapRef `qapi:"bitmaps"`
}

// bitmapRef is BlockDirtyBitmapOrStr: a bitmap name on the command's
// node, or {"node", "name"}.
type bitmapRef struct {
	Node, Name string
}

// UnmarshalQAPI implements the alternate. QEMU 7.2 names a list element
// of the wrong type 'null' in its message; so do we.
func (r *bitmapRef) UnmarshalQAPI(v any, mode qapi.Mode, path string) error {
	switch t := v.(type) {
	case string:
		r.Name = t
	case map[string]any:
		var a bitmapArgs
		if err := qapi.DecodeValue(t, &a, mode, path); err != nil {
			return err
		}
		r.Node, r.Name = a.Node, a.Name
	default:
		return qapi.Errorf(qapi.GenericError, "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr")
	}
	return nil
}

// QAPISchema describes the alternate.
func (bitmapRef) QAPISchema(b *SchemaBuilder) string {
	return b.AddAlternate(b.Builtin("str"), b.Type(reflect.TypeOf(bitmapArgs{})))
}
