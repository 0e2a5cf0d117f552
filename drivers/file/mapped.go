package file

import (
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Mapped I/O, for files on tmpfs only (cache.direct=off).
//
// Every page of a tmpfs file is in memory, so a copy to or from a shared
// mapping of it never waits for a device, and there is no writeback to
// write-protect pages again. The copy then beats preadv/pwritev: no
// syscall and no per-page lookup, and writes are not serialised on the
// inode lock, which buffered writes take for their whole length (1 MiB
// writes at queue depth 4 ran at one core's copy speed, 4.5-5.5 GB/s,
// against 9-13 GB/s for copies into the mapping on two cores). On other
// file systems a fault may wait for the disk while holding the goroutine's
// P, and pages written back are write-protected so that the next write
// faults: there the syscalls stay.
//
// The mapping is only used for requests of mapReadMin and more, over
// ranges inside the size the file is known to have whose pages are all in
// memory (see read and write). A fault (SIGBUS: another process shrank the file, or tmpfs is full
// when a hole gets its page) is turned into a panic by SetPanicOnFault,
// recovered, and the request is done again with the syscall, which
// reports the error as it would have without the mapping. A write that
// faulted half-way is harmless: the syscall writes all of it again.

const (
	tmpfsMagic = 0x01021994
	mapChunk   = 1 << 30  // mappings are made in multiples of this
	mapMax     = 1 << 46  // nor larger than this: the rest of a file uses syscalls
	mapReadMin = 64 << 10 // smaller requests use preadv/pwritev (see read)
)

// mapping is a file's shared mapping; nil when the file is not mapped.
type mapping struct {
	fd       int
	writable bool
	view     atomic.Pointer[mapView]

	reads atomic.Int64 // reads served through the mapping (for tests)

	mu     sync.Mutex // serialises new mappings
	maps   [][]byte   // every mapping made, unmapped by close
	closed bool
}

// mapView is the mapping in use and how much of it is inside the file.
type mapView struct {
	data []byte
	size int64 // bytes of data known to be inside the file, <= len(data)
}

// newMapping maps fd when it is a tmpfs file; otherwise, or when mmap
// fails, it returns nil and I/O goes through syscalls.
func newMapping(fd int, writable bool) *mapping {
	if strconv.IntSize < 64 {
		return nil // no address space for mappings of image size
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil || fs.Type != tmpfsMagic {
		return nil
	}
	m := &mapping{fd: fd, writable: writable}
	if !m.resync() {
		m.close()
		return nil
	}
	return m
}

// resync sets the known size to the file's size, mapping more if needed.
// It reports false when the file cannot be stat'ed or mapped.
func (m *mapping) resync() bool {
	var st unix.Stat_t
	if err := unix.Fstat(m.fd, &st); err != nil {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	v := m.view.Load()
	size := st.Size
	if v == nil || size > int64(len(v.data)) {
		length := min(alignUp(max(size+size/2, 1), mapChunk), mapMax)
		prot := unix.PROT_READ
		if m.writable {
			prot |= unix.PROT_WRITE
		}
		data, err := unix.Mmap(m.fd, 0, int(length), prot, unix.MAP_SHARED)
		if err != nil {
			return false
		}
		m.maps = append(m.maps, data)
		v = &mapView{data: data}
	}
	m.view.Store(&mapView{data: v.data, size: min(size, int64(len(v.data)))})
	return true
}

// grew records that the file now has at least size bytes (after a write
// or extension through a syscall).
func (m *mapping) grew(size int64) {
	for {
		v := m.view.Load()
		if size <= v.size {
			return
		}
		if size > int64(len(v.data)) {
			m.resync()
			return
		}
		if m.view.CompareAndSwap(v, &mapView{data: v.data, size: size}) {
			return
		}
	}
}

// shrink lowers the known size to size before the file is shrunk.
func (m *mapping) shrink(size int64) {
	for {
		v := m.view.Load()
		if size >= v.size || m.view.CompareAndSwap(v, &mapView{data: v.data, size: size}) {
			return
		}
	}
}

// inside returns the mapped bytes [off, off+n) when they lie inside the
// known size and every page of them is in memory (see read).
func (m *mapping) inside(off, n int64) ([]byte, bool) {
	v := m.view.Load()
	if off < 0 || n < 0 || off+n > v.size || off+n < off || !resident(v.data, off, n) {
		return nil, false
	}
	return v.data[off : off+n], true
}

// read copies [off, off+len(iov)) into iov; false sends the request to
// the syscall path.
//
// A read fault on a hole of a tmpfs file allocates a page, where preadv
// reads the hole as zeros and leaves it: a guest reading its sparse disk
// would fill the file. So a read goes through the mapping only when
// mincore(2) finds every page of its range in memory (a hole has no page;
// nor has a page swapped out, which preadv then reads), and only from
// mapReadMin up, where that syscall costs little against the copy.
// (lseek(SEEK_HOLE) cannot be bounded: in a file without holes it walks
// every page to the end, and made 1 MiB reads of a 1 GiB image 50 times
// slower.)
func (m *mapping) read(off int64, iov [][]byte) bool {
	n := iovBytes(iov)
	if n < mapReadMin {
		return false
	}
	src, ok := m.inside(off, n)
	if !ok {
		return false
	}
	m.reads.Add(1)
	return m.guard(func() {
		for _, b := range iov {
			src = src[copy(b, src):]
		}
	})
}

// resident reports whether every page of data[off, off+n) is in memory.
func resident(data []byte, off, n int64) bool {
	const page = 4096
	var vec [512]byte // one byte per page: 2 MiB per call
	start, end := alignDown(off, page), min(alignUp(off+n, page), int64(len(data)))
	for start < end {
		l := min(end-start, int64(len(vec))*page)
		_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&data[start])), uintptr(l), uintptr(unsafe.Pointer(&vec[0])))
		if e != 0 {
			return false
		}
		for _, b := range vec[:(l+page-1)/page] {
			if b&1 == 0 {
				return false
			}
		}
		start += l
	}
	return true
}

// write copies iov to [off, off+len(iov)); false sends the request to
// the syscall path.
//
// Like reads, only from mapReadMin up and where every page is in memory:
// a write fault on a hole allocates a page and zeroes it before the copy
// overwrites it, page by page, which made a convert into a new file on
// tmpfs a third slower than pwritev. The mapping's gain is on pages that
// exist: no inode lock, so large writes copy on every core.
func (m *mapping) write(off int64, iov [][]byte) bool {
	if !m.writable {
		return false
	}
	n := iovBytes(iov)
	if n < mapReadMin {
		return false
	}
	dst, ok := m.inside(off, n)
	if !ok {
		return false
	}
	return m.guard(func() {
		for _, b := range iov {
			dst = dst[copy(dst, b):]
		}
	})
}

// guard runs a copy that touches the mapping, reporting false if it
// faulted. After a fault the known size is taken from the file again.
func (m *mapping) guard(copyFn func()) (ok bool) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			if _, fault := r.(interface{ Addr() uintptr }); !fault {
				panic(r)
			}
			if _, rt := r.(runtime.Error); !rt {
				panic(r)
			}
			m.resync()
			ok = false
		}
	}()
	copyFn()
	return true
}

// close unmaps everything. The caller guarantees that no request is using
// the mapping (the graph drains I/O before a reopen commit and a close).
func (m *mapping) close() {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	m.view.Store(&mapView{})
	for _, d := range m.maps {
		_ = unix.Munmap(d)
	}
	m.maps = nil
}
