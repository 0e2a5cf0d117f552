package virtq

import (
	"encoding/binary"
	"sync/atomic"
	"unsafe"
)

// Access to ring fields that the guest reads or writes concurrently goes
// through 32-bit atomic operations on the naturally aligned word holding
// the field: Go has no 16-bit atomics, and an atomic access is also what
// keeps the compiler from caching or reordering it and gives the
// acquire/release ordering the rings need. New checks the ring alignments
// the specification demands, so a 16-bit field never straddles a word and
// its word never leaves the page the field is on.

func word(p unsafe.Pointer) (*uint32, uint) {
	a := uintptr(p)
	return (*uint32)(unsafe.Add(p, -int(a&3))), uint(a&3) * 8
}

// load16 reads the little-endian 16-bit field at p (2-byte aligned).
func load16(p unsafe.Pointer) uint16 {
	w, sh := word(p)
	return uint16(atomic.LoadUint32(w) >> sh)
}

// store16 writes the 16-bit field at p, leaving the other half of its word
// as it is even if the guest writes it at the same time.
func store16(p unsafe.Pointer, v uint16) {
	w, sh := word(p)
	for {
		old := atomic.LoadUint32(w)
		nw := old&^(0xffff<<sh) | uint32(v)<<sh
		if old == nw || atomic.CompareAndSwapUint32(w, old, nw) {
			return
		}
	}
}

// fenceWord is the target of fence's atomic operation.
var fenceWord atomic.Uint32

// fence is a full memory barrier: a store before it is visible before a
// load after it (needed where the device publishes an index and then reads
// the driver's event index, and the driver does the mirror image).
func fence() { fenceWord.Add(0) }

var le = binary.LittleEndian

// DirtyLog is the live-migration dirty bitmap the frontend shares with
// SET_LOG_BASE: one bit per 4 KiB page of guest physical memory.
type DirtyLog struct {
	words []uint32
}

// NewDirtyLog wraps the shared bitmap b (its length is used as a multiple
// of 4 bytes).
func NewDirtyLog(b []byte) *DirtyLog {
	if len(b) < 4 {
		return &DirtyLog{}
	}
	return &DirtyLog{words: unsafe.Slice((*uint32)(unsafe.Pointer(&b[0])), len(b)/4)}
}

const logPage = 4096

// Mark records that the device wrote guest bytes [gpa, gpa+n). Pages
// beyond the bitmap are ignored: the frontend sized it for its memory.
func (l *DirtyLog) Mark(gpa, n uint64) {
	if l == nil || n == 0 {
		return
	}
	last := (gpa + n - 1) / logPage
	if last < gpa/logPage { // overflow
		return
	}
	for p := gpa / logPage; p <= last; p++ {
		i := p / 32
		if i >= uint64(len(l.words)) {
			return
		}
		atomic.OrUint32(&l.words[i], 1<<(p%32))
	}
}
