package graph

import (
	"context"
	"encoding/binary"
	"math/bits"
	"sync"

	"blockbackend/qmp/qapi"
)

// Dirty bitmaps (QEMU's BdrvDirtyBitmap): each node keeps a list of named
// bitmaps, one bit per granularity-sized chunk of its virtual size, that
// record which chunks were written (write, write-zeroes, discard passed
// down) while the bitmap is enabled. They live in memory here, on any
// node; a format that stores bitmaps in its image (qcow2's persistent
// bitmaps) loads them when it opens (Node.AddLoadedBitmap), and stores the
// persistent ones when it closes (Node.Bitmaps).
//
// QEMU's checks and messages (qemu-storage-daemon 7.2) are kept: a bitmap
// is busy while a job uses it (no job does yet), read-only while its
// image is open read-only (it cannot be cleared or removed), and
// inconsistent when the image says it was in use by a process that did
// not close it (it cannot be used, only removed).

// MaxBitmapName is QEMU's limit on a bitmap name (BDRV_BITMAP_MAX_NAME_SIZE).
const MaxBitmapName = 1023

// MaxBitmapBytes bounds the memory of one bitmap (1 GiB: 512 TiB at a
// 64 KiB granularity), so that a bitmap of a huge node, or a crafted
// image, cannot exhaust memory.
const MaxBitmapBytes = 1 << 30

// BitmapBytes is the memory a bitmap of this granularity over size bytes
// takes.
func BitmapBytes(gran, size int64) int64 { return ((size+gran-1)/gran + 7) / 8 }

// DirtyBitmap is a dirty bitmap of a node.
type DirtyBitmap struct {
	name string
	gran int64 // bytes per bit, a power of 2 of at least 512

	mu           sync.Mutex // guards everything below
	words        []uint64   // bit k is bit k%64 of words[k/64]
	nbits        int64
	size         int64 // the node's virtual size the bitmap covers
	enabled      bool
	persistent   bool
	readOnly     bool
	inconsistent bool
	busy         bool
	// modified: a bit was set or cleared since the bitmap was created or
	// loaded (a format may then keep the stored copy as it is).
	modified bool
}

// BitmapSpec describes a bitmap a driver loads from its image.
type BitmapSpec struct {
	Name         string
	Granularity  int64
	Enabled      bool
	ReadOnly     bool // the image is open read-only
	Inconsistent bool // the image marks it in use: kept, never used
	// Data is the stored bitmap, bit k of byte k/8 for chunk k (qcow2.txt
	// "Bitmaps": least significant bit first); nil for none set.
	Data []byte
}

func newBitmap(name string, gran, size int64) *DirtyBitmap {
	nb := (size + gran - 1) / gran
	return &DirtyBitmap{name: name, gran: gran, nbits: nb, size: size, words: make([]uint64, (nb+63)/64)}
}

// Name is the bitmap's name.
func (b *DirtyBitmap) Name() string { return b.name }

// Granularity is the number of bytes one bit covers.
func (b *DirtyBitmap) Granularity() int64 { return b.gran }

// Persistent reports whether the bitmap is to be stored in the image.
func (b *DirtyBitmap) Persistent() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.persistent
}

// State is a snapshot of the bitmap's flags.
type BitmapState struct {
	Enabled, Persistent, ReadOnly, Inconsistent, Busy, Modified bool
}

// State returns the bitmap's flags.
func (b *DirtyBitmap) State() BitmapState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return BitmapState{b.enabled, b.persistent, b.readOnly, b.inconsistent, b.busy, b.modified}
}

// SetReadOnly marks the bitmap read-only (its image was reopened
// read-only) or writable again.
func (b *DirtyBitmap) SetReadOnly(ro bool) {
	b.mu.Lock()
	b.readOnly = ro
	b.mu.Unlock()
}

// ClearModified is called by a format once it has stored the bitmap.
func (b *DirtyBitmap) ClearModified() {
	b.mu.Lock()
	b.modified = false
	b.mu.Unlock()
}

// Data returns the bitmap as bytes, bit k of byte k/8 for chunk k.
func (b *DirtyBitmap) Data() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]byte, (b.nbits+7)/8)
	var w [8]byte
	for i, x := range b.words {
		binary.LittleEndian.PutUint64(w[:], x)
		copy(out[i*8:], w[:])
	}
	return out
}

// Count is the number of dirty bytes (set bits times the granularity), as
// query-named-block-nodes shows it.
func (b *DirtyBitmap) Count() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, x := range b.words {
		n += bits.OnesCount64(x)
	}
	return int64(n) * b.gran
}

