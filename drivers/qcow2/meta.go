package qcow2

// Metadata editing straight on the image file, for the operations that
// run with the node quiesced: check and repair, internal snapshots, amend.
// Nothing here caches across calls: the driver drains its requests, writes
// back its own caches, runs one of these operations and reloads its state
// from the file afterwards.
//
// Crash safety follows one rule throughout (qcow2.txt "Host cluster
// management"): a reference is only ever added to a cluster whose refcount
// already counts it, and a refcount is only decreased after the last
// reference is gone, with a flush between the two steps. A crash then
// leaves at worst leaked clusters.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"syscall"

	"blockbackend/graph"
)

// Storage is the image file (the node's "file" child) as the metadata
// operations use it. ReadAt beyond the end of the file reads zeros; WriteAt
// beyond it grows the file.
type Storage interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64) error
	Size() (int64, error)
	Flush(ctx context.Context) error
	Truncate(ctx context.Context, size int64) error
}

// NodeStorage adapts a graph node (the qcow2 node's file child) to Storage.
type NodeStorage struct{ Node *graph.Node }

// ReadAt reads p at off; the part beyond the end of the node reads zeros.
func (s NodeStorage) ReadAt(ctx context.Context, p []byte, off int64) error {
	size := s.Node.SizeNow()
	n := int64(len(p))
	if off >= size {
		clear(p)
		return nil
	}
	if off+n > size {
		clear(p[size-off:])
		p = p[:size-off]
	}
	return s.Node.ReadAt(ctx, p, off)
}

// WriteAt writes p at off, growing the node first when p ends beyond it.
func (s NodeStorage) WriteAt(ctx context.Context, p []byte, off int64) error {
	if end := off + int64(len(p)); end > s.Node.SizeNow() {
		if err := s.Node.Truncate(ctx, end, false, "off"); err != nil {
			return err
		}
	}
	return s.Node.WriteAt(ctx, p, off, 0)
}

// Size is the node's current size.
func (s NodeStorage) Size() (int64, error) {
	if err := s.Node.RefreshSize(); err != nil {
		return 0, err
	}
	return s.Node.SizeNow(), nil
}

// Flush flushes the node.
func (s NodeStorage) Flush(ctx context.Context) error { return s.Node.Flush(ctx) }

// Truncate sets the node's size exactly.
func (s NodeStorage) Truncate(ctx context.Context, size int64) error {
	return s.Node.Truncate(ctx, size, true, "off")
}

// storageReader makes a Storage an io.ReaderAt for the layout parsers.
type storageReader struct {
	ctx context.Context
	st  Storage
}

