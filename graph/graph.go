// Package graph is blockbackend's block layer: nodes (QEMU's
// BlockDriverState), the edges between them with their roles, node names,
// the permission system, open/close/reopen, and the registries of drivers
// and export types.
//
// It knows no format: every format and protocol is a driver in drivers/,
// registered by name, reached only through the interfaces in driver.go.
//
// # Permissions
//
// Every edge into a node (from a parent node, an export or a job) carries
// the permissions its user needs (perm) and those it lets others have
// (shared), with QEMU's bits (package permissions). A node's combined
// permissions are the union of its incoming perms and the intersection of
// its incoming shared sets; from them each driver computes what it needs of
// its children (Driver.ChildPerm, or QEMU's defaults by role). Every change to
// the graph is checked as a whole before anything changes: the new state of
// every edge is computed, conflicts between the users of each node are
// looked for, drivers with a PermHandler (the file driver's image locks)
// prepare, and only then is the new state committed — or everything
// prepared is aborted.
//
// # Locking
//
// Lock order: Graph.mu, then Node.io (parents before children), then
// driver-internal locks. Graph.mu guards the structure (node table, edges,
// exports, permissions) and is held for every graph change; I/O never takes
// it. Node.io is a read-write lock: every request holds it shared while it
// runs in the driver, and a change that swaps driver state (reopen, close)
// takes it exclusively, which drains the node. The dirty bitmap locks
// (Node.bmMu, then DirtyBitmap.mu; bitmaps.go) come last: drivers take
// them under their own locks, and nothing is called with them held.
package graph

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// Role says what a child is to its parent (QEMU's BdrvChildRole).
type Role uint32

const (
	RoleData     Role = 1 << iota // guest data lives here
	RoleMetadata                  // the parent's own metadata lives here
	RoleFiltered                  // the parent passes requests through unchanged
	RoleCOW                       // backing: read for unallocated ranges only
	RolePrimary                   // the child that "file"-style lookups follow
)

// Common role combinations.
const (
	RoleImage    = RoleData | RoleMetadata | RolePrimary // qcow2's file
	RoleFilter   = RoleFiltered | RolePrimary            // raw's file
	RoleBacking  = RoleCOW
	RoleDataFile = RoleData
)

// Graph holds the nodes. One per process.
type Graph struct {
	log *slog.Logger
	// Objects are the QOM-like user objects (secrets).
	Objects *Objects
	// Events receives QMP events (BLOCK_EXPORT_DELETED, ...). Set before use.
	Events func(name string, data any)
	// ImageTool marks the image tool's graph (blockbackend img): drivers
	// then allow what only the tool may do (legacy AES images, for
	// conversion). Set before opening nodes; false in the daemon.
	ImageTool bool

	mu       sync.Mutex         // guards everything below, and all edges and permissions
	nodes    map[string]*Node   // by node name, implicit ones included
	order    []*Node            // creation order, for stable listings
	exports  map[string]*Export // by export id
	genCount int                // for generated node names
	closed   bool
}

// New returns an empty graph.
func New(log *slog.Logger) *Graph {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g := &Graph{
		log:     log,
		nodes:   map[string]*Node{},
		exports: map[string]*Export{},
		Objects: NewObjects(),
	}
	return g
}

// Logger is the graph's logger.
func (g *Graph) Logger() *slog.Logger { return g.log }

func (g *Graph) emit(name string, data any) {
	if g.Events != nil {
		g.Events(name, data)
	}
}

// Node is a block node.
type Node struct {
	g        *Graph
	name     string
	implicit bool // named by us; not deletable by blockdev-del
	monitor  bool // added by blockdev-add/--blockdev at top level
	probed   bool // format guessed by probing
	driver   *Driver
	opts     map[string]any // options as given (the node's whole subtree)
	dopts    any            // decoded driver options
	mode     qapi.Mode
	common   CommonOptions
	log      *slog.Logger

	io   sync.RWMutex // held shared by each request in the driver, exclusively to drain
	inst Instance     // guarded by io (swapped only with io held exclusively)
	size atomic.Int64 // cached virtual size; refreshed on open, truncate and reopen

	// Guarded by Graph.mu:
	readOnly bool
	children []*Child
	parents  []*Child
	perm     permissions.Perm
	shared   permissions.Perm

	// Stats.
	rdOps, wrOps, flOps, rdBytes, wrBytes atomic.Uint64

	// Dirty bitmaps (bitmaps.go): bmMu guards bitmaps; bmList is a copy
	// published for the write path, which reads it without a lock.
	bmMu    sync.Mutex
	bitmaps []*DirtyBitmap
	bmList  atomic.Pointer[[]*DirtyBitmap]
}

// Name is the node name.
func (n *Node) Name() string { return n.name }

// DriverName is the driver's name.
func (n *Node) DriverName() string { return n.driver.Name }

// Driver is the node's driver.
func (n *Node) Driver() *Driver { return n.driver }

// ReadOnly reports whether the node is read-only.
func (n *Node) ReadOnly() bool {
	n.g.mu.Lock()
	defer n.g.mu.Unlock()
	return n.readOnly
}

// Common returns the node's common options.
func (n *Node) Common() CommonOptions { return n.common }

// Options returns the node's options as given.
func (n *Node) Options() map[string]any { return n.opts }

// Instance is the driver's state, for drivers that look at a child's
// capabilities (for example a format asking its file for alignment).
func (n *Node) Instance() Instance {
	n.io.RLock()
	defer n.io.RUnlock()
	return n.inst
}

// Perms returns the node's combined permissions.
func (n *Node) Perms() (perm, shared permissions.Perm) {
	n.g.mu.Lock()
	defer n.g.mu.Unlock()
	return n.perm, n.shared
}

