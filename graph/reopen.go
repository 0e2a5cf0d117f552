package graph

import (
	"context"
	"reflect"

	"blockbackend/qmp/qapi"
)

// reopenItem is one node of a reopen transaction.
type reopenItem struct {
	n        *Node
	opts     map[string]any
	mode     qapi.Mode
	common   CommonOptions
	dopts    any
	readOnly bool
	commit   func()
	abort    func()
}

// Reopen changes the options of existing nodes as one transaction
// (blockdev-reopen). Each entry is complete BlockdevOptions for a named
// node; options left out return to their defaults. Children given by
// reference must stay the same node; implicit children given as nested
// options are reopened with them, and implicit children left out inherit
// the parent's new read-only state.
func (g *Graph) Reopen(ctx context.Context, list []map[string]any, mode qapi.Mode) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	var items []*reopenItem
	seen := map[*Node]bool{}
	for _, opts := range list {
		if err := g.collectReopen(opts, mode, nil, seen, &items); err != nil {
			return err
		}
	}

	// Permissions for the new read-only states, checked as a whole first.
	ro := map[*Node]bool{}
	for _, it := range items {
		ro[it.n] = it.readOnly
	}
	// Driver preparation.
	var prepared []*reopenItem
	abortAll := func() {
		for _, it := range prepared {
			if it.abort != nil {
				it.abort()
			}
		}
	}
	for _, it := range items {
		r, ok := it.n.inst.(Reopener)
		if !ok {
			if it.readOnly == it.n.readOnly && reflect.DeepEqual(it.dopts, it.n.dopts) {
				prepared = append(prepared, it)
				continue
			}
			abortAll()
			return qapi.Errorf(qapi.GenericError, "Block format '%s' used by node '%s' does not support reopening files", it.n.driver.Name, it.n.name)
		}
		commit, abort, err := r.PrepareReopen(ctx, it.dopts, it.readOnly)
		if err != nil {
			abortAll()
			return err
		}
		it.commit, it.abort = commit, abort
		prepared = append(prepared, it)
	}
	// Drain every node in the transaction (parents were collected before
	// their children, which is the lock order), then switch permissions and
	// driver state together.
	for _, it := range items {
		it.n.io.Lock()
	}
	defer func() {
		for i := len(items) - 1; i >= 0; i-- {
			items[i].n.io.Unlock()
		}
	}()
	if err := g.updatePermsLocked(&permChange{readOnly: ro}); err != nil {
		abortAll()
		return err
	}
	for _, it := range items {
		if it.commit != nil {
			it.commit()
		}
		it.n.opts, it.n.mode, it.n.common, it.n.dopts = it.opts, it.mode, it.common, it.dopts
		if s, err := it.n.inst.Size(); err == nil {
			it.n.size.Store(s)
		}
	}
	return nil
}

func (g *Graph) collectReopen(opts map[string]any, mode qapi.Mode, parent *reopenItem, seen map[*Node]bool, items *[]*reopenItem) error {
	var b blockdevOptions
	if err := qapi.Decode(opts, &b, mode); err != nil {
		return err
	}
	if b.NodeName == "" {
		return qapi.Errorf(qapi.GenericError, "node-name not specified")
	}
	n, err := g.findLocked(b.NodeName)
	if err != nil {
		return err
	}
	if seen[n] {
		return qapi.Errorf(qapi.GenericError, "Node '%s' is listed more than once in the reopen queue", n.name)
	}
	seen[n] = true
	if b.Driver != n.driver.Name {
		return qapi.Errorf(qapi.GenericError, "Cannot change the option 'driver'")
	}
	if b.Discard == "" {
		b.Discard = "ignore"
	}
	if b.DetectZeroes == "" {
		b.DetectZeroes = "off"
	}
	if b.ForceShare && !b.ReadOnly {
		return qapi.Errorf(qapi.GenericError, "force-share=on can only be used with read-only images")
	}
	// Drivers are reopened with their own options and the read-only
	// state; a new cache mode would not reach them, so refuse it rather
	// than pretend.
	if b.Cache.Direct != n.common.Cache.Direct {
		return qapi.Errorf(qapi.GenericError, "Cannot change the option 'cache.direct'")
	}
	if b.ForceShare != n.common.ForceShare {
		return qapi.Errorf(qapi.GenericError, "Cannot change the option 'force-share'")
	}
	rest := b.Rest
	if rest == nil {
		rest = map[string]any{}
	}
	it := &reopenItem{n: n, opts: opts, mode: mode, common: b.CommonOptions, readOnly: b.ReadOnly}
	*items = append(*items, it)

	// Children: each must remain the node it is.
	var nested []func() error
	for _, c := range n.children {
		v, given := rest[c.name]
		switch ref := v.(type) {
		case nil:
			if given {
				return qapi.Errorf(qapi.GenericError, "Cannot change the option '%s'", c.name)
			}
			if c.node.implicit && !seen[c.node] {
				child := c
				nested = append(nested, func() error { return g.inheritReopen(child, it, seen, items) })
			}
		case string:
			if ref != c.node.name {
				return qapi.Errorf(qapi.GenericError, "Cannot change the option '%s'", c.name)
			}
		case map[string]any:
			if !c.node.implicit {
				return qapi.Errorf(qapi.GenericError, "Cannot change the option '%s'", c.name)
			}
			sub := qapi.Clone(ref)
			if nn, ok := sub["node-name"].(string); ok && nn != c.node.name {
				return qapi.Errorf(qapi.GenericError, "Cannot change the option '%s'", c.name)
			}
			sub["node-name"] = c.node.name
			inheritChildOptions(sub, it.common, c.role, mode)
			nested = append(nested, func() error { return g.collectReopen(sub, mode, it, seen, items) })
		default:
			return qapi.Errorf(qapi.GenericError, "Invalid parameter type for '%s', expected: object", c.name)
		}
		// The driver's decoder must not reopen the child from these options.
		rest[c.name] = c.node.name
	}
	for k, v := range rest {
		if _, isChild := v.(map[string]any); isChild && childNamed(n, k) == nil {
			return qapi.Errorf(qapi.GenericError, "Cannot change the option '%s'", k)
		}
	}
	dopts := n.driver.NewOptions()
	if err := qapi.Decode(rest, dopts, mode); err != nil {
		return err
	}
	it.dopts = dopts
	for _, f := range nested {
		if err := f(); err != nil {
			return err
		}
	}
	return nil
}

// inheritReopen reopens an implicit child that the options left out: it
// keeps its own options, and takes the parent's new read-only state
// (QEMU's inheritance), unless it is a COW child.
func (g *Graph) inheritReopen(c *Child, parent *reopenItem, seen map[*Node]bool, items *[]*reopenItem) error {
	n := c.node
	opts := qapi.Clone(n.opts)
	opts["node-name"] = n.name
	if c.role&RoleCOW == 0 {
		opts["read-only"] = boolValue(parent.readOnly, n.mode)
	}
	return g.collectReopen(opts, n.mode, parent, seen, items)
}
