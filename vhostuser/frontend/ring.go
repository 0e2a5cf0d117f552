package frontend

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

var le = binary.LittleEndian

// Descriptor flags (virtio spec 2.7.5 and 2.8.6).
const (
	DescFNext     = 1
	DescFWrite    = 2
	DescFIndirect = 4
	// Packed rings only.
	DescFAvail = 1 << 7
	DescFUsed  = 1 << 15
)

const (
	usedFNoNotify    = 1 // split: VIRTQ_USED_F_NO_NOTIFY
	eventFlagEnable  = 0 // packed event suppression
	eventFlagDisable = 1
	eventFlagDesc    = 2
)

// Per-request slot in guest memory, indexed by the head descriptor (split)
// or the buffer id (packed): the 16-byte request header, the status byte,
// discard/write-zeroes segments and an indirect table.
const (
	slotSize       = 4096
	slotStatus     = 16
	slotDiscard    = 64
	slotTable      = 1024
	maxDiscardSegs = (slotTable - slotDiscard) / 16
	maxTableDescs  = (slotSize - slotTable) / 16
	// MaxIndirectSegs is the most data segments a request may have when it
	// goes through an indirect table (header and status take two entries).
	MaxIndirectSegs = maxTableDescs - 2
)

// Errors returned by the data path.
var (
	ErrQueueFull = errors.New("frontend: not enough free descriptors in the virtqueue")
	ErrTimeout   = errors.New("frontend: timed out waiting for completions")
	ErrClosed    = errors.New("frontend: closed")
)

// queue is one virtqueue as the driver sees it. mu guards everything
// below it; it is released while waiting on the call eventfd, so Submit
// from another goroutine can proceed during a Reap.
type queue struct {
	f        *Frontend
	index    int
	size     uint16
	packed   bool
	eventIdx bool
	indirect bool

	kickFD, callFD, errFD int

	desc  []byte // split: descriptor table; packed: the descriptor ring
	avail []byte // split: available ring; packed: driver event suppression
	used  []byte // split: used ring; packed: device event suppression
	slots []byte
	slotG uint64 // guest address of slots[0]

	mu      sync.Mutex
	cond    sync.Cond // signalled when waiters drops to 0
	waiters int
	closed  bool
	err     error // sticky: the device broke the ring protocol

	// split state
	freeHead  uint16
	numFree   int
	next      []uint16 // free list links, and chain links while in flight
	chainTail []uint16
	chainN    []uint16
	availIdx  uint16 // shadow of avail->idx
	lastUsed  uint16

	// packed state
	nextAvail uint16
	availWrap bool
	lastUsedP uint16
	usedWrap  bool
	freeIDs   []uint16

	reqs     []*Request // in flight, by head or id
	inflight int

	done []*Request // completed, not yet returned
	ret  []*Request // returned by the last Reap

	// kicks and sleeps count kick-eventfd writes and waits in poll(2),
	// the frontend's notification cost (QueueStats).
	kicks, sleeps uint64

	kickBuf [8]byte
	pfd     [1]unix.PollFd
	bounce  []byte // for the copying conveniences
}

func newQueue(f *Frontend, index int, size uint16, packed, eventIdx, indirect bool) (*queue, error) {
	q := &queue{f: f, index: index, size: size, packed: packed, eventIdx: eventIdx, indirect: indirect,
		kickFD: -1, callFD: -1, errFD: -1}
	q.cond.L = &q.mu
	n := int(size)
	if packed {
		q.desc = f.mem.alloc(16*n, pageSize)
		q.avail = f.mem.alloc(4, pageSize)
		q.used = f.mem.alloc(4, pageSize)
	} else {
		q.desc = f.mem.alloc(16*n, pageSize)
		q.avail = f.mem.alloc(4+2*n+4, pageSize) // +2 used_event, +2 so it is a word
		q.used = f.mem.alloc(4+8*n+4, pageSize)
	}
	q.slots = f.mem.alloc(slotSize*n, pageSize)
	if q.desc == nil || q.avail == nil || q.used == nil || q.slots == nil {
		return nil, fmt.Errorf("frontend: guest memory too small for queue %d (size %d needs %d KiB per region)",
			index, size, (slotSize*n+16*n)>>10)
	}
	q.slotG, _ = f.mem.bufGPA(q.slots)
	q.reqs = make([]*Request, n)
	q.chainN = make([]uint16, n)
	q.done = make([]*Request, 0, n)
	q.ret = make([]*Request, 0, n)
	q.reset()
	var err error
	for _, p := range []*int{&q.kickFD, &q.callFD, &q.errFD} {
		if *p, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
			q.closeFDs()
			return nil, fmt.Errorf("frontend: eventfd: %w", err)
		}
	}
	q.pfd[0] = unix.PollFd{Fd: int32(q.callFD), Events: unix.POLLIN}
	le.PutUint64(q.kickBuf[:], 1)
	return q, nil
}

