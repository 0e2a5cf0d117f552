package frontend

import (
	"fmt"
	"sync"
	"unsafe"

	vu "blockbackend/vhostuser"

	"golang.org/x/sys/unix"
)

const pageSize = 4096

// regionGap is the hole left in guest-physical space between regions, so
// that a backend that confuses user addresses, guest addresses and mmap
// offsets (or assumes one contiguous region) fails visibly.
const regionGap = 1 << 30

// guestMem is the "guest RAM": one memfd mapped once here and described to
// the backend as Regions regions with different guest addresses and mmap
// offsets. Allocation is a bump pointer per region (nothing is freed
// before Close); a block never crosses a region, so every buffer is
// contiguous in guest-physical space.
type guestMem struct {
	fd      int
	mem     []byte
	regions []vu.MemRegion
	offs    []uint64 // offset of each region in mem (= its mmap offset)

	mu   sync.Mutex // guards next, rr
	next []uint64   // bump pointer per region, relative to the region
	rr   int        // region to try first
}

func newGuestMem(size uint64, nregions int) (*guestMem, error) {
	if nregions < 1 {
		nregions = 1
	}
	per := (size/uint64(nregions) + pageSize - 1) &^ (pageSize - 1)
	if per < pageSize {
		per = pageSize
	}
	total := per * uint64(nregions)
	fd, err := unix.MemfdCreate("vhost-user-frontend-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("frontend: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(total)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("frontend: sizing guest memory to %d bytes: %w", total, err)
	}
	mem, err := unix.Mmap(fd, 0, int(total), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("frontend: mmap guest memory: %w", err)
	}
	g := &guestMem{fd: fd, mem: mem, next: make([]uint64, nregions)}
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	for i := 0; i < nregions; i++ {
		off := uint64(i) * per
		g.offs = append(g.offs, off)
		g.regions = append(g.regions, vu.MemRegion{
			GuestAddr:  off + uint64(i)*regionGap,
			Size:       per,
			UserAddr:   base + off,
			MmapOffset: off,
		})
	}
	return g, nil
}

func (g *guestMem) close() {
	if g.mem != nil {
		unix.Munmap(g.mem)
		g.mem = nil
	}
	if g.fd >= 0 {
		unix.Close(g.fd)
		g.fd = -1
	}
}

// alloc returns n bytes aligned to align (a power of two), zeroed, from the
// next region with room, or nil when guest memory is exhausted.
func (g *guestMem) alloc(n int, align uint64) []byte {
	if n <= 0 {
		n = 1
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	for k := range g.regions {
		i := (g.rr + k) % len(g.regions)
		start := (g.next[i] + align - 1) &^ (align - 1)
		if start+uint64(n) > g.regions[i].Size {
			continue
		}
		g.next[i] = start + uint64(n)
		g.rr = (i + 1) % len(g.regions)
		off := g.offs[i] + start
		b := g.mem[off : off+uint64(n) : off+uint64(n)]
		clear(b)
		return b
	}
	return nil
}

// offset returns b's offset in the mapping, or false if b is not inside it.
func (g *guestMem) offset(b []byte) (uint64, bool) {
	if len(b) == 0 || len(g.mem) == 0 {
		return 0, false
	}
	base := uintptr(unsafe.Pointer(&g.mem[0]))
	p := uintptr(unsafe.Pointer(&b[0]))
	if p < base || p+uintptr(len(b)) > base+uintptr(len(g.mem)) {
		return 0, false
	}
	return uint64(p - base), true
}

// gpa translates a mapping offset to a guest-physical address. n bytes
// from off must lie in one region.
func (g *guestMem) gpa(off, n uint64) (uint64, bool) {
	for i, r := range g.regions {
		if off >= g.offs[i] && off+n <= g.offs[i]+r.Size {
			return r.GuestAddr + off - g.offs[i], true
		}
	}
	return 0, false
}

// bufGPA is the guest address of b, a buffer inside guest memory.
func (g *guestMem) bufGPA(b []byte) (uint64, bool) {
	off, ok := g.offset(b)
	if !ok {
		return 0, false
	}
	return g.gpa(off, uint64(len(b)))
}

// userAddr is the frontend's virtual address of b (what SET_VRING_ADDR
// carries).
func (g *guestMem) userAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }
