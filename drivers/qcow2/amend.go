package qcow2

// img amend for qcow2: the options QEMU 7.2 lets qemu-img amend change
// (qemu-img amend -o help -f qcow2): compat, lazy_refcounts,
// refcount_bits, size, backing_file/backing_fmt (refused: that is
// rebase's job), data_file, data_file_raw; and encrypt.* (LUKS key slots,
// on the open image: cryptamend.go).
//
// Like check and snapshots, amend works on the image file with the node
// quiesced; each change is ordered so that a crash leaves at worst leaked
// clusters.

import (
	"context"
	"math/bits"

	"blockbackend/qmp/qapi"
)

// AmendOptions are the qcow2 amend options. The names are qemu-img's -o
// names with '-' for '_' (as for create); nil or empty leaves a setting
// as it is.
type AmendOptions struct {
	// Compat is "0.10" or "v2", "1.1" or "v3".
	Compat        string     `qapi:"compat,optional"`
	LazyRefcounts *bool      `qapi:"lazy-refcounts,optional"`
	RefcountBits  *int64     `qapi:"refcount-bits,optional"`
	Size          *qapi.Size `qapi:"size,optional"`
	BackingFile   *string    `qapi:"backing-file,optional"`
	BackingFmt    *string    `qapi:"backing-fmt,optional"`
	DataFile      *string    `qapi:"data-file,optional"`
	DataFileRaw   *bool      `qapi:"data-file-raw,optional"`
	// Encrypt changes LUKS key slots (cryptamend.go).
	Encrypt *EncryptAmendOptions `qapi:"encrypt,optional"`
}

// newAmendOptions is Driver.NewAmendOptions.
func newAmendOptions() any { return &AmendOptions{} }

func amendErr(format string, args ...any) error {
	return qapi.Errorf(qapi.GenericError, format, args...)
}

// amendPlan is the validated target state.
type amendPlan struct {
	version      uint32
	refcountBits int
	lazy         bool
	size         uint64
	dataFile     *string
}

