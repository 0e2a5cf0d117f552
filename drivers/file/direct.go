package file

import (
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// bounceSize is the largest window a bounce buffer carries; longer
// unaligned requests go through it in several steps.
const bounceSize = 1 << 20

// maxAlign bounds the alignments we believe from the kernel or a probe.
const maxAlign = 1 << 16

// probeAlignment finds the request (offset and length) alignment and the
// buffer address alignment that O_DIRECT I/O on fd needs.
//
// statx(STATX_DIOALIGN) (Linux 6.1) answers directly. Without it we probe
// as QEMU does, with reads of growing aligned sizes at offset 0; a read
// that succeeds with data settles it. An empty file answers every size, so
// the probe is then inconclusive and we take 4096, which every device with
// 512- or 4096-byte sectors accepts.
func probeAlignment(fd int) (align, mem int64) {
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx); err == nil &&
		stx.Mask&unix.STATX_DIOALIGN != 0 && stx.Dio_offset_align != 0 {
		align = sanitizeAlign(int64(stx.Dio_offset_align))
		mem = sanitizeAlign(int64(stx.Dio_mem_align))
		return align, mem
	}
	return probeByReads(fd)
}

func probeByReads(fd int) (align, mem int64) {
	const fallback = 4096
	raw := make([]byte, 2*maxAlign)
	buf := alignedSlice(raw, 4096, maxAlign)
	sizes := []int64{512, 1024, 2048, 4096}
	align = fallback
	for _, a := range sizes {
		m, err := unix.Pread(fd, buf[:a], 0)
		if err == unix.EINVAL {
			continue
		}
		if err == nil && m > 0 {
			align = a
		}
		break
	}
	mem = fallback
	for _, m := range sizes {
		if m >= 4096 {
			break
		}
		k, err := unix.Pread(fd, raw[alignOffset(raw, 4096)+int(m):][:align], 0)
		if err == unix.EINVAL {
			continue
		}
		if err == nil && k > 0 {
			mem = m
		}
		break
	}
	return align, mem
}

// sanitizeAlign keeps an alignment a power of two in [1, maxAlign].
func sanitizeAlign(a int64) int64 {
	if a <= 0 {
		return 1
	}
	if a > maxAlign || a&(a-1) != 0 {
		return 4096
	}
	return a
}

func alignOffset(b []byte, a int) int {
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return int((uintptr(a) - p%uintptr(a)) % uintptr(a))
}

// alignedSlice returns n bytes of b starting at an address aligned to a.
func alignedSlice(b []byte, a, n int) []byte {
	o := alignOffset(b, a)
	return b[o : o+n : o+n]
}

// newBouncePool makes bounce buffers of bounceSize (a multiple of any
// alignment we accept) whose address meets the memory alignment (at least
// a page, which no device refuses).
func newBouncePool(align, memAlign int64) *sync.Pool {
	a := max(int(memAlign), 4096)
	size := max(bounceSize, int(align))
	return &sync.Pool{New: func() any {
		b := alignedSlice(make([]byte, size+a), a, size)
		return &b
	}}
}

// rangeTracker orders writes under O_DIRECT. Plain (aligned) writes may
// overlap each other freely; a serialising request (a read-modify-write)
// waits for every overlapping write that arrived before it, and every
// overlapping write that arrives after it waits for it. Waiting follows
// arrival order, so nothing starves. This is QEMU's serialising-request
// rule, and what keeps concurrent unaligned writes into one block from
// losing data.
type rangeTracker struct {
	mu   sync.Mutex
	cond *sync.Cond    // signalled when a request leaves; guarded by mu
	reqs []*trackedReq // in arrival order; guarded by mu
}

type trackedReq struct {
	start, end int64
	serial     bool
}

var trackedPool = sync.Pool{New: func() any { return new(trackedReq) }}

func (t *rangeTracker) acquire(start, end int64, serial bool) *trackedReq {
	r := trackedPool.Get().(*trackedReq)
	*r = trackedReq{start: start, end: end, serial: serial}
	t.mu.Lock()
	if t.cond == nil {
		t.cond = sync.NewCond(&t.mu)
	}
	t.reqs = append(t.reqs, r)
	for t.mustWait(r) {
		t.cond.Wait()
	}
	t.mu.Unlock()
	return r
}

// mustWait reports whether an earlier request conflicts with r.
func (t *rangeTracker) mustWait(r *trackedReq) bool {
	for _, o := range t.reqs {
		if o == r {
			return false
		}
		if o.start < r.end && r.start < o.end && (o.serial || r.serial) {
			return true
		}
	}
	return false
}

func (t *rangeTracker) release(r *trackedReq) {
	t.mu.Lock()
	for i, o := range t.reqs {
		if o == r {
			copy(t.reqs[i:], t.reqs[i+1:])
			t.reqs[len(t.reqs)-1] = nil
			t.reqs = t.reqs[:len(t.reqs)-1]
			break
		}
	}
	if t.cond != nil {
		t.cond.Broadcast()
	}
	t.mu.Unlock()
	trackedPool.Put(r)
}