func (r storageReader) ReadAt(p []byte, off int64) (int, error) {
	if err := r.st.ReadAt(r.ctx, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

var _ io.ReaderAt = storageReader{}

// writeHeader encodes h and writes it over the first cluster's header
// area, then flushes. The header write is the single switch point of
// every crash-safe metadata change.
func writeHeader(ctx context.Context, st Storage, h *Header) error {
	if !h.Fits() {
		return fmt.Errorf("qcow2: header does not fit in the first cluster: %w", syscall.ENOSPC)
	}
	buf := h.Marshal()
	if err := st.WriteAt(ctx, buf, 0); err != nil {
		return fmt.Errorf("qcow2: writing the header: %w", err)
	}
	return st.Flush(ctx)
}

// metaEditor reads and changes refcounts and allocates clusters directly
// in the file. Changed refcount blocks are kept until flushRefs writes
// them (in table order) and flushes the file.
type metaEditor struct {
	ctx context.Context
	st  Storage
	h   *Header
	g   Geometry
	cs  int64

	reftable []uint64
	blocks   map[uint64][]byte // refcount blocks read, by table index
	dirty    map[uint64]bool
	freeHint int64 // no free cluster below this index
}

func newMetaEditor(ctx context.Context, st Storage, h *Header) (*metaEditor, error) {
	m := &metaEditor{ctx: ctx, st: st, h: h, g: h.Geometry(), cs: h.ClusterSize(),
		blocks: map[uint64][]byte{}, dirty: map[uint64]bool{}}
	if err := m.loadReftable(); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *metaEditor) loadReftable() error {
	n := int64(m.h.RefcountTableClusters) * m.cs
	buf := make([]byte, n)
	if err := m.st.ReadAt(m.ctx, buf, int64(m.h.RefcountTableOffset)); err != nil {
		return fmt.Errorf("qcow2: reading the refcount table: %w", err)
	}
	m.reftable = make([]uint64, n/8)
	for i := range m.reftable {
		m.reftable[i] = be.Uint64(buf[i*8:])
	}
	return nil
}

// block returns refcount block idx, nil when the table has none there.
func (m *metaEditor) block(idx uint64) ([]byte, error) {
	if b, ok := m.blocks[idx]; ok {
		return b, nil
	}
	if idx >= uint64(len(m.reftable)) {
		return nil, nil
	}
	e := m.reftable[idx] &^ RefcountTableReservedMask
	if e == 0 {
		return nil, nil
	}
	off := int64(e)
	if off%m.cs != 0 || e > MaxHostOffset {
		return nil, &refblockError{idx: idx, off: off}
	}
	b := make([]byte, m.cs)
	if err := m.st.ReadAt(m.ctx, b, off); err != nil {
		return nil, fmt.Errorf("qcow2: reading refcount block %d at %#x: %w", idx, off, err)
	}
	m.blocks[idx] = b
	return b, nil
}

// refblockError is a refcount table entry that cannot point at a block.
type refblockError struct {
	idx uint64
	off int64
}

func (e *refblockError) detail() string {
	return fmt.Sprintf("Refblock offset %s unaligned (reftable index: %s)", cHex(uint64(e.off)), cHex(e.idx))
}

// cHex formats v as C's "%#x" does (no prefix for zero).
func cHex(v uint64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}

func (e *refblockError) Error() string { return "qcow2: " + e.detail() }

func (e *refblockError) Unwrap() error { return syscall.EIO }

// refcount returns the stored refcount of host cluster k.
func (m *metaEditor) refcount(k int64) (uint64, error) {
	idx, i := m.g.RefcountIndex(k * m.cs)
	b, err := m.block(idx)
	if err != nil || b == nil {
		return 0, err
	}
	return GetRefcount(b, m.g.RefcountOrder, i), nil
}

// setRefcount stores v as the refcount of cluster k. A missing refcount
// block is created in the first cluster of the range it describes (free,
// since no block describes it yet), describing itself; a refcount table
// too small for it is grown first.
func (m *metaEditor) setRefcount(k int64, v uint64) error {
	if v > m.g.MaxRefcount() {
		return fmt.Errorf("qcow2: refcount of cluster %d would exceed %d: %w", k, m.g.MaxRefcount(), syscall.EINVAL)
	}
	idx, i := m.g.RefcountIndex(k * m.cs)
	b, err := m.block(idx)
	if err != nil {
		return err
	}
	if b == nil {
		if v == 0 {
			return nil
		}
		if b, err = m.newBlock(idx); err != nil {
			return err
		}
		if int64(idx)*m.g.RefcountBlockEntries() == k {
			return fmt.Errorf("qcow2: cluster %d is taken by its own refcount block: %w", k, syscall.EIO)
		}
	}
	if err := SetRefcount(b, m.g.RefcountOrder, i, v); err != nil {
		return fmt.Errorf("qcow2: refcount of cluster %d: %w", k, syscall.EINVAL)
	}
	m.dirty[idx] = true
	return nil
}

// newBlock creates refcount block idx at the first cluster it covers.
func (m *metaEditor) newBlock(idx uint64) ([]byte, error) {
	first := int64(idx) * m.g.RefcountBlockEntries()
	if idx >= uint64(len(m.reftable)) {
		if err := m.growReftable(idx); err != nil {
			return nil, err
		}
		if b := m.blocks[idx]; b != nil {
			return b, nil // growReftable made it
		}
	}
	b := make([]byte, m.cs)
	if err := SetRefcount(b, m.g.RefcountOrder, 0, 1); err != nil {
		return nil, err
	}
	// The block goes to the file before the table points at it.
	if err := m.st.WriteAt(m.ctx, b, first*m.cs); err != nil {
		return nil, fmt.Errorf("qcow2: writing refcount block %d: %w", idx, err)
	}
	if err := m.st.Flush(m.ctx); err != nil {
		return nil, err
	}
	m.reftable[idx] = uint64(first * m.cs)
	var e [8]byte
	be.PutUint64(e[:], m.reftable[idx])
	if err := m.st.WriteAt(m.ctx, e[:], int64(m.h.RefcountTableOffset)+int64(idx)*8); err != nil {
		return nil, fmt.Errorf("qcow2: writing the refcount table: %w", err)
	}
	m.blocks[idx] = b
	return b, nil
}

// growReftable moves the refcount table to a larger one that has room for
// index idx. The new table lives in the range of refcount block idx (all
// free, as no block covers it), right after that block, which describes
// both; the header switches to it after both are on disk.
func (m *metaEditor) growReftable(idx uint64) error {
	perCluster := uint64(m.cs / 8)
	newClusters := (idx + 1 + perCluster - 1) / perCluster
	newClusters += newClusters / 2 // room to grow
	if newClusters*uint64(m.cs) > MaxRefcountTable {
		return fmt.Errorf("qcow2: refcount table would exceed %d bytes: %w", MaxRefcountTable, syscall.EFBIG)
	}
	if int64(newClusters)+1 > m.g.RefcountBlockEntries() {
		return fmt.Errorf("qcow2: refcount table too large for one refcount block: %w", syscall.EFBIG)
	}
	first := int64(idx) * m.g.RefcountBlockEntries()
	blk := make([]byte, m.cs)
	for j := int64(0); j <= int64(newClusters); j++ {
		if err := SetRefcount(blk, m.g.RefcountOrder, j, 1); err != nil {
			return err
		}
	}
	table := make([]uint64, newClusters*perCluster)
	copy(table, m.reftable)
	table[idx] = uint64(first * m.cs)
	tbuf := make([]byte, len(table)*8)
	for j, e := range table {
		be.PutUint64(tbuf[j*8:], e)
	}
	if err := m.st.WriteAt(m.ctx, blk, first*m.cs); err != nil {
		return err
	}
	if err := m.st.WriteAt(m.ctx, tbuf, (first+1)*m.cs); err != nil {
		return err
	}
	if err := m.flushRefs(); err != nil { // also flushes the file
		return err
	}
	oldOff, oldClusters := int64(m.h.RefcountTableOffset), int64(m.h.RefcountTableClusters)
	m.h.RefcountTableOffset = uint64((first + 1) * m.cs)
	m.h.RefcountTableClusters = uint32(newClusters)
	if err := writeHeader(m.ctx, m.st, m.h); err != nil {
		return err
	}
	m.reftable = table
	m.blocks[idx] = blk
	// The old table's clusters are free now.
	return m.freeClusters(oldOff, oldClusters*m.cs)
}

// flushRefs writes the changed refcount blocks and flushes the file.
func (m *metaEditor) flushRefs() error {
	idxs := make([]uint64, 0, len(m.dirty))
	for idx := range m.dirty {
		idxs = append(idxs, idx)
	}
	sort.Slice(idxs, func(a, b int) bool { return idxs[a] < idxs[b] })
	for _, idx := range idxs {
		off := int64(m.reftable[idx] &^ RefcountTableReservedMask)
		if err := m.st.WriteAt(m.ctx, m.blocks[idx], off); err != nil {
			return fmt.Errorf("qcow2: writing refcount block %d: %w", idx, err)
		}
		delete(m.dirty, idx)
	}
	return m.st.Flush(m.ctx)
}

// addRef changes the refcount of every cluster that [off, off+n) touches
// by delta. Clusters that reach zero become free.
func (m *metaEditor) addRef(off, n int64, delta int) error {
	if n <= 0 {
		return nil
	}
	for k := off / m.cs; k <= (off+n-1)/m.cs; k++ {
		r, err := m.refcount(k)
		if err != nil {
			return err
		}
		switch {
		case delta < 0 && r < uint64(-delta):
			return fmt.Errorf("qcow2: refcount of cluster %d would drop below zero: %w", k, syscall.EIO)
		case delta < 0:
			r -= uint64(-delta)
		default:
			r += uint64(delta)
		}
		if err := m.setRefcount(k, r); err != nil {
			return err
		}
		if r == 0 && k < m.freeHint {
			m.freeHint = k
		}
	}
	return nil
}

// freeClusters drops one reference from each cluster of [off, off+n).
func (m *metaEditor) freeClusters(off, n int64) error { return m.addRef(off, n, -1) }

// alloc finds n contiguous free clusters, gives them refcount 1 and
// returns the offset of the first. The refcounts reach the file with the
// next flushRefs, which must come before anything points at the clusters.
func (m *metaEditor) alloc(n int64) (int64, error) {
	if n <= 0 {
		return 0, errors.New("qcow2: empty allocation")
	}
	firstFree, start, run := int64(-1), int64(0), int64(0)
	for k := m.freeHint; ; k++ {
		free := !m.needsBlockAt(k)
		if free {
			r, err := m.refcount(k)
			if err != nil {
				return 0, err
			}
			free = r == 0
		}
		if !free {
			run = 0
			continue
		}
		if firstFree < 0 {
			firstFree = k
		}
		if run == 0 {
			start = k
		}
		if run++; run < n {
			continue
		}
		for c := start; c < start+n; c++ {
			if err := m.setRefcount(c, 1); err != nil {
				return 0, err
			}
		}
		if firstFree == start {
			m.freeHint = start + n
		} else {
			m.freeHint = firstFree
		}
		return start * m.cs, nil
	}
}

// needsBlockAt reports whether cluster k is the first of a range without
// a refcount block, where setRefcount would place that block.
func (m *metaEditor) needsBlockAt(k int64) bool {
	e := m.g.RefcountBlockEntries()
	if k%e != 0 {
		return false
	}
	idx := uint64(k / e)
	if _, ok := m.blocks[idx]; ok {
		return false
	}
	return idx >= uint64(len(m.reftable)) || m.reftable[idx]&^RefcountTableReservedMask == 0
}

// readL1 reads an L1 table of n entries at off.
func readL1(ctx context.Context, st Storage, off int64, n uint32) ([]uint64, error) {
	buf := make([]byte, int64(n)*8)
	if err := st.ReadAt(ctx, buf, off); err != nil {
		return nil, err
	}
	l1 := make([]uint64, n)
	for i := range l1 {
		l1[i] = be.Uint64(buf[i*8:])
	}
	return l1, nil
}

func encodeL1(l1 []uint64) []byte {
	buf := make([]byte, len(l1)*8)
	for i, e := range l1 {
		be.PutUint64(buf[i*8:], e)
	}
	return buf
}

// clustersFor is the number of clusters n bytes take.
func clustersFor(n, cs int64) int64 { return (n + cs - 1) / cs }
