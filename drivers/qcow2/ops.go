package qcow2

import (
	"context"
	"fmt"
	"syscall"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// waitRangeLocked returns an in-flight allocation on any guest cluster of
// [off, off+n), or nil.
func (img *image) waitRangeLocked(off, n int64) *inflightAlloc {
	for c := off / img.cs; c <= (off+n-1)/img.cs; c++ {
		if w := img.inflight[c]; w != nil {
			return w
		}
	}
	return nil
}

// setClustersLocked rewrites the entries of the whole clusters in
// [off, off+n) with f, which gets the old entry and returns the new one
// and whether the old host cluster is released. Clusters whose L2 table
// is missing are passed a zero entry; when f keeps it zero no table is
// allocated.
func (img *image) setClustersLocked(ctx context.Context, off, n int64, kind discardKind,
	f func(old L2Entry) (L2Entry, bool)) error {
	for g := off; g < off+n; g += img.cs {
		s, idx, _, err := img.l2SliceLocked(ctx, g)
		if err != nil {
			return err
		}
		var old L2Entry
		if s != nil {
			old = img.geo.GetL2(s, idx)
		}
		ne, release := f(old)
		if ne == old {
			continue
		}
		s, idx, soff, err := img.l2ForWriteLocked(ctx, g)
		if err != nil {
			return err
		}
		// The table may have been copied: take the entry from there.
		old = img.geo.GetL2(s, idx)
		ne, release = f(old)
		img.geo.SetL2(s, idx, ne)
		img.l2c.markDirty(soff)
		if release {
			img.releaseEntryLocked(old, kind)
		}
	}
	return nil
}

// Discard frees whole clusters (qcow2 discards at cluster granularity;
// the rest of the range is ignored, as discard is advisory). In version 3
// images with a backing file the clusters become zero clusters, so that
// the backing file does not show through; otherwise they become
// unallocated. The file child sees a discard when pass-discard-request
// is on, once the change is stable.
func (img *image) Discard(ctx context.Context, off, n int64) error {
	img.resize.RLock()
	defer img.resize.RUnlock()
	size := img.size.Load()
	start := (off + img.cs - 1) / img.cs * img.cs
	end := (off + n) / img.cs * img.cs
	if off+n == size {
		end = (size + img.cs - 1) / img.cs * img.cs
	}
	if end <= start {
		return nil
	}
	if img.dataRaw {
		// The data file must stay a valid raw image, and discard is
		// advisory: leave it alone.
		return nil
	}
	zero := img.v3 && img.backing != nil
	for {
		img.meta.Lock()
		if w := img.waitRangeLocked(start, end-start); w != nil {
			img.meta.Unlock()
			if err := waitFor(ctx, w); err != nil {
				return err
			}
			continue
		}
		seq := img.startReqLocked()
		err := img.beginWriteLocked(ctx)
		if err == nil {
			err = img.setClustersLocked(ctx, start, end-start, discardRequest, func(old L2Entry) (L2Entry, bool) {
				return img.unmappedEntry(zero), old.Compressed() || old.Offset() != 0 || (img.extData && old.Copied())
			})
		}
		delete(img.active, seq)
		img.meta.Unlock()
		if err == nil && img.extData && img.passDiscard[discardRequest] {
			_ = img.data.Discard(ctx, start, min(end, size)-start)
		}
		return err
	}
}

// unmappedEntry is the entry of a cluster without host data that reads
// as zeros (zero) or falls through to the backing file.
func (img *image) unmappedEntry(zero bool) L2Entry {
	if !zero {
		return L2Entry{}
	}
	if img.geo.ExtendedL2 {
		return L2Entry{Bitmap: MakeBitmap(0, allSubclusters)}
	}
	return L2Entry{Entry: FlagZero}
}

// WriteZeroes marks whole clusters (subclusters with extended L2 entries)
// as zero in version 3 images; the unaligned head and tail are written as
// zero data. With may-unmap the host clusters are released; without it a
// cluster the image owns stays allocated (a preallocated zero cluster).
func (img *image) WriteZeroes(ctx context.Context, off, n int64, flags graph.ZeroFlags) error {
	if !img.v3 || img.dataRaw {
		// No zero flag (v2), or the data file must hold real zeros.
		return fmt.Errorf("qcow2: write zeroes: %w", graph.ErrNotSupported)
	}
	img.resize.RLock()
	defer img.resize.RUnlock()
	unit := img.geo.SubclusterSize()
	size := img.size.Load()
	start := (off + unit - 1) / unit * unit
	end := (off + n) / unit * unit
	if off+n == size {
		end = (size + unit - 1) / unit * unit
	}
	if end <= start {
		return img.writeZeroData(ctx, off, n)
	}
	if start > off {
		if err := img.writeZeroData(ctx, off, start-off); err != nil {
			return err
		}
	}
	if tail := off + n - end; tail > 0 {
		if err := img.writeZeroData(ctx, end, tail); err != nil {
			return err
		}
	}
	// Whole clusters in the middle through the metadata; partial clusters
	// (extended L2: whole subclusters of a cluster) through bitmaps.
	unmap := flags&graph.ZeroMayUnmap != 0
	for {
		img.meta.Lock()
		if w := img.waitRangeLocked(start, end-start); w != nil {
			img.meta.Unlock()
			if err := waitFor(ctx, w); err != nil {
				return err
			}
			continue
		}
		seq := img.startReqLocked()
		err := img.beginWriteLocked(ctx)
		var compressed []int64
		if err == nil {
			compressed, err = img.zeroRangeLocked(ctx, start, end, unmap)
		}
		delete(img.active, seq)
		img.meta.Unlock()
		if err != nil {
			return err
		}
		// Compressed clusters partly zeroed (extended L2) are rewritten.
		for _, c := range compressed {
			a := max(start, c)
			b := min(end, c+img.cs)
			if err := img.writeZeroData(ctx, a, b-a); err != nil {
				return err
			}
		}
		if flags&graph.ZeroFUA != 0 {
			return img.flushAll(ctx)
		}
		return nil
	}
}

// zeroRangeLocked makes the whole subclusters of [start, end) read as
// zeros through the L2 entries. It returns the compressed clusters that
// could not be changed that way (extended L2, partly zeroed): the caller
// writes zero data there.
func (img *image) zeroRangeLocked(ctx context.Context, start, end int64, unmap bool) ([]int64, error) {
	var compressed []int64
	for g := start; g < end; {
		c := g / img.cs * img.cs
		ce := min(c+img.cs, end)
		a, b := g-c, ce-c
		if err := img.setClustersLocked(ctx, c, 1, discardRequest, func(old L2Entry) (L2Entry, bool) {
			return img.zeroedEntry(old, a, b, unmap, &compressed, c)
		}); err != nil {
			return nil, err
		}
		g = ce
	}
	return compressed, nil
}

// zeroedEntry is old with the subclusters of [a, b) reading as zeros.
func (img *image) zeroedEntry(old L2Entry, a, b int64, unmap bool, compressed *[]int64, c int64) (L2Entry, bool) {
	whole := a == 0 && b >= img.cs
	if !img.geo.ExtendedL2 {
		if !unmap && img.ownedHost(old) {
			return L2Entry{Entry: old.Entry | FlagZero}, false
		}
		return L2Entry{Entry: FlagZero}, old.Compressed() || old.Offset() != 0
	}
	if old.Compressed() {
		if whole {
			return L2Entry{Bitmap: MakeBitmap(0, allSubclusters)}, true
		}
		for _, x := range *compressed {
			if x == c {
				return old, false
			}
		}
		*compressed = append(*compressed, c)
		return old, false
	}
	m := img.subMask(a, b)
	alloc := old.AllocBitmap() &^ m
	zero := old.ZeroBitmap() | m
	hasHost := old.Offset() != 0 || (img.extData && old.Copied())
	if hasHost && alloc == 0 && (unmap || !img.ownedHost(old)) {
		return L2Entry{Bitmap: MakeBitmap(0, zero)}, true
	}
	return L2Entry{Entry: old.Entry, Bitmap: MakeBitmap(alloc, zero)}, false
}

// writeZeroData writes zero bytes through the normal write path.
func (img *image) writeZeroData(ctx context.Context, off, n int64) error {
	if n <= 0 {
		return nil
	}
	img.meta.Lock()
	seq := img.startReqLocked()
	err := img.beginWriteLocked(ctx)
	img.meta.Unlock()
	defer img.endReq(seq)
	if err != nil {
		return err
	}
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(buf)))
		if err := img.writeLocked(ctx, off, [][]byte{buf[:k]}, 0); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// BlockStatus reports data (with its offset in the data child), zeros and
