package frontend

import (
	"bytes"
	"errors"
	"fmt"
	"time"
)

// Virtio-blk request types (virtio spec 1.2, 5.2.6).
const (
	TypeIn           = 0
	TypeOut          = 1
	TypeFlush        = 4
	TypeGetID        = 8
	TypeGetLifetime  = 10
	TypeDiscard      = 11
	TypeWriteZeroes  = 13
	TypeSecureErase  = 14
	SectorSize       = 512
	GetIDSize        = 20 // VIRTIO_BLK_ID_BYTES
	WriteZeroesUnmap = 1  // DiscardSeg.Flags bit for WRITE_ZEROES
)

// Virtio-blk status values.
const (
	StatusOK     = 0
	StatusIOErr  = 1
	StatusUnsupp = 2
)

// DiscardSeg is one virtio_blk_discard_write_zeroes segment.
type DiscardSeg struct {
	Sector     uint64
	NumSectors uint32
	Flags      uint32
}

// Request is one virtio-blk request. The caller owns it and may reuse it
// once it has completed (Reap returned it or Do returned).
type Request struct {
	Type   uint32 // TypeIn, TypeOut, ...
	Ioprio uint32 // the header's reserved/ioprio field
	Sector uint64
	// Data is the payload, a buffer from Frontend.Alloc: device-writable
	// for TypeIn, TypeGetID and TypeGetLifetime, device-readable
	// otherwise.
	Data []byte
	// Segs splits Data into this many descriptors (0 means 1).
	Segs int
	// Discard, if set, is the payload of DISCARD/WRITE_ZEROES/SECURE_ERASE
	// (written into the request's slot in guest memory; Data must be nil).
	Discard []DiscardSeg
	// NoIndirect forces direct descriptors even if indirect descriptors
	// were negotiated.
	NoIndirect bool
	// Tag is for the caller (Bench keeps an index in it).
	Tag uint64

	// Status is the status byte the device wrote (0xff if it wrote none).
	Status byte
	// Written is the used length the device reported: bytes written into
	// device-writable buffers, including the status byte.
	Written uint32

	busy, done bool
	q          int
	id         uint16
}

// StatusError is a request that completed with a status other than OK.
type StatusError struct {
	Type   uint32
	Status byte
}

func (e *StatusError) Error() string {
	s := map[byte]string{StatusIOErr: "IOERR", StatusUnsupp: "UNSUPP", 0xff: "no status written"}[e.Status]
	if s == "" {
		s = fmt.Sprintf("status %d", e.Status)
	}
	return fmt.Sprintf("virtio-blk request type %d: %s", e.Type, s)
}

// Err returns nil if the request completed with StatusOK, else a
// *StatusError.
func (r *Request) Err() error {
	if r.Status == StatusOK {
		return nil
	}
	return &StatusError{r.Type, r.Status}
}

// BlkConfig is struct virtio_blk_config (virtio spec 1.2, 5.2.4). Fields
// beyond the bytes the backend returned are zero.
type BlkConfig struct {
	Capacity               uint64 // in 512-byte sectors
	SizeMax                uint32
	SegMax                 uint32
	Cylinders              uint16
	Heads                  uint8
	Sectors                uint8
	BlkSize                uint32
	PhysicalBlockExp       uint8
	AlignmentOffset        uint8
	MinIOSize              uint16
	OptIOSize              uint32
	Writeback              uint8
	NumQueues              uint16
	MaxDiscardSectors      uint32
	MaxDiscardSeg          uint32
	DiscardSectorAlignment uint32
	MaxWriteZeroesSectors  uint32
	MaxWriteZeroesSeg      uint32
	WriteZeroesMayUnmap    uint8
	Raw                    []byte
}

