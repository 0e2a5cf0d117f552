package qcow2

// Consistency check and repair (qemu-img check [-r leaks|all]): every host
// cluster's expected refcount is computed by walking everything that
// references clusters (qcow2.txt "Host cluster management", "Cluster
// mapping", "Snapshots", "Bitmaps") and compared with the stored one. The
// messages and the numbers are those qemu-img 7.2 prints for the same
// image.

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"blockbackend/graph"
)

// checker is one run of checkImage.
type checker struct {
	ctx context.Context
	st  Storage
	h   *Header
	g   Geometry
	cs  int64
	fix graph.CheckFix
	res *graph.CheckResult

	fileSize   int64
	nbClusters int64    // clusters in the file
	refs       []uint32 // computed refcounts
	snaps      []Snapshot
	snapLen    int64
	rebuild    bool // the refcount structures must be rebuilt
	quiet      bool // recalculating: no messages, no counts
	// refErrs counts the corruptions that a rebuild of the refcount
	// structures repairs (wrong refcounts, broken refcount blocks).
	refErrs int
	// skipRefStructs leaves the refcount table and blocks out of refs (for
	// a rebuild, which replaces them).
	skipRefStructs bool
}

func (c *checker) msg(format string, args ...any) {
	if !c.quiet {
		c.res.Messages = append(c.res.Messages, fmt.Sprintf(format, args...))
	}
}

func (c *checker) corruption() {
	if !c.quiet {
		c.res.Corruptions++
	}
}

// checkImage checks the image st whose parsed header is h, and repairs
// what fix allows. It writes to st only when fix is non-zero. When the
// repair rebuilds the refcount structures, h is updated to the new
// header. The caller (the driver's Check) has drained the node and
// written back its caches, and reloads its state afterwards.
//
// An error means the check could not complete (an I/O error, or a repair
// that needs -r all); the result then still says what was found.
func checkImage(ctx context.Context, st Storage, h *Header, fix graph.CheckFix) (graph.CheckResult, error) {
	var res graph.CheckResult
	c := &checker{ctx: ctx, st: st, h: h, g: h.Geometry(), cs: h.ClusterSize(), fix: fix, res: &res}
	if err := c.load(); err != nil {
		res.CheckErrors++
		return res, err
	}
	res.TotalClusters = clustersFor(int64(h.Size), c.cs)
	c.calculate()

	pre := res
	highest, err := c.compare(0)
	if err != nil {
		return res, err
	}
	switch {
	case c.rebuild && fix&graph.CheckFixErrors != 0:
		c.msg("Rebuilding refcount structure")
		fixedErrs := c.refErrs
		// The new structures count the old ones too (as qemu-img does),
		// which the pass below then frees as leaks, saying so.
		if err := c.rebuildRefcounts(true); err != nil {
			res.CheckErrors++
			return res, err
		}
		if err := c.load(); err != nil {
			res.CheckErrors++
			return res, err
		}
		res.CorruptionsFixed += fixedErrs
		res.Corruptions -= fixedErrs
		res.LeaksFixed += res.Leaks
		res.Leaks = 0
		// What the new structures say must now match exactly.
		c.quiet = true
		c.rebuild = false
		c.calculate()
		var scratch graph.CheckResult
		saved := c.res
		c.res = &scratch
		c.quiet = false
		highest, err = c.compare(graph.CheckFixLeaks)
		c.res = saved
		if err != nil {
			return res, err
		}
		if scratch.Corruptions != 0 || c.rebuild {
			c.msg("ERROR rebuilt refcount structure is still broken")
		}
		res.Messages = append(res.Messages, scratch.Messages...)
		res.Leaks += scratch.Leaks
		res.Corruptions += scratch.Corruptions
	case fix != 0 && c.rebuild:
		c.msg("ERROR need to rebuild refcount structures")
		res.CheckErrors++
		return res, fmt.Errorf("Check failed: %w", syscall.EIO)
	case fix != 0 && (res.Leaks != 0 || res.Corruptions != 0):
		// Count again, repairing this time (the lines say "Repairing").
		msgs := res.Messages
		res = pre
		res.Messages = msgs
		if highest, err = c.compare(fix); err != nil {
			return res, err
		}
	}
	if err := c.checkCopied(); err != nil {
		res.CheckErrors++
		return res, err
	}
	res.ImageEndOffset = (highest + 1) * c.cs
	if fix != 0 {
		if err := st.Flush(ctx); err != nil {
			return res, err
		}
		// A repair that leaves nothing wrong makes the image clean and
		// consistent again, as qemu-img check -r does.
		if res.CheckErrors == 0 && res.Corruptions == 0 {
			if err := markClean(ctx, st, h); err != nil {
				return res, err
			}
		}
	}
	return res, nil
}