// allocation in this layer; unallocated ranges fall through to the
// backing node.
func (img *image) BlockStatus(ctx context.Context, off, n int64) (graph.StatusExtent, error) {
	img.resize.RLock()
	defer img.resize.RUnlock()
	img.meta.Lock()
	m, err := img.lookupLocked(ctx, off, n)
	recurse := err == nil && m.kind == kindData && img.metaPreallocatedLocked(ctx)
	img.meta.Unlock()
	if err != nil {
		return graph.StatusExtent{}, err
	}
	ext := graph.StatusExtent{Length: m.length}
	switch m.kind {
	case kindData:
		ext.Status = graph.StatusData | graph.StatusAllocated
		ext.Offset, ext.File = m.host, img.data
		if recurse {
			// Whether it reads as zeros is for the file to say.
			ext.Status |= graph.StatusRecurse
		}
	case kindZero:
		ext.Status = graph.StatusZero | graph.StatusAllocated
		if m.zeroAlloc {
			// A preallocated zero cluster: QEMU reports where it lies.
			ext.Offset, ext.File = m.host, img.data
		}
	case kindCompressed:
		ext.Status = graph.StatusData | graph.StatusAllocated
	case kindUnalloc:
		if img.backing == nil {
			ext.Status = graph.StatusZero
		} else if bs := img.backing.SizeNow(); off >= bs {
			ext.Status = graph.StatusZero
		}
		if m.zeroAlloc {
			ext.Offset, ext.File = m.host, img.data
		}
	}
	if img.crypt != nil {
		// As QEMU: encrypted data has no offset a reader could use, and
		// zeros in the file are not zeros to the guest.
		ext.Offset, ext.File = 0, nil
		ext.Status &^= graph.StatusRecurse
	}
	return ext, nil
}

