package qcow2

import (
	"context"
	"fmt"
	"syscall"
)

// Refcounts and cluster allocation (qcow2.txt "Host cluster management").
// Everything here runs with img.meta held.

// refcountLocked returns the refcount of host cluster index k.
func (img *image) refcountLocked(ctx context.Context, k int64) (uint64, error) {
	ti, bi := img.geo.RefcountIndex(k * img.cs)
	if ti >= uint64(len(img.rt)) {
		return 0, nil
	}
	boff := int64(img.rt[ti] & OffsetMask)
	if boff == 0 {
		return 0, nil
	}
	if img.rt[ti]&RefcountTableReservedMask != 0 || boff%img.cs != 0 {
		return 0, img.corruptfLocked(ctx, "Refblock offset %#x unaligned (reftable index: %#x)", boff, ti)
	}
	b, err := img.rbc.get(ctx, boff)
	if err != nil {
		return 0, err
	}
	return GetRefcount(b, img.geo.RefcountOrder, bi), nil
}

// setRefcountLocked sets the refcount of cluster k, which must be covered
// by an allocated refcount block.
func (img *image) setRefcountLocked(ctx context.Context, k int64, v uint64) error {
	ti, bi := img.geo.RefcountIndex(k * img.cs)
	boff := int64(img.rt[ti] & OffsetMask)
	b, err := img.rbc.get(ctx, boff)
	if err != nil {
		return err
	}
	if err := SetRefcount(b, img.geo.RefcountOrder, bi, v); err != nil {
		return fmt.Errorf("qcow2: refcount of cluster %d would overflow: %w", k, syscall.ERANGE)
	}
	img.rbc.markDirty(boff)
	return nil
}

// addRefLocked adds delta (+1 or -1) to the refcount of every cluster
// touched by [off, off+length). Increments only: decrements go through
// queueFree so they reach the disk after the dereference.
func (img *image) addRefLocked(ctx context.Context, off, length int64, delta int) error {
	first, last := off/img.cs, (off+length-1)/img.cs
	for k := first; k <= last; k++ {
		if err := img.coverLocked(ctx, k, last+1); err != nil {
			return err
		}
		rc, err := img.refcountLocked(ctx, k)
		if err != nil {
			return err
		}
		switch {
		case delta > 0 && rc == img.geo.MaxRefcount():
			return fmt.Errorf("qcow2: refcount of cluster %d would overflow: %w", k, syscall.ERANGE)
		case delta < 0 && rc == 0:
			return img.corruptfLocked(ctx, "Preventing invalid write on metadata (refcount of cluster %#x is already 0)", k*img.cs)
		}
		if err := img.setRefcountLocked(ctx, k, uint64(int64(rc)+int64(delta))); err != nil {
			return err
		}
		if delta < 0 && rc == 1 && k < img.freeHint {
			img.freeHint = k
		}
	}
	return nil
}

func (img *image) writeRefcountTableEntryLocked(ctx context.Context, ti uint64) error {
	var b [8]byte
	be.PutUint64(b[:], img.rt[ti])
	return img.file.WriteV(ctx, int64(img.hdr.RefcountTableOffset)+int64(ti)*8, [][]byte{b[:]}, 0)
}

