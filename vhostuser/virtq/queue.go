package virtq

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// Config describes a ring as the frontend set it up.
type Config struct {
	Size uint16 // number of descriptors, a power of two for split rings
	// Frontend user addresses: for a split ring the descriptor table,
	// available and used rings; for a packed ring the descriptor ring,
	// the driver event suppression area and the device one.
	Desc, Avail, Used uint64

	Packed, EventIdx, Indirect bool
	NotifyOnEmpty              bool // VIRTIO_F_NOTIFY_ON_EMPTY

	// Base is SET_VRING_BASE's value: for a split ring the next available
	// index; for a packed ring the next available index with its wrap
	// counter in bit 15, and (frontends that send it) the used index and
	// its wrap counter in bits 16-31.
	Base uint32

	// Inflight is the ring's inflight tracking region (vhost-user
	// INFLIGHT_SHMFD), already initialised; nil if not in use.
	Inflight []byte

	MaxChain int // the most descriptors in one request (zero: Size)
}

// Chain is one request: the buffers of a descriptor chain, device-readable
// (Out) then device-writable (In), as slices of guest memory. Only the
// goroutine that popped it (or the one it hands the chain to) may use it,
// until Push or Complete. The device may reslice the elements of Out and
// In in place (Complete does not look at them), but not grow the
// slices.
type Chain struct {
	Head          uint16 // descriptor index (split) or buffer id (packed)
	Out, In       [][]byte
	OutLen, InLen uint64

	// Err is set when some buffer of the chain is unusable (outside guest
	// memory, a readable buffer after a writable one, a descriptor loop,
	// a chain too long). TailOK then says whether the last writable
	// buffer is still sound, so that the device can answer with an error
	// status there.
	Err    error
	TailOK bool

	ndesc    uint16   // ring slots the chain takes (packed)
	slot     uint16   // inflight entry (packed)
	inGuest  []uint64 // guest addresses of the In buffers, for the dirty log
	inLens   []uint64
	inflight bool // tracked in the inflight region
}

func (c *Chain) reset() {
	c.Head, c.Out, c.In, c.OutLen, c.InLen, c.Err, c.TailOK = 0, c.Out[:0], c.In[:0], 0, 0, nil, false
	c.ndesc, c.slot, c.inGuest, c.inLens, c.inflight = 0, 0, c.inGuest[:0], c.inLens[:0], false
}

// Queue is the device side of one ring. Pop, Resubmit, DisableNotify and
// EnableNotify belong to one goroutine at a time (the ring's worker);
// Push, Complete, Notify, SetLog and Base may be called from any
// goroutine.
type Queue struct {
	mem      *Memory
	size     uint16
	eventIdx bool
	indirect bool
	onEmpty  bool
	maxChain int
	log      atomic.Pointer[DirtyLog]

	// outstanding counts popped requests not yet pushed.
	outstanding atomic.Int32

	split  *splitRing
	packed *packedRing

	// pushMu serialises the used side (and the inflight region, which
	// both sides update).
	pushMu sync.Mutex
	// pending counts the completions since the last Notify; guarded by
	// pushMu.
	pending uint32

	resubmit []uint16 // inflight entries still to resubmit, in order
}

// Descriptor flags (the same bits in split and packed descriptors).
const (
	descNext     = 1
	descWrite    = 2
	descIndirect = 4
)

const descSize = 16

// errors that break the ring itself.
var errRing = errors.New("virtqueue")

// New starts serving a ring over mem.
func New(mem *Memory, cfg Config) (*Queue, error) {
	if mem == nil {
		return nil, fmt.Errorf("%w: no memory table", errRing)
	}
	if cfg.Size == 0 || cfg.Size > 32768 || (!cfg.Packed && cfg.Size&(cfg.Size-1) != 0) {
		return nil, fmt.Errorf("%w: invalid ring size %d", errRing, cfg.Size)
	}
	q := &Queue{mem: mem, size: cfg.Size, eventIdx: cfg.EventIdx, indirect: cfg.Indirect,
		onEmpty: cfg.NotifyOnEmpty, maxChain: cfg.MaxChain}
	if q.maxChain <= 0 || q.maxChain > int(cfg.Size) && !cfg.Indirect {
		q.maxChain = int(cfg.Size)
	}
	var err error
	if cfg.Packed {
		q.packed, err = newPacked(q, cfg)
	} else {
		q.split, err = newSplit(q, cfg)
	}
	if err != nil {
		return nil, err
	}
	return q, nil
}

