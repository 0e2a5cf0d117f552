package nbd

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"sync"
	"syscall"
)

// budget is a counting semaphore of bytes: it bounds the READ and WRITE
// buffers one connection holds, whatever the client pipelines.
type budget struct {
	mu    sync.Mutex
	cond  sync.Cond
	avail int64 // guarded by mu
}

func (b *budget) init(n int64) {
	b.avail = n
	b.cond.L = &b.mu
}

// acquire waits for n bytes; n never exceeds the total (MaxPayload ≤
// MaxInFlightBytes), and holders always release, so it cannot wait forever
// unless a backend call does.
func (b *budget) acquire(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	for b.avail < n {
		b.cond.Wait()
	}
	b.avail -= n
	b.mu.Unlock()
}

func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.avail += n
	b.mu.Unlock()
	b.cond.Broadcast()
}

// Buffer pools by power-of-2 size class, 4 KiB to MaxPayload: a client
// streaming 32 MiB requests would otherwise churn the garbage collector.
const (
	minPoolShift = 12
	maxPoolShift = 25 // log2(MaxPayload)
)

var bufPools [maxPoolShift - minPoolShift + 1]sync.Pool

func poolClass(n int) int {
	if n <= 1<<minPoolShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minPoolShift
}

// getBuf returns a buffer of n bytes (n ≤ MaxPayload) with stale contents:
// callers overwrite it whole before anyone reads it.
func getBuf(n int) []byte {
	if n == 0 {
		return nil
	}
	c := poolClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minPoolShift))
}

func putBuf(b []byte) {
	if cap(b) < 1<<minPoolShift || bits.OnesCount(uint(cap(b))) != 1 {
		return
	}
	c := poolClass(cap(b))
	if c >= len(bufPools) {
		return
	}
	b = b[:0]
	bufPools[c].Put(&b)
}

// zeroBuf is shared by every fallback zero write and never written to.
var zeroBuf = make([]byte, 1<<20)

// transmit is the reading side of the transmission phase: it parses
// requests, checks them, reads WRITE payloads, and hands each request to a
// worker goroutine.
func (c *conn) transmit() {
	graceful := false
	defer func() {
		if !graceful {
			// The client broke the protocol or the socket failed: stop the
			// backend calls of its requests, the replies cannot arrive.
			c.abort()
		}
		c.inflight.Wait()
	}()
	hdr := make([]byte, RequestSize)
	for {
		if err := c.readFull(hdr); err != nil {
			graceful = c.isDraining()
			if !graceful && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.log.Debug("nbd: read request", "err", err)
			}
			return
		}
		req, err := ParseRequest(hdr)
		if err != nil {
			c.log.Debug("nbd: closing connection", "err", err)
			return
		}
		if req.Type == CmdDisc {
			// "The server MUST handle all outstanding requests" and then
			// close; there is no reply.
			graceful = true
			return
		}
		if req.Type == CmdWrite && req.Length > MaxPayload {
			c.log.Debug("nbd: closing connection: write payload too large", "length", req.Length)
			return
		}
		errno, msg := c.check(req)
		var payload []byte
		var held int64
		if errno == 0 && (req.Type == CmdRead || req.Type == CmdWrite) {
			held = int64(req.Length)
		}
		c.slots <- struct{}{}
		c.budget.acquire(held)
		release := func() {
			c.budget.release(held)
			<-c.slots
		}
		if req.Type == CmdWrite {
			if errno != 0 {
				// Keep the stream in step: the payload follows anyway.
				_, err = io.CopyN(io.Discard, c.br, int64(req.Length))
			} else {
				payload = getBuf(int(req.Length))
				err = c.readFull(payload)
			}
			if err != nil {
				putBuf(payload)
				release()
				graceful = c.isDraining()
				return
			}
		}
		if errno != 0 {
			c.replyError(req, errno, msg)
			release()
			continue
		}
		c.inflight.Add(1)
		go func() {
			defer c.inflight.Done()
			defer release()
			c.handle(req, payload)
		}()
	}
}

