package graph

import (
	"context"
	"errors"
	"fmt"

	"blockbackend/qmp/qapi"
)

// openTxn remembers the nodes one Add created, so that a failure removes
// all of them and nothing else.
type openTxn struct {
	created []*Node
	probed  bool // the next node opened had its format probed
	noIO    bool // every node is opened for metadata only (OpenContext.NoIO)
}

// Add opens a node from BlockdevOptions (blockdev-add, --blockdev). The
// top node must be named; nested children may be named or get generated
// names. On error nothing is left behind.
func (g *Graph) Add(ctx context.Context, opts map[string]any, mode qapi.Mode) (*Node, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, errors.New("block layer is shutting down")
	}
	if name, _ := opts["node-name"].(string); name == "" {
		if _, ok := opts["node-name"]; !ok {
			return nil, qapi.Errorf(qapi.GenericError, "'node-name' must be specified for the root node")
		}
	}
	txn := &openTxn{}
	n, err := g.openNodeLocked(ctx, opts, mode, txn)
	if err != nil {
		return nil, err
	}
	n.monitor = true
	return n, nil
}

// driverNames are QEMU 7.2's BlockdevDriver values: a name in this list
// that we have not built gets a clear "not built" error rather than QEMU's
// "does not accept value".
var qemuDrivers = []string{
	"blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
	"copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
	"gluster", "host_cdrom", "host_device", "http", "https", "io_uring", "iscsi", "luks",
	"nbd", "nfs", "null-aio", "null-co", "nvme", "nvme-io_uring", "parallels", "preallocate",
	"qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi",
	"vhdx", "virtio-blk-vfio-pci", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa", "vmdk",
	"vpc", "vvfat",
}

func lookupDriverForOpen(name string) (*Driver, error) {
	if d := Lookup(name); d != nil {
		return d, nil
	}
	for _, q := range qemuDrivers {
		if q == name {
			return nil, qapi.Errorf(qapi.GenericError,
				"Driver '%s' is not built into blockbackend yet (see the feature table in README.md)", name)
		}
	}
	return nil, qapi.Errorf(qapi.GenericError, "Parameter 'driver' does not accept value '%s'", name)
}

