package file

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

func fallocate(fd int, mode uint32, off, length int64) error {
	for {
		err := unix.Fallocate(fd, mode, off, length)
		if err != unix.EINTR {
			return err
		}
	}
}

// unsupported reports errnos that mean "this file system cannot".
func unsupported(err error) bool {
	return errIs(err, unix.EOPNOTSUPP, unix.ENOTSUP, unix.ENOSYS, unix.ENOTTY)
}

// trackWrite holds a plain-write slot in the O_DIRECT tracker for a
// request that changes file contents outside WriteV, so that it is
// ordered against read-modify-write cycles on the same blocks.
func (n *node) trackWrite(off, length int64) func() {
	if !n.direct {
		return func() {}
	}
	a := n.align
	r := n.tracker.acquire(alignDown(off, a), alignUp(off+length, a), false)
	return func() { n.tracker.release(r) }
}

// Discard punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE). On file systems
// without hole punching it reports ErrNotSupported, which the graph ignores
// (discard is advisory).
func (n *node) Discard(ctx context.Context, off, length int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if n.noPunchHole.Load() {
		return fmt.Errorf("file: discard on '%s': %w", n.path, graph.ErrNotSupported)
	}
	done := n.trackWrite(off, length)
	defer done()
	err := fallocate(n.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if unsupported(err) {
		n.noPunchHole.Store(true)
		return fmt.Errorf("file: discard on '%s': %v: %w", n.path, err, graph.ErrNotSupported)
	}
	if err != nil {
		return fmt.Errorf("file: discard on '%s' at offset %d: %w", n.path, off, err)
	}
	return nil
}

// WriteZeroes makes [off, off+length) read as zeros without writing data:
//   - with ZeroMayUnmap, by punching a hole (on Linux a punched range
//     always reads back as zeros);
//   - otherwise with FALLOC_FL_ZERO_RANGE, which keeps the blocks
//     allocated; where that is missing, by punching and then allocating
//     the range again.
//
// A range that ends past the end of the file extends it, as a write would.
// When the file system can do none of these it returns an error wrapping
// graph.ErrNotSupported and the graph writes zero buffers.
func (n *node) WriteZeroes(ctx context.Context, off, length int64, flags graph.ZeroFlags) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	done := n.trackWrite(off, length)
	defer done()
	err := n.zeroRange(off, length, flags&graph.ZeroMayUnmap != 0)
	if err != nil {
		return err
	}
	if err := n.extendTo(off + length); err != nil {
		return err
	}
	if flags&graph.ZeroFUA != 0 {
		if err := fdatasync(n.fd); err != nil {
			return fmt.Errorf("file: write zeroes on '%s': sync: %w", n.path, err)
		}
	}
	return nil
}

