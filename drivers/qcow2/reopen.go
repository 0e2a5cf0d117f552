package qcow2

import (
	"context"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

var _ graph.Reopener = (*image)(nil)

// PrepareReopen validates new options (blockdev-reopen). What can change:
// read-only (a corrupt image cannot become writable; going read-only
// writes everything back and clears the dirty bit), the cache sizes,
// lazy-refcounts and the pass-discard options. The children stay.
func (img *image) PrepareReopen(ctx context.Context, o any, readOnly bool) (func(), func(), error) {
	opts := o.(*Options)
	if err := opts.validate(); err != nil {
		return nil, nil, err
	}
	img.meta.Lock()
	h := img.hdr
	corrupt := img.corrupt
	img.meta.Unlock()
	if !readOnly && img.readOnly {
		if corrupt {
			return nil, nil, qapi.Errorf(qapi.GenericError, "qcow2: Image is corrupt; cannot be opened read/write")
		}
		if h.IncompatibleFeatures&IncompatDirty != 0 {
			return nil, nil, qapi.Errorf(qapi.GenericError,
				"Could not repair dirty image: reopen the image read-write after 'check -r all'")
		}
	}
	lazy := h.CompatibleFeatures&CompatLazyRefcounts != 0
	if opts.LazyRefcounts != nil {
		if *opts.LazyRefcounts && h.Version < 3 {
			return nil, nil, qapi.Errorf(qapi.GenericError, "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
		}
		lazy = *opts.LazyRefcounts
	}
	sizes, err := resolveCacheSizes(opts, img.geo, img.size.Load())
	if err != nil {
		return nil, nil, err
	}
	pass := [3]bool{
		boolOr(opts.PassDiscardRequest, true),
		boolOr(opts.PassDiscardSnap, true),
		boolOr(opts.PassDiscardOther, false),
	}
	if readOnly && !img.readOnly {
		// Write back while requests may still run; commit repeats it
		// drained.
		if err := img.flushAll(ctx); err != nil {
			return nil, nil, err
		}
	}
	commit := func() {
		ctx := context.Background()
		img.meta.Lock()
		defer img.meta.Unlock()
		if readOnly && !img.readOnly {
			if err := img.closeMetadataLocked(ctx); err != nil {
				img.log.Error("qcow2: writing metadata back on reopen read-only failed", "err", err)
			}
		}
		if err := img.syncLocked(ctx, true); err != nil {
			img.log.Error("qcow2: writing metadata back on reopen failed", "err", err)
		}
		wasRO := img.readOnly
		img.readOnly = readOnly
		if wasRO != readOnly {
			if err := img.reopenBitmapsLocked(ctx, readOnly); err != nil {
				img.log.Error("qcow2: marking the persistent dirty bitmaps in use failed", "err", err)
			}
		}
		img.lazy = lazy
		img.passDiscard = pass
		if sizes.l2Entry != img.l2Slice || int(sizes.l2Bytes/sizes.l2Entry) != img.l2c.max {
			img.l2Slice = sizes.l2Entry
			img.l2c = newTableCache("L2 table", img.file, sizes.l2Entry, sizes.l2Bytes)
			img.l2c.beforeWrite = img.syncRefcounts
		}
		if n := int(sizes.rcBytes / img.cs); n != img.rbc.max {
			img.rbc = newTableCache("refcount block", img.file, img.cs, sizes.rcBytes)
		}
		if !readOnly {
			img.headerDone = false
		}
	}
	return commit, func() {}, nil
}

// closeMetadataLocked writes everything back and clears the dirty bit, as
// a clean close does.
func (img *image) closeMetadataLocked(ctx context.Context) error {
	if err := img.storeBitmapsLocked(ctx); err != nil {
		// They stay in use on disk: inconsistent, never wrong.
		img.log.Error("qcow2: storing the persistent dirty bitmaps failed", "err", err)
	}
	if err := img.syncLocked(ctx, true); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	if !img.dirtySet {
		return nil
	}
	h := *img.hdr
	h.IncompatibleFeatures &^= IncompatDirty
	if err := img.writeHeaderLocked(ctx, &h); err != nil {
		return err
	}
	img.dirtySet = false
	return img.file.Flush(ctx)
}
