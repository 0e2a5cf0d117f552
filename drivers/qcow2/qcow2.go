package qcow2

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"blockbackend/graph"
	"blockbackend/qmp/keyval"
	"blockbackend/qmp/qapi"
)

// image is an open qcow2 node.
type image struct {
	log      *slog.Logger
	gnode    *graph.Node
	file     *graph.Node // the image file: metadata, and data without a data file
	data     *graph.Node // where guest clusters live: file or the data-file child
	backing  *graph.Node // nil without a backing node
	readOnly bool

	// Immutable after open.
	geo         Geometry
	cs          int64 // cluster size
	extData     bool  // external data file: host offset == guest offset, not refcounted
	dataRaw     bool  // the data file must stay a valid raw image
	compression uint8
	v3          bool // version 3: zero clusters exist
	lazy        bool // lazy refcounts in effect
	passDiscard [3]bool
	crypt       *imageCrypt // nil: not encrypted (crypt.go)

	// resize is held shared by every request and exclusively by truncate
	// (and the offline metadata operations): see the package doc.
	resize sync.RWMutex

	size atomic.Int64 // virtual size

	// meta guards every field below. Only ReadV's check for an unmapped
	// range (the L1 table alone) takes it shared: everything else, reads
	// included (the caches change on every look-up), takes it exclusively.
	meta sync.RWMutex
	hdr  *Header
	// l1 is the active L1 table; l1Dirty marks entries to write back.
	l1      []uint64
	l1Dirty map[int]bool
	// rt is the refcount table.
	rt      []uint64
	l2c     *tableCache // L2 slices
	rbc     *tableCache // refcount blocks
	l2Slice int64       // bytes per L2 cache entry
	// freeHint: no free cluster lies below it (allocation starts there).
	freeHint int64
	// pending are refcount decrements waiting for their dereference to be
	// stable and their readers to finish.
	pending []pendingFree
	// inflight maps guest cluster indexes to the allocation that owns them.
	inflight map[int64]*inflightAlloc
	// Request sequence numbers: active holds the requests in progress.
	nextSeq uint64
	active  map[uint64]struct{}
	// compCursor is where the next compressed cluster may be packed (a
	// byte offset inside a host cluster allocated for compressed data),
	// 0 when none.
	compCursor int64
	dirtySet   bool                 // the dirty bit is set on disk (lazy refcounts)
	snapList   []graph.SnapshotInfo // the snapshot table as read at open and after offline changes
	headerDone bool                 // the first-write header update (autoclear bits) is done
	corrupt    bool                 // the corrupt bit is set: no more writes
	// corruptSeen: corruption was reported on a read-only image; it only
	// silences further reports.
	corruptSeen bool
	mp          metaPrealloc // see prealloc.go
	bm          bitmapState  // persistent bitmaps (bitmaps.go)

	// dcMu guards dc, the last inflated compressed clusters. Lock order:
	// meta → dcMu (dcMu is also taken alone).
	dcMu sync.Mutex
	dc   [4]decompressedCluster

	stopClean chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// pendingFree is a queued refcount decrement (qcow2 discard types:
// request, snapshot, other decide whether the file child sees a discard).
type pendingFree struct {
	off, length int64 // host bytes; every cluster touched loses one reference
	seq         uint64
	kind        discardKind
}

type discardKind int

const (
	discardRequest discardKind = iota
	discardSnapshot
	discardOther
	discardNever
)

// inflightAlloc is an allocating write in progress on some guest clusters.
type inflightAlloc struct {
	done chan struct{}
}

// Compile-time checks of the capabilities the graph looks for.
var (
	_ graph.Instance      = (*image)(nil)
	_ graph.Discarder     = (*image)(nil)
	_ graph.ZeroWriter    = (*image)(nil)
	_ graph.BlockStatuser = (*image)(nil)
	_ graph.Truncater     = (*image)(nil)
	_ graph.Infoer        = (*image)(nil)
	_ graph.BackingFiler  = (*image)(nil)
	_ graph.DirtyReporter = (*image)(nil)
)

// DirtyRepair, when set, rebuilds the refcounts of an image whose dirty
// bit is set (what qemu-img check -r all does) before it is opened for
// writing. The offline check code sets it; without it a dirty image opens
// only read-only.
var DirtyRepair func(ctx context.Context, file *graph.Node, h *Header) error

func open(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
	opts := o.(*Options)
	if err := opts.validate(); err != nil {
		return nil, err
	}
	fc, err := oc.OpenChild(ctx, "file", &opts.File, graph.RoleImage, false)
	if err != nil {
		return nil, err
	}
	file := fc.Node()
	fsize := file.SizeNow()
	h, err := ParseHeader(nodeReaderAt{ctx, file}, fsize)
	if err != nil {
		var fe *FormatError
		if errors.As(err, &fe) {
			return nil, qapi.Errorf(qapi.GenericError, "%s", fe.Msg)
		}
		return nil, err
	}
	img := &image{
		log: oc.Logger(), gnode: oc.Node(), file: file, data: file, readOnly: oc.ReadOnly(),
		hdr: h, geo: h.Geometry(), cs: h.ClusterSize(),
		extData: h.ExternalData(), dataRaw: h.DataFileRaw(), compression: h.CompressionType, v3: h.Version >= 3,
		l1Dirty: map[int]bool{}, inflight: map[int64]*inflightAlloc{}, active: map[uint64]struct{}{},
	}
	if img.log == nil {
		img.log = slog.New(slog.DiscardHandler)
	}
	img.size.Store(int64(h.Size))
	if err := img.openCrypt(ctx, oc, opts); err != nil {
		return nil, err
	}
	if h.IncompatibleFeatures&IncompatCorrupt != 0 {
		img.corrupt = true
		if !img.readOnly {
			return nil, qapi.Errorf(qapi.GenericError, "qcow2: Image is corrupt; cannot be opened read/write")
		}
	}
	if h.IncompatibleFeatures&IncompatDirty != 0 && !img.readOnly {
		if DirtyRepair == nil {
			return nil, qapi.Errorf(qapi.GenericError,
				"Could not repair dirty image: automatic refcount repair is not built into blockbackend yet; open it read-only or run 'qemu-img check -r all'")
		}
		if err := DirtyRepair(ctx, file, h); err != nil {
			return nil, qapi.Errorf(qapi.GenericError, "Could not repair dirty image: %v", err)
		}
		if h, err = ParseHeader(nodeReaderAt{ctx, file}, file.SizeNow()); err != nil {
			return nil, err
		}
		img.hdr = h
	}
	img.lazy = h.CompatibleFeatures&CompatLazyRefcounts != 0
	if opts.LazyRefcounts != nil {
		if *opts.LazyRefcounts && h.Version < 3 {
			return nil, qapi.Errorf(qapi.GenericError, "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
		}
		img.lazy = *opts.LazyRefcounts
	}
	img.passDiscard = [3]bool{
		boolOr(opts.PassDiscardRequest, true),
		boolOr(opts.PassDiscardSnap, true),
		boolOr(opts.PassDiscardOther, false),
	}
	sizes, err := resolveCacheSizes(opts, img.geo, int64(h.Size))
	if err != nil {
		return nil, err
	}

	// Tables.
	if img.l1, err = img.readTable(ctx, int64(h.L1TableOffset), int(h.L1Size)); err != nil {
		return nil, err
	}
	if img.rt, err = img.readTable(ctx, int64(h.RefcountTableOffset), int(int64(h.RefcountTableClusters)*img.cs/8)); err != nil {
		return nil, err
	}
	img.l2Slice = sizes.l2Entry
	img.l2c = newTableCache("L2 table", file, sizes.l2Entry, sizes.l2Bytes)
	img.rbc = newTableCache("refcount block", file, img.cs, sizes.rcBytes)
	img.l2c.beforeWrite = img.syncRefcounts

	// External data file.
	if img.extData {
		ref := opts.DataFile
		if ref == nil || !ref.Present() {
			if !h.HasDataFile || h.DataFile == "" {
				return nil, qapi.Errorf(qapi.GenericError, "'data-file' is required for this image")
			}
			ref = &graph.ChildRef{Options: map[string]any{"driver": "file", "filename": graph.ResolveImageName(img.file, h.DataFile)}, Mode: qapi.JSON}
		}
		dc, err := oc.OpenChild(ctx, "data-file", ref, graph.RoleDataFile, false)
		if err != nil {
			return nil, err
		}
		img.data = dc.Node()
	} else if opts.DataFile != nil && opts.DataFile.Present() {
		return nil, qapi.Errorf(qapi.GenericError, "'data-file' can only be set for images with an external data file")
	}
	if img.dataRaw && h.BackingFile != "" {
		return nil, qapi.Errorf(qapi.GenericError, "data-file-raw cannot be used with backing files")
	}

	// Backing node.
	if err := img.openBacking(ctx, oc, opts); err != nil {
		return nil, err
	}

	img.freeHint = 0
	if err := img.loadBitmaps(ctx); err != nil {
		return nil, err
	}
	img.loadSnapshotList(ctx)
	if opts.CacheCleanInterval != nil && *opts.CacheCleanInterval > 0 {
		img.stopClean = make(chan struct{})
		go img.cleaner(time.Duration(*opts.CacheCleanInterval)*time.Second, img.stopClean)
	}
	return img, nil
}

// nodeReaderAt adapts a node to io.ReaderAt for ParseHeader.
type nodeReaderAt struct {
	ctx context.Context
	n   *graph.Node
}

func (r nodeReaderAt) ReadAt(p []byte, off int64) (int, error) {
	size := r.n.SizeNow()
	if off >= size {
		return 0, errEOF
	}
	n := len(p)
	if int64(n) > size-off {
		n = int(size - off)
	}
	if err := r.n.ReadV(r.ctx, off, [][]byte{p[:n]}); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, errEOF
	}
	return n, nil
}

var errEOF = errors.New("EOF")

func (img *image) readTable(ctx context.Context, off int64, n int) ([]uint64, error) {
	t := make([]uint64, n)
	if n == 0 {
		return t, nil
	}
	buf := make([]byte, n*8)
	if err := img.file.ReadV(ctx, off, [][]byte{buf}); err != nil {
		return nil, fmt.Errorf("qcow2: reading table at %#x: %w", off, err)
	}
	for i := range t {
		t[i] = be.Uint64(buf[i*8:])
	}
	return t, nil
}

// openBacking opens the backing child from the options ("backing": a node
// name, nested options, or null for none) or from the header's backing
// file name and format.
func (img *image) openBacking(ctx context.Context, oc *graph.OpenContext, opts *Options) error {
	ref := opts.Backing
	if ref == nil || !ref.Present() {
		name := img.hdr.BackingFile
		if name == "" {
			return nil
		}
		m, err := img.backingOptions(name, img.hdr.BackingFormat)
		if err != nil {
			return err
		}
		ref = &graph.ChildRef{Options: m, Mode: qapi.JSON}
	} else if ref.Null {
		return nil
	} else if m := ref.Options; m != nil && m["driver"] == nil && img.hdr.BackingFile != "" && oc.ImageTool() {
		// qemu-img's backing.* options without a driver (say
		// backing.encrypt.key-secret for an encrypted backing file)
		// add to the backing file the header names.
		hm, err := img.backingOptions(img.hdr.BackingFile, img.hdr.BackingFormat)
		if err != nil {
			return err
		}
		qapi.Merge(hm, m)
		ref = &graph.ChildRef{Options: hm, Mode: ref.Mode}
	}
	bc, err := oc.OpenChild(ctx, "backing", ref, graph.RoleBacking, true)
	if err != nil {
		return err
	}
	if bc != nil {
		img.backing = bc.Node()
	}
	return nil
}

// backingOptions turns the recorded backing file name into node options.
func (img *image) backingOptions(name, format string) (map[string]any, error) {
	if m, ok, err := keyval.ParseJSONFilename(name); ok {
		if err != nil {
			return nil, err
		}
		if _, has := m["driver"]; !has && format != "" {
			m["driver"] = format
		}
		if _, has := m["driver"]; !has {
			return nil, qapi.Errorf(qapi.GenericError, "Could not open backing file: json: backing file name without a driver")
		}
		return m, nil
	}
	path := graph.ResolveImageName(img.file, name)
	proto, err := graph.ProtocolFor(path)
	if err != nil {
		return nil, qapi.Errorf(qapi.GenericError, "Could not open backing file: %v", err)
	}
	pname := "file"
	if proto != nil {
		pname = proto.Name
	}
	fileOpts := map[string]any{"driver": pname, "filename": path}
	if format == "" {
		// QEMU probes the backing file's format when the image does not
		// record it; we read its first bytes for a plain file.
		format = "raw"
		if proto == nil {
			if f, err := os.Open(path); err == nil {
				hdr := make([]byte, 2048)
				n, _ := f.ReadAt(hdr, 0)
				f.Close()
				if d, _ := graph.ProbeFormat(hdr[:n], path); d != nil {
					format = d.Name
				}
			}
		}
	}
	if d := graph.Lookup(format); d != nil && d.Protocol {
		fileOpts["driver"] = format
		return fileOpts, nil
	}
	return map[string]any{"driver": format, "file": fileOpts}, nil
}

func (img *image) Size() (int64, error) { return img.size.Load(), nil }

// ClusterSize is the unit of compressed writes.
func (img *image) ClusterSize() int64 { return img.cs }

// BackingFile is the backing file name and format the header records
// (graph.BackingFiler).
func (img *image) BackingFile() (name, format string) {
	img.meta.Lock()
	defer img.meta.Unlock()
	return img.hdr.BackingFile, img.hdr.BackingFormat
}

// Dirty reports whether the dirty bit of lazy refcounts is set on disk
// now (graph.DirtyReporter).
func (img *image) Dirty() bool {
	img.meta.Lock()
	defer img.meta.Unlock()
	return img.dirtySet
}

// Info is ImageInfoSpecificQCow2, as qemu-img info --output=json shows it.
func (img *image) Info() map[string]any {
	img.meta.Lock()
	h := img.hdr
	corrupt := img.corrupt
	bitmaps := img.bitmapInfoLocked()
	img.meta.Unlock()
	d := map[string]any{}
	if bitmaps != nil {
		d["bitmaps"] = bitmaps
	}
	if h.Version == 2 {
		d["compat"] = "0.10"
	} else {
		d["compat"] = "1.1"
		d["lazy-refcounts"] = h.CompatibleFeatures&CompatLazyRefcounts != 0
		d["corrupt"] = corrupt
		d["extended-l2"] = h.ExtendedL2()
	}
	d["refcount-bits"] = h.RefcountBits()
	if h.CompressionType == CompressionZstd {
		d["compression-type"] = "zstd"
	} else {
		d["compression-type"] = "zlib"
	}
	if h.ExternalData() {
		if h.DataFile != "" {
			d["data-file"] = h.DataFile
		}
		d["data-file-raw"] = h.DataFileRaw()
	}
	if e := img.encryptInfo(); e != nil {
		d["encrypt"] = e
	}
	return map[string]any{"type": "qcow2", "data": d}
}

// cleaner drops unused clean cache entries every interval
// (cache-clean-interval).
func (img *image) cleaner(every time.Duration, stop chan struct{}) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			img.meta.Lock()
			img.l2c.dropClean()
			img.rbc.dropClean()
			img.meta.Unlock()
		}
	}
}