// Truncate resizes the virtual disk. Growing extends the L1 table when
// needed and makes the new range read as zeros (even over a longer
// backing file); shrinking releases the clusters past the new end (what
// internal snapshots still reference stays).
func (img *image) Truncate(ctx context.Context, size int64, exact bool, prealloc string) error {
	img.resize.Lock()
	defer img.resize.Unlock()
	old := img.size.Load()
	if size%512 != 0 {
		return qapi.Errorf(qapi.GenericError, "The new size must be a multiple of 512")
	}
	// As QEMU 7.2 (qemu-img resize, block_resize), even to the same size:
	// ENOTSUP.
	img.meta.Lock()
	v2snaps := img.hdr.Version < 3 && img.hdr.NbSnapshots > 0
	img.meta.Unlock()
	if v2snaps {
		e := qapi.Errorf(qapi.GenericError, "Can't resize a v2 image which has snapshots")
		e.Err = syscall.ENOTSUP
		return e
	}
	if size < old && prealloc != "off" {
		return qapi.Errorf(qapi.GenericError, "Preallocation can only be used for growing images")
	}
	img.meta.Lock()
	err := img.beginWriteLocked(ctx)
	if err == nil {
		err = img.resizeLocked(ctx, old, size)
	}
	img.meta.Unlock()
	if err != nil {
		return err
	}
	if img.extData {
		if err := img.data.Truncate(ctx, size, false, prealloc); err != nil {
			return err
		}
	}
	if size > old {
		// Bytes of the old last cluster past the old end, and a longer
		// backing file, must not show through.
		zend := (old + img.cs - 1) / img.cs * img.cs
		if img.backing != nil {
			zend = max(zend, min(img.backing.SizeNow(), size))
		}
		zend = min(zend, size)
		if zend > old && !img.readsZero(ctx, old, zend-old) {
			if err := img.writeZeroesInternal(ctx, old, zend-old); err != nil {
				return err
			}
		}
		if prealloc != "off" {
			if err := img.preallocate(ctx, old, size, prealloc); err != nil {
				return err
			}
		}
	}
	return img.flushAll(ctx)
}