// reset puts the driver-side ring state at its initial values (rings are
// zero in memory: new allocation).
func (q *queue) reset() {
	n := int(q.size)
	if q.packed {
		q.availWrap, q.usedWrap = true, true
		q.freeIDs = make([]uint16, 0, n)
		for i := n - 1; i >= 0; i-- {
			q.freeIDs = append(q.freeIDs, uint16(i))
		}
	} else {
		q.next = make([]uint16, n)
		q.chainTail = make([]uint16, n)
		for i := range q.next {
			q.next[i] = uint16(i + 1)
		}
	}
	q.numFree = n
}

func (q *queue) closeFDs() {
	for _, p := range []*int{&q.kickFD, &q.callFD, &q.errFD} {
		if *p >= 0 {
			unix.Close(*p)
			*p = -1
		}
	}
}

// shutdown wakes waiters, waits for them to leave, then closes the fds.
func (q *queue) shutdown() {
	q.mu.Lock()
	q.closed = true
	if q.callFD >= 0 {
		unix.Write(q.callFD, q.kickBuf[:])
	}
	for q.waiters > 0 {
		q.cond.Wait()
	}
	q.closeFDs()
	q.mu.Unlock()
}

func word(b []byte, off int) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }

func putDesc(b []byte, addr uint64, n uint32, flags, next uint16) {
	le.PutUint64(b, addr)
	le.PutUint32(b[8:], n)
	le.PutUint16(b[12:], flags)
	le.PutUint16(b[14:], next)
}

func putPackedDesc(b []byte, addr uint64, n uint32, id, flags uint16) {
	le.PutUint64(b, addr)
	le.PutUint32(b[8:], n)
	le.PutUint16(b[12:], id)
	le.PutUint16(b[14:], flags)
}

// segment returns data segment i of r's chain (nseg in all).
func segment(dataG uint64, dataLen, nseg, i int) (uint64, uint32) {
	per := dataLen / nseg
	l := per
	if i == nseg-1 {
		l = dataLen - per*(nseg-1)
	}
	return dataG + uint64(per*i), uint32(l)
}

// prepared is a request resolved to guest addresses.
type prepared struct {
	dataG    uint64
	dataLen  int
	nseg     int
	writable bool
	discard  int
}

func (q *queue) prepare(r *Request) (prepared, error) {
	var p prepared
	if len(r.Discard) > 0 {
		if len(r.Data) > 0 {
			return p, errors.New("frontend: request has both Data and Discard")
		}
		if len(r.Discard) > maxDiscardSegs {
			return p, fmt.Errorf("frontend: %d discard segments, at most %d", len(r.Discard), maxDiscardSegs)
		}
		p.discard = len(r.Discard)
		p.dataLen = 16 * len(r.Discard)
		p.nseg = 1
		return p, nil
	}
	if len(r.Data) == 0 {
		return p, nil
	}
	g, ok := q.f.mem.bufGPA(r.Data)
	if !ok {
		return p, errors.New("frontend: request Data is not a buffer from Alloc (not in guest memory)")
	}
	p.dataG, p.dataLen = g, len(r.Data)
	p.nseg = max(r.Segs, 1)
	if p.nseg > p.dataLen {
		return p, fmt.Errorf("frontend: %d segments for %d bytes", p.nseg, p.dataLen)
	}
	p.writable = r.Type == TypeIn || r.Type == TypeGetID || r.Type == TypeGetLifetime
	return p, nil
}