// ringArea maps a ring area given by user address, checking its alignment.
func ringArea(mem *Memory, what string, addr, n uint64, align uint64) ([]byte, error) {
	if addr%align != 0 {
		return nil, fmt.Errorf("%w: %s at %#x is not %d-byte aligned", errRing, what, addr, align)
	}
	b, err := mem.User(addr, n)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", errRing, what, err)
	}
	return b, nil
}

// SetLog turns dirty logging on (l non-nil) or off.
func (q *Queue) SetLog(l *DirtyLog) { q.log.Store(l) }

// Pop takes the next available request into c. It returns false when the
// ring is empty, and an error when the ring is broken beyond use.
func (q *Queue) Pop(c *Chain) (bool, error) {
	c.reset()
	var ok bool
	var err error
	if q.packed != nil {
		ok, err = q.packed.pop(c)
	} else {
		ok, err = q.split.pop(c)
	}
	if ok {
		q.outstanding.Add(1)
	}
	return ok, err
}

// Resubmit takes the next request that a previous backend had in flight
// (from the inflight region), oldest first; false when there is none left.
func (q *Queue) Resubmit(c *Chain) (bool, error) {
	if len(q.resubmit) == 0 {
		return false, nil
	}
	c.reset()
	slot := q.resubmit[0]
	q.resubmit = q.resubmit[1:]
	if q.packed != nil {
		q.packed.resubmitChain(c, slot)
	} else {
		q.split.resubmitChain(c, slot)
	}
	q.outstanding.Add(1)
	return true, nil
}

// Push returns c to the driver with written bytes in its writable
// buffers, and says whether the driver wants to be notified: it is
// Complete followed by Notify.
func (q *Queue) Push(c *Chain, written uint32) bool {
	q.Complete(c, written)
	return q.Notify()
}

// Complete returns c to the driver with written bytes in its writable
// buffers, without deciding about a notification: a later Notify decides
// for every completion since the one before it, so that a batch of
// completions costs the driver one interrupt. Every Complete must be
// followed by a Notify (whose true answer is acted on), or a driver
// waiting for the completion may never hear of it.
func (q *Queue) Complete(c *Chain, written uint32) {
	if l := q.log.Load(); l != nil {
		q.logWritten(l, c, written)
	}
	q.pushMu.Lock()
	if q.packed != nil {
		q.packed.push(c, written)
	} else {
		q.split.push(c, written)
	}
	q.pending++
	q.pushMu.Unlock()
	q.outstanding.Add(-1)
}

// Notify reports whether the driver must be notified of the completions
// since the previous Notify: with VIRTIO_F_EVENT_IDX, whether the used
// index moved past the driver's used_event (virtio 1.2, 2.7.10 and
// 2.8.10: the test over the whole batch, as a device that publishes
// several used elements at once applies it), else whether the driver
// left notifications on (VIRTQ_AVAIL_F_NO_INTERRUPT clear, or the packed
// ring's driver event flags not "disable"). With VIRTIO_F_NOTIFY_ON_EMPTY
// the device also notifies when it has used every buffer and none is
// available, whatever the driver asked. Without completions since the
// previous Notify the answer is false.
func (q *Queue) Notify() bool {
	q.pushMu.Lock()
	n := q.pending
	q.pending = 0
	var notify bool
	if n > 0 {
		// The used index was published before the driver's
		// suppression is read (the driver does the mirror image).
		fence()
		if q.packed != nil {
			notify = q.packed.needNotify(n)
		} else {
			notify = q.split.needNotify(n)
		}
	}
	q.pushMu.Unlock()
	if n > 0 && !notify && q.onEmpty && q.outstanding.Load() == 0 && q.empty() {
		notify = true
	}
	return notify
}

// Pending reports whether the driver has made requests available that
// Pop has not taken yet (for a worker that polls before it sleeps).
func (q *Queue) Pending() bool { return !q.empty() }

func (q *Queue) empty() bool {
	if q.packed != nil {
		return !q.packed.availableNow()
	}
	return q.split.availIdx() == q.split.lastAvail.Load()
}

// logWritten marks the guest pages the device wrote for c.
func (q *Queue) logWritten(l *DirtyLog, c *Chain, written uint32) {
	left := uint64(written)
	for i, a := range c.inGuest {
		if left == 0 {
			break
		}
		n := min(left, c.inLens[i])
		l.Mark(a, n)
		left -= n
	}
}

// logUser marks n bytes at the ring's user address addr.
func (q *Queue) logUser(addr, n uint64) {
	if l := q.log.Load(); l != nil {
		if g, ok := q.mem.userToGuest(addr); ok {
			l.Mark(g, n)
		}
	}
}

