package qcow2

// The image tools on an open qcow2 node: check/repair, internal
// snapshots, amend and measure, joined to the driver. Each operation
// quiesces the node (image.resize held exclusively: no request runs),
// writes back every cache, runs the operation on the image file through
// Storage, and reloads the driver's state from the file.

import (
	"context"
	"fmt"
	"math/bits"
	"syscall"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

var (
	_ graph.Checker     = (*image)(nil)
	_ graph.Snapshotter = (*image)(nil)
	_ graph.Amender     = (*image)(nil)
)

func init() {
	// Opening a dirty image with lazy refcounts for writing repairs it
	// first (qcow2.txt, incompatible bit 0).
	DirtyRepair = func(ctx context.Context, file *graph.Node, h *Header) error {
		_, err := repairImage(ctx, NodeStorage{file}, h)
		return err
	}
}

// offline runs fn on the quiesced image. With write, the node must be
// writable and the driver reloads its state afterwards; only a repair
// (check with fix) may write to an image marked corrupt.
func (img *image) offline(ctx context.Context, write bool, fn func(st Storage, h *Header) error) error {
	return img.offlineMode(ctx, write, false, fn)
}

func (img *image) offlineMode(ctx context.Context, write, repair bool, fn func(st Storage, h *Header) error) error {
	img.resize.Lock()
	defer img.resize.Unlock()
	img.meta.Lock()
	defer img.meta.Unlock()
	if write && img.readOnly {
		return graph.ErrReadOnly
	}
	if write && img.corrupt && !repair {
		return fmt.Errorf("qcow2: image is marked corrupt: %w", syscall.EIO)
	}
	if !img.readOnly && !img.corrupt {
		if err := img.syncLocked(ctx, true); err != nil {
			return err
		}
		if err := img.file.Flush(ctx); err != nil {
			return err
		}
	}
	st := NodeStorage{img.file}
	size, err := st.Size()
	if err != nil {
		return err
	}
	h, err := ParseHeader(nodeReaderAt{ctx, img.file}, size)
	if err != nil {
		return err
	}
	ferr := fn(st, h)
	if !write {
		return ferr
	}
	if err := img.reloadLocked(ctx); err != nil && ferr == nil {
		ferr = err
	}
	return ferr
}

// reloadLocked reads the header and tables again after an offline
// operation changed them, and forgets every cached table.
func (img *image) reloadLocked(ctx context.Context) error {
	h, err := ParseHeader(nodeReaderAt{ctx, img.file}, img.file.SizeNow())
	if err != nil {
		return err
	}
	l1, err := img.readTable(ctx, int64(h.L1TableOffset), int(h.L1Size))
	if err != nil {
		return err
	}
	rt, err := img.readTable(ctx, int64(h.RefcountTableOffset), int(int64(h.RefcountTableClusters)*img.cs/8))
	if err != nil {
		return err
	}
	img.l2c.dropClean()
	img.rbc.dropClean()
	// The lazy-refcounts open option overrides the header until amend
	// changes the header's bit.
	if old := img.hdr.CompatibleFeatures & CompatLazyRefcounts; old != h.CompatibleFeatures&CompatLazyRefcounts || h.Version < 3 {
		img.lazy = h.CompatibleFeatures&CompatLazyRefcounts != 0
	}
	img.hdr, img.l1, img.rt = h, l1, rt
	img.l1Dirty = map[int]bool{}
	img.geo = h.Geometry()
	img.size.Store(int64(h.Size))
	img.dirtySet = h.IncompatibleFeatures&IncompatDirty != 0
	img.corrupt = h.IncompatibleFeatures&IncompatCorrupt != 0
	img.headerDone = false
	img.freeHint = 0
	img.compCursor = 0
	img.loadSnapshotList(ctx)
	return img.reloadBitmapsLocked(ctx)
}

// Check is graph.Checker: qemu-img check [-r] on the image.
func (img *image) Check(ctx context.Context, fix graph.CheckFix) (graph.CheckResult, error) {
	var res graph.CheckResult
	err := img.offlineMode(ctx, fix != 0, true, func(st Storage, h *Header) error {
		var err error
		res, err = checkImage(ctx, st, h, fix)
		return err
	})
	return res, err
}

// loadSnapshotList reads the snapshot table for SnapshotList, at open
// (meta not yet shared) and after offline changes (meta held). A table
// that cannot be read lists nothing here; the snapshot commands report
// the error.
func (img *image) loadSnapshotList(ctx context.Context) {
	img.snapList = nil
	if img.hdr.NbSnapshots == 0 {
		return
	}
	snaps, err := listSnapshots(ctx, NodeStorage{img.file}, img.hdr)
	if err != nil {
		img.log.Warn("reading the snapshot table", "err", err)
		return
	}
	img.snapList = snaps
}

// SnapshotList is graph.SnapshotLister.
func (img *image) SnapshotList() []graph.SnapshotInfo {
	img.meta.Lock()
	defer img.meta.Unlock()
	return append([]graph.SnapshotInfo(nil), img.snapList...)
}

// Snapshots is graph.Snapshotter.
func (img *image) Snapshots(ctx context.Context) ([]graph.SnapshotInfo, error) {
	var out []graph.SnapshotInfo
	err := img.offline(ctx, false, func(st Storage, h *Header) error {
		var err error
		out, err = listSnapshots(ctx, st, h)
		return err
	})
	return out, err
}

// CreateSnapshot is graph.Snapshotter.
func (img *image) CreateSnapshot(ctx context.Context, s graph.SnapshotInfo) (graph.SnapshotInfo, error) {
	var out graph.SnapshotInfo
	err := img.offline(ctx, true, func(st Storage, h *Header) error {
		var err error
		out, err = createSnapshot(ctx, st, h, s)
		return err
	})
	return out, err
}

// ApplySnapshot is graph.Snapshotter. The virtual size becomes the
// snapshot's; the graph learns it through Size.
func (img *image) ApplySnapshot(ctx context.Context, id, name string) error {
	return img.offline(ctx, true, func(st Storage, h *Header) error {
		return applySnapshot(ctx, st, h, id, name)
	})
}

// DeleteSnapshot is graph.Snapshotter.
func (img *image) DeleteSnapshot(ctx context.Context, id, name string) (graph.SnapshotInfo, error) {
	var out graph.SnapshotInfo
	err := img.offline(ctx, true, func(st Storage, h *Header) error {
		var err error
		out, err = deleteSnapshot(ctx, st, h, id, name)
		return err
	})
	return out, err
}

// Amend is graph.Amender: everything is validated first; a new size goes
// through the driver's Truncate (as qemu-img amend resizes through the
// block layer), the rest through amendImage.
func (img *image) Amend(ctx context.Context, o any, force bool) error {
	opts, ok := o.(*AmendOptions)
	if q, isQMP := o.(*QMPAmendOptions); isQMP {
		var err error
		if opts, err = q.amendOptions(); err != nil {
			return err
		}
		ok = true
	}
	if !ok {
		return fmt.Errorf("qcow2: amend options of type %T", o)
	}
	if img.readOnly {
		return graph.ErrReadOnly
	}
	img.meta.Lock()
	h := *img.hdr
	img.meta.Unlock()
	if _, err := validateAmend(&h, opts); err != nil {
		return err
	}
	if opts.Encrypt != nil {
		if err := img.amendCrypt(ctx, opts.Encrypt, force); err != nil {
			return err
		}
	}
	rest := *opts
	rest.Size = nil
	rest.Encrypt = nil
	if err := img.offline(ctx, true, func(st Storage, h *Header) error {
		// A downgrade comes last in QEMU too: size first when both.
		return amendImage(ctx, st, h, &rest, force)
	}); err != nil {
		return err
	}
	if opts.Size != nil && int64(*opts.Size) != img.size.Load() {
		if err := img.Truncate(ctx, int64(*opts.Size), false, "off"); err != nil {
			return err
		}
	}
	return nil
}

// measureImage is Driver.Measure for qcow2: createOpts is a
// *CreateOptions (its size and file ignored).
func measureImage(ctx context.Context, createOpts any, size int64, src *graph.Node) (graph.MeasureResult, error) {
	o, ok := createOpts.(*CreateOptions)
	if io, isImg := createOpts.(*ImageCreateOptions); isImg {
		// qemu-img measure ignores encryption=on and checks only what a
		// LUKS header needs.
		c := io.CreateOptions
		o, ok = &c, true
	}
	if !ok {
		return graph.MeasureResult{}, fmt.Errorf("qcow2: create options of type %T", createOpts)
	}
	// qemu-img measure checks less than create, in its own words.
	e := func(f string, a ...any) (graph.MeasureResult, error) {
		return graph.MeasureResult{}, qapi.Errorf(qapi.GenericError, f, a...)
	}
	cs := int64(o.ClusterSize)
	switch rb := o.RefcountBits; {
	case cs < 512 || cs > 2<<20 || cs&(cs-1) != 0:
		return e("Cluster size must be a power of two between 512 and 2048k")
	case rb < 1 || rb > 64 || rb&(rb-1) != 0:
		return e("Refcount width must be a power of two and may not exceed 64 bits")
	case o.Version == "v2" && rb != 16:
		return e("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
	case o.ExtendedL2 && cs < 1<<MinClusterBitsExtL2:
		return e("Extended L2 entries are only supported with cluster sizes of at least %d bytes", 1<<MinClusterBitsExtL2)
	}
	// The LUKS header and key material take whole clusters.
	var cryptoBytes int64
	if e := o.Encrypt; e != nil && e.Format == "luks" {
		if err := validateEncrypt(e, true); err != nil {
			return graph.MeasureResult{}, err
		}
		p, _ := e.params()
		cryptoBytes = (crypto.PayloadOffset(p) + cs - 1) / cs * cs
	}
	if size < 0 {
		return graph.MeasureResult{}, qapi.Errorf(qapi.GenericError, "Invalid image size specified. Must be between 0 and 9223372036854775807.")
	}
	p := measureParams{
		clusterBits:   uint32(bits.TrailingZeros64(uint64(o.ClusterSize))),
		refcountOrder: uint32(bits.TrailingZeros64(uint64(o.RefcountBits))),
		extendedL2:    o.ExtendedL2,
		prealloc:      string(o.Preallocation),
		v3:            o.Version != "v2",
	}
	res, err := p.measure(ctx, size, src)
	if err == nil {
		res.Required += cryptoBytes
		res.FullyAllocated += cryptoBytes
	}
	return res, err
}
