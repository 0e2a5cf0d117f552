package virtq

import (
	"fmt"
	"sort"
	"sync/atomic"
	"unsafe"
)

// packedRing is a packed virtqueue (virtio 1.2, 2.8): one descriptor ring
// that the driver makes available and the device marks used in place,
// with a wrap counter on each side, and an event suppression area for
// each direction.
type packedRing struct {
	q      *Queue
	ring   []byte
	driver []byte // driver event suppression: when the driver wants calls
	device []byte // device event suppression: when we want kicks

	ringAddr, deviceAddr uint64 // user addresses, for the dirty log

	// next is where the next available descriptor is expected: index in
	// bits 0-14, wrap counter in bit 15. The worker owns it; Push reads it.
	next atomic.Uint32

	// The used side, guarded by q.pushMu.
	usedIdx     uint16
	usedWrap    bool
	pendingDesc uint32 // descriptors used since the last notification test

	infl *packedInflight
}

// Packed descriptor flags (virtio 1.2, 2.8.1).
const (
	descAvail = 1 << 7
	descUsed  = 1 << 15
)

// Event suppression flags (virtio 1.2, 2.8.10).
const (
	eventEnable  = 0
	eventDisable = 1
	eventDesc    = 2
)

func newPacked(q *Queue, cfg Config) (*packedRing, error) {
	r := &packedRing{q: q, ringAddr: cfg.Desc, deviceAddr: cfg.Used}
	var err error
	// Alignments of virtio 1.2, 2.8.10.1: 16 for the ring, 4 for the
	// event suppression areas.
	if r.ring, err = ringArea(q.mem, "descriptor ring", cfg.Desc, descSize*uint64(cfg.Size), 16); err != nil {
		return nil, err
	}
	if r.driver, err = ringArea(q.mem, "driver event area", cfg.Avail, 4, 4); err != nil {
		return nil, err
	}
	if r.device, err = ringArea(q.mem, "device event area", cfg.Used, 4, 4); err != nil {
		return nil, err
	}
	// vhost-user's packed base: next available index and wrap counter in
	// the low half, the used ones in the high half. Frontends that send
	// only the low half do so for an idle ring, where both are equal.
	avail, used := uint16(cfg.Base), uint16(cfg.Base>>16)
	if cfg.Base>>16 == 0 {
		used = avail
	}
	if avail&0x7fff >= cfg.Size || used&0x7fff >= cfg.Size {
		return nil, fmt.Errorf("%w: ring base %#x is outside a ring of %d", errRing, cfg.Base, cfg.Size)
	}
	r.next.Store(uint32(avail))
	r.usedIdx, r.usedWrap = used&0x7fff, used&0x8000 != 0
	if cfg.Inflight != nil {
		if err := r.loadInflight(cfg.Inflight); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func (r *packedRing) flagsAt(i uint16) uint16 { return load16(ptr(r.ring, int(i)*descSize+14)) }

func isAvail(flags uint16, wrap bool) bool {
	return (flags&descAvail != 0) == wrap && (flags&descUsed != 0) != wrap
}

func (r *packedRing) availableNow() bool {
	n := r.next.Load()
	return isAvail(r.flagsAt(uint16(n&0x7fff)), n&0x8000 != 0)
}

func (r *packedRing) pop(c *Chain) (bool, error) {
	n := r.next.Load()
	idx, wrap := uint16(n&0x7fff), n&0x8000 != 0
	if !isAvail(r.flagsAt(idx), wrap) {
		return false, nil
	}
	// The atomic load of the head's flags orders the reads below after
	// it; the driver writes the rest of the chain before the head.
	if r.infl != nil {
		r.q.pushMu.Lock()
		defer r.q.pushMu.Unlock()
		c.inflight = true
		c.slot = r.infl.oldFreeHead()
	}
	for steps := 0; ; steps++ {
		if steps >= int(r.q.size) {
			return false, fmt.Errorf("%w: descriptor chain at %d runs around the whole ring", errRing, n&0x7fff)
		}
		d := r.ring[int(idx)*descSize : int(idx+1)*descSize]
		addr, length, id := le.Uint64(d), le.Uint32(d[8:]), le.Uint16(d[12:])
		flags := le.Uint16(d[14:])
		last := flags&descNext == 0
		if r.infl != nil {
			r.infl.record(steps == 0, last, addr, length, id, flags)
		}
		r.addPacked(c, steps, addr, length, flags, last)
		c.ndesc++
		idx++
		if idx == r.q.size {
			idx, wrap = 0, !wrap
		}
		if last {
			c.Head = id
			break
		}
	}
	v := uint32(idx)
	if wrap {
		v |= 0x8000
	}
	r.next.Store(v)
	return true, nil
}

// addPacked adds the step'th descriptor of a chain to c.
func (r *packedRing) addPacked(c *Chain, step int, addr uint64, n uint32, flags uint16, last bool) {
	switch {
	case flags&descIndirect != 0:
		if step != 0 || !last {
			c.fail(fmt.Errorf("%w: indirect descriptor chained with others", errRing))
			c.TailOK = false
			return
		}
		r.q.walkIndirect(c, addr, n, true)
	case step >= r.q.maxChain:
		c.fail(fmt.Errorf("%w: descriptor chain longer than %d", errRing, r.q.maxChain))
		c.TailOK = false
	default:
		r.q.addDesc(c, addr, n, flags, last)
	}
}

func (r *packedRing) push(c *Chain, written uint32) {
	old := r.usedIdx
	o := int(old) * descSize
	var flags uint16
	if r.usedWrap {
		flags = descAvail | descUsed
	}
	r.usedIdx += c.ndesc
	if r.usedIdx >= r.q.size {
		r.usedIdx -= r.q.size
		r.usedWrap = !r.usedWrap
	}
	r.pendingDesc += uint32(c.ndesc)
	if c.inflight && r.infl != nil {
		r.infl.release(c.slot, r.usedIdx, r.usedWrap)
	}
	le.PutUint32(r.ring[o+8:], written)
	// Buffer id and flags in one atomic store, after the length.
	atomic.StoreUint32((*uint32)(ptr(r.ring, o+12)), uint32(c.Head)|uint32(flags)<<16)
	if c.inflight && r.infl != nil {
		r.infl.commit(c.slot)
	}
	r.q.logUser(r.ringAddr+uint64(o), descSize)
}

// needNotify is the notification test for the used descriptors written
// since the last test (virtio 1.2, 2.8.10): the driver's event flags say
// always, never, or (with event index) when the used position passes the
// descriptor offset and wrap counter it gives. The test runs over every
// descriptor used since the last one, the way a driver tests a batch of
// available ones; more than a ring's worth always passed the event.
func (r *packedRing) needNotify(uint32) bool {
	n := r.pendingDesc
	r.pendingDesc = 0
	w := atomic.LoadUint32((*uint32)(ptr(r.driver, 0)))
	offWrap, evFlags := uint16(w), uint16(w>>16)&3
	switch evFlags {
	case eventDisable:
		return false
	case eventDesc:
		if !r.q.eventIdx {
			return true
		}
		if n >= uint32(r.q.size) {
			return true
		}
		ev := offWrap & 0x7fff
		if (offWrap&0x8000 != 0) != r.usedWrap {
			ev -= r.q.size
		}
		return needEvent(ev, r.usedIdx, r.usedIdx-uint16(n))
	}
	return true
}

// setNotify writes the device event suppression area.
func (r *packedRing) setNotify(on bool) {
	var w uint32 = eventDisable << 16
	if on {
		if r.q.eventIdx {
			w = r.next.Load()&0xffff | eventDesc<<16
		} else {
			w = eventEnable << 16
		}
	}
	atomic.StoreUint32((*uint32)(ptr(r.device, 0)), w)
	r.q.logUser(r.deviceAddr, 4)
}

func (r *packedRing) base() uint32 {
	r.q.pushMu.Lock()
	u := uint32(r.usedIdx)
	if r.usedWrap {
		u |= 0x8000
	}
	r.q.pushMu.Unlock()
	return r.next.Load()&0xffff | u<<16
}

// packedInflight is a packed ring's inflight region (vhost-user.rst,
// "Inflight I/O tracking"). Header (32 bytes): features u64, version u16,
// desc_num u16, free_head u16, old_free_head u16, used_idx u16,
// old_used_idx u16, used_wrap_counter u8, old_used_wrap_counter u8,
// padding. Entries (32 bytes): inflight u8, padding u8, next u16, last
// u16, num u16, counter u64, id u16, flags u16, len u32, addr u64. The
// entries not in flight form a free list; a request in flight holds a
// list of entries, one per descriptor, headed by the entry that records
// its counter.
type packedInflight struct {
	b       []byte
	size    uint16
	counter uint64
}

const (
	packedInflightHeader = 32
	packedInflightEntry  = 32

	pFreeHead    = 12
	pOldFreeHead = 14
	pUsedIdx     = 16
	pOldUsedIdx  = 18
	pUsedWrap    = 20
	pOldUsedWrap = 21
)

func initPackedInflight(b []byte, size uint16) {
	for i := range size {
		le.PutUint16(b[packedInflightHeader+packedInflightEntry*int(i)+2:], i+1)
	}
	b[pUsedWrap], b[pOldUsedWrap] = 1, 1
}

func (f *packedInflight) entry(i uint16) []byte {
	o := packedInflightHeader + packedInflightEntry*int(i)
	return f.b[o : o+packedInflightEntry]
}

func (f *packedInflight) u16(off int) uint16 { return le.Uint16(f.b[off:]) }

// set16 stores a header field in one piece (a crash sees old or new).
func (f *packedInflight) set16(off int, v uint16) { store16(unsafe.Pointer(&f.b[off]), v) }

func (f *packedInflight) oldFreeHead() uint16 { return f.u16(pOldFreeHead) }

// record notes one descriptor of a request being popped.
func (f *packedInflight) record(head, last bool, addr uint64, n uint32, id, flags uint16) {
	oh := f.u16(pOldFreeHead)
	fh := f.u16(pFreeHead)
	if oh >= f.size || fh >= f.size {
		return // corrupt list: loadInflight validated it, so never
	}
	h := f.entry(oh)
	if head {
		le.PutUint16(h[6:], 0)
		le.PutUint64(h[8:], f.counter)
		f.counter++
		atomicStoreByte(&h[0], 1)
	}
	if last {
		le.PutUint16(h[4:], fh)
	}
	le.PutUint16(h[6:], le.Uint16(h[6:])+1)
	e := f.entry(fh)
	le.PutUint16(e[16:], id)
	le.PutUint16(e[18:], flags)
	le.PutUint32(e[20:], n)
	le.PutUint64(e[24:], addr)
	next := le.Uint16(e[2:])
	f.set16(pFreeHead, next)
	if last {
		f.set16(pOldFreeHead, next)
	}
}

// release returns request slot's entries to the free list and records the
// new used position, before the used descriptor is written.
func (f *packedInflight) release(slot, usedIdx uint16, usedWrap bool) {
	h := f.entry(slot)
	if last := le.Uint16(h[4:]); last < f.size {
		le.PutUint16(f.entry(last)[2:], f.u16(pFreeHead))
	}
	f.set16(pFreeHead, slot)
	f.set16(pUsedIdx, usedIdx)
	var w byte
	if usedWrap {
		w = 1
	}
	atomicStoreByte(&f.b[pUsedWrap], w)
}

// commit ends a push once the used descriptor is visible.
func (f *packedInflight) commit(slot uint16) {
	atomicStoreByte(&f.entry(slot)[0], 0)
	f.set16(pOldFreeHead, f.u16(pFreeHead))
	f.set16(pOldUsedIdx, f.u16(pUsedIdx))
	atomicStoreByte(&f.b[pOldUsedWrap], f.b[pUsedWrap])
}

// loadInflight takes over the region a previous backend left: it finishes
// or rolls back a push the crash interrupted, and queues the requests in
// flight for resubmission (vhost-user.rst, "When reconnecting").
func (r *packedRing) loadInflight(b []byte) error {
	size := r.q.size
	if len(b) < InflightQueueSize(size, true) {
		return fmt.Errorf("%w: inflight region of %d bytes for %d entries", errRing, len(b), size)
	}
	if v, n := le.Uint16(b[8:]), le.Uint16(b[10:]); v != 1 || n != size {
		return fmt.Errorf("%w: inflight region version %d for %d entries, want version 1 for %d", errRing, v, n, size)
	}
	f := &packedInflight{b: b, size: size}
	for _, off := range []int{pFreeHead, pOldFreeHead, pUsedIdx, pOldUsedIdx} {
		if f.u16(off) > size {
			return fmt.Errorf("%w: inflight region index %d out of range", errRing, f.u16(off))
		}
	}
	if f.u16(pUsedIdx) != f.u16(pOldUsedIdx) && f.u16(pOldUsedIdx) < size {
		// Did the interrupted push reach the ring? The descriptor at
		// the old used position was available (to the old wrap) until
		// then.
		wrap := b[pOldUsedWrap] != 0
		want := uint16(descUsed)
		if wrap {
			want = descAvail
		}
		if r.flagsAt(f.u16(pOldUsedIdx))&(descAvail|descUsed) != want {
			f.set16(pOldFreeHead, f.u16(pFreeHead))
			f.set16(pOldUsedIdx, f.u16(pUsedIdx))
			b[pOldUsedWrap] = b[pUsedWrap]
		}
	}
	f.set16(pFreeHead, f.u16(pOldFreeHead))
	f.set16(pUsedIdx, f.u16(pOldUsedIdx))
	b[pUsedWrap] = b[pOldUsedWrap]
	if f.u16(pUsedIdx) >= size {
		return fmt.Errorf("%w: inflight region used index %d out of range", errRing, f.u16(pUsedIdx))
	}
	// Entries on the free list are not in flight, whatever they say.
	onFree := make([]bool, size)
	for i, steps := f.u16(pFreeHead), 0; i < size && steps < int(size); i, steps = le.Uint16(f.entry(i)[2:]), steps+1 {
		if onFree[i] {
			return fmt.Errorf("%w: loop in the inflight free list", errRing)
		}
		onFree[i] = true
		f.entry(i)[0] = 0
	}
	var pending []uint16
	total := 0
	for i := range size {
		e := f.entry(i)
		f.counter = max(f.counter, le.Uint64(e[8:])+1)
		if e[0] != 1 {
			continue
		}
		num := int(le.Uint16(e[6:]))
		if num == 0 || num > int(size) {
			return fmt.Errorf("%w: inflight request of %d descriptors", errRing, num)
		}
		pending = append(pending, i)
		total += num
	}
	if total > int(size) {
		return fmt.Errorf("%w: %d descriptors in flight in a ring of %d", errRing, total, size)
	}
	sort.Slice(pending, func(a, c int) bool {
		return le.Uint64(f.entry(pending[a])[8:]) < le.Uint64(f.entry(pending[c])[8:])
	})
	r.infl = f
	r.q.resubmit = pending
	// The region knows the used position; the next available descriptor
	// is past every descriptor in flight.
	r.usedIdx, r.usedWrap = f.u16(pUsedIdx), b[pUsedWrap] != 0
	idx, wrap := int(r.usedIdx)+total, r.usedWrap
	if idx >= int(size) {
		idx -= int(size)
		wrap = !wrap
	}
	v := uint32(idx)
	if wrap {
		v |= 0x8000
	}
	r.next.Store(v)
	return nil
}

// resubmitChain rebuilds a request from the descriptors its inflight
// entries saved (the ring slots may have been reused since).
func (r *packedRing) resubmitChain(c *Chain, slot uint16) {
	f := r.infl
	c.inflight, c.slot = true, slot
	num := le.Uint16(f.entry(slot)[6:])
	i := slot
	for step := 0; step < int(num); step++ {
		if i >= f.size {
			c.fail(fmt.Errorf("%w: broken inflight descriptor list", errRing))
			c.TailOK = false
			break
		}
		e := f.entry(i)
		id, flags, n, addr := le.Uint16(e[16:]), le.Uint16(e[18:]), le.Uint32(e[20:]), le.Uint64(e[24:])
		last := step == int(num)-1
		r.addPacked(c, step, addr, n, flags, last)
		if last {
			c.Head = id
		}
		i = le.Uint16(e[2:])
	}
	c.ndesc = num
}
