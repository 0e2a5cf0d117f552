package raw

import (
	"context"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// PreallocMode is the preallocation a raw image is created with; raw has
// no metadata, so "metadata" is not offered (as in qemu-img create -f raw).
type PreallocMode string

// EnumValues lists the values qemu-img offers for raw.
func (PreallocMode) EnumValues() []string { return []string{"off", "falloc", "full"} }

// CreateOptions are raw's creation options for img create: the protocol
// node to size, the virtual size and the preallocation. (QEMU has no
// blockdev-create for raw, hence graph.Driver's ImageCreate; qemu-img
// create -f raw sizes the protocol file, which is what this does on the
// node named by file.)
type CreateOptions struct {
	File          graph.ChildRef `qapi:"file"`
	Size          qapi.Size      `qapi:"size"`
	Preallocation PreallocMode   `qapi:"preallocation,optional"`
}

// firstBlock is how much of a new image without preallocation is written
// with zeros, as QEMU does so that O_DIRECT alignment can later be
// probed from the first block.
const firstBlock = 4096

func create(ctx context.Context, cc *graph.CreateContext, o any) error {
	opts := o.(*CreateOptions)
	n, release, err := cc.OpenRef(ctx, &opts.File, "file")
	if err != nil {
		return err
	}
	defer release()
	if opts.Size > 1<<63-1 {
		return qapi.Errorf(qapi.GenericError, "Image size must be less than 8 EiB!")
	}
	size := int64(opts.Size)
	prealloc := string(opts.Preallocation)
	if prealloc == "" {
		prealloc = "off"
	}
	if err := n.Truncate(ctx, size, true, prealloc); err != nil {
		return err
	}
	if prealloc == "off" && size > 0 {
		var zeros [firstBlock]byte
		if err := n.WriteAt(ctx, zeros[:min(size, firstBlock)], 0, 0); err != nil {
			return err
		}
	}
	return n.Flush(ctx)
}

// measure answers img measure for raw: the image is its data, every byte
// of the virtual size rounded up to a sector.
func measure(_ context.Context, _ any, size int64, src *graph.Node) (graph.MeasureResult, error) {
	if src != nil {
		size = src.SizeNow()
	}
	size = (size + 511) &^ 511
	return graph.MeasureResult{Required: size, FullyAllocated: size, Bitmaps: -1}, nil
}