// load reads the file size and the snapshot table.
func (c *checker) load() error {
	size, err := c.st.Size()
	if err != nil {
		return err
	}
	c.fileSize = size
	c.nbClusters = clustersFor(size, c.cs)
	c.snaps, c.snapLen, err = ParseSnapshotTable(storageReader{c.ctx, c.st}, size,
		c.h.SnapshotsOffset, c.h.NbSnapshots, c.h.ClusterBits)
	return err
}

// calculate computes the expected refcount of every cluster, reporting
// what is wrong with the structures on the way.
func (c *checker) calculate() {
	c.refs = make([]uint32, c.nbClusters)
	c.refErrs = 0
	c.inc(0, c.cs) // the header
	c.checkL1(int64(c.h.L1TableOffset), c.h.L1Size, true)
	for i := range c.snaps {
		sn := &c.snaps[i]
		if int64(sn.L1TableOffset)%c.cs != 0 {
			c.msg("ERROR snapshot %s (%s) l1_offset=%s: L1 table is not cluster aligned; snapshot table entry corrupted",
				sn.ID, sn.Name, cHex(sn.L1TableOffset))
			c.corruption()
			continue
		}
		if uint64(sn.L1Size)*8 > MaxL1Bytes {
			c.msg("ERROR snapshot %s (%s) l1_size=%s: L1 table is too large; snapshot table entry corrupted",
				sn.ID, sn.Name, cHex(uint64(sn.L1Size)))
			c.corruption()
			continue
		}
		c.checkL1(int64(sn.L1TableOffset), sn.L1Size, false)
	}
	c.inc(int64(c.h.SnapshotsOffset), c.snapLen)
	if !c.skipRefStructs {
		c.inc(int64(c.h.RefcountTableOffset), int64(c.h.RefcountTableClusters)*c.cs)
	}
	if cr := c.h.Crypto; cr != nil {
		c.inc(int64(cr.Offset), int64(cr.Length))
	}
	c.checkBitmaps()
	c.checkRefblocks()
}

// inc counts one reference to each cluster [off, off+size) touches.
func (c *checker) inc(off, size int64) {
	if size <= 0 {
		return
	}
	if off < 0 || off+size-c.fileSize >= c.cs {
		c.msg("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset %#x size %#x", off, size)
		c.corruption()
		return
	}
	max := c.g.MaxRefcount()
	for k := off / c.cs; k <= (off+size-1)/c.cs; k++ {
		for k >= int64(len(c.refs)) {
			c.refs = append(c.refs, 0)
		}
		if uint64(c.refs[k]) >= max || c.refs[k] == ^uint32(0) {
			c.msg("ERROR: overflow cluster offset=%#x", k*c.cs)
			c.msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing")
			c.corruption()
			continue
		}
		c.refs[k]++
	}
}

// checkL1 counts an L1 table and everything it references. active
// selects the active table (its clusters give the allocation statistics).
func (c *checker) checkL1(off int64, n uint32, active bool) {
	c.inc(off, int64(n)*8)
	if n == 0 || off < 0 || off >= c.fileSize {
		return // nothing to read: beyond the file, entries read as zeros
	}
	l1, err := readL1(c.ctx, c.st, off, n)
	if err != nil {
		c.msg("ERROR: I/O error in check_refcounts_l1")
		if !c.quiet {
			c.res.CheckErrors++
		}
		return
	}
	for _, e := range l1 {
		l2 := L1Entry(e)
		if l2.Offset() == 0 {
			continue
		}
		if l2.Reserved() {
			c.msg("ERROR found L1 entry with reserved bits set: %x", e)
			c.corruption()
		}
		c.inc(l2.Offset(), c.cs)
		if l2.Offset()%c.cs != 0 {
			c.msg("ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted", l2.Offset())
			c.corruption()
		}
		c.checkL2(l2.Offset(), active)
	}
}

