// Package virtq is the device side of virtio virtqueues living in memory
// that a vhost-user frontend shares with us: the memory table (guest
// physical and frontend user addresses mapped into our address space),
// split and packed rings with indirect descriptors and event-index
// notification suppression, vhost-user inflight I/O tracking, and the
// dirty log used during live migration.
//
// Everything in the shared memory belongs to a guest that may be hostile:
// every address and length is checked against the memory table before it
// is turned into a slice, chains are bounded and loops cannot run away,
// and indices read from the rings are validated before use. A request
// that breaks the rules comes back with Chain.Err set (the device then
// answers it with an error status); a ring whose very structure is broken
// makes Pop fail, and the caller stops serving that ring.
//
// It is not a virtio driver, and it does no IOMMU translation (no
// VIRTIO_F_ACCESS_PLATFORM) or postcopy.
//
// Specifications: virtio 1.2, 2.7 (split virtqueues), 2.8 (packed
// virtqueues), 2.7.10 and 2.8.10 (event suppression); QEMU's
// docs/interop/vhost-user.rst (memory regions, vring base encoding,
// "Inflight I/O tracking", dirty logging).
package virtq

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrBadAddress is wrapped by every error about a guest address or length
// that the memory table does not cover.
var ErrBadAddress = errors.New("address outside guest memory")

// Region is one memory region as the frontend describes it: GuestAddr is
// its guest physical address, UserAddr its address in the frontend's
// process (vring addresses are given in that space), and FD with
// MmapOffset where its bytes are.
type Region struct {
	GuestAddr, Size, UserAddr, MmapOffset uint64
	FD                                    int
}

// mapping is one mmap of a region, shared between successive Memory
// tables (ADD/REM_MEM_REG build a new table from the old one) and
// unmapped when the last table using it closes.
type mapping struct {
	Region
	data []byte // the region's bytes
	full []byte // the whole mmap, for munmap
	refs atomic.Int32
}

func (m *mapping) release() {
	if m.refs.Add(-1) == 0 {
		_ = unix.Munmap(m.full)
	}
}

// Memory is an immutable memory table. Its methods may be called from any
// number of goroutines.
type Memory struct {
	maps   []*mapping // sorted by GuestAddr
	closed atomic.Bool
}

// maxRegionSize bounds one region (1 TiB): larger is no real guest and
// would only let arithmetic overflow.
const maxRegionSize = 1 << 40

// Map maps the regions. It takes ownership of every region's FD and closes
// them all, whether or not it succeeds.
func Map(regions []Region) (*Memory, error) {
	defer func() {
		for _, r := range regions {
			if r.FD >= 0 {
				unix.Close(r.FD)
			}
		}
	}()
	m := &Memory{}
	for _, r := range regions {
		mp, err := mapRegion(r)
		if err != nil {
			m.Close()
			return nil, err
		}
		if err := m.insert(mp); err != nil {
			mp.release()
			m.Close()
			return nil, err
		}
	}
	return m, nil
}

func mapRegion(r Region) (*mapping, error) {
	if r.Size == 0 || r.Size > maxRegionSize || r.GuestAddr+r.Size < r.GuestAddr ||
		r.UserAddr+r.Size < r.UserAddr || r.MmapOffset > maxRegionSize {
		return nil, fmt.Errorf("memory region at guest address %#x of %d bytes (offset %d) is out of range", r.GuestAddr, r.Size, r.MmapOffset)
	}
	if r.FD < 0 {
		return nil, fmt.Errorf("memory region at guest address %#x has no file descriptor", r.GuestAddr)
	}
	// mmap wants a page-aligned offset: map from the page start and slice.
	page := uint64(os.Getpagesize())
	start := r.MmapOffset &^ (page - 1)
	full, err := unix.Mmap(r.FD, int64(start), int(r.Size+r.MmapOffset-start), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping the memory region at guest address %#x (%d bytes): %w", r.GuestAddr, r.Size, err)
	}
	r.FD = -1
	mp := &mapping{Region: r, full: full, data: full[r.MmapOffset-start:]}
	mp.refs.Store(1)
	return mp, nil
}

// insert adds mp (taking its reference), refusing overlaps in either
// address space.
func (m *Memory) insert(mp *mapping) error {
	for _, o := range m.maps {
		if overlap(o.GuestAddr, o.Size, mp.GuestAddr, mp.Size) {
			return fmt.Errorf("memory region at guest address %#x overlaps the one at %#x", mp.GuestAddr, o.GuestAddr)
		}
		if overlap(o.UserAddr, o.Size, mp.UserAddr, mp.Size) {
			return fmt.Errorf("memory region at user address %#x overlaps the one at %#x", mp.UserAddr, o.UserAddr)
		}
	}
	i, _ := slices.BinarySearchFunc(m.maps, mp.GuestAddr, func(a *mapping, g uint64) int {
		switch {
		case a.GuestAddr < g:
			return -1
		case a.GuestAddr > g:
			return 1
		}
		return 0
	})
	m.maps = slices.Insert(m.maps, i, mp)
	return nil
}

