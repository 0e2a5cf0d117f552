package graph

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"

	"blockbackend/qmp/qapi"
)

// ExportType is a kind of export ("nbd", "vhost-user-blk"), registered by
// the package that serves it.
type ExportType struct {
	Name string
	// Resizable exports can tell their clients about a new size, and so
	// share the resize permission; others (NBD) do not, like QEMU's.
	Resizable bool
	// NewOptions returns a pointer to the type's own options (the members
	// of BlockExportOptions beyond the common ones), with defaults.
	NewOptions func() any
	// Start begins serving. The export is already attached to its node with
	// the permissions its common options imply.
	Start func(ctx context.Context, e *Export, opts any) (ExportInstance, error)
}

// ExportInstance is a running export.
type ExportInstance interface {
	// InUse reports whether clients are connected (block-export-del in safe
	// mode refuses then).
	InUse() bool
	// Close stops serving; hard disconnects clients at once. It returns once
	// no request of the export is in flight.
	Close(hard bool) error
}

var exportTypes = struct {
	sync.RWMutex
	m map[string]*ExportType
}{m: map[string]*ExportType{}}

// RegisterExportType adds an export type; a duplicate panics (init-time).
func RegisterExportType(t *ExportType) {
	exportTypes.Lock()
	defer exportTypes.Unlock()
	if _, dup := exportTypes.m[t.Name]; dup {
		panic("graph: export type " + t.Name + " registered twice")
	}
	exportTypes.m[t.Name] = t
}