// ParseBlkConfig decodes as much of a virtio_blk_config as b holds.
func ParseBlkConfig(b []byte) BlkConfig {
	var full [96]byte
	copy(full[:], b)
	p := full[:]
	return BlkConfig{
		Capacity: le.Uint64(p), SizeMax: le.Uint32(p[8:]), SegMax: le.Uint32(p[12:]),
		Cylinders: le.Uint16(p[16:]), Heads: p[18], Sectors: p[19], BlkSize: le.Uint32(p[20:]),
		PhysicalBlockExp: p[24], AlignmentOffset: p[25], MinIOSize: le.Uint16(p[26:]), OptIOSize: le.Uint32(p[28:]),
		Writeback: p[32], NumQueues: le.Uint16(p[34:]),
		MaxDiscardSectors: le.Uint32(p[36:]), MaxDiscardSeg: le.Uint32(p[40:]), DiscardSectorAlignment: le.Uint32(p[44:]),
		MaxWriteZeroesSectors: le.Uint32(p[48:]), MaxWriteZeroesSeg: le.Uint32(p[52:]), WriteZeroesMayUnmap: p[56],
		Raw: bytes.Clone(b),
	}
}

// Conveniences: one request each, synchronous, on queue q. Buffers that are
// not in guest memory are copied through a per-queue bounce buffer.

const bounceSize = 1 << 20

func (f *Frontend) bounce(q int) ([]byte, error) {
	qq := f.queues[q]
	qq.mu.Lock()
	defer qq.mu.Unlock()
	if qq.bounce == nil {
		qq.bounce = f.mem.alloc(bounceSize, pageSize)
		if qq.bounce == nil {
			return nil, errors.New("frontend: guest memory exhausted (bounce buffer)")
		}
	}
	return qq.bounce, nil
}

func (f *Frontend) checkQueue(q int) error {
	if q < 0 || q >= len(f.queues) {
		return fmt.Errorf("frontend: queue %d out of range (have %d)", q, len(f.queues))
	}
	return nil
}

func checkOff(off int64, n int) error {
	if off < 0 || off%SectorSize != 0 {
		return fmt.Errorf("frontend: offset %d is not a multiple of %d", off, SectorSize)
	}
	return nil
}

