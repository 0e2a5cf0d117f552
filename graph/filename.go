package graph

import (
	"blockbackend/qmp/qapi"
)

// QueryFilename is the node's filename as QEMU shows it in
// query-named-block-nodes ("file", "image.filename" and a parent's
// "backing_file"). Observed in qemu-storage-daemon 7.2: a protocol node
// shows its own filename, and a format node its file child's, unless
// the node cannot be opened again from that name alone; then the name
// is "json:" and the options that matter, printed in QDict order. That
// is when the node has strong options (Driver.StrongOptions), when its
// backing child was given in the options rather than read from the
// image (a node name, inline options or null), or when its file child
// is not a protocol node or has a json: name itself.
func (n *Node) QueryFilename() string {
	if n.plainFilename() {
		return n.Filename()
	}
	return "json:" + qapi.CompactJSON(n.fullOptions())
}

func (n *Node) plainFilename() bool {
	if len(n.strongOptions()) > 0 {
		return false
	}
	if n.driver.Protocol {
		return true
	}
	if n.explicitBacking() {
		return false
	}
	fc := n.Child("file")
	if fc == nil {
		return true
	}
	return fc.node.driver.Protocol && fc.node.plainFilename()
}

func (n *Node) strongOptions() map[string]any {
	if n.driver.StrongOptions == nil {
		return nil
	}
	n.g.mu.Lock()
	dopts := n.dopts
	n.g.mu.Unlock()
	return n.driver.StrongOptions(dopts)
}

// fullOptions are the options a json: filename holds: the driver, a
// protocol node's filename, the strong options, the file child's full
// options, and the backing child's (or null) when the options gave one.
// Weak options (node-name, read-only, cache, discard, ...) and a
// data-file child do not appear, as in QEMU 7.2.
func (n *Node) fullOptions() map[string]any {
	m := map[string]any{"driver": n.driver.Name}
	if n.driver.Protocol {
		if fn := n.Filename(); fn != "" {
			m["filename"] = fn
		}
	}
	for k, v := range n.strongOptions() {
		m[k] = v
	}
	if fc := n.Child("file"); fc != nil {
		m["file"] = fc.node.fullOptions()
	}
	if n.explicitBacking() {
		if bc := n.Child("backing"); bc != nil {
			m["backing"] = bc.node.fullOptions()
		} else {
			m["backing"] = nil
		}
	}
	return m
}

// explicitBacking reports whether the node's options named its backing
// child (or null) rather than leaving it to the image.
func (n *Node) explicitBacking() bool {
	n.g.mu.Lock()
	defer n.g.mu.Unlock()
	_, ok := n.opts["backing"]
	return ok
}
