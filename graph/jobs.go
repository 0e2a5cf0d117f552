package graph

import (
	"context"
	"fmt"
	"reflect"
	"time"

	"blockbackend/qmp/qapi"
)

// The graph's side of the QMP commands that run as jobs (blockdev-create,
// x-blockdev-amend) and of the internal-snapshot commands: decoding of the
// driver-specific options, the checks QEMU makes before it starts, and
// the calls into the driver. The job machinery itself is package
// graph/job; it knows nothing of nodes.

// Emit sends a QMP event through Events (for the job machinery, which
// reports JOB_STATUS_CHANGE as the graph reports BLOCK_EXPORT_DELETED).
func (g *Graph) Emit(name string, data any) { g.emit(name, data) }

// unionHead is the tag of a union on "driver" and its other members.
type unionHead struct {
	Driver string         `qapi:"driver"`
	Rest   map[string]any `qapi:",rest"`
}

// emptyVariant decodes the members of a union variant that has none.
type emptyVariant struct{}

// PrepareCreate decodes blockdev-create's "options" (BlockdevCreateOptions,
// a union on "driver") strictly into the driver's create options, with
// QEMU's messages (member names prefixed with path, "options"), and
// returns the function that makes the image: the job's work.
func (g *Graph) PrepareCreate(opts map[string]any, mode qapi.Mode, path string) (func(ctx context.Context) error, error) {
	run, release, err := g.PrepareCreateJob(opts, mode, path)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		defer release()
		return run(ctx)
	}, nil
}

// PrepareCreateJob is PrepareCreate for a job that may never run: the
// nodes the options name are held from now until release, which the
// caller calls once, whether the job ran or not.
func (g *Graph) PrepareCreateJob(opts map[string]any, mode qapi.Mode, path string) (run func(ctx context.Context) error, release func(), err error) {
	var h unionHead
	if err := qapi.DecodeValue(opts, &h, mode, path); err != nil {
		return nil, nil, err
	}
	d, err := lookupDriverForOpen(h.Driver)
	if err != nil {
		return nil, nil, err
	}
	if d.Create == nil || d.NewCreateOptions == nil {
		// QEMU's variant for such a driver is empty: members are refused
		// before the driver is.
		if err := qapi.DecodeValue(h.Rest, &emptyVariant{}, mode, path); err != nil {
			return nil, nil, err
		}
		return nil, nil, qapi.Errorf(qapi.GenericError, "Driver does not support blockdev-create")
	}
	co := d.NewCreateOptions()
	if err := qapi.DecodeValue(h.Rest, co, mode, path); err != nil {
		return nil, nil, err
	}
	log := g.log.With("driver", d.Name)
	release = g.holdNamedRefs(co)
	return func(ctx context.Context) error {
		return d.Create(ctx, &CreateContext{g: g, log: log}, co)
	}, release, nil
}

// holdNamedRefs holds, until release, every existing node that the create
// options name in a BlockdevRef member, before the job starts: QEMU's
// create has its nodes by the time blockdev-create returns, so a
// blockdev-del that follows answers "Block device NAME is in use", and
// ours must not find a window before the job's OpenRef. The hold asks for
// nothing; OpenRef takes the permissions, in the job, as QEMU's create
// does. Names that find no node are left to OpenRef's message.
func (g *Graph) holdNamedRefs(co any) (release func()) {
	var held []*Child
	var walk func(v reflect.Value)
	walk = func(v reflect.Value) {
		switch v.Kind() {
		case reflect.Pointer, reflect.Interface:
			if !v.IsNil() {
				walk(v.Elem())
			}
		case reflect.Struct:
			if v.Type() == reflect.TypeFor[ChildRef]() {
				// By value: a struct under an interface is not
				// addressable.
				r := v.Interface().(ChildRef)
				if r.Ref == "" || r.Options != nil {
					return
				}
				if n, err := g.FindDevice(r.Ref, r.Ref); err == nil {
					if c, err := g.AttachUser(createHold{}, n, "create", 0, pAll); err == nil {
						held = append(held, c)
					}
				}
				return
			}
			for i := range v.NumField() {
				if f := v.Field(i); f.CanInterface() {
					walk(f)
				}
			}
		}
	}
	if v := reflect.ValueOf(co); v.Kind() == reflect.Pointer && !v.IsNil() {
		walk(v)
	}
	return func() {
		for _, c := range held {
			g.DetachUser(c)
		}
	}
}

// jobUser is a job's hold on a node: it keeps the node from being
// deleted while the job runs, and asks for nothing.
type jobUser struct{ id string }

func (u jobUser) UserDesc() string { return fmt.Sprintf("job '%s'", u.id) }