// growRefcountTableLocked replaces the refcount table by a larger one
// with at least need+1 entries. The new table and the refcount blocks that
// describe it are placed after every cluster the old table can describe
// (those are all free), written and flushed; then the header points at the
// new table and is flushed; then the old table's clusters are freed.
func (img *image) growRefcountTableLocked(ctx context.Context, need uint64) error {
	per := img.geo.RefcountBlockEntries()
	oldEntries := uint64(len(img.rt))
	entries := max(need+1, oldEntries+oldEntries/2, 1)
	perCluster := uint64(img.cs / 8)
	tableClusters := int64((entries + perCluster - 1) / perCluster)
	entries = uint64(tableClusters) * perCluster
	if tableClusters*img.cs > MaxRefcountTable {
		return fmt.Errorf("qcow2: refcount table would exceed %d bytes: %w", MaxRefcountTable, syscall.EFBIG)
	}
	// Layout from cluster S: the blocks for [S, end), then the table.
	start := int64(oldEntries) * per
	nblocks := int64(0)
	for {
		end := start + nblocks + tableClusters
		firstT, lastT := start/per, (end-1)/per
		want := lastT - firstT + 1
		if want <= nblocks {
			break
		}
		nblocks = want
	}
	tableOff := (start + nblocks) * img.cs
	if err := img.growFileLocked(ctx, img.file, tableOff+tableClusters*img.cs); err != nil {
		return err
	}
	newRT := make([]uint64, entries)
	copy(newRT, img.rt)
	for i := int64(0); i < nblocks; i++ {
		boff := (start + i) * img.cs
		ti := (start/per + i)
		if uint64(ti) >= entries {
			return fmt.Errorf("qcow2: refcount table growth miscomputed: %w", syscall.EIO)
		}
		newRT[ti] = uint64(boff)
		b, err := img.rbc.getNew(ctx, boff)
		if err != nil {
			return err
		}
		// Mark the clusters of the new blocks and table that this block
		// covers.
		lo, hi := ti*per, ti*per+per
		for k := max(lo, start); k < min(hi, start+nblocks+tableClusters); k++ {
			_ = SetRefcount(b, img.geo.RefcountOrder, k-lo, 1)
		}
	}
	if _, err := img.rbc.flush(ctx); err != nil {
		return err
	}
	tbuf := make([]byte, entries*8)
	for i, e := range newRT {
		be.PutUint64(tbuf[i*8:], e)
	}
	if err := img.file.WriteV(ctx, tableOff, [][]byte{tbuf}, 0); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	oldOff, oldClusters := int64(img.hdr.RefcountTableOffset), int64(img.hdr.RefcountTableClusters)
	h := *img.hdr
	h.RefcountTableOffset = uint64(tableOff)
	h.RefcountTableClusters = uint32(tableClusters)
	if err := img.writeHeaderLocked(ctx, &h); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	img.rt = newRT
	img.queueFreeLocked(oldOff, oldClusters*img.cs, discardOther)
	return nil
}

// allocRunLocked allocates up to n contiguous host clusters, at the first
// free cluster: it returns the offset of the first and how many it got
// (at least one). Their refcounts become 1 in the cache (the ordering
// rules make them stable before anything on disk points at them).
func (img *image) allocRunLocked(ctx context.Context, n int64) (int64, int64, error) {
	off, got, _, err := img.allocRunVirginLocked(ctx, n)
	return off, got, err
}

// allocRunVirginLocked is allocRunLocked that also reports whether the
// clusters lay past the end of the file (they read as zeros, so copy on
// write from zeros can be skipped).
func (img *image) allocRunVirginLocked(ctx context.Context, n int64) (int64, int64, bool, error) {
	return img.allocRunUsedLocked(ctx, n, n*img.cs)
}

// allocRunUsedLocked is allocRunVirginLocked for a caller that writes
// only the first used bytes of the run: a run at the end of the file
// grows the file over those bytes only, not to the end of its last
// cluster (0: not at all; a guest write grows it itself, to the end of
// what it writes). QEMU leaves a new L1 table so (a 64 MiB image of 64 KiB
// clusters ends 8 bytes into cluster 3), and the next allocation still
// starts at a cluster boundary: clusters are found by their refcounts,
// never by the file's size.
func (img *image) allocRunUsedLocked(ctx context.Context, n, used int64) (int64, int64, bool, error) {
	k := img.freeHint
	for {
		free, err := img.freeClusterLocked(ctx, k)
		if err != nil {
			return 0, 0, false, err
		}
		if free {
			break
		}
		k++
		img.freeHint = k
	}
	got := int64(1)
	for got < n {
		free, err := img.freeClusterLocked(ctx, k+got)
		if err != nil {
			return 0, 0, false, err
		}
		if !free {
			break
		}
		got++
	}
	// Past the end of the file, bytes read as zeros; the file only ever
	// grows to the end of clusters just claimed, so that end is exact.
	virgin := k*img.cs >= img.file.SizeNow()
	if err := img.takeUsedLocked(ctx, k, got, min(used, got*img.cs)); err != nil {
		return 0, 0, false, err
	}
	if k == img.freeHint {
		img.freeHint = k + got
	}
	return k * img.cs, got, virgin, nil
}

