package qcow2

// Internal snapshots (qcow2.txt "Snapshots"): list, create, apply and
// delete, straight on the image file with the node quiesced, as check is.
//
// Refcounts follow the rule the spec and qemu-img check use: a data
// cluster's refcount is the number of (L1 table, L2 table) paths that
// reach it, an L2 table's the number of L1 tables that point at it.
// Creating a snapshot adds one to everything the active L1 table reaches;
// deleting one takes one from everything its L1 table reaches.
//
// Each operation orders its writes so that a crash leaves at worst
// leaked clusters: references are counted (and flushed) before they
// exist, the header switches to the new state in one sector write, and
// what the old state alone referenced is freed afterwards.

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"syscall"
	"time"

	"blockbackend/graph"
)

// snapError is an error with QEMU's text that still matches an errno.
type snapError struct {
	msg   string
	errno syscall.Errno
}

func (e *snapError) Error() string { return e.msg }
func (e *snapError) Unwrap() error { return e.errno }

func readSnapshots(ctx context.Context, st Storage, h *Header) ([]Snapshot, int64, error) {
	size, err := st.Size()
	if err != nil {
		return nil, 0, err
	}
	return ParseSnapshotTable(storageReader{ctx, st}, size, h.SnapshotsOffset, h.NbSnapshots, h.ClusterBits)
}

// snapshotInfo converts a table entry to what the graph reports.
func snapshotInfo(s *Snapshot) graph.SnapshotInfo {
	return graph.SnapshotInfo{
		ID: s.ID, Name: s.Name, VMStateSize: s.StateSize(),
		DateSec: int64(s.DateSec), DateNsec: int64(s.DateNsec),
		VMClockNsec: int64(s.VMClockNsec), ICount: s.ICount,
	}
}

// listSnapshots returns the snapshots in table order.
func listSnapshots(ctx context.Context, st Storage, h *Header) ([]graph.SnapshotInfo, error) {
	snaps, _, err := readSnapshots(ctx, st, h)
	if err != nil {
		return nil, err
	}
	out := make([]graph.SnapshotInfo, len(snaps))
	for i := range snaps {
		out[i] = snapshotInfo(&snaps[i])
	}
	return out, nil
}

// findSnapshot returns the index of the first snapshot matching id and
// name (an empty one matches any), or -1.
func findSnapshot(snaps []Snapshot, id, name string) int {
	if id == "" && name == "" {
		return -1
	}
	for i := range snaps {
		if (id == "" || snaps[i].ID == id) && (name == "" || snaps[i].Name == name) {
			return i
		}
	}
	return -1
}

// nextSnapshotID is one more than the largest numeric ID.
func nextSnapshotID(snaps []Snapshot) string {
	var maxID uint64
	for i := range snaps {
		if n, err := strconv.ParseUint(snaps[i].ID, 10, 64); err == nil && n > maxID {
			maxID = n
		}
	}
	return strconv.FormatUint(maxID+1, 10)
}

// addTreeRefs adds delta to the refcount of every L2 table the L1 table
// l1 references and of every cluster those tables reference.
func addTreeRefs(m *metaEditor, l1 []uint64, delta int) error {
	return walkTree(m, l1, func(off, n int64) error { return m.addRef(off, n, delta) })
}

// treeDeltas adds delta, per host cluster index, to d for every reference
// the L1 table l1 holds (as addTreeRefs counts them), changing nothing.
func treeDeltas(m *metaEditor, l1 []uint64, delta int, d map[int64]int) error {
	return walkTree(m, l1, func(off, n int64) error {
		for k := off / m.cs; k <= (off+n-1)/m.cs; k++ {
			d[k] += delta
		}
		return nil
	})
}

// applyDeltas applies the positive (up) or the negative (!up) deltas of d.
func applyDeltas(m *metaEditor, d map[int64]int, up bool) error {
	ks := make([]int64, 0, len(d))
	for k, v := range d {
		if (v > 0) == up && v != 0 {
			ks = append(ks, k)
		}
	}
	slices.Sort(ks)
	for _, k := range ks {
		if err := m.addRef(k*m.cs, m.cs, d[k]); err != nil {
			return err
		}
	}
	return nil
}

