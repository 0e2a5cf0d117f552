package qmp

import (
	"context"
	"reflect"

	"blockbackend/graph"
	"blockbackend/nbd/nbdexport"
	"blockbackend/qmp/qapi"
)

// NBDCommands registers nbd-server-start/stop/add/remove over the process's
// NBD server.
func NBDCommands(s *Server, g *graph.Graph) {
	m := nbdexport.Default()
	reg := func(name string, args any, h Handler) {
		s.Register(Command{Name: name, Handler: h, ArgType: reflect.TypeOf(args)})
	}
	reg("nbd-server-start", nbdexport.LegacyServerOptions{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a nbdexport.LegacyServerOptions
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		o, err := a.Flat()
		if err != nil {
			return nil, err
		}
		return empty(m.Start(o))
	})
	s.Register(Command{Name: "nbd-server-stop", Handler: func(ctx context.Context, args map[string]any) (any, error) {
		return empty(StopNBD(ctx, g))
	}})
	reg("nbd-server-add", nbdAddArgs{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a nbdAddArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		name := a.Device
		if a.Name != "" {
			name = a.Name
		}
		opts := map[string]any{
			"type": "nbd", "id": name, "node-name": a.Device, "name": name,
			"writable": a.Writable, "description": a.Description,
		}
		if a.Bitmap != "" {
			opts["bitmaps"] = []any{a.Bitmap}
		}
		_, err := g.AddExport(ctx, opts, qapi.JSON)
		return empty(err)
	})
	reg("nbd-server-remove", nbdRemoveArgs{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a nbdRemoveArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		for _, e := range g.Exports() {
			if e.Type == "nbd" && e.ID == a.Name {
				return empty(g.DeleteExport(ctx, e.ID, a.Mode == "hard"))
			}
		}
		return nil, qapi.Errorf(qapi.GenericError, "Export '%s' is not found", a.Name)
	})
}

// StopNBD deletes every NBD export (emitting their events) and stops the
// server.
func StopNBD(ctx context.Context, g *graph.Graph) error {
	m := nbdexport.Default()
	if !m.Running() {
		return qapi.Errorf(qapi.GenericError, "NBD server not running")
	}
	for _, e := range g.Exports() {
		if e.Type == "nbd" {
			if err := g.DeleteExport(ctx, e.ID, true); err != nil {
				return err
			}
		}
	}
	return m.Stop()
}

type nbdAddArgs struct {
	Device      string `qapi:"device"`
	Name        string `qapi:"name,optional"`
	Description string `qapi:"description,optional"`
	Writable    bool   `qapi:"writable,optional"`
	Bitmap      string `qapi:"bitmap,optional"`
}

type nbdRemoveArgs struct {
	Name string           `qapi:"name"`
	Mode ExportRemoveMode `qapi:"mode,optional"`
}