// freeClusterLocked reports whether cluster c is free: a cluster whose
// range has no refcount block yet is (its refcount is 0); the block is
// created when the cluster is taken (coverLocked). A cluster past what the
// refcount table can describe makes the table grow first: the new table
// and its blocks go to the first clusters past that, which are free, so
// they can never land inside a run being taken.
func (img *image) freeClusterLocked(ctx context.Context, c int64) (bool, error) {
	if c*img.cs > MaxHostOffset {
		return false, fmt.Errorf("qcow2: image file too large: %w", syscall.EFBIG)
	}
	if ti, _ := img.geo.RefcountIndex(c * img.cs); ti >= uint64(len(img.rt)) {
		if err := img.growRefcountTableLocked(ctx, ti); err != nil {
			return false, err
		}
	}
	rc, err := img.refcountLocked(ctx, c)
	return rc == 0, err
}

// coverLocked makes sure cluster c's range has a refcount block, placing
// a new one where QEMU does (observed): at the first free cluster from
// after on (the caller passes the end of the run it is taking), so that
// a run reaching a range without a block keeps its clusters together and
// the block follows it. A block in its own range counts itself; one that
// lands in another range without a block gets that range's block first.
func (img *image) coverLocked(ctx context.Context, c, after int64) error {
	ti, _ := img.geo.RefcountIndex(c * img.cs)
	if ti >= uint64(len(img.rt)) {
		if err := img.growRefcountTableLocked(ctx, ti); err != nil {
			return err
		}
	}
	if img.rt[ti]&OffsetMask != 0 {
		return nil
	}
	per := img.geo.RefcountBlockEntries()
	p := after
	for {
		free, err := img.freeClusterLocked(ctx, p)
		if err != nil {
			return err
		}
		if !free {
			p++
			continue
		}
		pti := uint64(p / per)
		if pti == ti || (pti < uint64(len(img.rt)) && img.rt[pti]&OffsetMask != 0) {
			break
		}
		// p lies in another range without a block: that block first
		// (it takes p, counting itself), then look again.
		if err := img.coverLocked(ctx, p, p); err != nil {
			return err
		}
		if img.rt[ti]&OffsetMask != 0 {
			return nil // the table grew and its blocks cover ti
		}
	}
	off := p * img.cs
	if err := img.growFileLocked(ctx, img.file, off+img.cs); err != nil {
		return err
	}
	b, err := img.rbc.getNew(ctx, off)
	if err != nil {
		return err
	}
	if uint64(p/per) == ti {
		_ = SetRefcount(b, img.geo.RefcountOrder, p-int64(ti)*per, 1)
	} else if err := img.setRefcountLocked(ctx, p, 1); err != nil {
		img.rbc.drop(off, img.cs)
		return err
	}
	// The block (and the refcount of its cluster) must be on disk before
	// the table entry points at it: write them now; the table entry is
	// written right away too (the table is written through), after a
	// flush.
	if _, err := img.rbc.flush(ctx); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	img.rt[ti] = uint64(off)
	return img.writeRefcountTableEntryLocked(ctx, ti)
}

// takeLocked sets the refcounts of clusters [k, k+n) to 1, growing the
// file over them.
func (img *image) takeLocked(ctx context.Context, k, n int64) error {
	return img.takeUsedLocked(ctx, k, n, n*img.cs)
}

// takeUsedLocked is takeLocked growing the file over the first used bytes
// of the clusters only.
func (img *image) takeUsedLocked(ctx context.Context, k, n, used int64) error {
	if err := img.growFileLocked(ctx, img.file, k*img.cs+used); err != nil {
		return err
	}
	for c := k; c < k+n; c++ {
		if err := img.coverLocked(ctx, c, k+n); err != nil {
			return err
		}
		if err := img.setRefcountLocked(ctx, c, 1); err != nil {
			return err
		}
	}
	return nil
}

// allocLocked allocates exactly n contiguous host clusters. One cluster
// comes from allocRunLocked; a longer run (an L1 table) is placed at the
// end of the file, with the refcount blocks its ranges lack right after
// it, so that no block lands inside the run.
func (img *image) allocLocked(ctx context.Context, n int64) (int64, error) {
	return img.allocUsedLocked(ctx, n, n*img.cs)
}

