package graph

import (
	"context"
	"fmt"
)

// CompressedWriter is an optional capability of formats that store
// compressed clusters (qcow2's). Image conversion with compression
// (img convert -c) writes whole, cluster-aligned clusters through it.
type CompressedWriter interface {
	// ClusterSize is the unit of compressed writes, in bytes.
	ClusterSize() int64
	// WriteCompressed writes data, compressed, at off. off is a multiple
	// of ClusterSize and len(data) is ClusterSize, or less for the last
	// cluster of the image.
	WriteCompressed(ctx context.Context, off int64, data []byte) error
}

// CompressedWriter returns the node's CompressedWriter, or nil when its
// format cannot write compressed clusters.
func (n *Node) CompressedWriter() CompressedWriter {
	cw, _ := n.Instance().(CompressedWriter)
	return cw
}

// WriteCompressed writes one compressed cluster through the node, with
// the checks of WriteV (range, read-only, closed).
func (n *Node) WriteCompressed(ctx context.Context, off int64, data []byte) error {
	inst, err := n.beginWrite(off, int64(len(data)))
	if err != nil {
		return err
	}
	defer n.end()
	cw, ok := inst.(CompressedWriter)
	if !ok {
		return fmt.Errorf("Compression not supported for this file format: %w", ErrNotSupported)
	}
	defer n.markDirty(off, int64(len(data)))
	n.wrOps.Add(1)
	n.wrBytes.Add(uint64(len(data)))
	return cw.WriteCompressed(ctx, off, data)
}