// fillSlot writes the request header, the status sentinel and discard
// segments into the slot and returns the slot's guest address.
func (q *queue) fillSlot(slot uint16, r *Request, p *prepared) uint64 {
	s := q.slots[int(slot)*slotSize:]
	le.PutUint32(s, r.Type)
	le.PutUint32(s[4:], r.Ioprio)
	le.PutUint64(s[8:], r.Sector)
	s[slotStatus] = 0xff // a device that completes without writing a status is visible
	g := q.slotG + uint64(slot)*slotSize
	if p.discard > 0 {
		for i, d := range r.Discard {
			b := s[slotDiscard+16*i:]
			le.PutUint64(b, d.Sector)
			le.PutUint32(b[8:], d.NumSectors)
			le.PutUint32(b[12:], d.Flags)
		}
		p.dataG = g + slotDiscard
	}
	return g
}

// descriptor i (0 = header, last = status) of the request in slot g.
func (p *prepared) desc(i, ndesc int, g uint64) (addr uint64, n uint32, flags uint16) {
	switch {
	case i == 0:
		return g, 16, 0
	case i == ndesc-1:
		return g + slotStatus, 1, DescFWrite
	default:
		a, l := segment(p.dataG, p.dataLen, p.nseg, i-1)
		if p.writable {
			flags = DescFWrite
		}
		return a, l, flags
	}
}

// submitLocked places r in the ring without publishing it.
func (q *queue) submitLocked(r *Request) error {
	if q.closed {
		return ErrClosed
	}
	if q.err != nil {
		return q.err
	}
	if r.busy {
		return errors.New("frontend: request is already in flight")
	}
	p, err := q.prepare(r)
	if err != nil {
		return err
	}
	ndesc := 2 + p.nseg
	ind := q.indirect && !r.NoIndirect
	if ind && ndesc > maxTableDescs {
		return fmt.Errorf("frontend: %d segments, at most %d with indirect descriptors", p.nseg, MaxIndirectSegs)
	}
	need := ndesc
	if ind {
		need = 1
	}
	if q.numFree < need || (q.packed && len(q.freeIDs) == 0) {
		return ErrQueueFull
	}
	if q.packed {
		q.submitPacked(r, &p, ndesc, ind)
	} else {
		q.submitSplit(r, &p, ndesc, ind)
	}
	r.busy, r.done, r.q = true, false, q.index
	r.Status, r.Written = 0xff, 0
	q.inflight++
	return nil
}

func (q *queue) submitSplit(r *Request, p *prepared, ndesc int, ind bool) {
	head := q.freeHead
	g := q.fillSlot(head, r, p)
	if ind {
		t := q.slots[int(head)*slotSize+slotTable:]
		for i := 0; i < ndesc; i++ {
			a, l, fl := p.desc(i, ndesc, g)
			var nx uint16
			if i < ndesc-1 {
				fl |= DescFNext
				nx = uint16(i + 1)
			}
			putDesc(t[16*i:], a, l, fl, nx)
		}
		putDesc(q.desc[16*int(head):], g+slotTable, uint32(16*ndesc), DescFIndirect, 0)
		q.freeHead = q.next[head]
		q.chainTail[head], q.chainN[head] = head, 1
		q.numFree--
	} else {
		d := head
		for i := 0; i < ndesc; i++ {
			a, l, fl := p.desc(i, ndesc, g)
			var nx uint16
			if i < ndesc-1 {
				fl |= DescFNext
				nx = q.next[d]
			}
			putDesc(q.desc[16*int(d):], a, l, fl, nx)
			if i < ndesc-1 {
				d = nx
			}
		}
		q.freeHead = q.next[d]
		q.chainTail[head], q.chainN[head] = d, uint16(ndesc)
		q.numFree -= ndesc
	}
	q.reqs[head] = r
	r.id = head
	le.PutUint16(q.avail[4+2*int(q.availIdx%q.size):], head)
	q.availIdx++
}

func (q *queue) packedFlags(wrap bool) uint16 {
	if wrap {
		return DescFAvail
	}
	return DescFUsed
}