// readsZero reports whether [off, off+n) is known to read as zeros.
func (img *image) readsZero(ctx context.Context, off, n int64) bool {
	for pos := off; pos < off+n; {
		img.meta.Lock()
		m, err := img.lookupLocked(ctx, pos, off+n-pos)
		img.meta.Unlock()
		if err != nil {
			return false
		}
		switch {
		case m.kind == kindZero:
		case m.kind == kindUnalloc && (img.backing == nil || pos >= img.backing.SizeNow()):
		default:
			return false
		}
		pos += m.length
	}
	return true
}

// writeZeroesInternal zeroes a range with resize already held.
func (img *image) writeZeroesInternal(ctx context.Context, off, n int64) error {
	if !img.v3 || img.dataRaw {
		return img.writeZeroData(ctx, off, n)
	}
	unit := img.geo.SubclusterSize()
	start := (off + unit - 1) / unit * unit
	if start > off {
		if err := img.writeZeroData(ctx, off, min(start, off+n)-off); err != nil {
			return err
		}
	}
	end := (off + n + unit - 1) / unit * unit
	if start >= end {
		return nil
	}
	img.meta.Lock()
	compressed, err := img.zeroRangeLocked(ctx, start, end, true)
	img.meta.Unlock()
	if err != nil {
		return err
	}
	for _, c := range compressed {
		a, b := max(start, c), min(end, c+img.cs)
		if err := img.writeZeroData(ctx, a, b-a); err != nil {
			return err
		}
	}
	return nil
}

// resizeLocked changes the virtual size in the header, growing the L1
// table or releasing what lies past a smaller size.
func (img *image) resizeLocked(ctx context.Context, old, size int64) error {
	need := img.geo.L1SizeFor(size)
	if need*8 > MaxL1Bytes {
		return qapi.Errorf(qapi.GenericError, "Image is too big")
	}
	if size > old && need > uint64(len(img.l1)) {
		if err := img.growL1Locked(ctx, int(need)); err != nil {
			return err
		}
	}
	if size < old {
		from := (size + img.cs - 1) / img.cs * img.cs
		oldEnd := (old + img.cs - 1) / img.cs * img.cs
		if from < oldEnd {
			if err := img.setClustersLocked(ctx, from, oldEnd-from, discardOther, func(e L2Entry) (L2Entry, bool) {
				return L2Entry{}, e.Compressed() || e.Offset() != 0
			}); err != nil {
				return err
			}
		}
		// L2 tables wholly past the end go too.
		span := img.cs * img.geo.L2Entries()
		for i := (size + span - 1) / span; i < int64(len(img.l1)); i++ {
			if off := L1Entry(img.l1[i]).Offset(); off != 0 {
				img.l1[i] = 0
				img.l1Dirty[int(i)] = true
				img.queueFreeLocked(off, img.cs, discardOther)
			}
		}
	}
	if err := img.syncLocked(ctx, false); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	h := *img.hdr
	h.Size = uint64(size)
	if err := img.writeHeaderLocked(ctx, &h); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	img.size.Store(size)
	return nil
}

