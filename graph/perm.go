package graph

import (
	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// Perm is a set of permission bits (see package permissions).
type Perm = permissions.Perm

const (
	pRead  = permissions.ConsistentRead
	pWrite = permissions.Write
	pWU    = permissions.WriteUnchanged
	pSize  = permissions.Resize
	pAll   = permissions.All
)

// DefaultChildPerm is what a parent with combined permissions (perm,
// shared) needs from a child in the given role, following QEMU's model
// (QEMU-FACTS.md, "Default child permissions by role"):
//   - a filtered child passes the parent's permissions through;
//   - a COW (backing) child gets consistent-read only, and shares write and
//     resize only if the parent shares write;
//   - a metadata child gets consistent-read, plus write and resize when the
//     node is writable, and shares neither write nor resize;
//   - a data child: write-unchanged becomes write, write adds resize, and
//     resize is not shared.
func DefaultChildPerm(role Role, readOnly bool, perm, shared permissions.Perm) (permissions.Perm, permissions.Perm) {
	switch {
	case role&RoleFiltered != 0:
		return perm, shared
	case role&RoleCOW != 0:
		p := perm & pRead
		s := pRead | pWU
		if shared&pWrite != 0 {
			s |= pWrite | pSize
		}
		return p, s
	}
	p, s := perm, shared
	if role&RoleData != 0 {
		if p&pWU != 0 {
			p |= pWrite
		}
		if p&pWrite != 0 {
			p |= pSize
		}
		s &^= pSize
	}
	if role&RoleMetadata != 0 {
		p |= pRead
		if !readOnly {
			p |= pWrite | pSize
		}
		s &^= pWrite | pSize
	}
	// A child only ever needs write-unchanged through a filter; with write
	// it is implied.
	if p&pWrite != 0 {
		p &^= pWU
	}
	return p, s
}

// permChange is one proposed change to the graph, checked as a whole.
type permChange struct {
	add      []*Child                       // new edges
	del      map[*Child]bool                // edges going away
	userPerm map[*Child][2]permissions.Perm // new permissions of User edges
	readOnly map[*Node]bool                 // new read-only state
	gone     map[*Node]bool                 // nodes being removed
}

func (ch *permChange) ro(n *Node) bool {
	if v, ok := ch.readOnly[n]; ok {
		return v
	}
	return n.readOnly
}

type permState struct{ perm, shared permissions.Perm }

// updatePermsLocked checks the proposed change as a whole and commits it,
// or changes nothing and returns the first problem in QEMU's words.
func (g *Graph) updatePermsLocked(ch *permChange) error {
	if ch.del == nil {
		ch.del = map[*Child]bool{}
	}
	in := map[*Node][]*Child{}
	out := map[*Node][]*Child{}
	var nodes []*Node
	for _, n := range g.order {
		if ch.gone[n] {
			continue
		}
		nodes = append(nodes, n)
		for _, c := range n.parents {
			if !ch.del[c] {
				in[n] = append(in[n], c)
			}
		}
		for _, c := range n.children {
			if !ch.del[c] {
				out[n] = append(out[n], c)
			}
		}
	}
	for _, c := range ch.add {
		in[c.node] = append(in[c.node], c)
		if c.parent != nil {
			out[c.parent] = append(out[c.parent], c)
		}
	}

	// Proposed edge permissions, computed parents first.
	edge := map[*Child]permState{}
	for _, n := range nodes {
		for _, c := range in[n] {
			if c.parent == nil {
				p := permState{c.perm, c.shared}
				if v, ok := ch.userPerm[c]; ok {
					p = permState{v[0], v[1]}
				}
				edge[c] = p
			}
		}
	}
	cum := map[*Node]permState{}
	pending := map[*Node]int{}
	for _, n := range nodes {
		for _, c := range in[n] {
			if c.parent != nil {
				pending[n]++
			}
		}
	}
	var queue []*Node
	for _, n := range nodes {
		if pending[n] == 0 {
			queue = append(queue, n)
		}
	}
	for len(queue) > 0 {
		n := queue[0]
		queue = queue[1:]
		st := permState{0, pAll}
		for _, c := range in[n] {
			e := edge[c]
			if n.common.ForceShare {
				e.shared = pAll
				edge[c] = e
			}
			st.perm |= e.perm
			st.shared &= e.shared
		}
		cum[n] = st
		for _, c := range out[n] {
			var p, s permissions.Perm
			if n.driver.ChildPerm != nil {
				p, s = n.driver.ChildPerm(c, ch.ro(n), st.perm, st.shared)
			} else {
				p, s = DefaultChildPerm(c.role, ch.ro(n), st.perm, st.shared)
			}
			edge[c] = permState{p, s}
			pending[c.node]--
			if pending[c.node] == 0 {
				queue = append(queue, c.node)
			}
		}
	}
	if len(cum) != len(nodes) {
		return qapi.Errorf(qapi.GenericError, "Making the graph change would create a cycle")
	}

	// Conflicts between the users of each node, and writes to read-only nodes.
	for _, n := range nodes {
		st := cum[n]
		if ch.ro(n) && st.perm&(pWrite|pWU) != 0 {
			return qapi.Errorf(qapi.GenericError, "Block node is read-only")
		}
		// Pairs are checked as QEMU does: each older user against each newer
		// one, the older first allowing the newer, so that a new user that
		// wants what an old one does not share is named as requiring it.
		users := in[n]
		for i, a := range users {
			for _, b := range users[i+1:] {
				if bad := edge[b].perm &^ edge[a].shared; bad != 0 {
					return permConflict(n, bad, b, a)
				}
				if bad := edge[a].perm &^ edge[b].shared; bad != 0 {
					return permConflict(n, bad, a, b)
				}
			}
		}
	}

	// Prepare drivers whose combined permissions change; abort all on error.
	var prepared []PermHandler
	var changed []*Node
	for _, n := range nodes {
		st := cum[n]
		if st.perm == n.perm && st.shared == n.shared {
			continue
		}
		changed = append(changed, n)
		if h, ok := n.inst.(PermHandler); ok && n.inst != nil {
			if err := h.CheckPerm(st.perm, st.shared); err != nil {
				for _, p := range prepared {
					p.AbortPerm()
				}
				return err
			}
			prepared = append(prepared, h)
		}
	}

	// Commit.
	for c, p := range edge {
		c.perm, c.shared = p.perm, p.shared
	}
	for _, c := range ch.add {
		c.node.parents = append(c.node.parents, c)
		if c.parent != nil {
			c.parent.children = append(c.parent.children, c)
		}
	}
	for c := range ch.del {
		c.node.parents = removeChild(c.node.parents, c)
		if c.parent != nil {
			c.parent.children = removeChild(c.parent.children, c)
		}
	}
	for _, n := range changed {
		st := cum[n]
		n.perm, n.shared = st.perm, st.shared
		if h, ok := n.inst.(PermHandler); ok && n.inst != nil {
			h.SetPerm(st.perm, st.shared)
		}
	}
	for n, ro := range ch.readOnly {
		n.readOnly = ro
	}
	return nil
}

func permConflict(n *Node, bad Perm, requiredBy, unsharedBy *Child) error {
	return qapi.Errorf(qapi.GenericError,
		"Permission conflict on node '%s': permissions '%s' are both required by %s and unshared by %s.",
		n.name, bad, requiredBy.desc(), unsharedBy.desc())
}

func removeChild(list []*Child, c *Child) []*Child {
	for i, x := range list {
		if x == c {
			return append(list[:i:i], list[i+1:]...)
		}
	}
	return list
}