func (q *queue) submitPacked(r *Request, p *prepared, ndesc int, ind bool) {
	id := q.freeIDs[len(q.freeIDs)-1]
	q.freeIDs = q.freeIDs[:len(q.freeIDs)-1]
	g := q.fillSlot(id, r, p)
	headPos, headWrap := q.nextAvail, q.availWrap
	var headFlags uint16
	advance := func() {
		q.nextAvail++
		if q.nextAvail == q.size {
			q.nextAvail, q.availWrap = 0, !q.availWrap
		}
	}
	if ind {
		t := q.slots[int(id)*slotSize+slotTable:]
		for i := 0; i < ndesc; i++ {
			a, l, fl := p.desc(i, ndesc, g)
			putPackedDesc(t[16*i:], a, l, 0, fl)
		}
		b := q.desc[16*int(headPos):]
		le.PutUint64(b, g+slotTable)
		le.PutUint32(b[8:], uint32(16*ndesc))
		headFlags = DescFIndirect | q.packedFlags(headWrap)
		advance()
		q.chainN[id] = 1
		q.numFree--
	} else {
		for i := 0; i < ndesc; i++ {
			a, l, fl := p.desc(i, ndesc, g)
			if i < ndesc-1 {
				fl |= DescFNext
			}
			fl |= q.packedFlags(q.availWrap)
			b := q.desc[16*int(q.nextAvail):]
			if i == 0 {
				le.PutUint64(b, a)
				le.PutUint32(b[8:], l)
				headFlags = fl
			} else {
				putPackedDesc(b, a, l, id, fl)
			}
			advance()
		}
		q.chainN[id] = uint16(ndesc)
		q.numFree -= ndesc
	}
	// The head's flags go last: they make the whole chain available.
	atomic.StoreUint32(word(q.desc, 16*int(headPos)+12), uint32(id)|uint32(headFlags)<<16)
	q.reqs[id] = r
	r.id = id
}

// needEvent is the virtio event index test: has idx crossed event in the
// step from old to new?
func needEvent(event, new, old uint16) bool { return new-event-1 < new-old }

// publish makes the submitted requests visible and kicks if the device
// wants a notification. oldAvail/oldPos are the values before the batch.
func (q *queue) publish(oldAvail uint16, added int) error {
	if added == 0 {
		return nil
	}
	kick := true
	if q.packed {
		// The flags were published with each head; read the device's
		// suppression after them (the atomic store above orders it).
		w := atomic.LoadUint32(word(q.used, 0))
		offWrap, flags := uint16(w), uint16(w>>16)&3
		switch flags {
		case eventFlagDisable:
			kick = false
		case eventFlagDesc:
			if q.eventIdx {
				ev := offWrap &^ (1 << 15)
				if (offWrap>>15 == 1) != q.availWrap {
					ev -= q.size
				}
				kick = needEvent(ev, q.nextAvail, q.nextAvail-uint16(added))
			}
		}
	} else {
		atomic.StoreUint32(word(q.avail, 0), uint32(q.availIdx)<<16)
		if q.eventIdx {
			ev := uint16(atomic.LoadUint32(word(q.used, 4+8*int(q.size))))
			kick = needEvent(ev, q.availIdx, oldAvail)
		} else {
			kick = uint16(atomic.LoadUint32(word(q.used, 0)))&usedFNoNotify == 0
		}
	}
	if kick {
		q.kicks++
		if _, err := unix.Write(q.kickFD, q.kickBuf[:]); err != nil && err != unix.EAGAIN {
			return fmt.Errorf("frontend: kick queue %d: %w", q.index, err)
		}
	}
	return nil
}

func (q *queue) submit(rs ...*Request) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	old := q.availIdx
	n := 0
	var err error
	for _, r := range rs {
		if err = q.submitLocked(r); err != nil {
			break
		}
		n++
	}
	if perr := q.publish(old, n); perr != nil && err == nil {
		err = perr
	}
	if err != nil && n > 0 {
		err = fmt.Errorf("%w (after submitting %d of %d)", err, n, len(rs))
	}
	return err
}

// complete records the completion of the request in slot id.
func (q *queue) complete(id uint16, n uint32) bool {
	if int(id) >= len(q.reqs) || q.reqs[id] == nil {
		q.err = fmt.Errorf("frontend: queue %d: device returned id %d, which is not in flight", q.index, id)
		return false
	}
	r := q.reqs[id]
	q.reqs[id] = nil
	r.Status = q.slots[int(id)*slotSize+slotStatus]
	r.Written = n
	r.busy, r.done = false, true
	q.inflight--
	q.done = append(q.done, r)
	if q.packed {
		c := q.chainN[id]
		q.lastUsedP += c
		if q.lastUsedP >= q.size {
			q.lastUsedP -= q.size
			q.usedWrap = !q.usedWrap
		}
		q.numFree += int(c)
		q.freeIDs = append(q.freeIDs, id)
	} else {
		q.next[q.chainTail[id]] = q.freeHead
		q.freeHead = id
		q.numFree += int(q.chainN[id])
	}
	return true
}

