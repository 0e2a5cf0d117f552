package nbd

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// Errno is an error value of the transmission phase ("Error values" in
// proto.md). The spec fixes the numbers; they happen to equal Linux's.
type Errno uint32

// Error values.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

var errnoNames = map[Errno]string{
	EPERM: "NBD_EPERM", EIO: "NBD_EIO", ENOMEM: "NBD_ENOMEM", EINVAL: "NBD_EINVAL",
	ENOSPC: "NBD_ENOSPC", EOVERFLOW: "NBD_EOVERFLOW", ENOTSUP: "NBD_ENOTSUP",
	ESHUTDOWN: "NBD_ESHUTDOWN",
}

func (e Errno) String() string {
	if s, ok := errnoNames[e]; ok {
		return s
	}
	return fmt.Sprintf("NBD_ERRNO(%d)", uint32(e))
}

// Error makes an Errno usable as a Go error (a client will return it).
func (e Errno) Error() string { return "nbd: " + e.Syscall().Error() }

// Syscall is the host errno for e, so that errors.Is(err, syscall.EIO)
// works on an error a client got from a server. The spec says to treat an
// unknown value as EINVAL.
func (e Errno) Syscall() syscall.Errno {
	switch e {
	case EPERM:
		return syscall.EPERM
	case EIO:
		return syscall.EIO
	case ENOMEM:
		return syscall.ENOMEM
	case EINVAL:
		return syscall.EINVAL
	case ENOSPC:
		return syscall.ENOSPC
	case EOVERFLOW:
		return syscall.EOVERFLOW
	case ENOTSUP:
		return syscall.ENOTSUP
	case ESHUTDOWN:
		return syscall.ESHUTDOWN
	}
	return syscall.EINVAL
}

// Is lets errors.Is match an Errno against the host errno it stands for.
func (e Errno) Is(target error) bool {
	t, ok := target.(syscall.Errno)
	return ok && t == e.Syscall()
}

// ErrnoOf maps a backend error to the value sent to the client. The mapping
// keeps errnos the spec names (EDQUOT and EFBIG become ENOSPC as it asks, a
// read-only file system becomes EPERM) and turns everything else into EIO,
// so that no host errno outside the spec's list reaches the wire. ENOTSUP
// is kept here; callers decide where the spec allows it.
func ErrnoOf(err error) Errno {
	if err == nil {
		return 0
	}
	var e Errno
	if errors.As(err, &e) && e != 0 {
		return e
	}
	switch {
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EROFS):
		return EPERM
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return ENOSPC
	case errors.Is(err, syscall.EINVAL), errors.Is(err, syscall.ERANGE):
		return EINVAL
	case errors.Is(err, syscall.EOVERFLOW):
		return EOVERFLOW
	case errors.Is(err, syscall.ENOTSUP), errors.Is(err, syscall.EOPNOTSUPP):
		return ENOTSUP
	case errors.Is(err, syscall.ENOMEM):
		return ENOMEM
	case errors.Is(err, syscall.ESHUTDOWN), errors.Is(err, context.Canceled):
		// A request cancelled because its export is going away: the spec's
		// shutdown errno tells the client to disconnect softly.
		return ESHUTDOWN
	}
	return EIO
}
