package qmp

import (
	"context"
	"reflect"

	"blockbackend/graph"
	"blockbackend/graph/job"
	"blockbackend/qmp/qapi"
)

// JobCommands registers the job commands (query-jobs, job-cancel, -pause,
// -resume, -complete, -finalize, -dismiss), the commands that start jobs
// (blockdev-create, x-blockdev-amend) and the internal-snapshot commands
// on s, over g. Events go out through g.Emit. The caller closes the
// returned manager at shutdown, before the graph (it cancels the jobs
// still running and waits for them).
func JobCommands(s *Server, g *graph.Graph) *job.Manager {
	m := job.NewManager(g.Emit)
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
	s.RegisterEvent(job.EventStatusChange, reflect.TypeOf(job.StatusChange{}))

	reg("blockdev-create", createArgsSchema{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		var a createArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		run, release, err := g.PrepareCreateJob(a.Options, qapi.JSON, "options")
		if err != nil {
			return nil, err
		}
		return empty(startOneStep(m, "create", a.JobID, run, release))
	})

	reg("x-blockdev-amend", amendArgsSchema{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		var a amendArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		if err := m.CheckID(a.JobID); err != nil {
			return nil, err
		}
		run, release, err := g.PrepareAmend(a.JobID, a.NodeName, a.Options, a.Force, qapi.JSON, "options")
		if err != nil {
			return nil, err
		}
		return empty(startOneStep(m, "amend", a.JobID, run, release))
	})

	reg("query-jobs", nil, []job.Info{}, func(ctx context.Context, args map[string]any) (any, error) {
		return m.Query(), nil
	})
	verb := func(name string, f func(id string) error) {
		reg(name, jobIDArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
			var a jobIDArgs
			if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
				return nil, err
			}
			return empty(f(a.ID))
		})
	}
	verb("job-cancel", m.Cancel)
	verb("job-pause", m.Pause)
	verb("job-resume", m.Resume)
	verb("job-complete", m.Complete)
	verb("job-finalize", m.Finalize)
	verb("job-dismiss", m.Dismiss)

	reg("blockdev-snapshot-internal-sync", snapshotArgs{}, nil, func(ctx context.Context, args map[string]any) (any, error) {
		var a snapshotArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		return empty(g.SnapshotInternal(ctx, a.Device, a.Name))
	})
	reg("blockdev-snapshot-delete-internal-sync", snapshotDeleteArgs{}, graph.SnapshotJSON{}, func(ctx context.Context, args map[string]any) (any, error) {
		var a snapshotDeleteArgs
		if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
			return nil, err
		}
		info, err := g.DeleteSnapshotInternal(ctx, a.Device, a.ID, a.Name)
		if err != nil {
			return nil, err
		}
		return graph.NewSnapshotJSON(info), nil
	})
	return m
}

type jobIDArgs struct {
	ID string `qapi:"id"`
}

type createArgs struct {
	JobID   string         `qapi:"job-id"`
	Options map[string]any `qapi:"options"`
}

// createArgsSchema describes blockdev-create's arguments in the schema.
type createArgsSchema struct {
	JobID   string        `qapi:"job-id"`
	Options createOptions `qapi:"options"`
}

type amendArgs struct {
	JobID    string         `qapi:"job-id"`
	NodeName string         `qapi:"node-name"`
	Options  map[string]any `qapi:"options"`
	Force    bool           `qapi:"force,optional"`
}

type amendArgsSchema struct {
	JobID    string       `qapi:"job-id"`
	NodeName string       `qapi:"node-name"`
	Options  amendOptions `qapi:"options"`
	Force    bool         `qapi:"force,optional"`
}

// createOptions is BlockdevCreateOptions in the schema: a union on
// "driver" with the create options of every registered driver that can
// create images.
type createOptions struct{}

func (createOptions) QAPISchema(b *SchemaBuilder) string {
	return driverUnion(b, func(d *graph.Driver) func() any {
		if d.Create == nil {
			return nil
		}
		return d.NewCreateOptions
	})
}

// amendOptions is BlockdevAmendOptions in the schema.
type amendOptions struct{}

func (amendOptions) QAPISchema(b *SchemaBuilder) string {
	return driverUnion(b, func(d *graph.Driver) func() any {
		if d.NewQMPAmendOptions != nil {
			return d.NewQMPAmendOptions
		}
		return d.NewAmendOptions
	})
}

// driverUnion adds a union on "driver" over the registered drivers, with
// the variant struct that opts gives for each (none when nil).
func driverUnion(b *SchemaBuilder, opts func(*graph.Driver) func() any) string {
	names := graph.Drivers()
	enum := b.AddEnum(names)
	var variants []SchemaVariant
	for _, n := range names {
		if f := opts(graph.Lookup(n)); f != nil {
			variants = append(variants, SchemaVariant{Case: n, Type: b.AddObject(b.Members(reflect.TypeOf(f())))})
		}
	}
	return b.AddUnion([]SchemaMember{{Name: "driver", Type: enum}}, "driver", variants)
}

type snapshotArgs struct {
	Device string `qapi:"device"`
	Name   string `qapi:"name"`
}

type snapshotDeleteArgs struct {
	Device string  `qapi:"device"`
	ID     *string `qapi:"id,optional"`
	Name   *string `qapi:"name,optional"`
}

// startOneStep starts a job whose work is one step (blockdev-create,
// x-blockdev-amend). Such jobs finalize themselves and wait for
// job-dismiss, as QEMU's do. release runs when the job is cleaned up, or
// at once if it cannot start.
func startOneStep(m *job.Manager, typ, id string, run func(context.Context) error, release func()) error {
	_, err := m.Start(&job.Kind{
		Type: typ,
		Run: func(ctx context.Context, j *job.Job) error {
			err := run(ctx)
			j.Progress(1)
			return err
		},
		Clean: func(*job.Job) { release() },
	}, job.Options{ID: id, AutoFinalize: true, Remaining: 1})
	if err != nil {
		release()
	}
	return err
}
