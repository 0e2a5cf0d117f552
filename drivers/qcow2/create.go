package qcow2

import (
	"context"
	"fmt"
	"log/slog"
	"math/bits"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// create formats the node named by opts.File as a qcow2 image
// (blockdev-create driver=qcow2, img create).
func create(ctx context.Context, cc *graph.CreateContext, o any) error {
	opts := o.(*CreateOptions)
	file, release, err := cc.OpenRef(ctx, &opts.File, "file")
	if err != nil {
		return err
	}
	defer release()
	var data *graph.Node
	if opts.DataFile != nil && opts.DataFile.Present() {
		var releaseData func()
		if data, releaseData, err = cc.OpenRef(ctx, opts.DataFile, "data-file"); err != nil {
			return err
		}
		defer releaseData()
	}
	if opts.Encrypt != nil {
		// Refuse before anything is written: the options, the legacy
		// AES refusal and the secret.
		if err := validateCreate(opts, data != nil); err != nil {
			return err
		}
		if err := validateEncrypt(opts.Encrypt, cc.ImageTool()); err != nil {
			return err
		}
		if opts.Encrypt.Format == "qcow" && !cc.ImageTool() {
			return crypto.LegacyAESRefusal("qcow2", file.Name())
		}
		pass, err := cc.Secret(opts.Encrypt.KeySecret)
		if err != nil {
			return err
		}
		clear(pass)
	}
	return formatWith(ctx, cc.Logger(), file, data, opts, cc)
}

// validateCreate checks the options with QEMU's messages.
func validateCreate(o *CreateOptions, hasData bool) error {
	e := func(f string, a ...any) error { return qapi.Errorf(qapi.GenericError, f, a...) }
	cs := int64(o.ClusterSize)
	if cs < 512 || cs > 2<<20 || cs&(cs-1) != 0 {
		return e("Cluster size must be a power of two between 512 and 2048k")
	}
	if o.Encrypt != nil && hasData {
		return e("data-file cannot be used with encryption")
	}
	if o.Size%512 != 0 {
		return e("Image size must be a multiple of 512 bytes")
	}
	v3 := o.Version != "v2"
	if !v3 {
		switch {
		case o.LazyRefcounts:
			return e("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
		case o.RefcountBits != 16:
			return e("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
		case o.ExtendedL2:
			return e("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
		case o.Compression != "zlib" && o.Compression != "":
			return e("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
		case hasData:
			return e("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
		}
	}
	if o.RefcountBits < 1 || o.RefcountBits > 64 || o.RefcountBits&(o.RefcountBits-1) != 0 {
		return e("Refcount width must be a power of two and may not exceed 64 bits")
	}
	if o.ExtendedL2 && cs < 1<<MinClusterBitsExtL2 {
		return e("Extended L2 entries are only supported with cluster sizes of at least %d bytes", 1<<MinClusterBitsExtL2)
	}
	if o.DataFileRaw && !hasData {
		return e("data-file-raw requires data-file")
	}
	if o.BackingFmt != "" && o.BackingFile == "" {
		return e("Backing format cannot be used without backing file")
	}
	if o.BackingFile != "" && o.Preallocation != "off" && o.Preallocation != "" && !o.ExtendedL2 {
		return e("Backing file and preallocation can only be used at the same time if extended_l2 is on")
	}
	if o.BackingFile != "" && o.DataFileRaw {
		return e("Backing file and data-file-raw cannot be used at the same time")
	}
	if len(o.BackingFile) > MaxBackingFileSize {
		return e("Backing file name too long")
	}
	return nil
}

// format writes a new image on file: the header in cluster 0, the
// refcount table in cluster 1 and its first block in cluster 2, as
// qemu-img does; then the L1 table is sized through the same code that
// resizes an open image, and preallocation runs through it too.
func format(ctx context.Context, log *slog.Logger, file, data *graph.Node, o *CreateOptions) error {
	return formatWith(ctx, log, file, data, o, nil)
}

// formatWith is format; cc (with its secrets) is needed for encryption.
func formatWith(ctx context.Context, log *slog.Logger, file, data *graph.Node, o *CreateOptions, cc *graph.CreateContext) error {
	if err := validateCreate(o, data != nil); err != nil {
		return err
	}
	if o.Encrypt != nil && cc == nil {
		return qapi.Errorf(qapi.GenericError, "qcow2: encryption needs the create context's secrets")
	}
	prealloc := string(o.Preallocation)
	if o.DataFileRaw && (prealloc == "off" || prealloc == "") {
		// qemu-img maps every cluster of a raw data file at creation
		// (observed: a 64 MiB image gets its L2 table), so that other
		// readers of the data file and of the image agree from the start.
		prealloc = "metadata"
	}
	size := int64(o.Size)
	cs := int64(o.ClusterSize)
	cb := uint32(bits.TrailingZeros64(uint64(cs)))
	h := &Header{Version: 3, ClusterBits: cb, RefcountOrder: uint32(bits.TrailingZeros64(uint64(o.RefcountBits)))}
	if o.Version == "v2" {
		h.Version = 2
	}
	g := Geometry{ClusterBits: cb, ExtendedL2: o.ExtendedL2, RefcountOrder: h.RefcountOrder}
	if g.L1SizeFor(size)*8 > MaxL1Bytes {
		return qapi.Errorf(qapi.GenericError, "The image size is too large for file format 'qcow2' (try using a larger cluster size)")
	}
	if h.Version >= 3 {
		if o.ExtendedL2 {
			h.IncompatibleFeatures |= IncompatExtendedL2
		}
		if o.Compression == "zstd" {
			h.IncompatibleFeatures |= IncompatCompression
			h.CompressionType = CompressionZstd
		}
		if data != nil {
			h.IncompatibleFeatures |= IncompatDataFile
			h.DataFile = data.Filename()
			h.HasDataFile = true
			if o.DataFileRaw {
				h.AutoclearFeatures |= AutoclearDataFileRaw
			}
		}
		if o.LazyRefcounts {
			h.CompatibleFeatures |= CompatLazyRefcounts
		}
		// qemu-img writes the feature name table when the first cluster
		// leaves room for it beside a backing file name (observed: from
		// 8 KiB clusters on).
		if cs >= 8192 {
			h.FeatureNames = append([]FeatureName(nil), DefaultFeatureNames...)
		}
	}
	h.BackingFile = o.BackingFile
	h.BackingFormat = o.BackingFmt
	if !h.Fits() {
		return qapi.Errorf(qapi.GenericError, "Header extensions too large for the cluster size")
	}

	// Clusters 0-2: header, refcount table, refcount block (refcounts of
	// those three set).
	h.RefcountTableOffset = uint64(cs)
	h.RefcountTableClusters = 1
	if err := file.Truncate(ctx, 0, true, "off"); err != nil {
		return fmt.Errorf("Could not resize image: %w", err)
	}
	if err := file.Truncate(ctx, 3*cs, true, "off"); err != nil {
		return fmt.Errorf("Could not resize image: %w", err)
	}
	buf := make([]byte, 3*cs)
	hb := h.Marshal()
	copy(buf, hb)
	be.PutUint64(buf[cs:], uint64(2*cs))
	rb := buf[2*cs:]
	for k := int64(0); k < 3; k++ {
		_ = SetRefcount(rb, h.RefcountOrder, k, 1)
	}
	if err := file.WriteV(ctx, 0, [][]byte{buf}, 0); err != nil {
		return fmt.Errorf("Could not write qcow2 header: %w", err)
	}
	if err := file.Flush(ctx); err != nil {
		return err
	}
	if data != nil {
		if err := data.Truncate(ctx, 0, true, "off"); err != nil {
			return fmt.Errorf("Could not resize the data file: %w", err)
		}
	}

	// Now an image of size 0 with an empty L1 table: open it in memory.
	img := &image{
		log: log, file: file, data: file, hdr: h, geo: g, cs: cs,
		extData: data != nil, dataRaw: o.DataFileRaw, compression: h.CompressionType, v3: h.Version >= 3,
		l1Dirty: map[int]bool{}, inflight: map[int64]*inflightAlloc{}, active: map[uint64]struct{}{},
		rt:         make([]uint64, cs/8),
		l2Slice:    cs,
		headerDone: true,
	}
	if img.log == nil {
		img.log = slog.New(slog.DiscardHandler)
	}
	if data != nil {
		img.data = data
	}
	img.rt[0] = uint64(2 * cs)
	img.l2c = newTableCache("L2 table", file, cs, 16*cs)
	img.rbc = newTableCache("refcount block", file, cs, refcountCacheMin*cs)
	img.l2c.beforeWrite = img.syncRefcounts
	img.freeHint = 3
	img.meta.Lock()
	err := img.resizeLocked(ctx, 0, size)
	if err == nil && o.Encrypt != nil {
		// After the L1 table, as qemu-img lays it out.
		err = img.setUpEncryptionLocked(ctx, cc, o.Encrypt)
	}
	img.meta.Unlock()
	if err != nil {
		return err
	}
	if data != nil {
		dmode := prealloc
		if dmode == "metadata" || dmode == "" {
			dmode = "off"
		}
		if err := data.Truncate(ctx, size, false, dmode); err != nil {
			return fmt.Errorf("Could not resize the data file: %w", err)
		}
	}
	if prealloc != "off" && prealloc != "" {
		if err := img.preallocate(ctx, 0, size, prealloc); err != nil {
			return err
		}
	}
	img.meta.Lock()
	err = img.syncLocked(ctx, true)
	img.meta.Unlock()
	if err != nil {
		return err
	}
	return file.Flush(ctx)
}