// growL1Locked moves the active L1 table to new clusters with n entries:
// everything is written back first, the new table is written and flushed,
// then the header points at it, then the old table is released.
func (img *image) growL1Locked(ctx context.Context, n int) error {
	if err := img.syncLocked(ctx, false); err != nil {
		return err
	}
	clusters := (int64(n)*8 + img.cs - 1) / img.cs
	// The file grows over the table's entries only, as QEMU's does; in
	// clusters that lay inside the file the rest of them is zeroed.
	off, err := img.allocUsedLocked(ctx, clusters, int64(n)*8)
	if err != nil {
		return err
	}
	buf := make([]byte, max(int64(n)*8, min(clusters*img.cs, img.file.SizeNow()-off)))
	for i, e := range img.l1 {
		be.PutUint64(buf[i*8:], e)
	}
	// New clusters' refcounts first, then the table.
	if err := img.syncRefcounts(ctx); err != nil {
		return err
	}
	if err := img.file.WriteV(ctx, off, [][]byte{buf}, 0); err != nil {
		return fmt.Errorf("qcow2: writing the L1 table: %w", err)
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	oldOff, oldLen := int64(img.hdr.L1TableOffset), int64(len(img.l1))*8
	h := *img.hdr
	h.L1TableOffset, h.L1Size = uint64(off), uint32(n)
	if err := img.writeHeaderLocked(ctx, &h); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	nl1 := make([]uint64, n)
	copy(nl1, img.l1)
	img.l1 = nl1
	if oldOff != 0 && oldLen > 0 {
		img.queueFreeLocked(oldOff, (oldLen+img.cs-1)/img.cs*img.cs, discardOther)
	}
	return nil
}

// preallocate allocates the clusters of [from, to) (preallocation
// metadata, falloc, full): L2 tables and data clusters at the end of the
// file, which is then grown to cover them with the file's own
// preallocation mode, so that they read as zeros.
func (img *image) preallocate(ctx context.Context, from, to int64, mode string) error {
	img.meta.Lock()
	defer img.meta.Unlock()
	if (mode == "falloc" || mode == "full") && !img.extData {
		return img.preallocateAreaLocked(ctx, from, to, mode)
	}
	cs := img.cs
	span := cs * img.geo.L2Entries()
	last := (to + cs - 1) / cs * cs
	var end int64
	for c := from / cs * cs; c < last; {
		if need, err := img.unallocatedLocked(ctx, c); err != nil {
			return err
		} else if !need {
			c += cs
			continue
		}
		// The clusters to allocate from c on within its L2 table's span:
		// the table first, then their data in runs (as long as the free
		// space allows), so that tables and data interleave as in QEMU
		// and a run that reaches a range without a refcount block stays
		// in one piece, the block after it.
		n := int64(1)
		for stop := min((c/span+1)*span, last); c+n*cs < stop; n++ {
			if need, err := img.unallocatedLocked(ctx, c+n*cs); err != nil {
				return err
			} else if !need {
				break
			}
		}
		if _, _, _, err := img.l2ForWriteLocked(ctx, c); err != nil {
			return err
		}
		for n > 0 {
			host, got := c, n
			if !img.extData {
				var err error
				if host, got, err = img.allocRunLocked(ctx, n); err != nil {
					return err
				}
				end = max(end, host+got*cs)
			}
			for i := int64(0); i < got; i++ {
				s, idx, soff, err := img.l2ForWriteLocked(ctx, c+i*cs)
				if err != nil {
					return err
				}
				// With extended L2 entries the subclusters stay
				// unallocated, as QEMU leaves them: the space is
				// reserved, and a backing file (allowed with
				// preallocation only then) still shows through.
				img.geo.SetL2(s, idx, L2Entry{Entry: MakeStandard(host+i*cs, FlagCopied)})
				img.l2c.markDirty(soff)
			}
			c += got * cs
			n -= got
		}
	}
	fileMode := mode
	if mode == "metadata" {
		fileMode = "off"
	}
	if end > img.file.SizeNow() {
		if err := img.file.Truncate(ctx, end, false, fileMode); err != nil {
			if mode == "metadata" {
				return err
			}
			return fmt.Errorf("qcow2: preallocation %s: %w", mode, err)
		}
	}
	if err := img.syncLocked(ctx, false); err != nil {
		return err
	}
	if img.file.SizeNow() < end {
		return fmt.Errorf("qcow2: file too short after preallocation: %w", syscall.EIO)
	}
	return nil
}
