package graph

// QuickReader is an optional capability of drivers that can serve some
// reads at once: without I/O and without waiting for a lock that another
// request holds. A format driver's reads of zero clusters, or of
// unallocated ones without a backing node (an empty image), cost it a
// table look-up and clearing the buffers, less than starting a goroutine
// for them: an export's ring worker can answer such reads in line, as
// QEMU answers them in a coroutine without leaving its event loop. A
// caller that serves a ring on one goroutine may keep to small requests:
// clearing a large buffer in line holds up the requests behind it.
type QuickReader interface {
	// ReadQuick reads len(iov) bytes at off into iov if it can do so
	// without I/O and without blocking, and reports whether it did. The
	// range is within the node (the graph checks). On false, iov's
	// contents are unspecified and the caller issues ReadV, which
	// serves the read whatever it needs and reports any error.
	ReadQuick(off int64, iov [][]byte) bool
}

// ReadQuick reads len(iov) bytes at off if the node's driver can serve
// them at once (QuickReader) and reports whether it did. It never
// blocks: false also when the range is outside the node, when the driver
// lacks the capability, and while the node is drained or closed. The
// caller then issues ReadV.
func (n *Node) ReadQuick(off int64, iov [][]byte) bool {
	length := iovLen(iov)
	if n.checkRange(off, length) != nil {
		return false
	}
	if !n.io.TryRLock() {
		return false
	}
	defer n.io.RUnlock()
	q, ok := n.inst.(QuickReader)
	if !ok || !q.ReadQuick(off, iov) {
		return false
	}
	n.rdOps.Add(1)
	n.rdBytes.Add(uint64(length))
	return true
}