// check validates a request against the negotiated state and the export;
// a non-zero errno fails it without calling the backend.
func (c *conn) check(r Request) (Errno, string) {
	st := c.exp
	allowed := CmdFlagFUA // "valid for all commands"
	ranged := true
	write := false
	switch r.Type {
	case CmdRead:
		if c.structured {
			allowed |= CmdFlagDF
		}
	case CmdWrite:
		write = true
	case CmdTrim:
		write = true
		if c.flags&FlagSendTrim == 0 && c.flags&FlagReadOnly == 0 {
			return EINVAL, "NBD_CMD_TRIM is not supported by this export"
		}
	case CmdWriteZeroes:
		write = true
		allowed |= CmdFlagNoHole | CmdFlagFastZero
	case CmdFlush:
		ranged = false
	case CmdCache:
	case CmdBlockStatus:
		allowed |= CmdFlagReqOne
		if !c.useMeta {
			return EINVAL, "no metadata context was negotiated"
		}
	default:
		return EINVAL, fmt.Sprintf("unknown command %v", r.Type)
	}
	if r.Flags&^allowed != 0 {
		return EINVAL, fmt.Sprintf("flags %#x are invalid for %v", uint16(r.Flags&^allowed), r.Type)
	}
	if write && !st.Writable {
		return EPERM, "export is read-only"
	}
	if !ranged {
		return 0, ""
	}
	size := uint64(c.size)
	if r.Offset > size || uint64(r.Length) > size-r.Offset {
		e := EINVAL
		if r.Type == CmdWrite || r.Type == CmdWriteZeroes {
			e = ENOSPC // "SHOULD return NBD_ENOSPC if it receives a write request ... beyond the size"
		}
		return e, fmt.Sprintf("request [%d, +%d) is beyond the export size %d", r.Offset, r.Length, size)
	}
	if c.bsAgreed && st.min > 1 {
		end := r.Offset + uint64(r.Length)
		if r.Offset%uint64(st.min) != 0 || (end%uint64(st.min) != 0 && end != size) {
			return EINVAL, fmt.Sprintf("request [%d, +%d) is not aligned to %d", r.Offset, r.Length, st.min)
		}
	}
	if (r.Type == CmdRead || r.Type == CmdWrite) && r.Length > st.max {
		return EINVAL, fmt.Sprintf("request length %d exceeds the maximum block size %d", r.Length, st.max)
	}
	if r.Type == CmdBlockStatus && r.Length == 0 {
		return EINVAL, "block status of length 0"
	}
	return 0, ""
}

// handle runs one checked request and sends its reply.
func (c *conn) handle(r Request, payload []byte) {
	b := c.exp.Backend
	ctx := c.ctx
	off, n := int64(r.Offset), int64(r.Length)
	fua := r.Flags&CmdFlagFUA != 0
	var err error
	switch r.Type {
	case CmdRead:
		buf := getBuf(int(n))
		defer putBuf(buf)
		if n > 0 {
			err = b.ReadV(ctx, off, [][]byte{buf})
		}
		if err == nil {
			c.replyRead(r, buf)
			return
		}
	case CmdWrite:
		defer putBuf(payload)
		if n > 0 {
			err = b.WriteV(ctx, off, [][]byte{payload}, fua)
		}
	case CmdFlush:
		err = b.Flush(ctx)
	case CmdTrim:
		if d, ok := b.(Discarder); ok && n > 0 {
			err = d.Discard(ctx, off, n)
			if errors.Is(err, syscall.ENOTSUP) {
				err = nil // a hint the backend may ignore
			}
			if err == nil && fua {
				err = b.Flush(ctx)
			}
		}
	case CmdWriteZeroes:
		err = c.writeZeroes(r, off, n, fua)
	case CmdCache:
		// A hint; nothing to do (the backend has no read-ahead to prime).
	case CmdBlockStatus:
		var ext []Extent
		if ext, err = c.blockStatus(r); err == nil {
			c.replyBlockStatus(r, ext)
			return
		}
	}
	if err != nil {
		e := ErrnoOf(err)
		if e == ENOTSUP && !(r.Type == CmdWriteZeroes && r.Flags&CmdFlagFastZero != 0) {
			// "SHOULD NOT return NBD_ENOTSUP except ... FAST_ZERO".
			e = EINVAL
		}
		if e == EOVERFLOW {
			e = EIO // EOVERFLOW is reserved for DF reads, which we never refuse
		}
		c.log.Debug("nbd: request failed", "cmd", r.Type.String(), "offset", r.Offset, "length", r.Length, "err", err)
		c.replyError(r, e, err.Error())
		return
	}
	c.replyOK(r)
}

func (c *conn) writeZeroes(r Request, off, n int64, fua bool) error {
	if n == 0 {
		return nil
	}
	b := c.exp.Backend
	fast := r.Flags&CmdFlagFastZero != 0
	if zw, ok := b.(ZeroWriter); ok {
		err := zw.WriteZeroes(c.ctx, off, n, r.Flags&CmdFlagNoHole == 0, fast)
		if err == nil {
			if fua {
				return b.Flush(c.ctx)
			}
			return nil
		}
		if fast || !errors.Is(err, syscall.ENOTSUP) {
			return err
		}
	} else if fast {
		return fmt.Errorf("nbd: backend cannot zero faster than it writes: %w", syscall.ENOTSUP)
	}
	// Write zero buffers ourselves, 8 MiB per call.
	for n > 0 {
		chunk := min(n, 8<<20)
		iov := make([][]byte, 0, (chunk+int64(len(zeroBuf))-1)/int64(len(zeroBuf)))
		for rem := chunk; rem > 0; {
			l := min(rem, int64(len(zeroBuf)))
			iov = append(iov, zeroBuf[:l])
			rem -= l
		}
		if err := b.WriteV(c.ctx, off, iov, fua); err != nil {
			return err
		}
		off += chunk
		n -= chunk
	}
	return nil
}