// checkL2 counts the clusters an L2 table references.
func (c *checker) checkL2(off int64, active bool) {
	if off >= c.fileSize {
		return // reads as zeros: nothing mapped
	}
	table := make([]byte, c.cs)
	if err := c.st.ReadAt(c.ctx, table, off); err != nil {
		c.msg("ERROR: I/O error in check_refcounts_l2")
		if !c.quiet {
			c.res.CheckErrors++
		}
		return
	}
	ext, data := c.g.ExtendedL2, c.h.ExternalData()
	stats := active && !c.quiet
	var next int64 // where the next data cluster would be contiguous
	for i := 0; i < int(c.g.L2Entries()); i++ {
		e := c.g.GetL2(table, i)
		typ := e.Type(ext, data)
		if typ != ClusterCompressed && e.Entry&L2ReservedMask != 0 {
			c.msg("ERROR found l2 entry with reserved bits set: %x", e.Entry)
			c.corruption()
		}
		switch typ {
		case ClusterCompressed:
			if data {
				c.msg("ERROR compressed cluster %d with data file, entry=%#x", i, e.Entry)
				c.corruption()
				continue
			}
			if e.Copied() {
				c.msg("ERROR: coffset=%#x: copied flag must never be set for compressed clusters", e.Entry&^(FlagCopied|FlagCompressed))
				c.corruption()
			}
			if ext && e.Bitmap != 0 {
				c.msg("ERROR compressed cluster %d with non-zero subcluster allocation bitmap, entry=%#x", i, e.Entry)
				c.corruption()
			}
			if stats {
				// Compressed clusters are fragmented by nature.
				c.res.AllocatedClusters++
				c.res.CompressedClusters++
				c.res.FragmentedClusters++
			}
			host, length := c.g.CompressedSpan(e)
			c.inc(host&^511, length+host&511)
		case ClusterNormal, ClusterZeroAlloc:
			host := e.Offset()
			if ext && e.AllocBitmap()&e.ZeroBitmap() != 0 {
				c.msg("ERROR offset=%x: Allocated cluster has corrupted subcluster allocation bitmap", host)
				c.corruption()
			}
			if stats {
				c.res.AllocatedClusters++
				if next != 0 && host != next {
					c.res.FragmentedClusters++
				}
			}
			next = host + c.cs
			if host%c.cs != 0 {
				c.msg("ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted.", host)
				c.corruption()
			}
			if !data {
				c.inc(host, c.cs)
			}
		case ClusterUnallocated:
			if ext && e.AllocBitmap() != 0 {
				c.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
				c.corruption()
			}
		}
	}
}

// checkBitmaps counts the bitmap directory, the bitmap tables and their
// data clusters (qcow2.txt "Bitmaps"), when the extension is consistent.
func (c *checker) checkBitmaps() {
	bm := c.h.Bitmaps
	if bm == nil || c.h.AutoclearFeatures&AutoclearBitmaps == 0 || bm.NbBitmaps == 0 {
		return
	}
	c.inc(int64(bm.DirectoryOffset), int64(bm.DirectorySize))
	if bm.DirectorySize > 64<<20 || !inFile(bm.DirectoryOffset, bm.DirectorySize, c.fileSize) {
		return
	}
	dir := make([]byte, bm.DirectorySize)
	if err := c.st.ReadAt(c.ctx, dir, int64(bm.DirectoryOffset)); err != nil {
		c.msg("ERROR: Could not read the bitmap directory: %v", err)
		if !c.quiet {
			c.res.CheckErrors++
		}
		return
	}
	for p, n := 0, uint32(0); n < bm.NbBitmaps && p+24 <= len(dir); n++ {
		tOff := int64(be.Uint64(dir[p:]))
		tSize := int64(be.Uint32(dir[p+8:]))
		nameSize := int(be.Uint16(dir[p+18:]))
		extra := int(be.Uint32(dir[p+20:]))
		p += (24 + extra + nameSize + 7) &^ 7
		c.inc(tOff, tSize*8)
		if tSize*8 > 64<<20 || !inFile(uint64(tOff), uint64(tSize*8), c.fileSize) {
			continue
		}
		tbl, err := readL1(c.ctx, c.st, tOff, uint32(tSize))
		if err != nil {
			continue
		}
		for _, e := range tbl {
			if off := int64(e & OffsetMask); off != 0 {
				c.inc(off, c.cs)
			}
		}
	}
}