// rw does IN or OUT of p at off, through the bounce buffer if needed.
func (f *Frontend) rw(q int, typ uint32, off int64, p []byte) error {
	if err := f.checkQueue(q); err != nil {
		return err
	}
	if err := checkOff(off, len(p)); err != nil {
		return err
	}
	if _, ok := f.mem.offset(p); ok || len(p) == 0 {
		r := Request{Type: typ, Sector: uint64(off) / SectorSize, Data: p}
		if err := f.Do(q, &r); err != nil {
			return err
		}
		return r.Err()
	}
	b, err := f.bounce(q)
	if err != nil {
		return err
	}
	for len(p) > 0 {
		n := min(len(p), len(b))
		if typ == TypeOut {
			copy(b, p[:n])
		}
		r := Request{Type: typ, Sector: uint64(off) / SectorSize, Data: b[:n]}
		if err := f.Do(q, &r); err != nil {
			return err
		}
		if err := r.Err(); err != nil {
			return err
		}
		if typ == TypeIn {
			copy(p, b[:n])
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Read reads len(p) bytes at byte offset off (a multiple of 512).
func (f *Frontend) Read(q int, off int64, p []byte) error { return f.rw(q, TypeIn, off, p) }

// Write writes p at byte offset off (a multiple of 512). Virtio-blk has no
// FUA bit: follow with Flush for durability.
func (f *Frontend) Write(q int, off int64, p []byte) error { return f.rw(q, TypeOut, off, p) }

// Flush sends VIRTIO_BLK_T_FLUSH.
func (f *Frontend) Flush(q int) error {
	if err := f.checkQueue(q); err != nil {
		return err
	}
	r := Request{Type: TypeFlush}
	if err := f.Do(q, &r); err != nil {
		return err
	}
	return r.Err()
}

func (f *Frontend) discardLike(q int, typ uint32, off, n int64, flags uint32) error {
	if err := f.checkQueue(q); err != nil {
		return err
	}
	if off < 0 || n < 0 || off%SectorSize != 0 || n%SectorSize != 0 || n/SectorSize > 1<<32-1 {
		return fmt.Errorf("frontend: range %d+%d is not sector-aligned or too long", off, n)
	}
	r := Request{Type: typ, Discard: []DiscardSeg{{uint64(off) / SectorSize, uint32(n / SectorSize), flags}}}
	if err := f.Do(q, &r); err != nil {
		return err
	}
	return r.Err()
}

// Discard sends one VIRTIO_BLK_T_DISCARD segment.
func (f *Frontend) Discard(q int, off, n int64) error {
	return f.discardLike(q, TypeDiscard, off, n, 0)
}

// WriteZeroes sends one VIRTIO_BLK_T_WRITE_ZEROES segment.
func (f *Frontend) WriteZeroes(q int, off, n int64, unmap bool) error {
	var fl uint32
	if unmap {
		fl = WriteZeroesUnmap
	}
	return f.discardLike(q, TypeWriteZeroes, off, n, fl)
}

// GetID returns the device's serial (VIRTIO_BLK_T_GET_ID), up to 20 bytes,
// cut at the first NUL.
func (f *Frontend) GetID(q int) (string, error) {
	if err := f.checkQueue(q); err != nil {
		return "", err
	}
	b, err := f.bounce(q)
	if err != nil {
		return "", err
	}
	clear(b[:GetIDSize])
	r := Request{Type: TypeGetID, Data: b[:GetIDSize]}
	if err := f.Do(q, &r); err != nil {
		return "", err
	}
	if err := r.Err(); err != nil {
		return "", err
	}
	id := b[:GetIDSize]
	if i := bytes.IndexByte(id, 0); i >= 0 {
		id = id[:i]
	}
	return string(id), nil
}

// Do submits r on queue q and waits for it (at most Options.IOTimeout).
// Completions of other requests collected meanwhile are kept for Reap.
func (f *Frontend) Do(q int, r *Request) error {
	if err := f.checkQueue(q); err != nil {
		return err
	}
	qq := f.queues[q]
	if err := qq.submit(r); err != nil {
		return err
	}
	qq.mu.Lock()
	defer qq.mu.Unlock()
	err := qq.wait(func() bool { return r.done }, func() int { return 1 }, f.opts.IOTimeout)
	if r.done {
		for i, d := range qq.done {
			if d == r {
				qq.done = append(qq.done[:i], qq.done[i+1:]...)
				break
			}
		}
		return nil
	}
	return fmt.Errorf("frontend: queue %d: request type %d: %w", q, r.Type, err)
}

// Submit places r in queue q and notifies the device if it asks for it.
func (f *Frontend) Submit(q int, r *Request) error {
	if err := f.checkQueue(q); err != nil {
		return err
	}
	return f.queues[q].submit(r)
}

// SubmitBatch places all of rs in queue q and notifies the device once. On
// error the requests before the failing one were submitted.
func (f *Frontend) SubmitBatch(q int, rs []*Request) error {
	if err := f.checkQueue(q); err != nil {
		return err
	}
	return f.queues[q].submit(rs...)
}

// Reap returns the requests of queue q that completed, waiting until at
// least min have (timeout < 0: no limit; 0: do not wait). With fewer than
// min by the timeout it returns those and ErrTimeout. The returned slice
// is reused by the next Reap on the same queue.
func (f *Frontend) Reap(q int, min int, timeout time.Duration) ([]*Request, error) {
	if err := f.checkQueue(q); err != nil {
		return nil, err
	}
	qq := f.queues[q]
	qq.mu.Lock()
	defer qq.mu.Unlock()
	err := qq.wait(func() bool { return len(qq.done) >= min }, func() int { return min - len(qq.done) }, timeout)
	if err == ErrTimeout && min <= 0 {
		err = nil
	}
	qq.ret, qq.done = qq.done, qq.ret[:0]
	return qq.ret, err
}

// InFlight is the number of requests submitted on q and not yet completed.
func (f *Frontend) InFlight(q int) int {
	if f.checkQueue(q) != nil {
		return 0
	}
	qq := f.queues[q]
	qq.mu.Lock()
	defer qq.mu.Unlock()
	return qq.inflight
}

// QueueStats counts, since the queue started, the kicks the frontend sent
// (kick-eventfd writes) and the times it slept in poll(2) for a call:
// the notifications a backend costs its frontend.
func (f *Frontend) QueueStats(q int) (kicks, sleeps uint64) {
	if f.checkQueue(q) != nil {
		return 0, 0
	}
	qq := f.queues[q]
	qq.mu.Lock()
	defer qq.mu.Unlock()
	return qq.kicks, qq.sleeps
}