// Children returns the node's child edges.
func (n *Node) Children() []*Child {
	n.g.mu.Lock()
	defer n.g.mu.Unlock()
	return append([]*Child(nil), n.children...)
}

// Child returns the child edge called name, or nil.
func (n *Node) Child(name string) *Child {
	n.g.mu.Lock()
	defer n.g.mu.Unlock()
	return childNamed(n, name)
}

func childNamed(n *Node, name string) *Child {
	for _, c := range n.children {
		if c.name == name {
			return c
		}
	}
	return nil
}

// Filename is what QEMU shows as the node's "file": the protocol's
// filename, or the primary child's.
func (n *Node) Filename() string {
	if f, ok := n.Instance().(Filenamer); ok {
		return f.Filename()
	}
	for _, c := range n.Children() {
		if c.role&RolePrimary != 0 {
			return c.node.Filename()
		}
	}
	return ""
}

// User is a parent of a node that is not itself a node: an export, a job,
// a temporary user such as block_resize.
type User interface {
	// UserDesc describes the user in permission errors, as QEMU does:
	// "block device 'x'", "block export 'e0'".
	UserDesc() string
}

// Child is an edge from a parent (a node or a User) to a node.
type Child struct {
	name   string
	role   Role
	parent *Node // nil for a User
	user   User
	node   *Node
	// Guarded by Graph.mu:
	perm, shared permissions.Perm
}

// Name is the edge's name ("file", "backing", "root", ...).
func (c *Child) Name() string { return c.name }

// Role is the edge's role.
func (c *Child) Role() Role { return c.role }

// Node is the child node.
func (c *Child) Node() *Node { return c.node }

// Perms returns the edge's permissions.
func (c *Child) Perms() (perm, shared permissions.Perm) {
	c.node.g.mu.Lock()
	defer c.node.g.mu.Unlock()
	return c.perm, c.shared
}

func (c *Child) parentDesc() string {
	if c.parent != nil {
		return fmt.Sprintf("node '%s'", c.parent.name)
	}
	return c.user.UserDesc()
}

func (c *Child) desc() string {
	return fmt.Sprintf("%s (uses node '%s' as '%s' child)", c.parentDesc(), c.node.name, c.name)
}

// FindNode returns the node called name, with QEMU's error otherwise.
func (g *Graph) FindNode(name string) (*Node, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.findLocked(name)
}

func (g *Graph) findLocked(name string) (*Node, error) {
	if n := g.nodes[name]; n != nil {
		return n, nil
	}
	return nil, qapi.Errorf(qapi.GenericError, "Failed to find node with node-name='%s'", name)
}

// FindDevice finds a node by device (export id, our closest thing to a
// BlockBackend name) or node name, for commands that take either.
func (g *Graph) FindDevice(device, nodeName string) (*Node, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if device != "" {
		if e := g.exports[device]; e != nil {
			return e.node, nil
		}
	}
	if nodeName != "" {
		if n := g.nodes[nodeName]; n != nil {
			return n, nil
		}
	}
	return nil, qapi.Errorf(qapi.DeviceNotFound, "Cannot find device='%s' nor node-name='%s'", device, nodeName)
}

// Nodes returns every node in creation order.
func (g *Graph) Nodes() []*Node {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]*Node(nil), g.order...)
}

// MonitorNodes returns the nodes added at top level (by blockdev-add or
// --blockdev), in creation order.
func (g *Graph) MonitorNodes() []*Node {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []*Node
	for _, n := range g.order {
		if n.monitor {
			out = append(out, n)
		}
	}
	return out
}

// validNodeName applies QEMU's rules for ids: a letter first, then
// letters, digits, '-', '.', '_'.
func validNodeName(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
		case i > 0 && (r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_'):
		default:
			return false
		}
	}
	return true
}

// maxNodeName is QEMU's limit (a 32-byte buffer with its NUL).
const maxNodeName = 31

func (g *Graph) checkNewName(name string) error {
	if !validNodeName(name) {
		return qapi.Errorf(qapi.GenericError, "Invalid node-name: '%s'", name)
	}
	if len(name) > maxNodeName {
		return qapi.Errorf(qapi.GenericError, "Node name too long")
	}
	if _, ok := g.exports[name]; ok {
		return qapi.Errorf(qapi.GenericError, "node-name=%s is conflicting with a device id", name)
	}
	if _, ok := g.nodes[name]; ok {
		return qapi.Errorf(qapi.GenericError, "Duplicate nodes with node-name='%s'", name)
	}
	return nil
}

// genName makes a name for an implicit node, in QEMU's style ("#block123").
func (g *Graph) genName() string {
	for {
		g.genCount++
		name := fmt.Sprintf("#block%03d", g.genCount)
		if _, ok := g.nodes[name]; !ok {
			return name
		}
	}
}

// Close closes every export and node. Safe twice.
func (g *Graph) Close() error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	exports := make([]*Export, 0, len(g.exports))
	for _, e := range g.exports {
		exports = append(exports, e)
	}
	g.mu.Unlock()
	var errs []error
	for _, e := range exports {
		if err := g.DeleteExport(context.Background(), e.id, true); err != nil {
			errs = append(errs, err)
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	// Close roots first so parents go before children.
	for len(g.order) > 0 {
		progress := false
		for _, n := range append([]*Node(nil), g.order...) {
			if len(n.parents) == 0 {
				errs = append(errs, g.closeNodeLocked(n))
				progress = true
			}
		}
		if !progress {
			errs = append(errs, errors.New("graph: nodes left with parents at close"))
			break
		}
	}
	return errors.Join(errs...)
}
