package frontend

import (
	"bytes"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	vu "blockbackend/vhostuser"

	"golang.org/x/sys/unix"
)

// Raw gives hostile-input tests direct access: arbitrary messages on the
// control socket and arbitrary ring contents. Ring writes bypass the
// Frontend's bookkeeping, so once a test has written a queue's ring through
// Raw it should use only Raw on that queue.
type Raw struct{ f *Frontend }

// Raw returns the raw access handle.
func (f *Frontend) Raw() *Raw { return &Raw{f} }

// Send writes one message (flags get the version bit added).
func (r *Raw) Send(req vu.Request, flags uint32, payload []byte, fds ...int) error {
	r.f.mu.Lock()
	defer r.f.mu.Unlock()
	if err := r.f.usable(); err != nil {
		return err
	}
	return r.f.write(req, flags, payload, fds...)
}

// Recv reads one message within timeout (zero: Options.Timeout). The
// payload is a copy; the caller owns the fds.
func (r *Raw) Recv(timeout time.Duration) (vu.Message, error) {
	r.f.mu.Lock()
	defer r.f.mu.Unlock()
	if err := r.f.usable(); err != nil {
		return vu.Message{}, err
	}
	if timeout <= 0 {
		timeout = r.f.opts.Timeout
	}
	c := r.f.conn.UnixConn()
	c.SetReadDeadline(time.Now().Add(timeout))
	m, err := r.f.conn.Read()
	c.SetReadDeadline(time.Time{})
	m.Payload = bytes.Clone(m.Payload)
	return m, err
}

// Call sends a message and reads the next one.
func (r *Raw) Call(req vu.Request, flags uint32, payload []byte, fds ...int) (vu.Message, error) {
	if err := r.Send(req, flags, payload, fds...); err != nil {
		return vu.Message{}, err
	}
	return r.Recv(0)
}

// Alive reports whether the backend still answers GET_FEATURES.
func (r *Raw) Alive() error {
	m, err := r.Call(vu.GetFeatures, 0, nil)
	if err != nil {
		return err
	}
	m.CloseFDs()
	if m.Request() != vu.GetFeatures {
		return fmt.Errorf("frontend: GET_FEATURES answered with %v", m.Request())
	}
	return nil
}

// Mem is all of guest memory; Regions is how it was described.
func (r *Raw) Mem() []byte { return r.f.mem.mem }

// Regions returns the memory regions as sent to the backend.
func (r *Raw) Regions() []vu.MemRegion { return append([]vu.MemRegion(nil), r.f.mem.regions...) }

// GPA is the guest-physical address of b (a buffer inside guest memory).
func (r *Raw) GPA(b []byte) (uint64, bool) { return r.f.mem.bufGPA(b) }

// MemFD is the memfd behind guest memory (owned by the Frontend).
func (r *Raw) MemFD() int { return r.f.mem.fd }

// Desc is a split-ring descriptor.
type Desc struct {
	Addr  uint64
	Len   uint32
	Flags uint16
	Next  uint16
}

func (r *Raw) queue(q int) (*queue, error) {
	if err := r.f.checkQueue(q); err != nil {
		return nil, err
	}
	return r.f.queues[q], nil
}

// SetDesc writes descriptor i of queue q (split: the table entry; packed:
// the ring entry, with Next as the buffer id).
func (r *Raw) SetDesc(q int, i uint16, d Desc) error {
	qq, err := r.queue(q)
	if err != nil {
		return err
	}
	if i >= qq.size {
		return fmt.Errorf("frontend: descriptor %d beyond ring size %d", i, qq.size)
	}
	qq.mu.Lock()
	defer qq.mu.Unlock()
	b := qq.desc[16*int(i):]
	if qq.packed {
		le.PutUint64(b, d.Addr)
		le.PutUint32(b[8:], d.Len)
		atomic.StoreUint32(word(qq.desc, 16*int(i)+12), uint32(d.Next)|uint32(d.Flags)<<16)
	} else {
		putDesc(b, d.Addr, d.Len, d.Flags, d.Next)
	}
	return nil
}

// PushAvail appends heads to the split available ring and publishes the
// new index (without kicking).
func (r *Raw) PushAvail(q int, heads ...uint16) error {
	qq, err := r.queue(q)
	if err != nil {
		return err
	}
	if qq.packed {
		return errors.New("frontend: PushAvail on a packed ring")
	}
	qq.mu.Lock()
	defer qq.mu.Unlock()
	for _, h := range heads {
		le.PutUint16(qq.avail[4+2*int(qq.availIdx%qq.size):], h)
		qq.availIdx++
	}
	atomic.StoreUint32(word(qq.avail, 0), uint32(qq.availIdx)<<16)
	return nil
}

// SetAvailIdx publishes an arbitrary available index (split).
func (r *Raw) SetAvailIdx(q int, idx uint16) error {
	qq, err := r.queue(q)
	if err != nil {
		return err
	}
	if qq.packed {
		return errors.New("frontend: SetAvailIdx on a packed ring")
	}
	qq.mu.Lock()
	defer qq.mu.Unlock()
	qq.availIdx = idx
	atomic.StoreUint32(word(qq.avail, 0), uint32(idx)<<16)
	return nil
}

// SetAvailEntry writes entry i of the split available ring without
// publishing it.
func (r *Raw) SetAvailEntry(q int, i, head uint16) error {
	qq, err := r.queue(q)
	if err != nil {
		return err
	}
	if qq.packed {
		return errors.New("frontend: SetAvailEntry on a packed ring")
	}
	qq.mu.Lock()
	defer qq.mu.Unlock()
	le.PutUint16(qq.avail[4+2*int(i%qq.size):], head)
	return nil
}

// UsedIdx is the split used ring's index.
func (r *Raw) UsedIdx(q int) (uint16, error) {
	qq, err := r.queue(q)
	if err != nil {
		return 0, err
	}
	if qq.packed {
		return 0, errors.New("frontend: UsedIdx on a packed ring")
	}
	return uint16(atomic.LoadUint32(word(qq.used, 0)) >> 16), nil
}

// Used returns entry i (mod size) of the split used ring.
func (r *Raw) Used(q int, i uint16) (id, n uint32, err error) {
	qq, err := r.queue(q)
	if err != nil {
		return 0, 0, err
	}
	if qq.packed {
		return 0, 0, errors.New("frontend: Used on a packed ring")
	}
	e := qq.used[4+8*int(i%qq.size):]
	return le.Uint32(e), le.Uint32(e[4:]), nil
}

// Kick notifies queue q.
func (r *Raw) Kick(q int) error {
	qq, err := r.queue(q)
	if err != nil {
		return err
	}
	if _, err := unix.Write(qq.kickFD, qq.kickBuf[:]); err != nil && err != unix.EAGAIN {
		return fmt.Errorf("frontend: kick: %w", err)
	}
	return nil
}

// WaitCall waits up to timeout for the call eventfd of queue q and clears
// it; it reports whether it fired.
func (r *Raw) WaitCall(q int, timeout time.Duration) (bool, error) {
	qq, err := r.queue(q)
	if err != nil {
		return false, err
	}
	pfd := []unix.PollFd{{Fd: int32(qq.callFD), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(pfd, int(timeout/time.Millisecond))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("frontend: poll: %w", err)
		}
		if n == 0 {
			return false, nil
		}
		var b [8]byte
		unix.Read(qq.callFD, b[:])
		return true, nil
	}
}

// Bytes returns the ring memory of queue q: descriptors, and the avail
// and used rings (packed: the driver and device event areas).
func (r *Raw) Bytes(q int) (desc, avail, used []byte, err error) {
	qq, err := r.queue(q)
	if err != nil {
		return nil, nil, nil, err
	}
	return qq.desc, qq.avail, qq.used, nil
}
