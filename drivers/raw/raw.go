// Package raw is QEMU's raw format driver: the guest sees the bytes of its
// file child, optionally a slice of them (offset, size). It is a filter
// when it passes the whole child through, and a data user of the child
// when it is a slice (it must then not let the child be resized under it).
//
// A raw node whose format was guessed by probing refuses writes that would
// make the first sector look like another format, as QEMU does, so that a
// guest cannot turn its disk into a qcow2 whose backing file is a host file.
package raw

import (
	"context"
	"fmt"
	"syscall"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// Options is BlockdevOptionsRaw.
type Options struct {
	File   graph.ChildRef `qapi:"file"`
	Offset *int64         `qapi:"offset,optional"`
	Size   *int64         `qapi:"size,optional"`
}

func init() {
	graph.Register(&graph.Driver{
		Name:       "raw",
		NewOptions: func() any { return &Options{} },
		Open:       open,
		// qemu-img creates raw images; blockdev-create does not.
		NewImageCreateOptions: func() any { return &CreateOptions{Preallocation: "off"} },
		ImageCreate:           create,
		Measure:               measure,
		// Raw matches anything, with the lowest score: it is the fallback.
		Probe: func([]byte, string) int { return 1 },
		// offset and size pick a slice of the file: QEMU's strong options.
		StrongOptions: func(o any) map[string]any {
			opts, m := o.(*Options), map[string]any{}
			if opts.Offset != nil {
				m["offset"] = *opts.Offset
			}
			if opts.Size != nil {
				m["size"] = *opts.Size
			}
			return m
		},
	})
}

type node struct {
	file   *graph.Node
	offset int64
	size   int64 // -1: follow the file's size
	probed bool
}

func open(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
	opts := o.(*Options)
	role := graph.RoleFilter
	if opts.Offset != nil || opts.Size != nil {
		role = graph.RoleData | graph.RolePrimary
	}
	c, err := oc.OpenChild(ctx, "file", &opts.File, role, false)
	if err != nil {
		return nil, err
	}
	n := &node{file: c.Node(), size: -1, probed: oc.Probed()}
	if err := n.setSlice(opts); err != nil {
		return nil, err
	}
	return n, nil
}

func (n *node) setSlice(opts *Options) error {
	fileSize := n.file.SizeNow()
	var off, size int64 = 0, -1
	if opts.Offset != nil {
		off = *opts.Offset
		if off < 0 {
			return qapi.Errorf(qapi.GenericError, "offset cannot be negative")
		}
	}
	if opts.Size != nil {
		size = *opts.Size
		if size < 0 {
			return qapi.Errorf(qapi.GenericError, "size cannot be negative")
		}
	}
	if off > fileSize {
		return qapi.Errorf(qapi.GenericError, "The sum of offset (%d) and size (0) has to be smaller or equal to the  actual size of the containing file (%d)", off, fileSize)
	}
	if size >= 0 && off+size > fileSize {
		return qapi.Errorf(qapi.GenericError, "The sum of offset (%d) and size (%d) has to be smaller or equal to the  actual size of the containing file (%d)", off, size, fileSize)
	}
	n.offset, n.size = off, size
	return nil
}

func (n *node) Size() (int64, error) {
	if n.size >= 0 {
		return n.size, nil
	}
	return n.file.SizeNow() - n.offset, nil
}

func (n *node) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	return n.file.ReadV(ctx, off+n.offset, iov)
}

func (n *node) WriteV(ctx context.Context, off int64, iov [][]byte, flags graph.WriteFlags) error {
	if n.probed && off < probeSector {
		if err := n.checkProbedWrite(off, iov); err != nil {
			return err
		}
	}
	return n.file.WriteV(ctx, off+n.offset, iov, flags)
}

const probeSector = 512

// checkProbedWrite refuses a write to the first sector of a probed raw
// image if, after it, the sector would probe as another format.
func (n *node) checkProbedWrite(off int64, iov [][]byte) error {
	var sector [probeSector]byte
	// What is not written keeps its old value; reading it without the
	// node's lock is fine: we only look for format signatures.
	if err := n.file.ReadV(context.Background(), n.offset, [][]byte{sector[:]}); err != nil {
		return err
	}
	pos := off
	for _, b := range iov {
		if pos >= probeSector {
			break
		}
		pos += int64(copy(sector[pos:], b))
	}
	if d, _ := graph.ProbeFormat(sector[:], ""); d != nil && d.Name != "raw" {
		return fmt.Errorf("write to sector 0 of a probed raw image refused: it would make the image look like %s: %w", d.Name, syscall.EPERM)
	}
	return nil
}

func (n *node) Flush(ctx context.Context) error { return n.file.Flush(ctx) }

func (n *node) Discard(ctx context.Context, off, length int64) error {
	return n.file.Discard(ctx, off+n.offset, length)
}

func (n *node) WriteZeroes(ctx context.Context, off, length int64, flags graph.ZeroFlags) error {
	if n.probed && off < probeSector {
		var zero [probeSector]byte
		if err := n.checkProbedWrite(off, [][]byte{zero[:min(length, probeSector-off)]}); err != nil {
			return err
		}
	}
	return n.file.WriteZeroes(ctx, off+n.offset, length, flags)
}

func (n *node) BlockStatus(ctx context.Context, off, length int64) (graph.StatusExtent, error) {
	ext, err := n.file.BlockStatus(ctx, off+n.offset, length)
	if err != nil {
		return ext, err
	}
	if ext.File == nil {
		ext.File, ext.Offset = n.file, off+n.offset
	}
	return ext, nil
}

func (n *node) Truncate(ctx context.Context, size int64, exact bool, prealloc string) error {
	if n.size >= 0 || n.offset != 0 {
		return qapi.Errorf(qapi.GenericError, "Cannot resize fixed-size raw disks")
	}
	return n.file.Truncate(ctx, size, exact, prealloc)
}

func (n *node) Close() error { return nil }

// ClusterSize is the file child's, as QEMU's raw passes its file's
// block info through (query-named-block-nodes shows a raw node over a
// qcow2 node with the qcow2's cluster-size; the default granularity of
// a bitmap on it follows); 0 over a plain file.
func (n *node) ClusterSize() int64 {
	if c, ok := n.file.Instance().(interface{ ClusterSize() int64 }); ok {
		return c.ClusterSize()
	}
	return 0
}

// PrepareReopen allows a new slice; the file child stays (the graph checks).
func (n *node) PrepareReopen(_ context.Context, o any, _ bool) (func(), func(), error) {
	opts := o.(*Options)
	probe := &node{file: n.file}
	if err := probe.setSlice(opts); err != nil {
		return nil, nil, err
	}
	commit := func() { n.offset, n.size = probe.offset, probe.size }
	return commit, func() {}, nil
}

// Info is raw's (empty) format-specific information.
func (n *node) Info() map[string]any { return nil }
