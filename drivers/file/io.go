package file

import (
	"context"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
)

// ReadV reads len(iov) bytes at off. Bytes past the end of the file read
// as zeros (the file may have shrunk under us).
func (n *node) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if n.direct && !n.aligned(off, iov) {
		return n.bounceRead(off, iov)
	}
	if n.mapped != nil && n.mapped.read(off, iov) {
		return nil
	}
	err := readFull(n.fd, off, iov, n.align)
	if err == unix.EINVAL && n.direct {
		// The kernel wanted more alignment than we found out; the bounce
		// buffers meet the probed alignment at least as well.
		return n.bounceRead(off, iov)
	}
	if err != nil {
		return n.ioError("read", off, err)
	}
	return nil
}

// WriteV writes iov at off. With WriteFUA the data is on stable storage on
// return: RWF_DSYNC when the kernel has it, fdatasync otherwise.
func (n *node) WriteV(ctx context.Context, off int64, iov [][]byte, flags graph.WriteFlags) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	fua := flags&graph.WriteFUA != 0
	if n.direct {
		if !n.aligned(off, iov) {
			return n.bounceWrite(off, iov, fua)
		}
		length := iovBytes(iov)
		r := n.tracker.acquire(off, off+length, false)
		err := n.writeFUA(n.fd, off, iov, fua)
		n.tracker.release(r)
		if err == unix.EINVAL {
			return n.bounceWrite(off, iov, fua)
		}
		if err != nil {
			return n.ioError("write", off, err)
		}
		return nil
	}
	if m := n.mapped; m != nil {
		if m.write(off, iov) {
			if fua {
				if err := fdatasync(n.fd); err != nil {
					return n.ioError("write", off, err)
				}
			}
			return nil
		}
	}
	if err := n.writeFUA(n.fd, off, iov, fua); err != nil {
		return n.ioError("write", off, err)
	}
	if n.mapped != nil {
		n.mapped.grew(off + iovBytes(iov))
	}
	return nil
}

// writeFUA writes iov and, with fua, makes it stable.
func (n *node) writeFUA(fd int, off int64, iov [][]byte, fua bool) error {
	rwf := fua && !n.noRWFDSync.Load()
	err := writeFull(fd, off, iov, rwf)
	if err == errNoRWF {
		n.noRWFDSync.Store(true)
		rwf = false
		err = writeFull(fd, off, iov, false)
	}
	if err != nil {
		return err
	}
	if fua && !rwf {
		return fdatasync(fd)
	}
	return nil
}

func fdatasync(fd int) error {
	for {
		err := unix.Fdatasync(fd)
		if err != unix.EINTR {
			return err
		}
	}
}

// Flush makes every completed write stable (fdatasync). The I/O
// descriptors share the file's page cache and inode, so one call covers
// writes made through either.
func (n *node) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := fdatasync(n.fd); err != nil {
		return fmt.Errorf("file: flush '%s': %w", n.path, err)
	}
	return nil
}

func (n *node) ioError(op string, off int64, err error) error {
	return fmt.Errorf("file: %s '%s' at offset %d: %w", op, n.path, off, err)
}

func iovBytes(iov [][]byte) int64 {
	var t int64
	for _, b := range iov {
		t += int64(len(b))
	}
	return t
}

// aligned reports whether a request can go to the O_DIRECT descriptor as
// it is: the offset and every buffer's length a multiple of the request
// alignment (older kernels check each segment's length, not only the
// total) and every buffer's address a multiple of the memory alignment.
func (n *node) aligned(off int64, iov [][]byte) bool {
	a, m := n.align, uintptr(n.memAlign)
	if off&(a-1) != 0 {
		return false
	}
	for _, b := range iov {
		if len(b) == 0 {
			continue
		}
		if int64(len(b))&(a-1) != 0 || uintptr(unsafe.Pointer(&b[0]))&(m-1) != 0 {
			return false
		}
	}
	return true
}

func alignDown(x, a int64) int64 { return x &^ (a - 1) }
func alignUp(x, a int64) int64   { return (x + a - 1) &^ (a - 1) }

// bounceRead reads through aligned bounce buffers, window by window.
func (n *node) bounceRead(off int64, iov [][]byte) error {
	total := iovBytes(iov)
	if total == 0 {
		return nil
	}
	a := n.align
	start, end := alignDown(off, a), alignUp(off+total, a)
	bp := n.bounce.Get().(*[]byte)
	defer n.bounce.Put(bp)
	buf := *bp
	for pos := start; pos < end; {
		w := min(int64(len(buf)), end-pos)
		if err := readFlat(n.fd, pos, buf[:w], a); err != nil {
			return n.ioError("read", pos, err)
		}
		lo, hi := max(pos, off), min(pos+w, off+total)
		copyToIov(iov, lo-off, buf[lo-pos:hi-pos])
		pos += w
	}
	return nil
}

// bounceWrite writes a request that the O_DIRECT descriptor cannot take as
// it is. The partial first and last blocks are read, patched and written
// back whole; the aligned range is held exclusively against every other
// write for that time, so that two unaligned writes into one block (or an
// aligned write racing with the read-modify-write) cannot undo each other.
func (n *node) bounceWrite(off int64, iov [][]byte, fua bool) error {
	total := iovBytes(iov)
	if total == 0 {
		return nil
	}
	a := n.align
	start, end := alignDown(off, a), alignUp(off+total, a)
	r := n.tracker.acquire(start, end, true)
	defer n.tracker.release(r)

	if end != off+total {
		// An aligned write of the last block would grow a file whose size
		// is not a multiple of the alignment: write such requests through
		// the buffered descriptor instead (the kernel writes dirty page
		// cache back before any later O_DIRECT read of the range).
		size, err := n.Size()
		if err != nil {
			return err
		}
		if end > size {
			if err := n.writeFUA(n.bfd, off, iov, fua); err != nil {
				return n.ioError("write", off, err)
			}
			return nil
		}
	}

	bp := n.bounce.Get().(*[]byte)
	defer n.bounce.Put(bp)
	buf := *bp
	for pos := start; pos < end; {
		w := min(int64(len(buf)), end-pos)
		win := buf[:w]
		head := pos < off
		if head {
			if err := readFlat(n.fd, pos, win[:a], a); err != nil {
				return n.ioError("read-modify-write: read", pos, err)
			}
		}
		if pos+w > off+total {
			tb := pos + w - a
			if !head || tb != pos {
				if err := readFlat(n.fd, tb, win[tb-pos:], a); err != nil {
					return n.ioError("read-modify-write: read", tb, err)
				}
			}
		}
		lo, hi := max(pos, off), min(pos+w, off+total)
		copyFromIov(win[lo-pos:hi-pos], iov, lo-off)
		if err := n.writeFUA(n.fd, pos, [][]byte{win}, fua); err != nil {
			return n.ioError("write", pos, err)
		}
		pos += w
	}
	return nil
}

// errIs reports whether err is one of the errnos.
func errIs(err error, errnos ...unix.Errno) bool {
	for _, e := range errnos {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