// collect moves everything the device has used into q.done.
func (q *queue) collect() {
	if q.err != nil {
		return
	}
	if q.packed {
		q.collectPacked()
		return
	}
	usedIdx := uint16(atomic.LoadUint32(word(q.used, 0)) >> 16)
	if uint16(usedIdx-q.lastUsed) > q.size {
		q.err = fmt.Errorf("frontend: queue %d: used index moved from %d to %d, more than the ring size %d",
			q.index, q.lastUsed, usedIdx, q.size)
		return
	}
	for q.lastUsed != usedIdx {
		e := q.used[4+8*int(q.lastUsed%q.size):]
		id := le.Uint32(e)
		if id >= uint32(q.size) {
			q.err = fmt.Errorf("frontend: queue %d: device returned id %d beyond ring size %d", q.index, id, q.size)
			return
		}
		if !q.complete(uint16(id), le.Uint32(e[4:])) {
			return
		}
		q.lastUsed++
	}
}

func (q *queue) collectPacked() {
	for {
		off := 16 * int(q.lastUsedP)
		w := atomic.LoadUint32(word(q.desc, off+12))
		flags := uint16(w >> 16)
		a, u := flags&DescFAvail != 0, flags&DescFUsed != 0
		if a != u || u != q.usedWrap {
			return
		}
		if !q.complete(uint16(w), le.Uint32(q.desc[off+8:])) {
			return
		}
	}
}

// wait blocks until done() holds, the timeout passes (negative: never) or
// the queue breaks. Called with q.mu held; returns with it held.
func (q *queue) wait(done func() bool, need func() int, timeout time.Duration) error {
	// The deadline is set when the first sleep comes: a wait that finds
	// its completions at once reads no clock.
	var deadline time.Time
	var buf [8]byte
	for {
		q.collect()
		if q.err != nil {
			return q.err
		}
		if done() {
			return nil
		}
		if q.closed {
			return ErrClosed
		}
		if timeout == 0 {
			return ErrTimeout
		}
		if q.eventIdx && !q.packed {
			// Ask for one interrupt once the device has used enough
			// buffers, then look again: it may have passed the mark
			// before it could see it.
			ev := q.lastUsed + uint16(max(need(), 1)) - 1
			atomic.StoreUint32(word(q.avail, 4+2*int(q.size)), uint32(ev))
			if uint16(atomic.LoadUint32(word(q.used, 0))>>16) != q.lastUsed {
				continue
			}
		}
		ms := -1
		if timeout > 0 {
			if deadline.IsZero() {
				deadline = time.Now().Add(timeout)
			}
			left := time.Until(deadline)
			if left <= 0 {
				return ErrTimeout
			}
			ms = int((left + time.Millisecond - 1) / time.Millisecond)
		}
		q.waiters++
		q.sleeps++
		pfd := q.pfd
		q.mu.Unlock()
		_, err := unix.Poll(pfd[:], ms)
		if err == nil || err == unix.EINTR {
			unix.Read(int(pfd[0].Fd), buf[:])
		}
		q.mu.Lock()
		q.waiters--
		if q.waiters == 0 {
			q.cond.Broadcast()
		}
		if err != nil && err != unix.EINTR {
			return fmt.Errorf("frontend: poll call eventfd of queue %d: %w", q.index, err)
		}
	}
}

// usedPosition is where the device will write its next used element:
// for split rings used->idx, for packed rings the first position past
// the used descriptors, with its wrap counter.
func (q *queue) usedPosition() (uint16, bool) {
	if !q.packed {
		return uint16(atomic.LoadUint32(word(q.used, 0)) >> 16), false
	}
	pos, wrap := q.lastUsedP, q.usedWrap
	// Walk what is used but not reaped, following our chain lengths.
	for range q.size {
		off := 16 * int(pos)
		w := atomic.LoadUint32(word(q.desc, off+12))
		flags := uint16(w >> 16)
		a, u := flags&DescFAvail != 0, flags&DescFUsed != 0
		id := uint16(w)
		if a != u || u != wrap || int(id) >= len(q.reqs) || q.reqs[id] == nil {
			break
		}
		pos += q.chainN[id]
		if pos >= q.size {
			pos -= q.size
			wrap = !wrap
		}
	}
	return pos, wrap
}