// DisableNotify asks the driver not to kick while the worker drains the
// ring.
func (q *Queue) DisableNotify() {
	if q.packed != nil {
		q.packed.setNotify(false)
	} else {
		q.split.setNotify(false)
	}
}

// EnableNotify asks the driver to kick again and reports whether requests
// arrived meanwhile (then the worker must drain again).
func (q *Queue) EnableNotify() bool {
	if q.packed != nil {
		q.packed.setNotify(true)
		fence()
		return q.packed.availableNow()
	}
	q.split.setNotify(true)
	fence()
	return q.split.availIdx() != q.split.lastAvail.Load()
}

// Base returns the ring position for GET_VRING_BASE; call it once the ring
// is idle (no request between Pop and Push).
func (q *Queue) Base() uint32 {
	if q.packed != nil {
		return q.packed.base()
	}
	return uint32(q.split.lastAvail.Load())
}

// needEvent is the event-index test of the virtio specification: whether
// moving an index from old to new passed the event index ev.
func needEvent(ev, new, old uint16) bool { return new-ev-1 < new-old }

// addDesc appends one data descriptor's buffer to c, recording errors in
// c.Err; last says it ends the chain.
func (q *Queue) addDesc(c *Chain, addr uint64, n uint32, flags uint16, last bool) {
	write := flags&descWrite != 0
	if !write && (len(c.In) > 0 || len(c.inGuest) > 0) {
		c.fail(fmt.Errorf("%w: a device-readable buffer follows a device-writable one", errRing))
		return
	}
	if n == 0 {
		return
	}
	var err error
	if write {
		k := len(c.In)
		c.In, err = q.mem.AppendIOV(c.In, addr, uint64(n))
		if err != nil {
			c.In = c.In[:k]
			c.fail(err)
			if last {
				c.TailOK = false
			}
			return
		}
		c.InLen += uint64(n)
		c.inGuest = append(c.inGuest, addr)
		c.inLens = append(c.inLens, uint64(n))
		if last {
			c.TailOK = true
		}
		return
	}
	k := len(c.Out)
	c.Out, err = q.mem.AppendIOV(c.Out, addr, uint64(n))
	if err != nil {
		c.Out = c.Out[:k]
		c.fail(err)
		return
	}
	c.OutLen += uint64(n)
}

func (c *Chain) fail(err error) {
	if c.Err == nil {
		c.Err = err
	}
}

// walkIndirect adds the descriptors of an indirect table at guest address
// addr of n bytes. Its entries are split-format (next links) for split
// rings and sequential for packed ones.
func (q *Queue) walkIndirect(c *Chain, addr uint64, n uint32, packed bool) {
	if !q.indirect {
		c.fail(fmt.Errorf("%w: indirect descriptor without VIRTIO_F_INDIRECT_DESC", errRing))
		return
	}
	if n == 0 || n%descSize != 0 {
		c.fail(fmt.Errorf("%w: indirect table of %d bytes", errRing, n))
		return
	}
	count := n / descSize
	if int(count) > q.maxChain {
		c.fail(fmt.Errorf("%w: indirect table of %d descriptors exceeds %d", errRing, count, q.maxChain))
		return
	}
	table, err := q.mem.Guest(addr, uint64(n))
	if err != nil {
		c.fail(err)
		return
	}
	// The driver must not change the table while the request is in
	// flight; read each descriptor once anyway.
	i := uint32(0)
	for steps := uint32(0); ; steps++ {
		if steps >= count {
			c.fail(fmt.Errorf("%w: loop in an indirect table", errRing))
			return
		}
		d := table[i*descSize : (i+1)*descSize]
		daddr, dlen := le.Uint64(d), le.Uint32(d[8:])
		var dflags, dnext uint16
		if packed {
			dflags = le.Uint16(d[14:]) // id at 12 is unused in a table
		} else {
			dflags, dnext = le.Uint16(d[12:]), le.Uint16(d[14:])
		}
		if dflags&descIndirect != 0 {
			c.fail(fmt.Errorf("%w: indirect descriptor inside an indirect table", errRing))
			return
		}
		var more bool
		if packed {
			more = i+1 < count
		} else {
			more = dflags&descNext != 0
		}
		q.addDesc(c, daddr, dlen, dflags, !more)
		if !more {
			return
		}
		if packed {
			i++
		} else {
			i = uint32(dnext)
			if i >= count {
				c.fail(fmt.Errorf("%w: indirect descriptor links to %d of %d", errRing, i, count))
				return
			}
		}
	}
}