// ExportTypes lists the registered export type names.
func ExportTypes() []string {
	exportTypes.RLock()
	defer exportTypes.RUnlock()
	var out []string
	for n := range exportTypes.m {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// ExportOptions are the common members of BlockExportOptions, plus our
// share-rw.
type ExportOptions struct {
	Type          string `qapi:"type"`
	ID            string `qapi:"id"`
	FixedIOThread bool   `qapi:"fixed-iothread,optional"`
	IOThread      string `qapi:"iothread,optional"`
	NodeName      string `qapi:"node-name"`
	Writable      bool   `qapi:"writable,optional"`
	Writethrough  bool   `qapi:"writethrough,optional"`
	// ShareRW lets other writers use the image while we export it, as the
	// share-rw property of QEMU's block devices does. Off by default: the
	// export then protects the image like a QEMU device does (it does not
	// share write), unlike qemu-storage-daemon's exports, which share
	// everything.
	ShareRW bool `qapi:"share-rw,optional"`
}

type exportOptions struct {
	ExportOptions
	Rest map[string]any `qapi:",rest"`
}

// Export is an export of a node.
type Export struct {
	g        *Graph
	id       string
	typ      *ExportType
	opts     ExportOptions
	node     *Node
	child    *Child
	inst     ExportInstance
	deleting bool // guarded by Graph.mu
}

// ID is the export's id.
func (e *Export) ID() string { return e.id }

// Node is the exported node. I/O goes through its methods.
func (e *Export) Node() *Node { return e.node }

// Options returns the common options.
func (e *Export) Options() ExportOptions { return e.opts }

// Logger returns a logger with the export's attributes.
func (e *Export) Logger() *slog.Logger { return e.g.log.With("export", e.id, "node-name", e.node.name) }

// UserDesc implements User.
func (e *Export) UserDesc() string { return fmt.Sprintf("block export '%s'", e.id) }

// ExportPerms are the permissions an export with these options holds on its
// node: like a QEMU block device, consistent-read (+ write when writable),
// sharing consistent-read, write-unchanged, resize if the export type can
// announce a new size, and write only with share-rw.
func ExportPerms(o ExportOptions, resizable bool) (perm, shared Perm) {
	perm = pRead
	if o.Writable {
		perm |= pWrite
	}
	shared = pRead | pWU
	if resizable {
		shared |= pSize
	}
	if o.ShareRW {
		shared |= pWrite
	}
	return perm, shared
}

// AddExport starts an export from BlockExportOptions (block-export-add,
// --export).
func (g *Graph) AddExport(ctx context.Context, opts map[string]any, mode qapi.Mode) (*Export, error) {
	var o exportOptions
	if err := qapi.Decode(opts, &o, mode); err != nil {
		return nil, err
	}
	exportTypes.RLock()
	typ := exportTypes.m[o.Type]
	exportTypes.RUnlock()
	if typ == nil {
		switch o.Type {
		case "nbd", "vhost-user-blk", "fuse", "vduse-blk":
			return nil, qapi.Errorf(qapi.GenericError, "Export type '%s' is not built into blockbackend yet (see the feature table in README.md)", o.Type)
		}
		return nil, qapi.Errorf(qapi.GenericError, "Parameter 'type' does not accept value '%s'", o.Type)
	}
	topts := typ.NewOptions()
	if o.Rest == nil {
		o.Rest = map[string]any{}
	}
	if err := qapi.Decode(o.Rest, topts, mode); err != nil {
		return nil, err
	}
	if o.IOThread != "" {
		return nil, qapi.Errorf(qapi.GenericError, "Cannot find iothread '%s': blockbackend runs requests on Go's scheduler and has no iothread objects", o.IOThread)
	}

	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil, qapi.Errorf(qapi.GenericError, "block layer is shutting down")
	}
	if _, dup := g.exports[o.ID]; dup {
		g.mu.Unlock()
		return nil, qapi.Errorf(qapi.GenericError, "Block export id '%s' is already in use", o.ID)
	}
	n := g.nodes[o.NodeName]
	if n == nil {
		g.mu.Unlock()
		return nil, qapi.Errorf(qapi.GenericError, "Cannot find device='' nor node-name='%s'", o.NodeName)
	}
	if o.Writable && n.readOnly {
		g.mu.Unlock()
		return nil, qapi.Errorf(qapi.GenericError, "Cannot export read-only node as writable")
	}
	e := &Export{g: g, id: o.ID, typ: typ, opts: o.ExportOptions, node: n}
	perm, shared := ExportPerms(o.ExportOptions, typ.Resizable)
	c, err := g.attachUserLocked(e, n, "root", perm, shared)
	if err != nil {
		g.mu.Unlock()
		return nil, err
	}
	e.child = c
	// Reserve the id while the export starts without holding the graph lock
	// (starting may wait for a socket).
	g.exports[o.ID] = e
	g.mu.Unlock()

	inst, err := typ.Start(ctx, e, topts)
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil {
		delete(g.exports, o.ID)
		g.detachUserLocked(c)
		return nil, err
	}
	e.inst = inst
	return e, nil
}

// DeleteExport stops an export (block-export-del). In safe mode an export
// with connected clients is refused; hard mode disconnects them. The
// BLOCK_EXPORT_DELETED event is emitted once the export is gone.
func (g *Graph) DeleteExport(ctx context.Context, id string, hard bool) error {
	g.mu.Lock()
	e := g.exports[id]
	if e == nil || e.inst == nil {
		g.mu.Unlock()
		return qapi.Errorf(qapi.GenericError, "Export '%s' is not found", id)
	}
	if e.deleting {
		g.mu.Unlock()
		return qapi.Errorf(qapi.GenericError, "Export '%s' is already shutting down", id)
	}
	if !hard && e.inst.InUse() {
		g.mu.Unlock()
		return qapi.Errorf(qapi.GenericError, "Export '%s' is in use", id)
	}
	e.deleting = true
	g.mu.Unlock()

	err := e.inst.Close(hard)

	g.mu.Lock()
	delete(g.exports, id)
	g.detachUserLocked(e.child)
	g.mu.Unlock()
	g.emit("BLOCK_EXPORT_DELETED", map[string]any{"id": id})
	if err != nil {
		return fmt.Errorf("export '%s' closed with an error: %w", id, err)
	}
	return nil
}

// ExportInfo is one entry of query-block-exports.
type ExportInfo struct {
	Type         string `json:"type"`
	ID           string `json:"id"`
	NodeName     string `json:"node-name"`
	ShuttingDown bool   `json:"shutting-down"`
}

// Exports lists the exports, sorted by id.
func (g *Graph) Exports() []ExportInfo {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]ExportInfo, 0, len(g.exports))
	for _, e := range g.exports {
		if e.inst == nil {
			continue
		}
		out = append(out, ExportInfo{e.typ.Name, e.id, e.node.name, e.deleting})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}