// PrepareAmend checks x-blockdev-amend's arguments (node, BlockdevAmendOptions,
// a union on "driver" that must be the node's driver) and returns the
// job's work and a release function to call once the job is over. The
// node is held (cannot be deleted) until release.
func (g *Graph) PrepareAmend(jobID, nodeName string, opts map[string]any, force bool, mode qapi.Mode, path string) (run func(ctx context.Context) error, release func(), err error) {
	n, err := g.FindNode(nodeName)
	if err != nil {
		return nil, nil, qapi.Errorf(qapi.GenericError, "Cannot find device='' nor node-name='%s'", nodeName)
	}
	var h unionHead
	if err := qapi.DecodeValue(opts, &h, mode, path); err != nil {
		return nil, nil, err
	}
	if _, err := lookupDriverForOpen(h.Driver); err != nil {
		return nil, nil, err
	}
	if h.Driver != n.driver.Name {
		return nil, nil, qapi.Errorf(qapi.GenericError, "x-blockdev-amend doesn't support changing the block driver")
	}
	amender, ok := n.Instance().(Amender)
	if !ok || n.driver.NewAmendOptions == nil {
		if err := qapi.DecodeValue(h.Rest, &emptyVariant{}, mode, path); err != nil {
			return nil, nil, err
		}
		return nil, nil, qapi.Errorf(qapi.GenericError, "Driver does not support x-blockdev-amend")
	}
	ao := n.driver.NewAmendOptions()
	if n.driver.NewQMPAmendOptions != nil {
		ao = n.driver.NewQMPAmendOptions()
	}
	if err := qapi.DecodeValue(h.Rest, ao, mode, path); err != nil {
		return nil, nil, err
	}
	c, err := g.AttachUser(jobUser{jobID}, n, "job", 0, pAll)
	if err != nil {
		return nil, nil, err
	}
	run = func(ctx context.Context) error {
		before := n.SizeNow()
		err := func() error {
			// Drained: no request runs in the driver while it rewrites
			// its metadata.
			n.io.Lock()
			defer n.io.Unlock()
			if n.inst == nil {
				return ErrClosed
			}
			err := amender.Amend(ctx, ao, force)
			if serr := n.refreshSize(); err == nil {
				err = serr
			}
			return err
		}()
		if n.SizeNow() != before {
			g.notifyResize(n)
		}
		return err
	}
	return run, func() { g.DetachUser(c) }, nil
}

// rootNode finds the node that the internal-snapshot commands name by
// "device": a node without parent nodes (exports and jobs do not count),
// as qemu-storage-daemon's commands find it.
func (g *Graph) rootNode(device string) (*Node, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := g.nodes[device]
	if n == nil {
		return nil, qapi.Errorf(qapi.GenericError, "Cannot find device='%s' nor node-name='%s'", device, device)
	}
	for _, c := range n.parents {
		if c.parent != nil {
			return nil, qapi.Errorf(qapi.GenericError, "Need a root block node")
		}
	}
	return n, nil
}

// SnapshotInternal creates an internal snapshot called name on the root
// node device (blockdev-snapshot-internal-sync), with the node drained.
// Its date and VM clock are the current time (a storage daemon has no
// guest clock; qemu-storage-daemon records the same).
func (g *Graph) SnapshotInternal(ctx context.Context, device, name string) error {
	n, err := g.rootNode(device)
	if err != nil {
		return err
	}
	if n.ReadOnly() {
		return qapi.Errorf(qapi.GenericError, "Device '%s' is read only", device)
	}
	snap, ok := n.Instance().(Snapshotter)
	if !ok {
		return qapi.Errorf(qapi.GenericError, "Block format '%s' used by device '%s' does not support internal snapshots", n.driver.Name, device)
	}
	if name == "" {
		return qapi.Errorf(qapi.GenericError, "Name is empty")
	}
	n.io.Lock()
	defer n.io.Unlock()
	if n.inst == nil {
		return ErrClosed
	}
	list, err := snap.Snapshots(ctx)
	if err != nil {
		return qapi.Errorf(qapi.GenericError, "Failed to get a snapshot list: %w", err)
	}
	for _, s := range list {
		if s.Name == name {
			return qapi.Errorf(qapi.GenericError, "Snapshot with name '%s' already exists on device '%s'", name, device)
		}
	}
	now := time.Now()
	_, err = snap.CreateSnapshot(ctx, SnapshotInfo{
		Name:        name,
		DateSec:     now.Unix(),
		DateNsec:    int64(now.Nanosecond()),
		VMClockNsec: now.UnixNano(),
		ICount:      -1,
	})
	if err != nil {
		return qapi.Errorf(qapi.GenericError, "Failed to create snapshot '%s' on device '%s': %w", name, device, err)
	}
	return nil
}

// DeleteSnapshotInternal deletes the internal snapshot of the root node
// device that matches id and name (blockdev-snapshot-delete-internal-sync;
// nil matches any, at least one must be given) and returns what it was.
func (g *Graph) DeleteSnapshotInternal(ctx context.Context, device string, id, name *string) (SnapshotInfo, error) {
	n, err := g.rootNode(device)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if id == nil && name == nil {
		return SnapshotInfo{}, qapi.Errorf(qapi.GenericError, "Name or id must be provided")
	}
	n.io.Lock()
	defer n.io.Unlock()
	if n.inst == nil {
		return SnapshotInfo{}, ErrClosed
	}
	snap, ok := n.inst.(Snapshotter)
	if !ok {
		return SnapshotInfo{}, qapi.Errorf(qapi.GenericError, "Failed to get a snapshot list: Operation not supported")
	}
	list, err := snap.Snapshots(ctx)
	if err != nil {
		return SnapshotInfo{}, qapi.Errorf(qapi.GenericError, "Failed to get a snapshot list: %w", err)
	}
	var found *SnapshotInfo
	for i := range list {
		s := &list[i]
		if (id == nil || *id == s.ID) && (name == nil || *name == s.Name) {
			found = s
			break
		}
	}
	if found == nil {
		show := func(p *string) string {
			if p == nil {
				return "null"
			}
			return *p
		}
		return SnapshotInfo{}, qapi.Errorf(qapi.GenericError, "Snapshot with id '%s' and name '%s' does not exist on device '%s'",
			show(id), show(name), device)
	}
	g.mu.Lock()
	ro := n.readOnly
	g.mu.Unlock()
	if ro {
		// What qemu-storage-daemon answers for a read-only node.
		return SnapshotInfo{}, qapi.Errorf(qapi.GenericError, "Failed to remove snapshot from snapshot list: Operation not permitted")
	}
	info, err := snap.DeleteSnapshot(ctx, found.ID, found.Name)
	if err != nil {
		return SnapshotInfo{}, qapi.Errorf(qapi.GenericError, "%w", err)
	}
	return info, nil
}
