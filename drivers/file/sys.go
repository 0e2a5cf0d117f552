package file

import (
	"errors"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The vectored syscalls are issued directly rather than through
// unix.Preadv/Pwritev, which build a fresh []unix.Iovec per call: here
// the iovec array lives on the stack for small requests and comes from a
// pool for large ones, so that the data path does not allocate.

// iovMax is Linux's IOV_MAX (UIO_MAXIOV): the most buffers one preadv or
// pwritev takes. Longer vectors are split.
const iovMax = 1024

// smallIov buffers fit in the on-stack iovec array.
const smallIov = 16

var iovPool = sync.Pool{New: func() any { return new([iovMax]unix.Iovec) }}

// offsetHalves splits a file offset into the two registers preadv-style
// syscalls take (pos_l, pos_h); on 64-bit hosts pos_h is zero.
func offsetHalves(off int64) (lo, hi uintptr) {
	const longBits = unsafe.Sizeof(uintptr(0)) * 8
	return uintptr(off), uintptr(uint64(off) >> (longBits - 1) >> 1)
}

func preadv(fd int, vec []unix.Iovec, off int64) (int, error) {
	lo, hi := offsetHalves(off)
	r, _, e := unix.Syscall6(unix.SYS_PREADV, uintptr(fd), uintptr(unsafe.Pointer(&vec[0])), uintptr(len(vec)), lo, hi, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func pwritev2(fd int, vec []unix.Iovec, off int64, flags int) (int, error) {
	lo, hi := offsetHalves(off)
	var r uintptr
	var e unix.Errno
	if flags == 0 {
		r, _, e = unix.Syscall6(unix.SYS_PWRITEV, uintptr(fd), uintptr(unsafe.Pointer(&vec[0])), uintptr(len(vec)), lo, hi, 0)
	} else {
		r, _, e = unix.Syscall6(unix.SYS_PWRITEV2, uintptr(fd), uintptr(unsafe.Pointer(&vec[0])), uintptr(len(vec)), lo, hi, uintptr(flags))
	}
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// fillIovecs converts up to len(dst) non-empty buffers of iov into dst
// and returns the iovecs and how many entries of iov were consumed.
func fillIovecs(dst []unix.Iovec, iov [][]byte) ([]unix.Iovec, int) {
	k, i := 0, 0
	for ; i < len(iov) && k < len(dst); i++ {
		b := iov[i]
		if len(b) == 0 {
			continue
		}
		dst[k].Base = &b[0]
		dst[k].SetLen(len(b))
		k++
	}
	return dst[:k], i
}

// advance drops the first m bytes of vec.
func advance(vec []unix.Iovec, m int) []unix.Iovec {
	for m > 0 && len(vec) > 0 {
		l := int(vec[0].Len)
		if m < l {
			vec[0].Base = (*byte)(unsafe.Add(unsafe.Pointer(vec[0].Base), m))
			vec[0].SetLen(l - m)
			return vec
		}
		m -= l
		vec = vec[1:]
	}
	return vec
}

func clearIovecs(vec []unix.Iovec) {
	for _, v := range vec {
		clear(unsafe.Slice(v.Base, int(v.Len)))
	}
}

// readFull reads len(iov) bytes at off into iov, retrying EINTR and short
// reads; what lies past the end of the file reads as zeros. align is the
// O_DIRECT request alignment (1 for buffered descriptors): a short read
// that leaves the position unaligned can only be the end of the file, and
// must not be continued (the kernel would refuse the unaligned read).
func readFull(fd int, off int64, iov [][]byte, align int64) error {
	var small [smallIov]unix.Iovec
	var pooled *[iovMax]unix.Iovec
	defer func() {
		if pooled != nil {
			iovPool.Put(pooled)
		}
	}()
	for len(iov) > 0 {
		dst := small[:]
		if len(iov) > smallIov {
			if pooled == nil {
				pooled = iovPool.Get().(*[iovMax]unix.Iovec)
			}
			dst = pooled[:]
		}
		vec, used := fillIovecs(dst, iov)
		iov = iov[used:]
		for len(vec) > 0 {
			m, err := preadv(fd, vec, off)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if m == 0 {
				clearIovecs(vec)
				for _, b := range iov {
					clear(b)
				}
				return nil
			}
			off += int64(m)
			vec = advance(vec, m)
			if len(vec) > 0 && off&(align-1) != 0 {
				clearIovecs(vec)
				for _, b := range iov {
					clear(b)
				}
				return nil
			}
		}
	}
	return nil
}

// writeFull writes iov at off, retrying EINTR and short writes. With
// dsync, each syscall carries RWF_DSYNC; it reports errNoRWF when the
// kernel refuses the flag before anything was written.
func writeFull(fd int, off int64, iov [][]byte, dsync bool) error {
	var small [smallIov]unix.Iovec
	var pooled *[iovMax]unix.Iovec
	defer func() {
		if pooled != nil {
			iovPool.Put(pooled)
		}
	}()
	flags := 0
	if dsync {
		flags = unix.RWF_DSYNC
	}
	first := true
	for len(iov) > 0 {
		dst := small[:]
		if len(iov) > smallIov {
			if pooled == nil {
				pooled = iovPool.Get().(*[iovMax]unix.Iovec)
			}
			dst = pooled[:]
		}
		vec, used := fillIovecs(dst, iov)
		iov = iov[used:]
		for len(vec) > 0 {
			m, err := pwritev2(fd, vec, off, flags)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				if first && flags != 0 && (err == unix.EOPNOTSUPP || err == unix.ENOSYS) {
					return errNoRWF
				}
				return err
			}
			first = false
			if m == 0 {
				// A write that makes no progress and reports no error:
				// QEMU treats it as a full disk.
				return unix.ENOSPC
			}
			off += int64(m)
			vec = advance(vec, m)
		}
	}
	return nil
}

var errNoRWF = errors.New("RWF_DSYNC not supported")

// readFlat and writeFlat are readFull/writeFull for one buffer.
func readFlat(fd int, off int64, p []byte, align int64) error {
	return readFull(fd, off, [][]byte{p}, align)
}

func writeFlat(fd int, off int64, p []byte) error {
	return writeFull(fd, off, [][]byte{p}, false)
}

// copyToIov copies src into iov starting skip bytes into the vector.
func copyToIov(iov [][]byte, skip int64, src []byte) {
	for _, b := range iov {
		if len(src) == 0 {
			return
		}
		if skip >= int64(len(b)) {
			skip -= int64(len(b))
			continue
		}
		c := copy(b[skip:], src)
		src = src[c:]
		skip = 0
	}
}

// copyFromIov fills dst from iov starting skip bytes into the vector.
func copyFromIov(dst []byte, iov [][]byte, skip int64) {
	for _, b := range iov {
		if len(dst) == 0 {
			return
		}
		if skip >= int64(len(b)) {
			skip -= int64(len(b))
			continue
		}
		c := copy(dst, b[skip:])
		dst = dst[c:]
		skip = 0
	}
}