// Close writes everything back, clears the dirty bit of lazy refcounts
// and releases the node. Safe to call twice.
func (img *image) Close() error {
	img.closeOnce.Do(func() {
		if img.stopClean != nil {
			close(img.stopClean)
		}
		defer img.closeCrypt()
		if img.readOnly {
			return
		}
		ctx := context.Background()
		img.meta.Lock()
		defer img.meta.Unlock()
		if img.corrupt {
			return
		}
		err := img.closeMetadataLocked(ctx)
		img.closeErr = err
	})
	return img.closeErr
}

// writeHeaderLocked rewrites the header cluster's used part from h and
// makes it the current header. The caller orders flushes around it.
func (img *image) writeHeaderLocked(ctx context.Context, h *Header) error {
	buf := h.Marshal()
	if int64(len(buf)) > img.cs {
		return fmt.Errorf("qcow2: header does not fit in a cluster: %w", syscall.ENOSPC)
	}
	if err := img.file.WriteV(ctx, 0, [][]byte{buf}, 0); err != nil {
		return fmt.Errorf("qcow2: writing the header: %w", err)
	}
	img.hdr = h
	return nil
}

// beginWriteLocked does what the first write to an image needs: clear the
// autoclear bits we do not maintain (qcow2.txt: "An implementation may
// only write to an image with unknown auto-clear features if it clears
// the respective bits from this field first"; we keep no bitmaps, so the
// bitmaps bit goes too) and, with lazy refcounts, set the dirty bit.
func (img *image) beginWriteLocked(ctx context.Context) error {
	if img.corrupt {
		return fmt.Errorf("qcow2: image is marked corrupt: %w", syscall.EIO)
	}
	needDirty := img.lazy && !img.dirtySet && img.hdr.Version >= 3
	if img.headerDone && !needDirty {
		return nil
	}
	h := *img.hdr
	h.AutoclearFeatures &= AutoclearDataFileRaw | img.bitmapsAutoclear()
	if needDirty {
		h.IncompatibleFeatures |= IncompatDirty
	}
	if h.AutoclearFeatures != img.hdr.AutoclearFeatures || h.IncompatibleFeatures != img.hdr.IncompatibleFeatures {
		if err := img.writeHeaderLocked(ctx, &h); err != nil {
			return err
		}
		if err := img.file.Flush(ctx); err != nil {
			return err
		}
	}
	img.headerDone = true
	if needDirty {
		img.dirtySet = true
	}
	return nil
}

