package qcow2

import (
	"context"
	"fmt"
	"math/bits"
	"syscall"

	"blockbackend/graph"
)

// clusterPlan is one guest cluster of an allocating write.
type clusterPlan struct {
	guest  int64   // guest offset of the cluster
	old    L2Entry // its entry before the write
	host   int64   // host offset of its (new or kept) cluster
	a, b   int64   // the guest write within the cluster
	lo, hi int64   // the bytes written to the host cluster (a..b plus copy on write)
	// The new subcluster bitmap (extended L2 only).
	newAlloc, newZero uint32
	freeOld           bool // the old host cluster (or compressed data) loses a reference
}

// writePlan covers a prefix of a write.
type writePlan struct {
	inPlace  bool
	host     int64 // inPlace: host offset of the first byte
	length   int64
	clusters []clusterPlan
	fresh    int64 // host clusters newly allocated (freed again on failure)
	virgin   bool  // the new clusters read as zeros (never written)
}

const allSubclusters = ^uint32(0)

// subMask is the bitmap of the subclusters that [a, b) touches.
func (img *image) subMask(a, b int64) uint32 {
	if !img.geo.ExtendedL2 {
		return allSubclusters
	}
	sub := img.geo.SubclusterSize()
	first, last := a/sub, (b-1)/sub
	n := last - first + 1
	if n >= 32 {
		return allSubclusters
	}
	return uint32((uint64(1)<<n - 1) << first)
}

// ownedHostLocked reports whether e has a host cluster that only the
// active L1 references (COPIED), so it can be written in place.
func (img *image) ownedHost(e L2Entry) bool {
	if e.Compressed() || !e.Copied() {
		return false
	}
	return e.Offset() != 0 || img.extData
}

// inPlaceOK reports whether the write [a, b) of a cluster with entry e
// can go straight to its host cluster.
func (img *image) inPlaceOK(e L2Entry, a, b int64) bool {
	if !img.ownedHost(e) {
		return false
	}
	if img.geo.ExtendedL2 {
		m := img.subMask(a, b)
		return e.AllocBitmap()&m == m
	}
	return e.Entry&FlagZero == 0 || img.hdr.Version < 3
}

