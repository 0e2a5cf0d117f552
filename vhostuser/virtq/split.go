package virtq

import (
	"fmt"
	"sort"
	"sync/atomic"
	"unsafe"
)

// splitRing is a split virtqueue (virtio 1.2, 2.7): a descriptor table,
// the available ring the driver fills and the used ring the device fills.
type splitRing struct {
	q                 *Queue
	desc, avail, used []byte
	usedAddr          uint64 // user address of the used ring, for the dirty log

	lastAvail atomic.Uint32 // next available entry to pop (16 bits); worker-owned, read by Push
	usedIdx   uint16        // guarded by q.pushMu
	noNotify  bool          // worker-owned: VRING_USED_F_NO_NOTIFY is set

	infl *splitInflight
}

const (
	usedFNoNotify    = 1
	availFNoInterupt = 1
)

func newSplit(q *Queue, cfg Config) (*splitRing, error) {
	n := uint64(cfg.Size)
	r := &splitRing{q: q, usedAddr: cfg.Used}
	var err error
	// Alignments of virtio 1.2, 2.7: 16 for descriptors, 2 for the
	// available ring, 4 for the used ring.
	if r.desc, err = ringArea(q.mem, "descriptor table", cfg.Desc, descSize*n, 16); err != nil {
		return nil, err
	}
	if r.avail, err = ringArea(q.mem, "available ring", cfg.Avail, 6+2*n, 2); err != nil {
		return nil, err
	}
	if r.used, err = ringArea(q.mem, "used ring", cfg.Used, 6+8*n, 4); err != nil {
		return nil, err
	}
	r.usedIdx = load16(ptr(r.used, 2))
	r.lastAvail.Store(cfg.Base & 0xffff)
	if cfg.Inflight != nil {
		if err := r.loadInflight(cfg.Inflight); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func (r *splitRing) availIdx() uint32 { return uint32(load16(ptr(r.avail, 2))) }

func (r *splitRing) pop(c *Chain) (bool, error) {
	last := uint16(r.lastAvail.Load())
	idx := uint16(r.availIdx())
	if idx == last {
		return false, nil
	}
	if idx-last > r.q.size {
		return false, fmt.Errorf("%w: available index moved from %d to %d, more than the ring's %d entries", errRing, last, idx, r.q.size)
	}
	// The atomic load of the index orders the loads below after it.
	head := load16(ptr(r.avail, 4+2*int(last%r.q.size)))
	if head >= r.q.size {
		return false, fmt.Errorf("%w: available entry %d names descriptor %d of %d", errRing, last, head, r.q.size)
	}
	r.lastAvail.Store(uint32(last + 1))
	if r.infl != nil {
		r.q.pushMu.Lock()
		r.infl.start(head)
		r.q.pushMu.Unlock()
		c.inflight = true
	}
	r.walk(c, head)
	return true, nil
}

// walk fills c from the chain that starts at descriptor head.
func (r *splitRing) walk(c *Chain, head uint16) {
	c.Head = head
	i := head
	for steps := 0; ; steps++ {
		if steps >= int(r.q.size) || steps >= r.q.maxChain {
			c.fail(fmt.Errorf("%w: descriptor chain longer than %d (or a loop)", errRing, min(int(r.q.size), r.q.maxChain)))
			c.TailOK = false
			return
		}
		d := r.desc[int(i)*descSize : int(i+1)*descSize]
		addr, n, flags, next := le.Uint64(d), le.Uint32(d[8:]), le.Uint16(d[12:]), le.Uint16(d[14:])
		if flags&descIndirect != 0 {
			if steps != 0 || flags&descNext != 0 {
				// virtio 1.2, 2.7.5.3.1: an indirect descriptor is alone
				// in its chain.
				c.fail(fmt.Errorf("%w: indirect descriptor chained with others", errRing))
				c.TailOK = false
				return
			}
			r.q.walkIndirect(c, addr, n, false)
			return
		}
		more := flags&descNext != 0
		r.q.addDesc(c, addr, n, flags, !more)
		if !more {
			return
		}
		if next >= r.q.size {
			c.fail(fmt.Errorf("%w: descriptor %d links to %d of %d", errRing, i, next, r.q.size))
			c.TailOK = false
			return
		}
		i = next
	}
}

func (r *splitRing) push(c *Chain, written uint32) {
	if c.inflight && r.infl != nil {
		r.infl.batch(c.Head)
	}
	old := r.usedIdx
	o := 4 + 8*int(old%r.q.size)
	le.PutUint32(r.used[o:], uint32(c.Head))
	le.PutUint32(r.used[o+4:], written)
	r.usedIdx = old + 1
	// The atomic store publishes the element before the index.
	store16(ptr(r.used, 2), r.usedIdx)
	if r.infl != nil {
		if c.inflight {
			r.infl.done(c.Head)
		}
		r.infl.setUsedIdx(r.usedIdx)
	}
	r.q.logUser(r.usedAddr+4+8*uint64(old%r.q.size), 8)
	r.q.logUser(r.usedAddr+2, 2)
}

// needNotify is the notification test for the last n used elements
// (virtio 1.2, 2.7.10): with event index, whether the used index crossed
// used_event on its way from usedIdx-n to usedIdx (more than a ring's
// worth of elements always did); without, whether the driver left
// VIRTQ_AVAIL_F_NO_INTERRUPT clear.
func (r *splitRing) needNotify(n uint32) bool {
	if r.q.eventIdx {
		if n >= uint32(r.q.size) {
			return true
		}
		ev := load16(ptr(r.avail, 4+2*int(r.q.size)))
		return needEvent(ev, r.usedIdx, r.usedIdx-uint16(n))
	}
	return load16(ptr(r.avail, 0))&availFNoInterupt == 0
}

// setNotify sets or clears VRING_USED_F_NO_NOTIFY (without event index) or
// moves the available event to where we are (with it). With event index,
// disabling is leaving the available event behind: the driver kicks only
// when its index passes the event, which it already has.
func (r *splitRing) setNotify(on bool) {
	if r.q.eventIdx {
		if on {
			r.setAvailEvent(uint16(r.lastAvail.Load()))
		}
		return
	}
	if r.noNotify == !on {
		return
	}
	r.noNotify = !on
	var f uint16
	if !on {
		f = usedFNoNotify
	}
	store16(ptr(r.used, 0), f)
	r.q.logUser(r.usedAddr, 2)
}

func (r *splitRing) setAvailEvent(v uint16) {
	off := 4 + 8*int(r.q.size)
	store16(ptr(r.used, off), v)
	r.q.logUser(r.usedAddr+uint64(off), 2)
}

// splitInflight is a split ring's inflight region (vhost-user.rst,
// "Inflight I/O tracking"): a 16-byte header (features u64, version u16,
// desc_num u16, last_batch_head u16, used_idx u16) and one 16-byte entry
// per descriptor (inflight u8, 5 bytes padding, next u16, counter u64).
type splitInflight struct {
	b       []byte
	counter uint64
}

const splitInflightHeader = 16

// InflightQueueSize is the size of one queue's inflight region.
func InflightQueueSize(size uint16, packed bool) int {
	if packed {
		return packedInflightHeader + packedInflightEntry*int(size)
	}
	return splitInflightHeader + 16*int(size)
}

// InitInflight formats a zeroed inflight region for a ring of size
// entries.
func InitInflight(region []byte, size uint16, packed bool) {
	if len(region) < InflightQueueSize(size, packed) {
		return
	}
	clear(region[:InflightQueueSize(size, packed)])
	le.PutUint16(region[8:], 1) // version
	le.PutUint16(region[10:], size)
	if packed {
		initPackedInflight(region, size)
	}
}

func (f *splitInflight) entry(i uint16) []byte {
	o := splitInflightHeader + 16*int(i)
	return f.b[o : o+16]
}

func (f *splitInflight) start(head uint16) {
	e := f.entry(head)
	le.PutUint64(e[8:], f.counter)
	f.counter++
	atomicStoreByte(&e[0], 1)
}

func (f *splitInflight) batch(head uint16) {
	le.PutUint16(f.entry(head)[6:], le.Uint16(f.b[12:]))
	le.PutUint16(f.b[12:], head) // last_batch_head
}

func (f *splitInflight) done(head uint16) { atomicStoreByte(&f.entry(head)[0], 0) }

func (f *splitInflight) setUsedIdx(v uint16) { store16(unsafe.Pointer(&f.b[14]), v) }

// atomicStoreByte stores a byte that a crash must see either before or
// after, never torn or reordered: through its aligned word.
func atomicStoreByte(p *byte, v byte) {
	a := uintptr(unsafe.Pointer(p))
	w := (*uint32)(unsafe.Add(unsafe.Pointer(p), -int(a&3)))
	sh := uint(a&3) * 8
	for {
		old := atomic.LoadUint32(w)
		nw := old&^(0xff<<sh) | uint32(v)<<sh
		if old == nw || atomic.CompareAndSwapUint32(w, old, nw) {
			return
		}
	}
}

// loadInflight validates the region and, if a previous backend left
// requests in flight, repairs the last batch and queues them for
// resubmission (vhost-user.rst, "When reconnecting").
func (r *splitRing) loadInflight(b []byte) error {
	size := r.q.size
	if len(b) < InflightQueueSize(size, false) {
		return fmt.Errorf("%w: inflight region of %d bytes for %d entries", errRing, len(b), size)
	}
	if v, n := le.Uint16(b[8:]), le.Uint16(b[10:]); v != 1 || n != size {
		return fmt.Errorf("%w: inflight region version %d for %d entries, want version 1 for %d", errRing, v, n, size)
	}
	f := &splitInflight{b: b}
	usedIdx := load16(ptr(r.used, 2))
	if le.Uint16(b[14:]) != usedIdx {
		// The last push reached the used ring but not the region.
		if h := le.Uint16(b[12:]); h < size {
			f.done(h)
		}
		f.setUsedIdx(usedIdx)
	}
	var pending []uint16
	for i := range size {
		e := f.entry(i)
		if e[0] == 1 {
			pending = append(pending, i)
		}
		f.counter = max(f.counter, le.Uint64(e[8:])+1)
	}
	sort.Slice(pending, func(a, b int) bool {
		return le.Uint64(f.entry(pending[a])[8:]) < le.Uint64(f.entry(pending[b])[8:])
	})
	r.infl = f
	r.q.resubmit = pending
	// The requests in flight were popped in order after the last used
	// one, whatever base the frontend sends after a crash.
	r.lastAvail.Store(uint32(usedIdx + uint16(len(pending))))
	return nil
}

func (r *splitRing) resubmitChain(c *Chain, head uint16) {
	c.inflight = true
	r.walk(c, head)
}