// checkRefblocks counts the refcount blocks and checks where they are.
func (c *checker) checkRefblocks() {
	m, err := newMetaEditor(c.ctx, c.st, c.h)
	if err != nil {
		c.msg("ERROR: could not read the refcount table: %v", err)
		if !c.quiet {
			c.res.CheckErrors++
		}
		return
	}
	for i, e := range m.reftable {
		off := int64(e &^ RefcountTableReservedMask &^ (1 << 63))
		if off%c.cs != 0 {
			c.msg("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted", i)
			c.corruption()
			c.refErrs++
			c.rebuild = true
			continue
		}
		if off/c.cs >= c.nbClusters || e>>63 != 0 {
			c.msg("ERROR refcount block %d is outside image", i)
			c.corruption()
			c.refErrs++
			c.rebuild = true
			continue
		}
		if off == 0 || c.skipRefStructs {
			continue
		}
		c.inc(off, c.cs)
		if r := c.refs[off/c.cs]; r != 1 {
			c.msg("ERROR refcount block %d refcount=%d", i, r)
			c.corruption()
			c.refErrs++
			c.rebuild = true
		}
	}
}

// compare compares stored and expected refcounts, repairing what fix
// allows, and returns the highest cluster in use.
func (c *checker) compare(fix graph.CheckFix) (int64, error) {
	m, err := newMetaEditor(c.ctx, c.st, c.h)
	if err != nil {
		c.res.CheckErrors++
		return -1, err
	}
	highest := int64(0)
	n := max(c.nbClusters, int64(len(c.refs)))
	signalled := false
	for k := int64(0); k < n; k++ {
		stored, err := m.refcount(k)
		var rbe *refblockError
		if errors.As(err, &rbe) && !signalled {
			signalled = true
			if c.fix == 0 {
				c.msg("qcow2: Image is corrupt: %s; further non-fatal corruption events will be suppressed", rbe.detail())
			} else {
				c.msg("qcow2: Marking image as corrupt: %s; further corruption events will be suppressed", rbe.detail())
			}
		}
		if err != nil {
			c.msg("Can't get refcount for cluster %d: %s", k, errText(err))
			c.res.CheckErrors++
			continue
		}
		var want uint64
		if k < int64(len(c.refs)) {
			want = uint64(c.refs[k])
		}
		if stored > 0 || want > 0 {
			highest = k
		}
		if stored == want {
			continue
		}
		var fixed *int
		switch {
		case stored == 0:
			// Raising a refcount from zero may need a refcount block
			// that is not there: only a rebuild can do that safely.
			c.rebuild = true
		case stored > want && fix&graph.CheckFixLeaks != 0:
			fixed = &c.res.LeaksFixed
		case stored < want && fix&graph.CheckFixErrors != 0:
			fixed = &c.res.CorruptionsFixed
		}
		label := "Leaked"
		switch {
		case fixed != nil:
			label = "Repairing"
		case stored < want:
			label = "ERROR"
		}
		c.msg("%s cluster %d refcount=%d reference=%d", label, k, stored, want)
		if fixed != nil {
			if err := m.setRefcount(k, want); err == nil {
				*fixed++
				continue
			}
			c.msg("ERROR could not fix cluster refcount: %v", err)
		}
		if stored < want {
			c.res.Corruptions++
			c.refErrs++
		} else {
			c.res.Leaks++
		}
	}
	if fix != 0 && len(m.dirty) > 0 {
		if err := m.flushRefs(); err != nil {
			c.res.CheckErrors++
			return highest, err
		}
	}
	return highest, nil
}