// planWriteLocked decides how to write a prefix of [off, off+n), in p
// (which it resets). It returns an in-flight allocation to wait for when
// the first cluster is being allocated by another request. Allocating
// plans are registered in flight and must be finished with commitLocked
// or abortLocked.
func (img *image) planWriteLocked(ctx context.Context, off, n int64, p *writePlan) (*inflightAlloc, error) {
	*p = writePlan{}
	cs := img.cs
	s, idx, _, err := img.l2SliceLocked(ctx, off)
	if err != nil {
		return nil, err
	}
	perSlice := int(img.l2Slice / img.geo.L2EntrySize())
	if s == nil {
		// No L2 table: the plan must still stop at the end of the slice
		// off falls in (l2SliceLocked gives no index then), or it would
		// run into the next table's entries taking them as unallocated.
		idx = img.geo.L2Index(off) % perSlice
	}
	entry := func(i int) L2Entry {
		if s == nil {
			return L2Entry{}
		}
		return img.geo.GetL2(s, i)
	}
	first := off / cs
	if w := img.inflight[first]; w != nil {
		return w, nil
	}
	e0 := entry(idx)
	a0 := off - first*cs
	b0 := min(cs, a0+n)
	if img.inPlaceOK(e0, a0, b0) {
		if e0.Offset()%cs != 0 {
			return nil, img.corruptfLocked(ctx, "Cluster allocation offset %#x unaligned (guest offset: %#x)", e0.Offset(), first*cs)
		}
		if what := img.overlapLocked(e0.Offset()); what != "" {
			return nil, img.corruptfLocked(ctx, "Preventing invalid write on metadata (overlaps with %s)", what)
		}
		p.inPlace, p.host, p.length = true, e0.Offset()+a0, b0-a0
		for i := idx + 1; i < perSlice && p.length < n; i++ {
			g := off + p.length
			e := entry(i)
			b := min(cs, n-p.length)
			if img.inflight[g/cs] != nil || !img.inPlaceOK(e, 0, b) || e.Offset() != p.host+p.length {
				break
			}
			p.length += b
		}
		// A host cluster may reach past the end of the file (QEMU writes
		// only the subclusters it allocates, and reads past the end as
		// zeros): the file grows before a write there.
		if err := img.growFileLocked(ctx, img.data, p.host+p.length); err != nil {
			return nil, err
		}
		return nil, nil
	}

	// Allocation. The L2 table comes first, as in QEMU: a missing (or
	// shared) table is allocated now, before the data clusters, so the
	// same writes give QEMU's host layout (the table, then its data). It
	// is in the active L1 at once, under meta, so a concurrent request
	// into the same table finds it and never allocates a second one; it
	// reaches the file in syncLocked's order like any new table, and an
	// aborted write leaves it empty, still referenced. The plan is made
	// again over the new table (a copied table recomputes COPIED).
	if l1i := img.geo.L1Index(off); l1i < uint64(len(img.l1)) {
		if e := L1Entry(img.l1[l1i]); e.Offset() == 0 || !e.Copied() {
			if err := img.newL2TableLocked(ctx, l1i, e); err != nil {
				return nil, err
			}
			return img.planWriteLocked(ctx, off, n, p)
		}
	}

	// A cluster with an owned host cluster (extended L2 with
	// unallocated subclusters, a preallocated zero cluster) keeps it; with
	// an external data file every cluster's host offset is its guest
	// offset; otherwise new clusters are allocated, contiguous.
	keep := img.ownedHost(e0) || img.extData
	for i := idx; i < perSlice && p.length < n; i++ {
		g := off + p.length
		c := g / cs
		e := entry(i)
		a := g - c*cs
		b := min(cs, a+n-p.length)
		if i > idx {
			if img.inflight[c] != nil || img.inPlaceOK(e, a, b) || keep != (img.ownedHost(e) || img.extData) || img.ownedHost(e) {
				break
			}
		}
		cp := clusterPlan{guest: c * cs, old: e, a: a, b: b}
		p.clusters = append(p.clusters, cp)
		p.length += b - a
		if keep && !img.extData {
			break // one kept cluster at a time
		}
	}
	// Host clusters.
	var host int64
	switch {
	case img.extData:
		host = p.clusters[0].guest
		last := p.clusters[len(p.clusters)-1]
		if err := img.growFileLocked(ctx, img.data, last.guest+img.cs); err != nil {
			return nil, err
		}
	case keep:
		host = e0.Offset()
		if what := img.overlapLocked(host); what != "" {
			return nil, img.corruptfLocked(ctx, "Preventing invalid write on metadata (overlaps with %s)", what)
		}
		// As for in-place writes: the kept cluster may end past the file.
		if err := img.growFileLocked(ctx, img.data, host+cs); err != nil {
			return nil, err
		}
	default:
		var got int64
		host, got, p.virgin, err = img.allocRunUsedLocked(ctx, int64(len(p.clusters)), 0)
		if err != nil {
			return nil, err
		}
		// Free space may be fragmented: the plan shrinks to the run.
		if got < int64(len(p.clusters)) {
			p.clusters = p.clusters[:got]
			p.length = 0
			for _, cp := range p.clusters {
				p.length += cp.b - cp.a
			}
		}
		p.fresh = got
	}
	w := &inflightAlloc{done: make(chan struct{})}
	for i := range p.clusters {
		cp := &p.clusters[i]
		cp.host = host + int64(i)*cs
		img.fillPlan(cp, keep)
		img.inflight[cp.guest/cs] = w
	}
	if p.fresh > 0 {
		// The file grows to the end of what the write covers, as in
		// QEMU: with subclusters that may stop inside the last cluster
		// (the rest reads as zeros past the end of the file). Under meta,
		// so that growths never race into a shrink.
		last := p.clusters[len(p.clusters)-1]
		if err := img.growFileLocked(ctx, img.file, last.host+last.hi); err != nil {
			img.abortLocked(ctx, p)
			return nil, err
		}
	}
	return nil, nil
}