// walkTree calls ref for every L2 table the L1 table l1 references and
// for every host range those tables reference, after checking that each
// lies inside the file.
func walkTree(m *metaEditor, l1 []uint64, ref func(off, n int64) error) error {
	fileSize, err := m.st.Size()
	if err != nil {
		return err
	}
	inside := func(off, n int64) error { return checkRef(m, fileSize, off, n) }
	table := make([]byte, m.cs)
	for _, e := range l1 {
		l2 := L1Entry(e).Offset()
		if l2 == 0 {
			continue
		}
		if err := inside(l2, m.cs); err != nil {
			return err
		}
		if err := ref(l2, m.cs); err != nil {
			return err
		}
		if err := m.st.ReadAt(m.ctx, table, l2); err != nil {
			return fmt.Errorf("qcow2: reading the L2 table at %#x: %w", l2, err)
		}
		for i := 0; i < int(m.g.L2Entries()); i++ {
			le := m.g.GetL2(table, i)
			switch le.Type(m.g.ExtendedL2, m.h.ExternalData()) {
			case ClusterCompressed:
				host, n := m.g.CompressedSpan(le)
				if err := inside(host&^511, n+host&511); err != nil {
					return err
				}
				if err := ref(host&^511, n+host&511); err != nil {
					return err
				}
			case ClusterNormal, ClusterZeroAlloc:
				if m.h.ExternalData() {
					continue
				}
				if err := inside(le.Offset(), m.cs); err != nil {
					return err
				}
				if err := ref(le.Offset(), m.cs); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// checkRef refuses a reference that qemu-img check would call a
// corruption: a table or data cluster not cluster aligned (n == cluster
// size), or a range beyond the end of the file, where changing refcounts
// would grow the file.
func checkRef(m *metaEditor, fileSize, off, n int64) error {
	if n == m.cs && off%m.cs != 0 || off+n-fileSize >= m.cs {
		return fmt.Errorf("qcow2: metadata references [%#x, +%#x), beyond the end of the image or unaligned; run 'qemu-img check -r all': %w",
			off, n, syscall.EIO)
	}
	return nil
}

// fixCopied sets bit 63 of the active L1 table (at l1Off) and of the L2
// tables it references to "refcount is exactly one", writing the tables
// that change. l1 is updated.
func fixCopied(m *metaEditor, l1Off int64, l1 []uint64) error {
	table := make([]byte, m.cs)
	l1Changed := false
	for i, e := range l1 {
		l2 := L1Entry(e).Offset()
		if l2 == 0 || l2%m.cs != 0 {
			continue // unaligned: corrupt, never written over
		}
		r, err := m.refcount(l2 / m.cs)
		if err != nil {
			return err
		}
		if want := MakeL1Entry(l2, r == 1); uint64(want) != e&^L1ReservedMask {
			l1[i] = uint64(want) | e&L1ReservedMask
			l1Changed = true
		}
		if err := m.st.ReadAt(m.ctx, table, l2); err != nil {
			return fmt.Errorf("qcow2: reading the L2 table at %#x: %w", l2, err)
		}
		changed := false
		for j := 0; j < int(m.g.L2Entries()); j++ {
			le := m.g.GetL2(table, j)
			copied := false
			switch le.Type(m.g.ExtendedL2, m.h.ExternalData()) {
			case ClusterNormal, ClusterZeroAlloc:
				if m.h.ExternalData() {
					continue
				}
				r, err := m.refcount(le.Offset() / m.cs)
				if err != nil {
					return err
				}
				copied = r == 1
			case ClusterCompressed:
			default:
				continue
			}
			if le.Copied() != copied {
				le.Entry ^= FlagCopied
				m.g.SetL2(table, j, le)
				changed = true
			}
		}
		if changed {
			if err := m.st.WriteAt(m.ctx, table, l2); err != nil {
				return fmt.Errorf("qcow2: writing the L2 table at %#x: %w", l2, err)
			}
		}
	}
	if l1Changed {
		if err := m.st.WriteAt(m.ctx, encodeL1(l1), l1Off); err != nil {
			return fmt.Errorf("qcow2: writing the L1 table: %w", err)
		}
	}
	return m.st.Flush(m.ctx)
}

// writeSnapshotTable writes snaps as a new table in newly allocated
// clusters, switches the header to it and frees the old table.
func writeSnapshotTable(m *metaEditor, snaps []Snapshot, oldLen int64) error {
	h := m.h
	oldOff := int64(h.SnapshotsOffset)
	var newOff int64
	buf := MarshalSnapshotTable(snaps)
	if int64(len(buf)) > MaxSnapshotTable {
		return &snapError{"Snapshot table too large", syscall.EFBIG}
	}
	if len(buf) > 0 {
		off, err := m.alloc(clustersFor(int64(len(buf)), m.cs))
		if err != nil {
			return err
		}
		if err := m.st.WriteAt(m.ctx, buf, off); err != nil {
			return fmt.Errorf("qcow2: writing the snapshot table: %w", err)
		}
		newOff = off
	}
	if err := m.flushRefs(); err != nil {
		return err
	}
	var f [12]byte
	be.PutUint32(f[0:], uint32(len(snaps)))
	be.PutUint64(f[4:], uint64(newOff))
	if err := patchHeader(m.ctx, m.st, 60, f[:]); err != nil {
		return err
	}
	h.NbSnapshots, h.SnapshotsOffset = uint32(len(snaps)), uint64(newOff)
	if oldLen > 0 {
		if err := m.freeClusters(oldOff, oldLen); err != nil {
			return err
		}
	}
	return m.flushRefs()
}

// createSnapshot records the active state as a new snapshot (QEMU's
// savevm without VM state; img snapshot -c; blockdev-snapshot-internal-
// sync). An empty ID gets the next free number; a zero date is now. h is
// updated.
func createSnapshot(ctx context.Context, st Storage, h *Header, info graph.SnapshotInfo) (graph.SnapshotInfo, error) {
	if h.ExternalData() {
		return graph.SnapshotInfo{}, &snapError{"Internal snapshots are not supported with an external data file", syscall.ENOTSUP}
	}
	snaps, tableLen, err := readSnapshots(ctx, st, h)
	if err != nil {
		return graph.SnapshotInfo{}, err
	}
	if len(snaps) >= MaxSnapshots {
		return graph.SnapshotInfo{}, &snapError{"Too many snapshots", syscall.EFBIG}
	}
	if info.ID == "" {
		info.ID = nextSnapshotID(snaps)
	} else if findSnapshot(snaps, info.ID, "") >= 0 {
		return graph.SnapshotInfo{}, &snapError{fmt.Sprintf("Snapshot with ID '%s' already exists", info.ID), syscall.EEXIST}
	}
	if len(info.ID) > MaxSnapshotIDLen || len(info.Name) > 65535 {
		return graph.SnapshotInfo{}, &snapError{"Snapshot ID or name too long", syscall.EINVAL}
	}
	if info.DateSec == 0 && info.DateNsec == 0 {
		now := time.Now()
		info.DateSec, info.DateNsec = now.Unix(), int64(now.Nanosecond())
	}
	m, err := newMetaEditor(ctx, st, h)
	if err != nil {
		return graph.SnapshotInfo{}, err
	}
	l1Off := int64(h.L1TableOffset)
	l1, err := readL1(ctx, st, l1Off, h.L1Size)
	if err != nil {
		return graph.SnapshotInfo{}, fmt.Errorf("qcow2: reading the L1 table: %w", err)
	}
	// 1. Count the snapshot's references and give it its own copy of
	// the L1 table; nothing reaches the file until flushRefs, so a
	// refcount overflow here changes nothing.
	if err := addTreeRefs(m, l1, +1); err != nil {
		return graph.SnapshotInfo{}, err
	}
	var snapL1 int64
	if len(l1) > 0 {
		if snapL1, err = m.alloc(clustersFor(int64(len(l1))*8, m.cs)); err != nil {
			return graph.SnapshotInfo{}, err
		}
		copyL1 := make([]uint64, len(l1))
		for i, e := range l1 {
			copyL1[i] = e &^ FlagCopied
		}
		if err := st.WriteAt(ctx, encodeL1(copyL1), snapL1); err != nil {
			return graph.SnapshotInfo{}, fmt.Errorf("qcow2: writing the snapshot L1 table: %w", err)
		}
	}
	if err := m.flushRefs(); err != nil {
		return graph.SnapshotInfo{}, err
	}
	// 2. Everything the active table reaches is now shared: clear COPIED.
	if err := fixCopied(m, l1Off, l1); err != nil {
		return graph.SnapshotInfo{}, err
	}
	// 3. The new table, the header switch, the old table freed.
	sn := Snapshot{
		L1TableOffset: uint64(snapL1), L1Size: uint32(len(l1)),
		ID: info.ID, Name: info.Name,
		DateSec: uint32(info.DateSec), DateNsec: uint32(info.DateNsec),
		VMClockNsec:         uint64(info.VMClockNsec),
		HasVMStateSizeLarge: true, VMStateSizeLarge: info.VMStateSize,
		HasDiskSize: true, DiskSize: h.Size,
		HasICount: true, ICount: info.ICount,
	}
	if info.VMStateSize <= 0xffffffff {
		sn.VMStateSize = uint32(info.VMStateSize)
	}
	if err := writeSnapshotTable(m, append(snaps, sn), tableLen); err != nil {
		return graph.SnapshotInfo{}, err
	}
	return snapshotInfo(&sn), nil
}

// applySnapshot makes the snapshot's state the active one (img snapshot
// -a, QEMU's loadvm), including its virtual disk size. h is updated.
func applySnapshot(ctx context.Context, st Storage, h *Header, id, name string) error {
	snaps, _, err := readSnapshots(ctx, st, h)
	if err != nil {
		return err
	}
	i := findSnapshot(snaps, id, name)
	if i < 0 {
		return &snapError{"Failed to load snapshot", syscall.ENOENT}
	}
	sn := &snaps[i]
	if sn.L1TableOffset%uint64(h.ClusterSize()) != 0 || uint64(sn.L1Size)*8 > MaxL1Bytes {
		return &snapError{"Snapshot L1 table offset invalid", syscall.EFBIG}
	}
	diskSize := h.Size
	if sn.HasDiskSize {
		diskSize = sn.DiskSize
	}
	g := h.Geometry()
	newSize := uint64(sn.L1Size)
	if need := g.L1SizeFor(int64(diskSize)); need > newSize {
		newSize = need
	}
	if newSize*8 > MaxL1Bytes {
		return &snapError{"Active L1 table too large", syscall.EFBIG}
	}
	m, err := newMetaEditor(ctx, st, h)
	if err != nil {
		return err
	}
	snapL1, err := readL1(ctx, st, int64(sn.L1TableOffset), sn.L1Size)
	if err != nil {
		return fmt.Errorf("qcow2: reading the snapshot L1 table: %w", err)
	}
	oldOff, oldSize := int64(h.L1TableOffset), h.L1Size
	oldL1, err := readL1(ctx, st, oldOff, oldSize)
	if err != nil {
		return fmt.Errorf("qcow2: reading the L1 table: %w", err)
	}
	// 1. Count the new active table's references, write it to new
	// clusters; everything it reaches is shared with the snapshot, so
	// no COPIED flag. Only the net change is applied (what both states
	// reference keeps its refcount): a cluster the snapshot, the old
	// active state and another snapshot share is already at 3, the most
	// refcount_bits=2 holds, and stays there. Net increments now, before
	// the switch; net decrements after it.
	deltas := map[int64]int{}
	if err := treeDeltas(m, snapL1, +1, deltas); err != nil {
		return err
	}
	if err := treeDeltas(m, oldL1, -1, deltas); err != nil {
		return err
	}
	if err := applyDeltas(m, deltas, true); err != nil {
		return err
	}
	newL1 := make([]uint64, newSize)
	for i, e := range snapL1 {
		newL1[i] = e &^ FlagCopied
	}
	var newOff int64
	if newSize > 0 {
		if newOff, err = m.alloc(clustersFor(int64(newSize)*8, m.cs)); err != nil {
			return err
		}
		if err := st.WriteAt(ctx, encodeL1(newL1), newOff); err != nil {
			return fmt.Errorf("qcow2: writing the L1 table: %w", err)
		}
	}
	if err := m.flushRefs(); err != nil {
		return err
	}
	// 2. Switch: size, L1 size and L1 offset in one sector write.
	var f [24]byte
	be.PutUint64(f[0:], diskSize)
	be.PutUint32(f[8:], h.CryptMethod)
	be.PutUint32(f[12:], uint32(newSize))
	be.PutUint64(f[16:], uint64(newOff))
	if err := patchHeader(ctx, st, 24, f[:]); err != nil {
		return err
	}
	h.Size, h.L1Size, h.L1TableOffset = diskSize, uint32(newSize), uint64(newOff)
	// 3. Drop the old active state.
	if err := applyDeltas(m, deltas, false); err != nil {
		return err
	}
	if oldSize > 0 {
		if err := m.freeClusters(oldOff, int64(oldSize)*8); err != nil {
			return err
		}
	}
	if err := m.flushRefs(); err != nil {
		return err
	}
	return fixCopied(m, newOff, newL1)
}

// deleteSnapshot removes a snapshot and frees what only it used. h is
// updated.
func deleteSnapshot(ctx context.Context, st Storage, h *Header, id, name string) (graph.SnapshotInfo, error) {
	snaps, tableLen, err := readSnapshots(ctx, st, h)
	if err != nil {
		return graph.SnapshotInfo{}, err
	}
	i := findSnapshot(snaps, id, name)
	if i < 0 {
		return graph.SnapshotInfo{}, &snapError{"snapshot not found", syscall.ENOENT}
	}
	sn := snaps[i]
	m, err := newMetaEditor(ctx, st, h)
	if err != nil {
		return graph.SnapshotInfo{}, err
	}
	var snapL1 []uint64
	if sn.L1TableOffset%uint64(m.cs) == 0 && uint64(sn.L1Size)*8 <= MaxL1Bytes {
		if snapL1, err = readL1(ctx, st, int64(sn.L1TableOffset), sn.L1Size); err != nil {
			return graph.SnapshotInfo{}, fmt.Errorf("qcow2: reading the snapshot L1 table: %w", err)
		}
	}
	// 1. The table without the entry; from the header switch on, the
	// snapshot's clusters are at worst leaked.
	rest := append(append([]Snapshot(nil), snaps[:i]...), snaps[i+1:]...)
	if err := writeSnapshotTable(m, rest, tableLen); err != nil {
		return graph.SnapshotInfo{}, err
	}
	// 2. Free what it referenced, then mark what became unshared.
	if err := addTreeRefs(m, snapL1, -1); err != nil {
		return graph.SnapshotInfo{}, err
	}
	if len(snapL1) > 0 {
		if err := m.freeClusters(int64(sn.L1TableOffset), int64(len(snapL1))*8); err != nil {
			return graph.SnapshotInfo{}, err
		}
	}
	if err := m.flushRefs(); err != nil {
		return graph.SnapshotInfo{}, err
	}
	l1, err := readL1(ctx, st, int64(h.L1TableOffset), h.L1Size)
	if err != nil {
		return graph.SnapshotInfo{}, fmt.Errorf("qcow2: reading the L1 table: %w", err)
	}
	if err := fixCopied(m, int64(h.L1TableOffset), l1); err != nil {
		return graph.SnapshotInfo{}, err
	}
	return snapshotInfo(&sn), nil
}