// Get reports whether the chunk holding byte off is dirty.
func (b *DirtyBitmap) Get(off int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	k := off / b.gran
	if k < 0 || k >= b.nbits {
		return false
	}
	return b.words[k/64]&(1<<(k%64)) != 0
}

// setRange marks the chunks of [off, off+n) dirty when the bitmap records.
func (b *DirtyBitmap) setRange(off, n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.enabled || n <= 0 {
		return
	}
	first := off / b.gran
	last := min((off+n-1)/b.gran, b.nbits-1)
	for k := first; k <= last; k++ {
		w, m := k/64, uint64(1)<<(k%64)
		if b.words[w]&m == 0 {
			b.words[w] |= m
			b.modified = true
		}
	}
}

// Resize follows a new virtual size: chunks past the end are dropped, new
// ones start clean. The graph calls it after a truncate; a format calls it
// before storing the bitmap, for resizes it made itself.
func (b *DirtyBitmap) Resize(size int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.size = size
	nb := (size + b.gran - 1) / b.gran
	if nb == b.nbits {
		return
	}
	words := make([]uint64, (nb+63)/64)
	copy(words, b.words)
	if nb%64 != 0 && int64(len(words)) > 0 {
		words[len(words)-1] &= (1 << (nb % 64)) - 1
	}
	b.words, b.nbits, b.modified = words, nb, true
}

// BitmapStore is an optional capability of formats that store persistent
// bitmaps in their image (qcow2).
type BitmapStore interface {
	// CanStoreBitmap checks that a new persistent bitmap called name with
	// this granularity can be stored; its error is the reason why not
	// (QEMU's wording, without the "Can't make bitmap" prefix).
	CanStoreBitmap(name string, granularity int64) error
	// RemoveStoredBitmap removes the bitmap called name from the image,
	// when it is stored there, freeing its clusters.
	RemoveStoredBitmap(ctx context.Context, name string) error
}

// AddLoadedBitmap attaches a bitmap that a driver read from its image
// (called while the driver opens the node); it is persistent.
func (n *Node) AddLoadedBitmap(s BitmapSpec, size int64) *DirtyBitmap {
	b := newBitmap(s.Name, s.Granularity, size)
	b.persistent, b.enabled, b.readOnly, b.inconsistent = true, s.Enabled && !s.Inconsistent, s.ReadOnly, s.Inconsistent
	for i := 0; i < len(s.Data) && i/8 < len(b.words); i++ {
		b.words[i/8] |= uint64(s.Data[i]) << (8 * (i % 8))
	}
	if b.nbits%64 != 0 && len(b.words) > 0 {
		b.words[len(b.words)-1] &= (1 << (b.nbits % 64)) - 1
	}
	n.bmMu.Lock()
	n.bitmaps = append(n.bitmaps, b)
	n.publishBitmapsLocked()
	n.bmMu.Unlock()
	return b
}

// Bitmaps returns the node's bitmaps, oldest first.
func (n *Node) Bitmaps() []*DirtyBitmap {
	n.bmMu.Lock()
	defer n.bmMu.Unlock()
	return append([]*DirtyBitmap(nil), n.bitmaps...)
}

func (n *Node) publishBitmapsLocked() {
	l := append([]*DirtyBitmap(nil), n.bitmaps...)
	n.bmList.Store(&l)
}

// markDirty records a change of [off, off+length) in every enabled bitmap.
// It is called by every request that changes data, after the driver.
func (n *Node) markDirty(off, length int64) {
	l := n.bmList.Load()
	if l == nil {
		return
	}
	for _, b := range *l {
		b.setRange(off, length)
	}
}

// resizeBitmaps follows a truncate.
func (n *Node) resizeBitmaps(size int64) {
	for _, b := range n.Bitmaps() {
		b.Resize(size)
	}
}

// BitmapInfo is QAPI's BlockDirtyInfo.
type BitmapInfo struct {
	Name         string `json:"name,omitempty"` // optional in QAPI; never empty here
	Count        int64  `json:"count"`
	Granularity  uint32 `json:"granularity"`
	Recording    bool   `json:"recording"`
	Busy         bool   `json:"busy"`
	Persistent   bool   `json:"persistent"`
	Inconsistent bool   `json:"inconsistent,omitempty"`
}

