package graph

import (
	"context"

	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// createHold is a create job's hold on a node it formats: the node cannot
// be deleted while the job runs (QEMU's blockdev-del then answers "Block
// device NAME is in use"). It takes what QEMU's create takes of the node,
// write and resize, and shares all: an export that does not share write
// makes the create fail with the graph's conflict message.
type createHold struct{}

func (createHold) UserDesc() string { return "blockdev-create" }

const createPerm = permissions.Write | permissions.Resize

// OpenRef resolves a create option that is a BlockdevRef (qcow2's "file"
// and "data-file", luks's and raw's "file"): the name of an existing node,
// or the definition of a node opened only for the job, as QEMU opens
// inline definitions. The node is held until release, which closes a node
// opened here. name is the option's name, for messages.
func (cc *CreateContext) OpenRef(ctx context.Context, ref *ChildRef, name string) (n *Node, release func(), err error) {
	g := cc.g
	if !ref.Present() || ref.Null {
		return nil, nil, qapi.Errorf(qapi.GenericError, "A block device must be specified for \"%s\"", name)
	}
	if ref.Options == nil {
		if n, err = cc.LookupNode(ref.Ref); err != nil {
			return nil, nil, err
		}
		c, err := g.AttachUser(createHold{}, n, name, createPerm, pAll)
		if err != nil {
			return nil, nil, err
		}
		return n, func() { g.DetachUser(c) }, nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	n, err = g.openNodeLocked(ctx, qapi.Clone(ref.Options), ref.Mode, &openTxn{})
	if err != nil {
		return nil, nil, err
	}
	c, err := g.attachUserLocked(createHold{}, n, name, createPerm, pAll)
	if err != nil {
		_ = g.closeNodeLocked(n)
		return nil, nil, err
	}
	return n, func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		g.detachUserLocked(c)
		if len(n.parents) == 0 {
			if err := g.closeNodeLocked(n); err != nil {
				g.log.Warn("closing a node opened for blockdev-create failed", "node-name", n.name, "err", err)
			}
		}
	}, nil
}
