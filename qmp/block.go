package qmp

import (
	"context"
	"reflect"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// BlockCommands registers the block layer's commands on s, over g.
// quit is called after the reply to "quit" has been sent.
func BlockCommands(s *Server, g *graph.Graph, quit func()) {
	reg := func(name string, args any, ret any, h Handler) {
		c := Command{Name: name, Handler: h}
		if args != nil {
			c.ArgType = reflect.TypeOf(args)
		}
		if ret != nil {
			c.RetType = reflect.TypeOf(ret)
		}
		s.Register(c)
	}

	s.RegisterEvent("BLOCK_EXPORT_DELETED", reflect.TypeOf(exportDeletedEvent{}))

	reg("quit", nil, nil, func(ctx context.Context, args map[string]any) (any, error) {
		return AfterReply(func() { quit() }), nil
	})

	reg("blockdev-add", blockdevAddArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		_, err := g.Add(ctx, args, qapi.JSON)
		return empty(err)
	})

	reg("blockdev-del", nodeNameArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		var a nodeNameArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return empty(g.Delete(ctx, a.NodeName))
	})

	reg("blockdev-reopen", reopenArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		var a reopenArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return empty(g.Reopen(ctx, a.Options, qapi.JSON))
	})

	reg("query-named-block-nodes", queryNodesArgs{}, []graph.NodeInfo{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a queryNodesArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return g.QueryNodes(a.Flat), nil
	})

	// qemu-storage-daemon has no guest devices: no BlockBackend is named or
	// attached to a device, so query-block lists nothing, as qsd's does.
	reg("query-block", nil, []any{}, func(ctx context.Context, args map[string]any) (any, error) {
		return []any{}, nil
	})

	reg("x-debug-query-block-graph", nil, graph.GraphDump{}, func(ctx context.Context, args map[string]any) (any, error) {
		return g.DumpGraph(), nil
	})

	reg("block_resize", resizeArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		var a resizeArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		n, err := g.FindDevice(a.Device, a.NodeName)
		if err != nil {
			return nil, err
		}
		return empty(g.Resize(ctx, n, a.Size))
	})

	reg("object-add", objectAddArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		return empty(g.Objects.Add(args, qapi.JSON))
	})

	reg("object-del", idArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		var a idArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return empty(g.Objects.Delete(a.ID))
	})

	reg("block-export-add", exportAddArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		_, err := g.AddExport(ctx, args, qapi.JSON)
		return empty(err)
	})

	reg("block-export-del", exportDelArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		var a exportDelArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return empty(g.DeleteExport(ctx, a.ID, a.Mode == "hard"))
	})

	bitmapCommands(s, g)

	reg("query-block-exports", nil, []graph.ExportInfo{}, func(ctx context.Context, args map[string]any) (any, error) {
		return g.Exports(), nil
	})
}

func empty(err error) (any, error) {
	if err != nil {
		return nil, err
	}
	return struct{}{}, nil
}

// Argument types: they decode strictly and describe the commands in
// query-qmp-schema.

// exportDeletedEvent describes BLOCK_EXPORT_DELETED's data for the schema.
type exportDeletedEvent struct {
	ID string `qapi:"id"`
}

type nodeNameArgs struct {
	NodeName string `qapi:"node-name"`
}

type idArgs struct {
	ID string `qapi:"id"`
}

type reopenArgs struct {
	Options []map[string]any `qapi:"options"`
}

type queryNodesArgs struct {
	Flat bool `qapi:"flat,optional"`
}

type resizeArgs struct {
	Device   string `qapi:"device,optional"`
	NodeName string `qapi:"node-name,optional"`
	Size     int64  `qapi:"size"`
}

// blockdevAddArgs describes BlockdevOptions' common members for the
// schema; the driver-specific ones are decoded by the graph.
type blockdevAddArgs struct {
	graph.CommonOptions
	Rest map[string]any `qapi:",rest"`
}

type objectAddArgs struct {
	QOMType string         `qapi:"qom-type"`
	ID      string         `qapi:"id"`
	Rest    map[string]any `qapi:",rest"`
}

type exportAddArgs struct {
	graph.ExportOptions
	Rest map[string]any `qapi:",rest"`
}

// ExportRemoveMode is BlockExportRemoveMode.
type ExportRemoveMode string

// EnumValues lists QEMU's values.
func (ExportRemoveMode) EnumValues() []string { return []string{"safe", "hard"} }

type exportDelArgs struct {
	ID   string           `qapi:"id"`
	Mode ExportRemoveMode `qapi:"mode,optional"`
}