func (g *Graph) openNodeLocked(ctx context.Context, opts map[string]any, mode qapi.Mode, txn *openTxn) (*Node, error) {
	var b blockdevOptions
	if err := qapi.Decode(opts, &b, mode); err != nil {
		return nil, err
	}
	drv, err := lookupDriverForOpen(b.Driver)
	if err != nil {
		return nil, err
	}
	if b.Discard == "" {
		b.Discard = "ignore"
	}
	if b.DetectZeroes == "" {
		b.DetectZeroes = "off"
	}
	if b.ForceShare && !b.ReadOnly {
		return nil, qapi.Errorf(qapi.GenericError, "force-share=on can only be used with read-only images")
	}
	if b.DetectZeroes == "unmap" && !b.Discard.Unmap() {
		return nil, qapi.Errorf(qapi.GenericError, "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
	}
	implicit := false
	name := b.NodeName
	if name == "" {
		name, implicit = g.genName(), true
	} else if err := g.checkNewName(name); err != nil {
		return nil, err
	}
	rest := b.Rest
	if rest == nil {
		rest = map[string]any{}
	}
	if drv.ParseFilename != nil {
		if fn, ok := rest["filename"].(string); ok {
			parsed, err := drv.ParseFilename(fn)
			if err != nil {
				return nil, err
			}
			delete(rest, "filename")
			for k := range parsed {
				if _, dup := rest[k]; dup {
					return nil, qapi.Errorf(qapi.GenericError, "'%s' and 'filename' cannot be used at the same time", k)
				}
			}
			qapi.Merge(rest, parsed)
		}
	}
	dopts := drv.NewOptions()
	if err := qapi.Decode(rest, dopts, mode); err != nil {
		return nil, err
	}
	n := &Node{
		g: g, name: name, implicit: implicit, driver: drv, opts: opts, dopts: dopts,
		mode: mode, common: b.CommonOptions, readOnly: b.ReadOnly,
		perm: 0, shared: pAll,
	}
	n.common.NodeName = name
	n.probed, txn.probed = txn.probed, false
	n.log = g.log.With("node-name", name, "driver", drv.Name)
	g.nodes[name] = n
	g.order = append(g.order, n)
	txn.created = append(txn.created, n)

	inst, err := drv.Open(ctx, &OpenContext{g: g, node: n, txn: txn}, dopts)
	if err != nil {
		// The driver may have attached children before failing: detach
		// them, closing the implicit ones.
		g.removeNodeLocked(n)
		return nil, err
	}
	n.inst = inst
	if err := n.refreshSize(); err != nil {
		_ = g.closeNodeLocked(n)
		return nil, err
	}
	return n, nil
}

func (g *Graph) openChild(ctx context.Context, oc *OpenContext, name string, ref *ChildRef, role Role, optional bool) (*Child, error) {
	if !ref.Present() || ref.Null {
		if optional || (ref != nil && ref.Null) {
			return nil, nil
		}
		return nil, qapi.Errorf(qapi.GenericError, "A block device must be specified for \"%s\"", name)
	}
	parent := oc.node
	var child *Node
	created := false
	if ref.Options == nil {
		c := g.nodes[ref.Ref]
		if c == nil {
			return nil, qapi.Errorf(qapi.GenericError, "Cannot find device='' nor node-name='%s'", ref.Ref)
		}
		if c == parent {
			return nil, qapi.Errorf(qapi.GenericError, "Making '%s' a %s child of '%s' would create a cycle", c.name, name, parent.name)
		}
		child = c
	} else {
		opts := qapi.Clone(ref.Options)
		inheritChildOptions(opts, parent.common, role, ref.Mode)
		before := len(g.order)
		c, err := g.openNodeLocked(ctx, opts, ref.Mode, oc.txn)
		if err != nil {
			return nil, err
		}
		child, created = c, true
		if name == "file" && !parent.driver.Protocol {
			g.orderBefore(parent, before)
		}
	}
	edge := &Child{name: name, role: role, parent: parent, node: child}
	if err := g.updatePermsLocked(&permChange{add: []*Child{edge}}); err != nil {
		if created {
			g.removeNodeLocked(child)
		}
		return nil, err
	}
	return edge, nil
}

// Delete removes a node added by blockdev-add (blockdev-del).
func (g *Graph) Delete(ctx context.Context, name string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	n, err := g.findLocked(name)
	if err != nil {
		return err
	}
	if !n.monitor {
		return qapi.Errorf(qapi.GenericError, "Node %s is not owned by the monitor", name)
	}
	if len(n.parents) > 0 {
		for _, c := range n.parents {
			if _, ok := c.user.(createHold); c.parent == nil && !ok {
				return qapi.Errorf(qapi.GenericError, "Node '%s' is busy: node is used as %s", name, c.user.UserDesc())
			}
		}
		return qapi.Errorf(qapi.GenericError, "Block device %s is in use", name)
	}
	return g.closeNodeLocked(n)
}

// closeNodeLocked closes a node without parents: drain, close the driver
// (its children still open, so it can write back), detach the children and
// close those that were implicit and have no other parent.
func (g *Graph) closeNodeLocked(n *Node) error {
	if len(n.parents) > 0 {
		return fmt.Errorf("graph: closing node %s that still has parents", n.name)
	}
	var err error
	n.io.Lock()
	if n.inst != nil {
		err = n.inst.Close()
		n.inst = nil
	}
	n.io.Unlock()
	g.removeNodeLocked(n)
	if err != nil {
		return fmt.Errorf("closing node '%s': %w", n.name, err)
	}
	return nil
}

// removeNodeLocked takes a closed (or never opened) node out of the graph
// and detaches its children; implicit children left without parents are
// closed too.
func (g *Graph) removeNodeLocked(n *Node) {
	delete(g.nodes, n.name)
	for i, x := range g.order {
		if x == n {
			g.order = append(g.order[:i:i], g.order[i+1:]...)
			break
		}
	}
	children := append([]*Child(nil), n.children...)
	del := map[*Child]bool{}
	for _, c := range children {
		del[c] = true
	}
	if len(del) > 0 {
		// Relaxing permissions cannot conflict; a driver refusing to drop a
		// lock is logged, the graph goes on.
		if err := g.updatePermsLocked(&permChange{del: del, gone: map[*Node]bool{n: true}}); err != nil {
			g.log.Warn("detaching children failed", "node-name", n.name, "err", err)
			for _, c := range children {
				c.node.parents = removeChild(c.node.parents, c)
			}
			n.children = nil
		}
	}
	for _, c := range children {
		if c.node.implicit && len(c.node.parents) == 0 && g.nodes[c.node.name] == c.node {
			if err := g.closeNodeLocked(c.node); err != nil {
				g.log.Warn("closing implicit child failed", "node-name", c.node.name, "err", err)
			}
		}
	}
}

// AttachUser makes u a parent of n with the given permissions, checked
// against every other user.
func (g *Graph) AttachUser(u User, n *Node, name string, perm, shared Perm) (*Child, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.attachUserLocked(u, n, name, perm, shared)
}

func (g *Graph) attachUserLocked(u User, n *Node, name string, perm, shared Perm) (*Child, error) {
	if g.nodes[n.name] != n {
		return nil, qapi.Errorf(qapi.GenericError, "Failed to find node with node-name='%s'", n.name)
	}
	c := &Child{name: name, role: RoleFilter, user: u, node: n, perm: perm, shared: shared}
	if err := g.updatePermsLocked(&permChange{add: []*Child{c}}); err != nil {
		return nil, err
	}
	return c, nil
}

// DetachUser removes a User edge.
func (g *Graph) DetachUser(c *Child) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.detachUserLocked(c)
}

func (g *Graph) detachUserLocked(c *Child) {
	if err := g.updatePermsLocked(&permChange{del: map[*Child]bool{c: true}}); err != nil {
		g.log.Warn("detaching user failed", "node-name", c.node.name, "err", err)
		c.node.parents = removeChild(c.node.parents, c)
	}
}

// SetUserPerm changes the permissions of a User edge, or fails and
// changes nothing.
func (g *Graph) SetUserPerm(c *Child, perm, shared Perm) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.updatePermsLocked(&permChange{userPerm: map[*Child][2]Perm{c: {perm, shared}}})
}

// orderBefore moves the nodes created since g.order had length from to
// just before parent. QEMU opens a format node's file child before the
// node itself (and its other children after), and its node list, which
// query-named-block-nodes shows newest first, is in that order.
func (g *Graph) orderBefore(parent *Node, from int) {
	moved := append([]*Node(nil), g.order[from:]...)
	rest := g.order[:from]
	out := make([]*Node, 0, len(g.order))
	for _, n := range rest {
		if n == parent {
			out = append(out, moved...)
		}
		out = append(out, n)
	}
	g.order = out
}