// BitmapInfos lists the node's bitmaps, newest first, as QEMU does.
func (n *Node) BitmapInfos() []BitmapInfo {
	l := n.Bitmaps()
	if len(l) == 0 {
		return nil
	}
	out := make([]BitmapInfo, 0, len(l))
	for i := len(l) - 1; i >= 0; i-- {
		b := l[i]
		st := b.State()
		out = append(out, BitmapInfo{
			Name: b.name, Count: b.Count(), Granularity: uint32(b.gran),
			Recording: st.Enabled, Busy: st.Busy, Persistent: st.Persistent, Inconsistent: st.Inconsistent,
		})
	}
	return out
}

func (n *Node) findBitmap(name string) *DirtyBitmap {
	n.bmMu.Lock()
	defer n.bmMu.Unlock()
	for _, b := range n.bitmaps {
		if b.name == name {
			return b
		}
	}
	return nil
}

// Checks of QEMU's bdrv_dirty_bitmap_check.
const (
	bmCheckBusy = 1 << iota
	bmCheckRO
	bmCheckInconsistent
)

func (b *DirtyBitmap) check(flags int) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case flags&bmCheckBusy != 0 && b.busy:
		return qapi.Errorf(qapi.GenericError, "Bitmap '%s' is currently in use by another operation and cannot be used", b.name)
	case flags&bmCheckRO != 0 && b.readOnly:
		return qapi.Errorf(qapi.GenericError, "Bitmap '%s' is readonly and cannot be modified", b.name)
	case flags&bmCheckInconsistent != 0 && b.inconsistent:
		return qapi.Errorf(qapi.GenericError, "Bitmap '%s' is inconsistent and cannot be used", b.name)
	}
	return nil
}

// BitmapAddOptions are block-dirty-bitmap-add's arguments.
type BitmapAddOptions struct {
	Node        string
	Name        string
	Granularity *uint32 // nil: the default
	Persistent  bool
	Disabled    bool
}

// defaultGranularity is QEMU's: the node's cluster size, at least 4 KiB
// and at most 64 KiB; 64 KiB without a cluster size.
func (n *Node) defaultGranularity() int64 {
	if c, ok := n.Instance().(interface{ ClusterSize() int64 }); ok {
		if cs := c.ClusterSize(); cs > 0 {
			return min(max(cs, 4096), 65536)
		}
	}
	return 65536
}