// maxExtents bounds the descriptors of one block status reply; clients
// ask again from where the reply stopped.
const maxExtents = 1024

// blockStatus describes [r.Offset, +r.Length) for base:allocation. With a
// minimum block size above 1 every extent but one ending at the export's
// end is widened to that alignment, keeping only the flags true for the
// whole of it, since descriptors "MUST use ... lengths that are an integer
// multiple of any advertised minimum block size".
func (c *conn) blockStatus(r Request) ([]Extent, error) {
	off, end := int64(r.Offset), int64(r.Offset)+int64(r.Length)
	bs, ok := c.exp.Backend.(BlockStatuser)
	if !ok {
		return []Extent{{Length: r.Length, Flags: 0}}, nil
	}
	limit := maxExtents
	if r.Flags&CmdFlagReqOne != 0 {
		limit = 1
	}
	align := int64(c.exp.min)
	var out []Extent
	for off < end && len(out) < limit {
		start := off
		flags := StateHole | StateZero
		for {
			zero, data, l, err := bs.BlockStatus(c.ctx, off, end-off)
			if err == nil && l <= 0 {
				err = fmt.Errorf("nbd: backend block status at %d returned length %d: %w", off, l, syscall.EIO)
			}
			if err != nil {
				if len(out) > 0 {
					// Report what we know; the client asks again from there.
					return out, nil
				}
				return nil, err
			}
			var f uint32
			if !data {
				f |= StateHole
			}
			if zero {
				f |= StateZero
			}
			flags &= f
			off += min(l, end-off)
			if off == end || off%align == 0 {
				break
			}
		}
		e := Extent{Length: uint32(off - start), Flags: flags}
		if k := len(out) - 1; k >= 0 && out[k].Flags == e.Flags {
			out[k].Length += e.Length // sum ≤ r.Length: cannot overflow
			continue
		}
		out = append(out, e)
	}
	return out, nil
}

// write sends one whole reply; a failure ends the connection.
func (c *conn) write(bufs net.Buffers) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := bufs.WriteTo(c.nc); err != nil {
		c.log.Debug("nbd: write reply", "err", err)
		c.abort()
	}
}

func (c *conn) replyOK(r Request) {
	c.write(net.Buffers{SimpleReply{Handle: r.Handle}.Append(make([]byte, 0, SimpleReplySize))})
}

func (c *conn) replyError(r Request, e Errno, msg string) {
	if !c.structured {
		c.write(net.Buffers{SimpleReply{Error: e, Handle: r.Handle}.Append(nil)})
		return
	}
	p := ErrorChunk{Error: e, Message: msg}.Append(nil, ReplyTypeError)
	h := ChunkHeader{Flags: ReplyFlagDone, Type: ReplyTypeError, Handle: r.Handle, Length: uint32(len(p))}.Append(nil)
	c.write(net.Buffers{append(h, p...)})
}

func (c *conn) replyRead(r Request, data []byte) {
	if !c.structured {
		c.write(net.Buffers{SimpleReply{Handle: r.Handle}.Append(nil), data})
		return
	}
	if len(data) == 0 {
		c.write(net.Buffers{ChunkHeader{Flags: ReplyFlagDone, Type: ReplyTypeNone, Handle: r.Handle}.Append(nil)})
		return
	}
	// One content chunk, marked done: the data is in memory, no error can
	// follow it. len(data) ≤ MaxPayload, so the length fits.
	h := ChunkHeader{Flags: ReplyFlagDone, Type: ReplyTypeOffsetData, Handle: r.Handle, Length: uint32(8 + len(data))}.Append(nil)
	h = be.AppendUint64(h, r.Offset)
	c.write(net.Buffers{h, data})
}

func (c *conn) replyBlockStatus(r Request, ext []Extent) {
	p := AppendBlockStatus(nil, metaContextID, ext)
	h := ChunkHeader{Flags: ReplyFlagDone, Type: ReplyTypeBlockStatus, Handle: r.Handle, Length: uint32(len(p))}.Append(nil)
	c.write(net.Buffers{append(h, p...)})
}