// checkCopied checks bit 63 ("COPIED") of the active L1 table and of the
// L2 tables it references against the stored refcounts, and with
// CheckFixErrors sets it right.
func (c *checker) checkCopied() error {
	m, err := newMetaEditor(c.ctx, c.st, c.h)
	if err != nil {
		return err
	}
	// qemu-img repairs COPIED flags with -r leaks too.
	repair := c.fix != 0
	label := "ERROR"
	if repair {
		label = "Repairing"
	}
	count := func() {
		if repair {
			c.res.CorruptionsFixed++
		} else {
			c.res.Corruptions++
		}
	}
	l1Off := int64(c.h.L1TableOffset)
	l1, err := readL1(c.ctx, c.st, l1Off, c.h.L1Size)
	if err != nil {
		return fmt.Errorf("qcow2: reading the L1 table: %w", err)
	}
	ext, data := c.g.ExtendedL2, c.h.ExternalData()
	table := make([]byte, c.cs)
	for i, e := range l1 {
		l2off := L1Entry(e).Offset()
		if l2off == 0 {
			continue
		}
		r, err := m.refcount(l2off / c.cs)
		if err != nil {
			continue
		}
		if (r == 1) != L1Entry(e).Copied() {
			c.msg("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", label, i, e, r)
			count()
			if repair {
				l1[i] = e ^ FlagCopied
				if err := c.st.WriteAt(c.ctx, encodeL1(l1[i:i+1]), l1Off+int64(i)*8); err != nil {
					return fmt.Errorf("qcow2: updating the L1 table: %w", err)
				}
			}
		}
		if err := c.st.ReadAt(c.ctx, table, l2off); err != nil {
			c.msg("ERROR: Could not read L2 table: %s", errText(err))
			c.res.CheckErrors++
			continue
		}
		changed := false
		for j := 0; j < int(c.g.L2Entries()); j++ {
			le := c.g.GetL2(table, j)
			if t := le.Type(ext, data); t != ClusterNormal && t != ClusterZeroAlloc {
				continue
			}
			r := uint64(1)
			if !data {
				if r, err = m.refcount(le.Offset() / c.cs); err != nil {
					continue
				}
			}
			if (r == 1) != le.Copied() {
				c.msg("%s OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", label, le.Entry, r)
				count()
				if repair {
					le.Entry ^= FlagCopied
					c.g.SetL2(table, j, le)
					changed = true
				}
			}
		}
		if changed && l2off%c.cs == 0 {
			if err := c.st.WriteAt(c.ctx, table, l2off); err != nil {
				return fmt.Errorf("qcow2: updating the L2 table at %#x: %w", l2off, err)
			}
		}
	}
	return nil
}

// errText is an error as QEMU's strerror would show it.
func errText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		s := errno.Error()
		return string(s[0]-'a'+'A') + s[1:]
	}
	return err.Error()
}

// rebuildRefcounts writes a new refcount table and new refcount blocks
// for the refcounts computed from the references (with keepOld, counting
// the old refcount structures as in use, so that a later leak repair
// frees them; without, they are simply no longer referenced), behind the
// end of the file, then switches the header to them. Until the header is
// switched, the image is as it was.
func (c *checker) rebuildRefcounts(keepOld bool) error {
	c.quiet, c.skipRefStructs = true, !keepOld
	c.calculate()
	c.quiet, c.skipRefStructs = false, false
	return writeRefcounts(c.ctx, c.st, c.h, c.refs, c.nbClusters)
}

// writeRefcounts places a refcount table and blocks describing refs at
// cluster start (or later) and switches the header to them.
func writeRefcounts(ctx context.Context, st Storage, h *Header, refs []uint32, start int64) error {
	tOff, nrt, err := placeRefcounts(ctx, st, h.Geometry(), refs, start)
	if err != nil {
		return err
	}
	var f [12]byte
	be.PutUint64(f[0:], uint64(tOff))
	be.PutUint32(f[8:], uint32(nrt))
	if err := patchHeader(ctx, st, 48, f[:]); err != nil {
		return err
	}
	h.RefcountTableOffset = uint64(tOff)
	h.RefcountTableClusters = uint32(nrt)
	return nil
}