// fillPlan decides the new bitmap, which bytes of the host cluster are
// written, and whether the old host data is released.
func (img *image) fillPlan(cp *clusterPlan, keep bool) {
	cs := img.cs
	old := cp.old
	oldHost := !old.Compressed() && (old.Offset() != 0 || (img.extData && old.Copied()))
	cp.freeOld = !img.extData && !keep && (old.Compressed() || oldHost)
	if !img.geo.ExtendedL2 {
		cp.newAlloc = allSubclusters
		cp.lo, cp.hi = 0, cs
		return
	}
	sub := img.geo.SubclusterSize()
	touched := img.subMask(cp.a, cp.b)
	switch {
	case old.Compressed():
		cp.newAlloc, cp.newZero = allSubclusters, 0
	case keep:
		cp.newAlloc = old.AllocBitmap() | touched
		cp.newZero = old.ZeroBitmap() &^ cp.newAlloc
	default:
		// New host cluster: allocated subclusters keep their data (copied),
		// the others keep their state.
		if oldHost {
			cp.newAlloc = old.AllocBitmap() | touched
		} else {
			cp.newAlloc = touched
		}
		cp.newZero = old.ZeroBitmap() &^ cp.newAlloc
	}
	if keep {
		// Only the partially written subclusters that were not allocated
		// need filling; allocated ones may be written by others in place.
		cp.lo, cp.hi = cp.a, cp.b
		if old.AllocBitmap()&(1<<uint(cp.a/sub)) == 0 {
			cp.lo = cp.a / sub * sub
		}
		if old.AllocBitmap()&(1<<uint((cp.b-1)/sub)) == 0 {
			cp.hi = min((cp.b+sub-1)/sub*sub, cs)
		}
		return
	}
	lo := int64(bits.TrailingZeros32(cp.newAlloc)) * sub
	hi := int64(32-bits.LeadingZeros32(cp.newAlloc)) * sub
	cp.lo, cp.hi = min(lo, cp.a), max(hi, cp.b)
}

// WriteV writes guest data, allocating clusters as needed.
func (img *image) WriteV(ctx context.Context, off int64, iov [][]byte, flags graph.WriteFlags) error {
	img.resize.RLock()
	defer img.resize.RUnlock()
	img.meta.Lock()
	seq := img.startReqLocked()
	err := img.beginWriteLocked(ctx)
	img.meta.Unlock()
	defer img.endReq(seq)
	if err != nil {
		return err
	}
	return img.writeLocked(ctx, off, iov, flags)
}

// writeLocked is WriteV with resize held.
func (img *image) writeLocked(ctx context.Context, off int64, iov [][]byte, flags graph.WriteFlags) error {
	total := iovLen(iov)
	for pos := int64(0); pos < total; {
		n, err := img.writeStep(ctx, off+pos, iovSlice(iov, pos, total-pos), flags)
		if err != nil {
			return err
		}
		pos += n
	}
	if flags&graph.WriteFUA != 0 {
		return img.flushAll(ctx)
	}
	return nil
}