// validateAmend checks o against the image and returns the target state,
// with QEMU's messages for what it refuses. Nothing is changed.
func validateAmend(h *Header, o *AmendOptions) (amendPlan, error) {
	p := amendPlan{
		version:      h.Version,
		refcountBits: h.RefcountBits(),
		lazy:         h.CompatibleFeatures&CompatLazyRefcounts != 0,
		size:         h.Size,
	}
	switch o.Compat {
	case "":
	case "0.10", "v2":
		p.version = 2
	case "1.1", "v3":
		p.version = 3
	default:
		return p, amendErr("Unknown compatibility level %s", o.Compat)
	}
	if o.BackingFile != nil && *o.BackingFile != h.BackingFile ||
		o.BackingFmt != nil && *o.BackingFmt != h.BackingFormat {
		return p, amendErr("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
	}
	if o.DataFile != nil {
		if !h.ExternalData() {
			return p, amendErr("data-file can only be set for images that use an external data file")
		}
		p.dataFile = o.DataFile
	}
	if o.DataFileRaw != nil && *o.DataFileRaw != h.DataFileRaw() {
		return p, amendErr("data-file-raw cannot be set on existing images")
	}
	if o.RefcountBits != nil {
		rb := *o.RefcountBits
		if rb <= 0 || rb > 64 || bits.OnesCount64(uint64(rb)) != 1 {
			return p, amendErr("Refcount width must be a power of two and may not exceed 64 bits")
		}
		p.refcountBits = int(rb)
	}
	if o.LazyRefcounts != nil {
		p.lazy = *o.LazyRefcounts
	} else if p.version == 2 {
		p.lazy = false // a downgrade drops lazy refcounts
	}
	if o.Size != nil {
		if uint64(*o.Size)%512 != 0 {
			return p, amendErr("The new size must be a multiple of 512")
		}
		p.size = uint64(*o.Size)
	}
	if p.version == 2 {
		if o.Compat != "" && h.Version == 3 && p.refcountBits != 16 {
			return p, amendErr("compat=0.10 requires refcount_bits=16")
		}
		if p.refcountBits != 16 {
			return p, amendErr("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
		}
		if p.lazy {
			return p, amendErr("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
		}
		if h.Version == 3 {
			if h.ExternalData() {
				return p, amendErr("Cannot downgrade an image with a data file")
			}
			// Compression type and extended L2 entries cannot be
			// expressed in a version 2 image.
			if f := h.IncompatibleFeatures &^ (IncompatDirty | IncompatCorrupt); f != 0 {
				return p, amendErr("Cannot downgrade an image with incompatible features %#x set", f)
			}
		}
	}
	if h.IncompatibleFeatures&IncompatCorrupt != 0 {
		return p, amendErr("qcow2: Image is corrupt; cannot be opened read/write")
	}
	if p.size > h.Size {
		if need := h.Geometry().L1SizeFor(int64(p.size)); need > MaxL1Bytes/8 {
			return p, amendErr("Failed to grow the L1 table: File too large")
		}
	}
	return p, nil
}

// amendImage applies o to the image (Amender.Amend over the file). h is
// updated to the new header.
func amendImage(ctx context.Context, st Storage, h *Header, o *AmendOptions, force bool) error {
	p, err := validateAmend(h, o)
	if err != nil {
		return err
	}
	// Refcounts must be right before they are rewritten or relied on.
	if h.IncompatibleFeatures&IncompatDirty != 0 {
		if _, err := repairImage(ctx, st, h); err != nil {
			return err
		}
	}
	if p.refcountBits != h.RefcountBits() {
		if err := changeRefcountWidth(ctx, st, h, p.refcountBits); err != nil {
			return err
		}
	}
	if p.size != h.Size {
		if err := resizeImage(ctx, st, h, p.size); err != nil {
			return err
		}
	}
	nh := *h
	if p.version == 2 && h.Version == 3 {
		if err := expandZeroClusters(ctx, st, h); err != nil {
			return err
		}
		if err := dropBitmaps(ctx, st, h); err != nil {
			return err
		}
		nh = *h
		nh.Version = 2
		nh.IncompatibleFeatures, nh.CompatibleFeatures, nh.AutoclearFeatures = 0, 0, 0
		nh.CompressionType, nh.ExtraFields, nh.FeatureNames, nh.Bitmaps = 0, nil, nil, nil
	}
	if p.version == 3 && h.Version == 2 {
		nh.Version = 3
		nh.RefcountOrder = 4
		nh.FeatureNames = append([]FeatureName(nil), DefaultFeatureNames...)
	}
	if p.version == 3 {
		if p.lazy {
			nh.CompatibleFeatures |= CompatLazyRefcounts
		} else {
			nh.CompatibleFeatures &^= CompatLazyRefcounts
		}
	}
	if p.dataFile != nil {
		nh.DataFile, nh.HasDataFile = *p.dataFile, true
	}
	if headerEqual(&nh, h) {
		return nil
	}
	if !nh.Fits() {
		return amendErr("Cannot update the header: it does not fit in the first cluster")
	}
	if err := writeHeader(ctx, st, &nh); err != nil {
		return err
	}
	*h = nh
	return nil
}

func headerEqual(a, b *Header) bool {
	x, y := *a, *b
	return string(x.Marshal()) == string(y.Marshal())
}

// changeRefcountWidth rewrites the refcount structures with entries of
// width bits: new ones behind the end of the file, then one header write
// switches both the table and refcount_order; the old structures are then
// simply unreferenced.
func changeRefcountWidth(ctx context.Context, st Storage, h *Header, width int) error {
	m, err := newMetaEditor(ctx, st, h)
	if err != nil {
		return err
	}
	size, err := st.Size()
	if err != nil {
		return err
	}
	cs := h.ClusterSize()
	n := clustersFor(size, cs)
	ng := h.Geometry()
	ng.RefcountOrder = uint32(bits.TrailingZeros(uint(width)))
	newMax := ng.MaxRefcount()
	refs := make([]uint32, n)
	for k := int64(0); k < n; k++ {
		r, err := m.refcount(k)
		if err != nil {
			return err
		}
		if r > newMax {
			return amendErr("Cannot decrease refcount entry width to %d bits: Cluster at offset %#x has a refcount of %d", width, k*cs, r)
		}
		if r > uint64(^uint32(0)) {
			return amendErr("Cannot convert refcount of cluster at offset %#x (%d)", k*cs, r)
		}
		refs[k] = uint32(r)
	}
	// The old table and blocks are not part of the new state.
	drop := func(off, length int64) {
		for k := off / cs; length > 0 && k <= (off+length-1)/cs && k < n; k++ {
			if refs[k] > 0 {
				refs[k]--
			}
		}
	}
	drop(int64(h.RefcountTableOffset), int64(h.RefcountTableClusters)*cs)
	for _, e := range m.reftable {
		if off := int64(e &^ RefcountTableReservedMask); off != 0 {
			drop(off, cs)
		}
	}
	tOff, nrt, err := placeRefcounts(ctx, st, ng, refs, n)
	if err != nil {
		return err
	}
	nh := *h
	nh.RefcountTableOffset, nh.RefcountTableClusters, nh.RefcountOrder = uint64(tOff), uint32(nrt), ng.RefcountOrder
	// Bytes 48-99 hold the table and refcount_order (and, unchanged,
	// everything between): one write within the first sector.
	buf := nh.Marshal()
	if err := patchHeader(ctx, st, 48, buf[48:100]); err != nil {
		return err
	}
	*h = nh
	return nil
}

// resizeImage changes the virtual size. Growing may move the L1 table to
// a larger one; shrinking drops the mappings beyond the new end (copying
// an L2 table that a snapshot shares before changing it).
func resizeImage(ctx context.Context, st Storage, h *Header, newSize uint64) error {
	m, err := newMetaEditor(ctx, st, h)
	if err != nil {
		return err
	}
	g := h.Geometry()
	if newSize > h.Size {
		need := g.L1SizeFor(int64(newSize))
		if need <= uint64(h.L1Size) {
			var f [8]byte
			be.PutUint64(f[:], newSize)
			if err := patchHeader(ctx, st, 24, f[:]); err != nil {
				return err
			}
			h.Size = newSize
			return nil
		}
		oldOff, oldSize := int64(h.L1TableOffset), h.L1Size
		l1, err := readL1(ctx, st, oldOff, oldSize)
		if err != nil {
			return err
		}
		l1 = append(l1, make([]uint64, need-uint64(oldSize))...)
		newOff, err := m.alloc(clustersFor(int64(need)*8, m.cs))
		if err != nil {
			return err
		}
		if err := st.WriteAt(ctx, encodeL1(l1), newOff); err != nil {
			return err
		}
		if err := m.flushRefs(); err != nil {
			return err
		}
		var f [24]byte
		be.PutUint64(f[0:], newSize)
		be.PutUint32(f[8:], h.CryptMethod)
		be.PutUint32(f[12:], uint32(need))
		be.PutUint64(f[16:], uint64(newOff))
		if err := patchHeader(ctx, st, 24, f[:]); err != nil {
			return err
		}
		h.Size, h.L1Size, h.L1TableOffset = newSize, uint32(need), uint64(newOff)
		if oldSize > 0 {
			if err := m.freeClusters(oldOff, int64(oldSize)*8); err != nil {
				return err
			}
		}
		return m.flushRefs()
	}

	// Shrink: the header first, so nothing beyond the end is visible any
	// more, then the mappings there are dropped.
	var f [8]byte
	be.PutUint64(f[:], newSize)
	if err := patchHeader(ctx, st, 24, f[:]); err != nil {
		return err
	}
	h.Size = newSize
	l1Off := int64(h.L1TableOffset)
	l1, err := readL1(ctx, st, l1Off, h.L1Size)
	if err != nil {
		return err
	}
	firstGone := (int64(newSize) + m.cs - 1) / m.cs // first guest cluster dropped
	per := g.L2Entries()
	table := make([]byte, m.cs)
	for i := range l1 {
		l2 := L1Entry(l1[i]).Offset()
		if l2 == 0 || int64(i+1)*per <= firstGone {
			continue
		}
		from := max(firstGone-int64(i)*per, 0) // first entry dropped
		if err := st.ReadAt(ctx, table, l2); err != nil {
			return err
		}
		if from == 0 {
			// The whole table goes: one reference less to it and to
			// everything it maps.
			l1[i] = 0
			if err := st.WriteAt(ctx, encodeL1(l1[i:i+1]), l1Off+int64(i)*8); err != nil {
				return err
			}
			if err := st.Flush(ctx); err != nil {
				return err
			}
			if err := addTreeRefs(m, []uint64{uint64(MakeL1Entry(l2, false))}, -1); err != nil {
				return err
			}
			continue
		}
		r, err := m.refcount(l2 / m.cs)
		if err != nil {
			return err
		}
		dropped := make([]byte, m.cs)
		copy(dropped, table)
		for j := int64(0); j < per; j++ {
			if j >= from {
				g.SetL2(table, int(j), L2Entry{})
			} else {
				g.SetL2(dropped, int(j), L2Entry{})
			}
		}
		if r == 1 {
			if err := st.WriteAt(ctx, table, l2); err != nil {
				return err
			}
			if err := st.Flush(ctx); err != nil {
				return err
			}
		} else {
			// Shared with a snapshot: the active table gets its own copy
			// (the kept entries keep their counts: one path replaces
			// another), the shared one loses the active reference.
			nl2, err := m.alloc(1)
			if err != nil {
				return err
			}
			if err := st.WriteAt(ctx, table, nl2); err != nil {
				return err
			}
			if err := m.flushRefs(); err != nil {
				return err
			}
			l1[i] = uint64(MakeL1Entry(nl2, true))
			if err := st.WriteAt(ctx, encodeL1(l1[i:i+1]), l1Off+int64(i)*8); err != nil {
				return err
			}
			if err := st.Flush(ctx); err != nil {
				return err
			}
			if err := m.addRef(l2, m.cs, -1); err != nil {
				return err
			}
		}
		// One path less to each dropped cluster.
		if err := dropEntries(m, dropped); err != nil {
			return err
		}
	}
	if err := m.flushRefs(); err != nil {
		return err
	}
	return fixCopied(m, l1Off, l1)
}

// dropEntries takes one reference from every cluster the L2 table maps.
func dropEntries(m *metaEditor, table []byte) error {
	fileSize, err := m.st.Size()
	if err != nil {
		return err
	}
	for j := 0; j < int(m.g.L2Entries()); j++ {
		le := m.g.GetL2(table, j)
		switch le.Type(m.g.ExtendedL2, m.h.ExternalData()) {
		case ClusterCompressed:
			host, n := m.g.CompressedSpan(le)
			if err := checkRef(m, fileSize, host&^511, n+host&511); err != nil {
				return err
			}
			if err := m.addRef(host&^511, n+host&511, -1); err != nil {
				return err
			}
		case ClusterNormal, ClusterZeroAlloc:
			if m.h.ExternalData() {
				continue
			}
			if err := checkRef(m, fileSize, le.Offset(), m.cs); err != nil {
				return err
			}
			if err := m.addRef(le.Offset(), m.cs, -1); err != nil {
				return err
			}
		}
	}
	return nil
}

// expandZeroClusters removes the zero flag (which version 2 does not
// have) from every L2 entry of every L1 table: a zero cluster without a
// host cluster becomes unallocated when nothing is behind it, else an
// allocated cluster of zeros; a preallocated zero cluster gets its host
// cluster zeroed (or, when another table shares that cluster, a new
// zeroed one).
func expandZeroClusters(ctx context.Context, st Storage, h *Header) error {
	m, err := newMetaEditor(ctx, st, h)
	if err != nil {
		return err
	}
	snaps, _, err := readSnapshots(ctx, st, h)
	if err != nil {
		return err
	}
	// How many L1 tables reference each L2 table: the number of paths
	// through it to each cluster it maps.
	uses := map[int64]int{}
	var order []int64
	tables := []struct {
		off int64
		n   uint32
	}{{int64(h.L1TableOffset), h.L1Size}}
	for _, sn := range snaps {
		if sn.L1TableOffset%uint64(m.cs) != 0 || uint64(sn.L1Size)*8 > MaxL1Bytes {
			return amendErr("Snapshot %s has an invalid L1 table; run 'qemu-img check -r all' first", sn.ID)
		}
		tables = append(tables, struct {
			off int64
			n   uint32
		}{int64(sn.L1TableOffset), sn.L1Size})
	}
	for _, t := range tables {
		l1, err := readL1(ctx, st, t.off, t.n)
		if err != nil {
			return err
		}
		for _, e := range l1 {
			if l2 := L1Entry(e).Offset(); l2 != 0 {
				if uses[l2] == 0 {
					order = append(order, l2)
				}
				uses[l2]++
			}
		}
	}
	hasBacking := h.BackingFile != ""
	zeros := make([]byte, m.cs)
	table := make([]byte, m.cs)
	fileSize, err := st.Size()
	if err != nil {
		return err
	}
	for _, l2 := range order {
		if err := checkRef(m, fileSize, l2, m.cs); err != nil {
			return err
		}
		if err := st.ReadAt(ctx, table, l2); err != nil {
			return err
		}
		paths := uint64(uses[l2])
		changed := false
		var release []int64 // host clusters that lose this table's paths
		for j := 0; j < int(m.g.L2Entries()); j++ {
			le := m.g.GetL2(table, j)
			switch le.Type(false, false) {
			case ClusterZeroPlain:
				if !hasBacking {
					m.g.SetL2(table, j, L2Entry{})
					changed = true
					continue
				}
				off, err := m.alloc(1)
				if err != nil {
					return err
				}
				if err := m.setRefcount(off/m.cs, paths); err != nil {
					return err
				}
				if err := st.WriteAt(ctx, zeros, off); err != nil {
					return err
				}
				m.g.SetL2(table, j, L2Entry{Entry: MakeStandard(off, copiedFlag(paths == 1))})
				changed = true
			case ClusterZeroAlloc:
				host := le.Offset()
				if err := checkRef(m, fileSize, host, m.cs); err != nil {
					return err
				}
				r, err := m.refcount(host / m.cs)
				if err != nil {
					return err
				}
				if r == paths {
					if err := st.WriteAt(ctx, zeros, host); err != nil {
						return err
					}
					m.g.SetL2(table, j, L2Entry{Entry: MakeStandard(host, copiedFlag(r == 1))})
				} else {
					off, err := m.alloc(1)
					if err != nil {
						return err
					}
					if err := m.setRefcount(off/m.cs, paths); err != nil {
						return err
					}
					if err := st.WriteAt(ctx, zeros, off); err != nil {
						return err
					}
					m.g.SetL2(table, j, L2Entry{Entry: MakeStandard(off, copiedFlag(paths == 1))})
					release = append(release, host)
				}
				changed = true
			}
		}
		if !changed {
			continue
		}
		if err := m.flushRefs(); err != nil { // new clusters counted and zeroed
			return err
		}
		if err := st.WriteAt(ctx, table, l2); err != nil {
			return err
		}
		if err := st.Flush(ctx); err != nil {
			return err
		}
		for _, host := range release {
			if err := m.addRef(host, m.cs, -int(paths)); err != nil {
				return err
			}
		}
		if err := m.flushRefs(); err != nil {
			return err
		}
	}
	return nil
}

func copiedFlag(copied bool) uint64 {
	if copied {
		return FlagCopied
	}
	return 0
}

// dropBitmaps removes the bitmaps extension and frees the bitmap
// directory, tables and data (a version 2 image cannot keep them).
func dropBitmaps(ctx context.Context, st Storage, h *Header) error {
	if h.Bitmaps == nil {
		return nil
	}
	bms, err := readBitmapDirectory(ctx, st, h)
	if err != nil {
		return err
	}
	nh := *h
	nh.Bitmaps = nil
	nh.AutoclearFeatures &^= AutoclearBitmaps
	if err := writeHeader(ctx, st, &nh); err != nil {
		return err
	}
	old := *h
	*h = nh
	if old.AutoclearFeatures&AutoclearBitmaps == 0 {
		return nil // inconsistent extension: its clusters were not counted
	}
	m, err := newMetaEditor(ctx, st, h)
	if err != nil {
		return err
	}
	for _, b := range bms {
		tbl, err := readL1(ctx, st, b.tableOffset, b.tableSize)
		if err != nil {
			return err
		}
		for _, e := range tbl {
			if off := int64(e & OffsetMask); off != 0 {
				if err := m.freeClusters(off, m.cs); err != nil {
					return err
				}
			}
		}
		if err := m.freeClusters(b.tableOffset, int64(b.tableSize)*8); err != nil {
			return err
		}
	}
	if err := m.freeClusters(int64(old.Bitmaps.DirectoryOffset), int64(old.Bitmaps.DirectorySize)); err != nil {
		return err
	}
	return m.flushRefs()
}