// placeRefcounts writes refcount blocks of geometry g and a refcount
// table describing refs (plus themselves) at cluster start or later, and
// flushes. It returns the table's offset and size in clusters; nothing
// points at them yet.
func placeRefcounts(ctx context.Context, st Storage, g Geometry, refs []uint32, start int64) (int64, int64, error) {
	cs := g.ClusterSize()
	start = max(start, int64(len(refs)))
	per := g.RefcountBlockEntries()
	var nrb, nrt int64
	for {
		total := start + nrb + nrt
		b := (total + per - 1) / per
		t := clustersFor(b*8, cs)
		if b == nrb && t == nrt {
			break
		}
		nrb, nrt = b, t
	}
	if nrt*cs > MaxRefcountTable {
		return 0, 0, fmt.Errorf("qcow2: refcount table would exceed %d bytes: %w", MaxRefcountTable, syscall.EFBIG)
	}
	total := start + nrb + nrt
	table := make([]byte, nrt*cs)
	block := make([]byte, cs)
	for b := int64(0); b < nrb; b++ {
		clear(block)
		for i := int64(0); i < per; i++ {
			k := b*per + i
			var v uint64
			switch {
			case k < int64(len(refs)):
				v = uint64(refs[k])
			case k >= start && k < total:
				v = 1
			}
			if v != 0 {
				if err := SetRefcount(block, g.RefcountOrder, i, v); err != nil {
					return 0, 0, fmt.Errorf("qcow2: refcount of cluster %d: %w", k, err)
				}
			}
		}
		off := (start + b) * cs
		if err := st.WriteAt(ctx, block, off); err != nil {
			return 0, 0, fmt.Errorf("qcow2: writing refcount block %d: %w", b, err)
		}
		be.PutUint64(table[b*8:], uint64(off))
	}
	tOff := (start + nrb) * cs
	if err := st.WriteAt(ctx, table, tOff); err != nil {
		return 0, 0, fmt.Errorf("qcow2: writing the refcount table: %w", err)
	}
	return tOff, nrt, st.Flush(ctx)
}

// patchHeader overwrites header bytes [off, off+len(b)) (all within the
// first sector, so the write is atomic) and flushes.
func patchHeader(ctx context.Context, st Storage, off int64, b []byte) error {
	if err := st.WriteAt(ctx, b, off); err != nil {
		return fmt.Errorf("qcow2: updating the header: %w", err)
	}
	return st.Flush(ctx)
}

// rebuildRefcountStructure replaces the refcount structures of the image
// st (header h) with ones computed from the references alone, and clears
// the dirty bit. This is the repair of an image whose refcounts cannot be
// trusted (lazy refcounts left dirty); h is updated.
func rebuildRefcountStructure(ctx context.Context, st Storage, h *Header) error {
	var res graph.CheckResult
	c := &checker{ctx: ctx, st: st, h: h, g: h.Geometry(), cs: h.ClusterSize(), res: &res}
	if err := c.load(); err != nil {
		return err
	}
	if err := c.rebuildRefcounts(false); err != nil {
		return err
	}
	if h.IncompatibleFeatures&IncompatDirty == 0 {
		return nil
	}
	var f [8]byte
	be.PutUint64(f[:], h.IncompatibleFeatures&^IncompatDirty)
	if err := patchHeader(ctx, st, 72, f[:]); err != nil {
		return err
	}
	h.IncompatibleFeatures &^= IncompatDirty
	return nil
}

// repairImage is what opening a dirty image with lazy refcounts does
// (qcow2.txt: "make sure to scan L1/L2 tables to repair refcounts before
// accessing the image"): qemu-img check -r all, which also clears the
// dirty bit when nothing is left to repair. h is updated.
func repairImage(ctx context.Context, st Storage, h *Header) (graph.CheckResult, error) {
	res, err := checkImage(ctx, st, h, graph.CheckFixLeaks|graph.CheckFixErrors)
	if err == nil && res.CheckErrors != 0 {
		err = fmt.Errorf("qcow2: %d check errors: %w", res.CheckErrors, syscall.EIO)
	}
	return res, err
}

// markClean clears the dirty and corrupt bits on disk (after a flush of
// what made the image consistent).
func markClean(ctx context.Context, st Storage, h *Header) error {
	bits := h.IncompatibleFeatures &^ (IncompatDirty | IncompatCorrupt)
	if bits == h.IncompatibleFeatures {
		return nil
	}
	var f [8]byte
	be.PutUint64(f[:], bits)
	if err := patchHeader(ctx, st, 72, f[:]); err != nil {
		return err
	}
	h.IncompatibleFeatures = bits
	return nil
}