// AddBitmap is block-dirty-bitmap-add.
func (g *Graph) AddBitmap(ctx context.Context, o BitmapAddOptions) error {
	if o.Name == "" {
		return qapi.Errorf(qapi.GenericError, "Bitmap name cannot be empty")
	}
	n, err := g.FindDevice(o.Node, o.Node)
	if err != nil {
		return qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	var gran int64
	if o.Granularity != nil {
		gran = int64(*o.Granularity)
		if gran < 512 || gran&(gran-1) != 0 {
			return qapi.Errorf(qapi.GenericError, "Granularity must be power of 2 and at least 512")
		}
	} else {
		gran = n.defaultGranularity()
	}
	inst, err := n.begin()
	if err != nil {
		return err
	}
	defer n.end()
	if o.Persistent {
		s, ok := inst.(BitmapStore)
		if !ok {
			return qapi.Errorf(qapi.GenericError, "Can't store persistent bitmaps to %s: Operation not supported", n.name)
		}
		if err := s.CanStoreBitmap(o.Name, gran); err != nil {
			return qapi.Errorf(qapi.GenericError, "Can't make bitmap '%s' persistent in '%s': %s", o.Name, n.name, err.Error())
		}
	}
	n.bmMu.Lock()
	defer n.bmMu.Unlock()
	for _, b := range n.bitmaps {
		if b.name == o.Name {
			return qapi.Errorf(qapi.GenericError, "Bitmap already exists: %s", o.Name)
		}
	}
	if len(o.Name) > MaxBitmapName {
		return qapi.Errorf(qapi.GenericError, "Bitmap name too long: %s", o.Name)
	}
	if BitmapBytes(gran, n.SizeNow()) > MaxBitmapBytes {
		return qapi.Errorf(qapi.GenericError, "Bitmap '%s' would take more than %d bytes of memory: use a coarser granularity", o.Name, MaxBitmapBytes)
	}
	b := newBitmap(o.Name, gran, n.SizeNow())
	b.enabled, b.persistent = !o.Disabled, o.Persistent
	n.bitmaps = append(n.bitmaps, b)
	n.publishBitmapsLocked()
	return nil
}

// lookupBitmap finds a node and one of its bitmaps with QEMU's messages
// (block_dirty_bitmap_lookup).
func (g *Graph) lookupBitmap(node, name string) (*Node, *DirtyBitmap, error) {
	n, err := g.FindNode(node)
	if err != nil {
		return nil, nil, qapi.Errorf(qapi.GenericError, "Node '%s' not found", node)
	}
	b := n.findBitmap(name)
	if b == nil {
		return nil, nil, qapi.Errorf(qapi.GenericError, "Dirty bitmap '%s' not found", name)
	}
	return n, b, nil
}

// RemoveBitmap is block-dirty-bitmap-remove: a persistent bitmap is
// removed from the image too.
func (g *Graph) RemoveBitmap(ctx context.Context, node, name string) error {
	n, b, err := g.lookupBitmap(node, name)
	if err != nil {
		return err
	}
	if err := b.check(bmCheckBusy | bmCheckRO); err != nil {
		return err
	}
	if b.Persistent() {
		inst, err := n.begin()
		if err != nil {
			return err
		}
		if s, ok := inst.(BitmapStore); ok {
			err = s.RemoveStoredBitmap(ctx, name)
		}
		n.end()
		if err != nil {
			return err
		}
	}
	n.bmMu.Lock()
	defer n.bmMu.Unlock()
	for i, x := range n.bitmaps {
		if x == b {
			n.bitmaps = append(n.bitmaps[:i:i], n.bitmaps[i+1:]...)
			break
		}
	}
	n.publishBitmapsLocked()
	return nil
}

// ClearBitmap is block-dirty-bitmap-clear.
func (g *Graph) ClearBitmap(node, name string) error {
	_, b, err := g.lookupBitmap(node, name)
	if err != nil {
		return err
	}
	if err := b.check(bmCheckBusy | bmCheckRO | bmCheckInconsistent); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, w := range b.words {
		if w != 0 {
			b.words[i] = 0
			b.modified = true
		}
	}
	return nil
}

// EnableBitmap is block-dirty-bitmap-enable (enable) and -disable.
func (g *Graph) EnableBitmap(node, name string, enable bool) error {
	_, b, err := g.lookupBitmap(node, name)
	if err != nil {
		return err
	}
	if err := b.check(bmCheckBusy | bmCheckInconsistent); err != nil {
		return err
	}
	b.mu.Lock()
	b.enabled = enable
	b.mu.Unlock()
	return nil
}

// BitmapRef names a bitmap: on a given node, or (Node "") on the node of
// the command.
type BitmapRef struct {
	Node, Name string
}

// MergeBitmaps is block-dirty-bitmap-merge: the bits of every source are
// added to target (any granularity; the same size), with QEMU's checks:
// the target must be usable and writable, the sources usable.
func (g *Graph) MergeBitmaps(node, target string, sources []BitmapRef) error {
	_, dst, err := g.lookupBitmap(node, target)
	if err != nil {
		return err
	}
	if err := dst.check(bmCheckBusy | bmCheckRO | bmCheckInconsistent); err != nil {
		return err
	}
	var srcs []*DirtyBitmap
	for _, r := range sources {
		n := r.Node
		if n == "" {
			n = node
		}
		_, src, err := g.lookupBitmap(n, r.Name)
		if err != nil {
			return err
		}
		if err := src.check(bmCheckBusy | bmCheckInconsistent); err != nil {
			return err
		}
		srcs = append(srcs, src)
	}
	for _, src := range srcs {
		if err := dst.merge(src); err != nil {
			return err
		}
	}
	return nil
}

// merge adds src's dirty chunks to b.
func (b *DirtyBitmap) merge(src *DirtyBitmap) error {
	if src == b {
		return nil
	}
	src.mu.Lock()
	words, nbits, gran := append([]uint64(nil), src.words...), src.nbits, src.gran
	srcSize := src.size
	src.mu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	if srcSize != b.size {
		return qapi.Errorf(qapi.GenericError, "Bitmaps are of different sizes (destination size is %d, source size is %d) and can't be merged", b.size, srcSize)
	}
	for k := int64(0); k < nbits; k++ {
		if words[k/64]&(1<<(k%64)) == 0 {
			continue
		}
		first := k * gran / b.gran
		last := min(((k+1)*gran-1)/b.gran, b.nbits-1)
		for j := first; j <= last; j++ {
			w, m := j/64, uint64(1)<<(j%64)
			if b.words[w]&m == 0 {
				b.words[w] |= m
				b.modified = true
			}
		}
	}
	return nil
}
