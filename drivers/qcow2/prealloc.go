package qcow2

import (
	"context"
	"fmt"
	"os"
	"syscall"
)

// metaPrealloc remembers whether the image looks metadata-preallocated:
// its refcounts claim clearly more clusters than its file occupies on
// disk, so many allocated clusters lie in holes of the file and read as
// zeros. QEMU 7.2 decides this once per open with the same rule and only
// then asks the file, for each allocated data run, whether it reads as
// zeros (qemu-img map shows such runs as "data" and "zero"); for any
// other image, e.g. preallocation=falloc whose file extents are
// allocated but unwritten, it reports plain data, and so do we. Guarded
// by img.meta.
type metaPrealloc struct {
	checked, yes bool
}

// metaPreallocatedLocked returns the (once computed) verdict. Errors and
// files that cannot say how much of them is allocated give false, as an
// image that is not preallocated.
func (img *image) metaPreallocatedLocked(ctx context.Context) bool {
	if img.mp.checked {
		return img.mp.yes
	}
	img.mp.checked = true
	if img.extData {
		// Data clusters live in the data file and are not refcounted.
		return false
	}
	st, err := os.Stat(img.file.Filename())
	if err != nil {
		return false
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || !st.Mode().IsRegular() {
		return false
	}
	onDisk := sys.Blocks * 512 / img.cs
	// A margin of a ninth (and at least two clusters) keeps metadata,
	// file-system rounding and a few holes from tipping the verdict.
	threshold := max(onDisk*10/9, onDisk+2)
	var used int64
	for k := int64(0); k < (st.Size()+img.cs-1)/img.cs; k++ {
		if ctx.Err() != nil {
			return false
		}
		rc, err := img.refcountLocked(ctx, k)
		if err != nil {
			return false
		}
		if rc > 0 {
			if used++; used > threshold {
				img.mp.yes = true
				return true
			}
		}
	}
	return false
}

// preallocateAreaLocked is preallocate for falloc and full, laid out as
// qemu-img 7.2 lays it out (observed): from the first cluster past the
// end of the file, refcount blocks for every range that lacks one up to
// the end of the whole area, then a new refcount table (sized for those
// ranges) replacing the old one, which is freed; then all the data
// clusters in one run, the file grown over them with the preallocation
// mode; last the L2 tables, each taken as a new table is (first free
// cluster: the first in the old refcount table's place, the rest after
// the data).
func (img *image) preallocateAreaLocked(ctx context.Context, from, to int64, mode string) error {
	cs := img.cs
	// The guest clusters to allocate and the L2 tables they lack.
	var nData, nL2 int64
	lastL1 := int64(-1)
	unallocated := func(c int64) (bool, error) { return img.unallocatedLocked(ctx, c) }
	for c := from / cs * cs; c < to; c += cs {
		if ok, err := unallocated(c); err != nil {
			return err
		} else if !ok {
			continue
		}
		nData++
		if l1i := int64(img.geo.L1Index(c)); l1i != lastL1 {
			lastL1 = l1i
			if e := L1Entry(img.l1[l1i]); e.Offset() == 0 || !e.Copied() {
				nL2++
			}
		}
	}
	if err := img.syncLocked(ctx, false); err != nil {
		return err
	}

	// Blocks and table sized for everything up to the area's end, the
	// metadata itself included.
	per := img.geo.RefcountBlockEntries()
	perTable := cs / 8
	start := (img.file.SizeNow() + cs - 1) / cs
	used := int64(0)
	for ti, e := range img.rt {
		if e&OffsetMask != 0 {
			used = int64(ti) + 1
		}
	}
	var nb, tc int64
	for {
		ranges := max((start+nb+tc+nData+nL2+per-1)/per, used)
		var missing int64
		for ti := int64(0); ti < ranges; ti++ {
			if ti >= int64(len(img.rt)) || img.rt[ti]&OffsetMask == 0 {
				missing++
			}
		}
		ntc := (ranges + perTable - 1) / perTable
		if missing == nb && ntc == tc {
			break
		}
		nb, tc = missing, ntc
	}
	if tc*cs > MaxRefcountTable {
		return fmt.Errorf("qcow2: refcount table would exceed %d bytes: %w", MaxRefcountTable, syscall.EFBIG)
	}
	tableOff := (start + nb) * cs
	dataStart := start + nb + tc
	if err := img.growFileLocked(ctx, img.file, tableOff+tc*cs); err != nil {
		return err
	}
	oldRT := img.rt
	newRT := make([]uint64, tc*perTable)
	copy(newRT, oldRT)
	blk := start
	for ti := range newRT {
		if blk == start+nb {
			break
		}
		if newRT[ti]&OffsetMask != 0 {
			continue
		}
		if _, err := img.rbc.getNew(ctx, blk*cs); err != nil {
			img.rbc.drop(start*cs, nb*cs)
			return err
		}
		newRT[ti] = uint64(blk * cs)
		blk++
	}
	// The refcounts of the new blocks, the table and the data, in the
	// blocks found through the new table (in memory until the header
	// points at it on disk).
	img.rt = newRT
	undo := func(err error) error {
		img.rt = oldRT
		img.rbc.drop(start*cs, nb*cs)
		return err
	}
	for k := start; k < dataStart+nData; k++ {
		if err := img.setRefcountLocked(ctx, k, 1); err != nil {
			return undo(err)
		}
	}
	// Blocks (flushed), table (flushed), header (flushed), then the old
	// table is freed: a crash in between leaks clusters at most.
	if _, err := img.rbc.flush(ctx); err != nil {
		return undo(err)
	}
	if err := img.file.Flush(ctx); err != nil {
		return undo(err)
	}
	tbuf := make([]byte, tc*cs)
	for i, e := range newRT {
		be.PutUint64(tbuf[i*8:], e)
	}
	if err := img.file.WriteV(ctx, tableOff, [][]byte{tbuf}, 0); err != nil {
		return undo(fmt.Errorf("qcow2: writing the refcount table: %w", err))
	}
	if err := img.file.Flush(ctx); err != nil {
		return undo(err)
	}
	oldOff, oldClusters := int64(img.hdr.RefcountTableOffset), int64(img.hdr.RefcountTableClusters)
	h := *img.hdr
	h.RefcountTableOffset = uint64(tableOff)
	h.RefcountTableClusters = uint32(tc)
	if err := img.writeHeaderLocked(ctx, &h); err != nil {
		return undo(err)
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	img.queueFreeLocked(oldOff, oldClusters*cs, discardOther)
	if err := img.syncLocked(ctx, false); err != nil {
		return err
	}

	// The data clusters, the file grown over them with the mode.
	end := (dataStart + nData) * cs
	if end > img.file.SizeNow() {
		if err := img.file.Truncate(ctx, end, false, mode); err != nil {
			return fmt.Errorf("qcow2: preallocation %s: %w", mode, err)
		}
	}
	if img.file.SizeNow() < end {
		return fmt.Errorf("qcow2: file too short after preallocation: %w", syscall.EIO)
	}
	// Then the L2 entries, in guest order, each L2 table allocated when
	// first needed. With extended L2 entries the subclusters stay
	// unallocated, as QEMU leaves them (see preallocate).
	host := dataStart
	for c := from / cs * cs; c < to; c += cs {
		if ok, err := unallocated(c); err != nil {
			return err
		} else if !ok {
			continue
		}
		s, idx, soff, err := img.l2ForWriteLocked(ctx, c)
		if err != nil {
			return err
		}
		img.geo.SetL2(s, idx, L2Entry{Entry: MakeStandard(host*cs, FlagCopied)})
		img.l2c.markDirty(soff)
		host++
	}
	return img.syncLocked(ctx, false)
}

// unallocatedLocked reports whether guest cluster c has no host cluster
// (neither a standard nor a compressed one) and needs one to be
// preallocated.
func (img *image) unallocatedLocked(ctx context.Context, c int64) (bool, error) {
	s, idx, _, err := img.l2SliceLocked(ctx, c)
	if err != nil {
		return false, err
	}
	if s != nil {
		if e := img.geo.GetL2(s, idx); e.Offset() != 0 || e.Compressed() {
			return false, nil
		}
	}
	return true, nil
}