func (n *node) zeroRange(off, length int64, mayUnmap bool) error {
	const punch = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	if mayUnmap && !n.noPunchHole.Load() {
		err := fallocate(n.fd, punch, off, length)
		if err == nil {
			return nil
		}
		if !unsupported(err) {
			return fmt.Errorf("file: write zeroes on '%s' at offset %d: %w", n.path, off, err)
		}
		n.noPunchHole.Store(true)
	}
	if !n.noZeroRange.Load() {
		err := fallocate(n.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if err == nil {
			return nil
		}
		if !unsupported(err) {
			return fmt.Errorf("file: write zeroes on '%s' at offset %d: %w", n.path, off, err)
		}
		n.noZeroRange.Store(true)
	}
	if !n.noPunchHole.Load() {
		// Punch, then allocate again so that the range stays allocated
		// (the caller did not allow unmapping).
		err := fallocate(n.fd, punch, off, length)
		if err == nil {
			err = fallocate(n.fd, unix.FALLOC_FL_KEEP_SIZE, off, length)
			if err == nil || unsupported(err) {
				// The range reads as zeros either way; only its
				// allocation is uncertain, which is allowed.
				return nil
			}
			return fmt.Errorf("file: write zeroes on '%s' at offset %d: %w", n.path, off, err)
		}
		if !unsupported(err) {
			return fmt.Errorf("file: write zeroes on '%s' at offset %d: %w", n.path, off, err)
		}
		n.noPunchHole.Store(true)
	}
	return fmt.Errorf("file: write zeroes on '%s': %w", n.path, graph.ErrNotSupported)
}

// extendTo grows the file to end if it is shorter (fallocate with
// KEEP_SIZE leaves the size alone).
func (n *node) extendTo(end int64) error {
	size, err := n.Size()
	if err != nil {
		return err
	}
	if end <= size {
		return nil
	}
	if err := unix.Ftruncate(n.fd, end); err != nil {
		return fmt.Errorf("file: extending '%s' to %d bytes: %w", n.path, end, err)
	}
	if n.mapped != nil {
		n.mapped.grew(end)
	}
	return nil
}

// BlockStatus answers with lseek(SEEK_DATA/SEEK_HOLE). Data is
// StatusData|StatusAllocated; a hole is StatusZero|StatusAllocated — that
// is what `qemu-img map --output=json -f raw` prints for a sparse file
// ("present": true, "zero": true, "data": false) — and both point at this
// node's file at the same offset. A file system without SEEK_DATA reports
// everything as data.
func (n *node) BlockStatus(ctx context.Context, off, length int64) (graph.StatusExtent, error) {
	if err := ctx.Err(); err != nil {
		return graph.StatusExtent{}, err
	}
	data := graph.StatusExtent{Status: graph.StatusData | graph.StatusAllocated, Length: length, Offset: off, File: n.gnode}
	zero := graph.StatusExtent{Status: graph.StatusZero | graph.StatusAllocated, Length: length, Offset: off, File: n.gnode}
	end := off + length
	d, err := unix.Seek(n.fd, off, unix.SEEK_DATA)
	switch {
	case err == unix.ENXIO:
		// No data at or after off: a hole up to the end of the file, and
		// past it the file reads as zeros too.
		return zero, nil
	case err != nil:
		// EINVAL and friends: no SEEK_DATA here. Everything is data.
		return data, nil
	case d > off:
		zero.Length = min(d, end) - off
		return zero, nil
	case d < off:
		// Cannot happen with a sane kernel; do not trust the answer.
		return data, nil
	}
	h, err := unix.Seek(n.fd, off, unix.SEEK_HOLE)
	if err != nil || h <= off {
		// The data may have been punched between the two calls (ENXIO), or
		// the answer is nonsense: report data, which is always safe.
		return data, nil
	}
	data.Length = min(h, end) - off
	return data, nil
}

// Truncate resizes the file to exactly size (regular files always resize
// exactly, whatever exact says). prealloc applies to the new part when
// growing: "off" leaves a hole, "falloc" allocates it with fallocate,
// "full" writes zeros to it.
func (n *node) Truncate(ctx context.Context, size int64, exact bool, prealloc string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if size < 0 {
		return fmt.Errorf("file: negative size %d: %w", size, unix.EINVAL)
	}
	cur, err := n.Size()
	if err != nil {
		return err
	}
	if n.mapped != nil && size < cur {
		// No copy may go past the new end while the file shrinks (within
		// its last page it would not fault, and would be lost).
		n.mapped.shrink(size)
	}
	err = resize(ctx, n.bfd, n.path, cur, size, prealloc)
	if n.mapped != nil {
		// Grown or shrunk, or half-way through a failed full
		// preallocation: take the size from the file.
		n.mapped.resync()
	}
	return err
}

// resize grows or shrinks fd from cur to size with the preallocation mode.
// It is shared with image creation.
func resize(ctx context.Context, fd int, path string, cur, size int64, prealloc string) error {
	switch prealloc {
	case "", "off":
		if err := unix.Ftruncate(fd, size); err != nil {
			return qapi.Errorf(qapi.GenericError, "Could not resize file: %w", err)
		}
		return nil
	case "falloc", "full":
	case "metadata":
		return qapi.Errorf(qapi.GenericError, "Unsupported preallocation mode: metadata: %w", unix.ENOTSUP)
	default:
		return qapi.Errorf(qapi.GenericError, "Unsupported preallocation mode: %s: %w", prealloc, unix.ENOTSUP)
	}
	if size < cur {
		return qapi.Errorf(qapi.GenericError, "Cannot use preallocation for shrinking files: %w", unix.ENOTSUP)
	}
	if size == cur {
		return nil
	}
	if prealloc == "falloc" {
		// posix_fallocate's semantics: allocate and extend.
		if err := fallocate(fd, 0, cur, size-cur); err != nil {
			return qapi.Errorf(qapi.GenericError, "Could not preallocate new data: %w", err)
		}
		return nil
	}
	// full: extend, then write zeros over the new part so that every block
	// is allocated and written.
	if err := unix.Ftruncate(fd, size); err != nil {
		return qapi.Errorf(qapi.GenericError, "Could not resize file: %w", err)
	}
	zeros := make([]byte, min(size-cur, fullChunk))
	for pos := cur; pos < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		c := min(int64(len(zeros)), size-pos)
		if err := writeFlat(fd, pos, zeros[:c]); err != nil {
			return qapi.Errorf(qapi.GenericError, "Could not write zeros for preallocation: %w", err)
		}
		pos += c
	}
	if err := fdatasync(fd); err != nil {
		return qapi.Errorf(qapi.GenericError, "Could not flush file: %w", err)
	}
	return nil
}

// fullChunk is the size of each write of preallocation=full.
const fullChunk = 1 << 20
