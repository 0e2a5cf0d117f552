package graph

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"blockbackend/internal/zeros"
)

// ErrNotSupported is wrapped by drivers that cannot do an optional
// operation efficiently (write-zeroes without fallback, for example).
var ErrNotSupported = fmt.Errorf("operation not supported: %w", syscall.ENOTSUP)

// ErrReadOnly is returned for writes to a read-only node; like QEMU it
// carries EPERM.
var ErrReadOnly = fmt.Errorf("block node is read-only: %w", syscall.EPERM)

// ErrClosed is returned for I/O on a node that has been closed.
var ErrClosed = fmt.Errorf("block node is closed: %w", syscall.ENODEV)

// maxZeroBuf bounds the buffer used when write-zeroes falls back to writes.
const maxZeroBuf = 1 << 20

var zeroBuf = make([]byte, maxZeroBuf)

func iovLen(iov [][]byte) int64 {
	var n int64
	for _, b := range iov {
		n += int64(len(b))
	}
	return n
}

// SizeNow is the cached virtual size.
func (n *Node) SizeNow() int64 { return n.size.Load() }

func (n *Node) refreshSize() error {
	s, err := n.inst.Size()
	if err != nil {
		return fmt.Errorf("node '%s': getting size: %w", n.name, err)
	}
	n.size.Store(s)
	return nil
}

func (n *Node) checkRange(off, length int64) error {
	if off < 0 || length < 0 || off > n.size.Load()-length {
		return fmt.Errorf("node '%s': request [%d, +%d) outside the %d-byte image: %w",
			n.name, off, length, n.size.Load(), syscall.EINVAL)
	}
	return nil
}

// begin takes the node's I/O lock (shared) and returns the instance.
func (n *Node) begin() (Instance, error) {
	n.io.RLock()
	if n.inst == nil {
		n.io.RUnlock()
		return nil, ErrClosed
	}
	return n.inst, nil
}

func (n *Node) end() { n.io.RUnlock() }

// ReadV reads len(iov) bytes at off.
func (n *Node) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	length := iovLen(iov)
	if err := n.checkRange(off, length); err != nil {
		return err
	}
	inst, err := n.begin()
	if err != nil {
		return err
	}
	defer n.end()
	n.rdOps.Add(1)
	n.rdBytes.Add(uint64(length))
	return inst.ReadV(ctx, off, iov)
}

// ReadAt is ReadV with one buffer (io.ReaderAt-like, with a context).
func (n *Node) ReadAt(ctx context.Context, p []byte, off int64) error {
	return n.ReadV(ctx, off, [][]byte{p})
}

// WriteAt is WriteV with one buffer.
func (n *Node) WriteAt(ctx context.Context, p []byte, off int64, flags WriteFlags) error {
	return n.WriteV(ctx, off, [][]byte{p}, flags)
}

// writable checks the read-only state without Graph.mu: readOnly only
// changes in reopen, which drains the node (holds io exclusively) first,
// and the caller holds io shared.
func (n *Node) writable() error {
	if n.readOnly {
		return ErrReadOnly
	}
	return nil
}

// beginWrite starts a request that changes [off, off+length): it checks the
// range, takes the I/O lock shared and checks the node is writable. On
// success the caller must call end.
func (n *Node) beginWrite(off, length int64) (Instance, error) {
	if err := n.checkRange(off, length); err != nil {
		return nil, err
	}
	inst, err := n.begin()
	if err != nil {
		return nil, err
	}
	if err := n.writable(); err != nil {
		n.end()
		return nil, err
	}
	return inst, nil
}

// WriteV writes iov at off. detect-zeroes turns all-zero writes into
// write-zeroes requests.
func (n *Node) WriteV(ctx context.Context, off int64, iov [][]byte, flags WriteFlags) error {
	length := iovLen(iov)
	inst, err := n.beginWrite(off, length)
	if err != nil {
		return err
	}
	defer n.end()
	defer n.markDirty(off, length)
	n.wrOps.Add(1)
	n.wrBytes.Add(uint64(length))
	if n.common.DetectZeroes != "off" && length > 0 && zeros.IsV(iov) {
		zf := ZeroFlags(0)
		if n.common.DetectZeroes == "unmap" && n.common.Discard.Unmap() {
			zf |= ZeroMayUnmap
		}
		if flags&WriteFUA != 0 {
			zf |= ZeroFUA
		}
		return n.writeZeroesLocked(ctx, inst, off, length, zf)
	}
	return inst.WriteV(ctx, off, iov, flags)
}

// Flush makes completed writes stable, unless cache.no-flush is set.
func (n *Node) Flush(ctx context.Context) error {
	inst, err := n.begin()
	if err != nil {
		return err
	}
	defer n.end()
	n.flOps.Add(1)
	if n.common.Cache.NoFlush {
		return nil
	}
	return inst.Flush(ctx)
}