// allocUsedLocked is allocLocked for a caller that writes only the first
// used bytes of the clusters (see allocRunUsedLocked).
func (img *image) allocUsedLocked(ctx context.Context, n, used int64) (int64, error) {
	if n == 1 {
		off, _, _, err := img.allocRunUsedLocked(ctx, 1, used)
		return off, err
	}
	per := img.geo.RefcountBlockEntries()
	for {
		e := (img.file.SizeNow() + img.cs - 1) / img.cs
		// Blocks needed for the uncovered ranges of [e, e+n+b).
		var b int64
		for {
			var need int64
			for ti := e / per; ti <= (e+n+b-1)/per; ti++ {
				if ti >= int64(len(img.rt)) || img.rt[ti]&OffsetMask == 0 {
					need++
				}
			}
			if need <= b {
				break
			}
			b = need
		}
		if last := uint64((e + n + b - 1) / per); last >= uint64(len(img.rt)) {
			// The table grows at the end of the file: start over.
			if err := img.growRefcountTableLocked(ctx, last); err != nil {
				return 0, err
			}
			continue
		}
		// The run must be free where refcounts exist.
		busy := int64(-1)
		for c := e; c < e+n+b; c++ {
			ti := c / per
			if img.rt[ti]&OffsetMask == 0 {
				continue
			}
			rc, err := img.refcountLocked(ctx, c)
			if err != nil {
				return 0, err
			}
			if rc != 0 {
				busy = c
			}
		}
		if busy >= 0 {
			// Leaked clusters past the end of the file: skip them.
			if err := img.growFileLocked(ctx, img.file, (busy+1)*img.cs); err != nil {
				return 0, err
			}
			continue
		}
		fileEnd := (e + n + b) * img.cs
		if b == 0 {
			fileEnd = e*img.cs + used
		}
		if err := img.growFileLocked(ctx, img.file, fileEnd); err != nil {
			return 0, err
		}
		// New blocks at e+n.., entered in the table in memory first so
		// that their own refcounts can be set; on disk the blocks go
		// first (flushed), then the table entries.
		var added []uint64
		blk := e + n
		for ti := e / per; ti <= (e+n+b-1)/per; ti++ {
			if img.rt[ti]&OffsetMask != 0 {
				continue
			}
			if _, err := img.rbc.getNew(ctx, blk*img.cs); err != nil {
				return 0, err
			}
			img.rt[ti] = uint64(blk * img.cs)
			added = append(added, uint64(ti))
			blk++
		}
		for c := e; c < e+n+b; c++ {
			if err := img.setRefcountLocked(ctx, c, 1); err != nil {
				return 0, err
			}
		}
		if len(added) > 0 {
			if _, err := img.rbc.flush(ctx); err != nil {
				return 0, err
			}
			if err := img.file.Flush(ctx); err != nil {
				return 0, err
			}
			for _, ti := range added {
				if err := img.writeRefcountTableEntryLocked(ctx, ti); err != nil {
					return 0, err
				}
			}
		}
		return e * img.cs, nil
	}
}

// queueFreeLocked records that [off, off+length) lost one reference; the
// decrement is applied by applyFreesLocked once the dereference is stable.
func (img *image) queueFreeLocked(off, length int64, kind discardKind) {
	if length <= 0 {
		return
	}
	img.pending = append(img.pending, pendingFree{off: off, length: length, seq: img.nextSeq, kind: kind})
}