// corruptf reports metadata corruption as QEMU does: the image is marked
// corrupt (when writable) so that it is not written again, and the
// request fails with EIO.
func (img *image) corruptfLocked(ctx context.Context, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	switch {
	case img.corrupt || img.corruptSeen:
	case !img.readOnly:
		// No more writes; version 3 records it in the header (version 2
		// has no corrupt bit: the refusal lasts while the image is open).
		img.corrupt = true
		img.log.Error("Marking image as corrupt: " + msg + "; further corruption events will be suppressed")
		if img.v3 {
			h := *img.hdr
			h.IncompatibleFeatures |= IncompatCorrupt
			if err := img.writeHeaderLocked(ctx, &h); err == nil {
				_ = img.file.Flush(ctx)
			}
		}
	default:
		// Read-only: only report it.
		img.corruptSeen = true
		img.log.Error("Image is corrupt: " + msg + "; further non-fatal corruption events will be suppressed")
	}
	return fmt.Errorf("qcow2: %s: %w", msg, syscall.EIO)
}

// startReq registers a request for the reuse quarantine of freed
// clusters; endReq ends it.
func (img *image) startReqLocked() uint64 {
	img.nextSeq++
	img.active[img.nextSeq] = struct{}{}
	return img.nextSeq
}

func (img *image) endReq(seq uint64) {
	img.meta.Lock()
	delete(img.active, seq)
	img.meta.Unlock()
}

// oldestActiveLocked is the sequence number of the oldest request still
// running, or nextSeq+1 when none is.
func (img *image) oldestActiveLocked() uint64 {
	oldest := img.nextSeq + 1
	for s := range img.active {
		if s < oldest {
			oldest = s
		}
	}
	return oldest
}