// Discard passes a discard down when the node's discard option is "unmap";
// otherwise (and for drivers without Discarder) it does nothing, as QEMU.
func (n *Node) Discard(ctx context.Context, off, length int64) error {
	inst, err := n.beginWrite(off, length)
	if err != nil {
		return err
	}
	defer n.end()
	if !n.common.Discard.Unmap() || length == 0 {
		return nil
	}
	d, ok := inst.(Discarder)
	if !ok {
		return nil
	}
	defer n.markDirty(off, length)
	err = d.Discard(ctx, off, length)
	if errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EOPNOTSUPP) {
		return nil // advisory
	}
	return err
}

// WriteZeroes makes the range read as zeros. ZeroMayUnmap is honoured only
// when discard=unmap. Without an efficient driver method the graph writes
// zero buffers, unless ZeroNoFallback is set.
func (n *Node) WriteZeroes(ctx context.Context, off, length int64, flags ZeroFlags) error {
	inst, err := n.beginWrite(off, length)
	if err != nil {
		return err
	}
	defer n.end()
	defer n.markDirty(off, length)
	n.wrOps.Add(1)
	if !n.common.Discard.Unmap() {
		flags &^= ZeroMayUnmap
	}
	return n.writeZeroesLocked(ctx, inst, off, length, flags)
}

func (n *Node) writeZeroesLocked(ctx context.Context, inst Instance, off, length int64, flags ZeroFlags) error {
	if length == 0 {
		return nil
	}
	if z, ok := inst.(ZeroWriter); ok {
		err := z.WriteZeroes(ctx, off, length, flags)
		if err == nil || !errors.Is(err, syscall.ENOTSUP) {
			return err
		}
	}
	if flags&ZeroNoFallback != 0 {
		return ErrNotSupported
	}
	wf := WriteFlags(0)
	for length > 0 {
		chunk := min(length, maxZeroBuf)
		if length == chunk && flags&ZeroFUA != 0 {
			wf = WriteFUA
		}
		if err := inst.WriteV(ctx, off, [][]byte{zeroBuf[:chunk]}, wf); err != nil {
			return err
		}
		off += chunk
		length -= chunk
	}
	return nil
}

// BlockStatus describes the run of bytes starting at off (at most length).
// Without a driver method everything is allocated data.
func (n *Node) BlockStatus(ctx context.Context, off, length int64) (StatusExtent, error) {
	if err := n.checkRange(off, length); err != nil {
		return StatusExtent{}, err
	}
	if length == 0 {
		return StatusExtent{}, fmt.Errorf("node '%s': block status of an empty range: %w", n.name, syscall.EINVAL)
	}
	inst, err := n.begin()
	if err != nil {
		return StatusExtent{}, err
	}
	defer n.end()
	if s, ok := inst.(BlockStatuser); ok {
		ext, err := s.BlockStatus(ctx, off, length)
		if err != nil {
			return StatusExtent{}, err
		}
		if ext.Length <= 0 || ext.Length > length {
			return StatusExtent{}, fmt.Errorf("node '%s': driver %s returned a %d-byte extent for a %d-byte query: %w",
				n.name, n.driver.Name, ext.Length, length, syscall.EIO)
		}
		return ext, nil
	}
	// As QEMU's fallback: only a protocol node says where the data lives
	// (itself, at the same offset). A format without block status (luks)
	// has no valid offset: img map then reports encrypted data as
	// qemu-img does, not a mapping onto the node's own file name.
	if n.driver.Protocol {
		return StatusExtent{Status: StatusData | StatusAllocated, Length: length, Offset: off, File: n}, nil
	}
	return StatusExtent{Status: StatusData | StatusAllocated, Length: length}, nil
}

// Truncate resizes the node. The caller must hold the resize permission
// through some edge (block_resize attaches a temporary user for that).
func (n *Node) Truncate(ctx context.Context, size int64, exact bool, prealloc string) error {
	if size < 0 {
		return fmt.Errorf("node '%s': negative size: %w", n.name, syscall.EINVAL)
	}
	inst, err := n.begin()
	if err != nil {
		return err
	}
	defer n.end()
	if err := n.writable(); err != nil {
		return err
	}
	t, ok := inst.(Truncater)
	if !ok {
		return fmt.Errorf("Image format driver does not support resize: %w", syscall.ENOTSUP)
	}
	if prealloc == "" {
		prealloc = "off"
	}
	if err := t.Truncate(ctx, size, exact, prealloc); err != nil {
		return err
	}
	err = n.refreshSize()
	n.resizeBitmaps(n.SizeNow())
	return err
}

// RefreshSize asks the driver for the size again (after a child grew).
func (n *Node) RefreshSize() error {
	_, err := n.begin()
	if err != nil {
		return err
	}
	defer n.end()
	return n.refreshSize()
}

// Stats are counters for query-blockstats.
type Stats struct {
	RdOps, WrOps, FlushOps, RdBytes, WrBytes uint64
}

// Stats returns the node's I/O counters.
func (n *Node) Stats() Stats {
	return Stats{n.rdOps.Load(), n.wrOps.Load(), n.flOps.Load(), n.rdBytes.Load(), n.wrBytes.Load()}
}