// applyFreesLocked applies the queued decrements whose dereference is on
// disk (the caller has just made it so) and whose readers have finished;
// clusters reaching refcount 0 are discarded on the file child when the
// pass-discard option for their kind says so.
func (img *image) applyFreesLocked(ctx context.Context) error {
	if len(img.pending) == 0 {
		return nil
	}
	oldest := img.oldestActiveLocked()
	// Freed compressed data may come back with other contents under the
	// same entry value: forget what was inflated.
	img.dcMu.Lock()
	img.dc = [4]decompressedCluster{}
	img.dcMu.Unlock()
	keep := img.pending[:0]
	var todo []pendingFree
	for _, p := range img.pending {
		if p.seq < oldest {
			todo = append(todo, p)
		} else {
			keep = append(keep, p)
		}
	}
	img.pending = keep
	for _, p := range todo {
		if err := img.addRefLocked(ctx, p.off, p.length, -1); err != nil {
			return err
		}
		first, last := p.off/img.cs, (p.off+p.length-1)/img.cs
		for k := first; k <= last; k++ {
			rc, err := img.refcountLocked(ctx, k)
			if err != nil || rc != 0 {
				continue
			}
			img.l2c.drop(k*img.cs, img.cs)
			if img.compCursor/img.cs == k {
				img.compCursor = 0
			}
			if p.kind < discardNever && img.passDiscard[p.kind] {
				_ = img.file.Discard(ctx, k*img.cs, img.cs)
			}
		}
	}
	return nil
}

// syncRefcounts makes the refcount increments in the cache stable; it is
// the L2 cache's beforeWrite (an L2 entry may only reach the disk after
// the refcount of the cluster it points to, and after the guest data it
// maps). With lazy refcounts, once the dirty bit is on disk, refcounts may
// lag behind (the next open repairs them): the blocks are written without
// the flush, which is what lazy refcounts save.
func (img *image) syncRefcounts(ctx context.Context) error {
	if _, err := img.rbc.flush(ctx); err != nil {
		return err
	}
	if img.lazy && img.dirtySet {
		return nil
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	if img.data != img.file {
		return img.data.Flush(ctx)
	}
	return nil
}

// syncLocked writes all metadata back in the safe order: refcount blocks
// (flush), L2 tables (flush), L1 entries, then the queued frees. With all,
// every queued free is applied whatever requests run (close).
func (img *image) syncLocked(ctx context.Context, all bool) error {
	l2dirty := img.l2c.dirty() || len(img.l1Dirty) > 0 || len(img.pending) > 0
	if l2dirty {
		if err := img.syncRefcounts(ctx); err != nil {
			return err
		}
		saved := img.l2c.beforeWrite
		img.l2c.beforeWrite = nil
		_, err := img.l2c.flush(ctx)
		img.l2c.beforeWrite = saved
		if err != nil {
			return err
		}
		if len(img.l1Dirty) > 0 || len(img.pending) > 0 {
			if err := img.file.Flush(ctx); err != nil {
				return err
			}
		}
		if len(img.l1Dirty) > 0 {
			if err := img.writeL1Locked(ctx); err != nil {
				return err
			}
			if len(img.pending) > 0 {
				if err := img.file.Flush(ctx); err != nil {
					return err
				}
			}
		}
	}
	if all {
		img.active = map[uint64]struct{}{}
	}
	if err := img.applyFreesLocked(ctx); err != nil {
		return err
	}
	if _, err := img.rbc.flush(ctx); err != nil {
		return err
	}
	return nil
}

// writeL1Locked writes the dirty L1 entries (one write per run).
func (img *image) writeL1Locked(ctx context.Context) error {
	base := int64(img.hdr.L1TableOffset)
	for i := range img.l1Dirty {
		// Write the whole 512-byte sector holding the entry, so entries
		// go out in aligned units.
		lo := i &^ 63
		hi := min(lo+64, len(img.l1))
		buf := make([]byte, (hi-lo)*8)
		for j := lo; j < hi; j++ {
			be.PutUint64(buf[(j-lo)*8:], img.l1[j])
			delete(img.l1Dirty, j)
		}
		if err := img.file.WriteV(ctx, base+int64(lo)*8, [][]byte{buf}, 0); err != nil {
			return fmt.Errorf("qcow2: writing the L1 table: %w", err)
		}
	}
	return nil
}

// growFileLocked makes child n at least end bytes long: the graph checks
// requests against a node's size, so clusters past the end of the file
// are made part of it before anything is written there.
func (img *image) growFileLocked(ctx context.Context, n interface {
	SizeNow() int64
	Truncate(context.Context, int64, bool, string) error
}, end int64) error {
	if end <= n.SizeNow() {
		return nil
	}
	if err := n.Truncate(ctx, end, false, "off"); err != nil {
		return fmt.Errorf("qcow2: growing the image file to %d bytes: %w", end, err)
	}
	return nil
}