func overlap(a, an, b, bn uint64) bool { return a < b+bn && b < a+an }

// maxRegions bounds the table (GET_MAX_MEM_SLOTS answers less).
const maxRegions = 509

// Add returns a new table with r added; the receiver stays valid until it
// is closed. It takes ownership of r.FD.
func (m *Memory) Add(r Region) (*Memory, error) {
	if len(m.maps) >= maxRegions {
		if r.FD >= 0 {
			unix.Close(r.FD)
		}
		return nil, fmt.Errorf("too many memory regions (%d)", len(m.maps))
	}
	mp, err := mapRegion(r)
	if r.FD >= 0 {
		unix.Close(r.FD)
	}
	if err != nil {
		return nil, err
	}
	n := m.clone(nil)
	if err := n.insert(mp); err != nil {
		mp.release()
		n.Close()
		return nil, err
	}
	return n, nil
}

// Remove returns a new table without the region that has r's guest
// address, size and user address. It closes r.FD if it has one.
func (m *Memory) Remove(r Region) (*Memory, error) {
	if r.FD >= 0 {
		unix.Close(r.FD)
	}
	for _, o := range m.maps {
		if o.GuestAddr == r.GuestAddr && o.Size == r.Size && o.UserAddr == r.UserAddr {
			return m.clone(o), nil
		}
	}
	return nil, fmt.Errorf("no memory region at guest address %#x of %d bytes to remove", r.GuestAddr, r.Size)
}

func (m *Memory) clone(skip *mapping) *Memory {
	n := &Memory{maps: make([]*mapping, 0, len(m.maps)+1)}
	for _, o := range m.maps {
		if o != skip {
			o.refs.Add(1)
			n.maps = append(n.maps, o)
		}
	}
	return n
}

// Close releases the table's mappings. Slices obtained from it must no
// longer be used. Close of a nil Memory, or a second Close, does nothing.
func (m *Memory) Close() {
	if m == nil || m.closed.Swap(true) {
		return
	}
	for _, mp := range m.maps {
		mp.release()
	}
}

// Regions lists the table's regions (with FD -1).
func (m *Memory) Regions() []Region {
	rs := make([]Region, len(m.maps))
	for i, mp := range m.maps {
		rs[i] = mp.Region
	}
	return rs
}

// find returns the mapping holding guest address (or, with user, frontend
// user address) addr and addr's offset in it.
func (m *Memory) find(addr uint64, user bool) (*mapping, uint64) {
	for _, mp := range m.maps {
		base := mp.GuestAddr
		if user {
			base = mp.UserAddr
		}
		if addr >= base && addr-base < mp.Size {
			return mp, addr - base
		}
	}
	return nil, 0
}

func (m *Memory) slice(addr, n uint64, user bool) ([]byte, error) {
	mp, off := m.find(addr, user)
	if mp == nil || n > mp.Size-off {
		space := "guest"
		if user {
			space = "user"
		}
		return nil, fmt.Errorf("%s address %#x+%d: %w", space, addr, n, ErrBadAddress)
	}
	return mp.data[off : off+n : off+n], nil
}

// Guest returns the n bytes at guest physical address addr, which must lie
// in one region.
func (m *Memory) Guest(addr, n uint64) ([]byte, error) { return m.slice(addr, n, false) }

// User returns the n bytes at frontend user address addr, which must lie
// in one region.
func (m *Memory) User(addr, n uint64) ([]byte, error) { return m.slice(addr, n, true) }

// userToGuest translates a frontend user address into a guest physical
// one (for the dirty log).
func (m *Memory) userToGuest(addr uint64) (uint64, bool) {
	mp, off := m.find(addr, true)
	if mp == nil {
		return 0, false
	}
	return mp.GuestAddr + off, true
}

// AppendIOV appends the bytes at guest address [addr, addr+n) to iov as
// one slice per region they span (a guest buffer may cross from one
// region into an adjacent one).
func (m *Memory) AppendIOV(iov [][]byte, addr, n uint64) ([][]byte, error) {
	if addr+n < addr {
		return iov, fmt.Errorf("guest address %#x+%d: %w", addr, n, ErrBadAddress)
	}
	for n > 0 {
		mp, off := m.find(addr, false)
		if mp == nil {
			return iov, fmt.Errorf("guest address %#x+%d: %w", addr, n, ErrBadAddress)
		}
		k := min(n, mp.Size-off)
		iov = append(iov, mp.data[off:off+k:off+k])
		addr += k
		n -= k
	}
	return iov, nil
}

// ptr returns a pointer into b at off; callers have checked the bounds.
func ptr(b []byte, off int) unsafe.Pointer { return unsafe.Pointer(&b[off]) }