// waitFor waits for an in-flight allocation to finish.
func waitFor(ctx context.Context, w *inflightAlloc) error {
	select {
	case <-w.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// writeStep writes a prefix of iov at off and returns its length.
func (img *image) writeStep(ctx context.Context, off int64, iov [][]byte, flags graph.WriteFlags) (int64, error) {
	n := iovLen(iov)
	var plan writePlan
	p := &plan
	for {
		img.meta.Lock()
		wait, err := img.planWriteLocked(ctx, off, n, p)
		img.meta.Unlock()
		if err != nil {
			return 0, err
		}
		if wait != nil {
			if err := waitFor(ctx, wait); err != nil {
				return 0, err
			}
			continue
		}
		if p.inPlace {
			return p.length, img.writeData(ctx, off, p.host, iovSlice(iov, 0, p.length), flags&graph.WriteFUA)
		}
		err = img.writeAllocated(ctx, p, iovSlice(iov, 0, p.length))
		img.meta.Lock()
		if err == nil {
			err = img.commitLocked(ctx, p)
		} else {
			img.abortLocked(ctx, p)
		}
		img.meta.Unlock()
		return p.length, err
	}
}

// writeAllocated writes the data of an allocating plan, with the copy on
// write of the parts of its first and last clusters that the guest does
// not write. The L2 entries still describe the old contents, so the old
// data is read through the normal read path.
func (img *image) writeAllocated(ctx context.Context, p *writePlan, data [][]byte) error {
	firstC, lastC := &p.clusters[0], &p.clusters[len(p.clusters)-1]
	// New clusters that read as zeros need no copy of zeros (unless
	// encrypted: zeros in the file are not encrypted zeros).
	if img.crypt != nil {
		p.virgin = false
	}
	if p.virgin && firstC.lo < firstC.a && img.readsZero(ctx, firstC.guest+firstC.lo, firstC.a-firstC.lo) {
		firstC.lo = firstC.a
	}
	if p.virgin && lastC.hi > lastC.b && img.readsZero(ctx, lastC.guest+lastC.b, lastC.hi-lastC.b) {
		lastC.hi = lastC.b
	}
	var out [][]byte
	if firstC.lo < firstC.a {
		head := make([]byte, firstC.a-firstC.lo)
		if err := img.readLocked(ctx, firstC.guest+firstC.lo, [][]byte{head}); err != nil {
			return fmt.Errorf("qcow2: copy on write: %w", err)
		}
		out = append(out, head)
	}
	out = append(out, data...)
	if lastC.hi > lastC.b {
		tail := make([]byte, lastC.hi-lastC.b)
		if err := img.readLocked(ctx, lastC.guest+lastC.b, [][]byte{tail}); err != nil {
			return fmt.Errorf("qcow2: copy on write: %w", err)
		}
		out = append(out, tail)
	}
	return img.writeData(ctx, firstC.guest+firstC.lo, firstC.host+firstC.lo, out, 0)
}

// commitLocked points the L2 entries at the written clusters and releases
// the old ones.
func (img *image) commitLocked(ctx context.Context, p *writePlan) error {
	defer img.releaseLocked(p)
	for i := range p.clusters {
		cp := &p.clusters[i]
		s, idx, soff, err := img.l2ForWriteLocked(ctx, cp.guest)
		if err != nil {
			return err
		}
		ne := L2Entry{Entry: MakeStandard(cp.host, FlagCopied)}
		if img.geo.ExtendedL2 {
			ne.Bitmap = MakeBitmap(cp.newAlloc, cp.newZero)
		}
		img.geo.SetL2(s, idx, ne)
		img.l2c.markDirty(soff)
		if cp.freeOld {
			img.releaseEntryLocked(cp.old, discardOther)
		}
	}
	return nil
}

// releaseEntryLocked queues the release of what an old entry referenced.
func (img *image) releaseEntryLocked(e L2Entry, kind discardKind) {
	if img.extData {
		return
	}
	if e.Compressed() {
		off, length := img.geo.CompressedSpan(e)
		img.queueFreeLocked(off, length, kind)
		return
	}
	if e.Offset() != 0 {
		img.queueFreeLocked(e.Offset(), img.cs, kind)
	}
}

func (img *image) abortLocked(ctx context.Context, p *writePlan) {
	if p.fresh > 0 {
		// Nothing references them: give them back at once.
		_ = img.addRefLocked(ctx, p.clusters[0].host, p.fresh*img.cs, -1)
	}
	img.releaseLocked(p)
}

func (img *image) releaseLocked(p *writePlan) {
	var w *inflightAlloc
	for _, cp := range p.clusters {
		c := cp.guest / img.cs
		if x := img.inflight[c]; x != nil {
			w = x
			delete(img.inflight, c)
		}
	}
	if w != nil {
		close(w.done)
	}
}

// l2ForWriteLocked returns the L2 slice for guest offset off, ready to be
// changed: the L2 table is allocated if missing, and copied if it is
// shared with a snapshot (qcow2.txt "Snapshots": a write must not be
// visible in other snapshots).
func (img *image) l2ForWriteLocked(ctx context.Context, off int64) ([]byte, int, int64, error) {
	l1i := img.geo.L1Index(off)
	if l1i >= uint64(len(img.l1)) {
		return nil, 0, 0, fmt.Errorf("qcow2: guest offset %#x beyond the L1 table: %w", off, syscall.EIO)
	}
	e := L1Entry(img.l1[l1i])
	if e.Offset() == 0 || !e.Copied() {
		if err := img.newL2TableLocked(ctx, l1i, e); err != nil {
			return nil, 0, 0, err
		}
	}
	return img.l2SliceLocked(ctx, off)
}

// newL2TableLocked allocates the L2 table of L1 entry l1i: zeroed, or a
// copy of the shared table old with its COPIED flags recomputed from the
// refcounts. The table is written at once; the L1 entry is written back
// by syncLocked after a flush.
func (img *image) newL2TableLocked(ctx context.Context, l1i uint64, old L1Entry) error {
	cs := img.cs
	buf := make([]byte, cs)
	if old.Offset() != 0 {
		if old.Offset()%cs != 0 || old.Reserved() {
			return img.corruptfLocked(ctx, "L2 table offset %#x unaligned (L1 index: %#x)", old.Offset(), l1i)
		}
		for o := int64(0); o < cs; o += img.l2Slice {
			s, err := img.l2c.get(ctx, old.Offset()+o)
			if err != nil {
				return err
			}
			copy(buf[o:], s)
		}
		n := int(img.geo.L2Entries())
		for i := 0; i < n; i++ {
			e := img.geo.GetL2(buf, i)
			if e.Compressed() || img.extData {
				continue
			}
			if e.Offset() == 0 {
				e.Entry &^= FlagCopied
			} else {
				rc, err := img.refcountLocked(ctx, e.Offset()/cs)
				if err != nil {
					return err
				}
				if rc == 1 {
					e.Entry |= FlagCopied
				} else {
					e.Entry &^= FlagCopied
				}
			}
			img.geo.SetL2(buf, i, e)
		}
	}
	off, err := img.allocLocked(ctx, 1)
	if err != nil {
		return err
	}
	img.l2c.drop(off, cs)
	if err := img.file.WriteV(ctx, off, [][]byte{buf}, 0); err != nil {
		_ = img.addRefLocked(ctx, off, cs, -1)
		return fmt.Errorf("qcow2: writing a new L2 table: %w", err)
	}
	img.l1[l1i] = uint64(MakeL1Entry(off, true))
	img.l1Dirty[int(l1i)] = true
	if old.Offset() != 0 {
		img.queueFreeLocked(old.Offset(), cs, discardOther)
	}
	return nil
}

// flushAll writes all metadata back in order and flushes the children.
func (img *image) flushAll(ctx context.Context) error {
	img.meta.Lock()
	err := img.syncLocked(ctx, false)
	img.meta.Unlock()
	if err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	if img.data != img.file {
		return img.data.Flush(ctx)
	}
	return nil
}

// Flush makes every completed write stable, metadata included.
func (img *image) Flush(ctx context.Context) error {
	if img.readOnly {
		return nil
	}
	return img.flushAll(ctx)
}

// overlapLocked names the metadata structure that the data cluster at
// host would overwrite (QEMU's "constant" overlap checks: header, active
// L1 table, refcount table), or "".
func (img *image) overlapLocked(host int64) string {
	if img.extData {
		return ""
	}
	in := func(off, n int64) bool { return n > 0 && host+img.cs > off && host < off+n }
	switch {
	case in(0, img.cs):
		return "qcow2_header"
	case in(int64(img.hdr.L1TableOffset), int64(len(img.l1))*8):
		return "active L1 table"
	case in(int64(img.hdr.RefcountTableOffset), int64(img.hdr.RefcountTableClusters)*img.cs):
		return "refcount table"
	}
	return ""
}
