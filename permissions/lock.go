package permissions

import (
	"errors"
	"fmt"
	"log/slog"
	"sort"

	"golang.org/x/sys/unix"
)

// Lock byte offsets: 100+bit for each permission held, 200+bit for each
// permission not shared (bit = the index of the permission bit).
const (
	permByteBase   = 100
	sharedByteBase = 200
)

// LockError is a lock conflict with another open file description, in
// QEMU's words. Error() is the first line (what QMP sends as "desc");
// Hint() is the second line, which QEMU prints only to people.
type LockError struct {
	Perm   Perm // the bit that conflicts
	Shared bool // true: someone holds a bit we do not share
	Path   string
}

func (e *LockError) Error() string {
	if e.Shared {
		return fmt.Sprintf("Failed to get shared \"%s\" lock", e.Perm)
	}
	return fmt.Sprintf("Failed to get \"%s\" lock", e.Perm)
}

// Hint is QEMU's hint line.
func (e *LockError) Hint() string {
	return fmt.Sprintf("Is another process using the image [%s]?", e.Path)
}

// Is lets errors.Is(err, unix.EAGAIN) match, as QEMU reports -EAGAIN.
func (e *LockError) Is(target error) bool { return target == unix.EAGAIN }

// lockKind says which syscalls a Locker uses.
type lockKind int

const (
	lockNone lockKind = iota
	lockOFD
	lockPOSIX
)

// Locker holds the lock bytes of one open file description. It is not safe
// for concurrent use: the graph calls it with its lock held.
type Locker struct {
	fd   int
	path string
	kind lockKind
	held map[int64]bool // bytes locked now
	old  map[int64]bool // bytes locked before the pending Prepare
	want map[int64]bool // bytes the pending Prepare asked for
}

// ProbeOFD reports whether the kernel supports OFD locks on fd.
func ProbeOFD(fd int) bool {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 1}
	return unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk) == nil
}

// NewLocker prepares locking on fd (an open descriptor of path) in mode:
// auto uses OFD locks when the kernel has them and none otherwise; on uses
// OFD locks, or POSIX locks with QEMU's warnings; off takes none.
func NewLocker(fd int, path string, mode LockMode, log *slog.Logger) (*Locker, error) {
	l := &Locker{fd: fd, path: path, held: map[int64]bool{}}
	switch mode {
	case LockOff:
		l.kind = lockNone
	case LockAuto:
		if ProbeOFD(fd) {
			l.kind = lockOFD
		}
	case LockOn:
		if ProbeOFD(fd) {
			l.kind = lockOFD
		} else {
			l.kind = lockPOSIX
			if log != nil {
				log.Warn("File lock requested but OFD locking syscall is unavailable, falling back to POSIX file locks")
				log.Warn("Due to the implementation, locks can be lost unexpectedly.")
			}
		}
	default:
		return nil, fmt.Errorf("permissions: bad lock mode %d", mode)
	}
	return l, nil
}

// Enabled reports whether the Locker takes locks at all.
func (l *Locker) Enabled() bool { return l.kind != lockNone }

func (l *Locker) cmd(set bool) int {
	switch {
	case l.kind == lockOFD && set:
		return unix.F_OFD_SETLK
	case l.kind == lockOFD:
		return unix.F_OFD_GETLK
	case set:
		return unix.F_SETLK
	default:
		return unix.F_GETLK
	}
}

func (l *Locker) setByte(b int64, typ int16) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: b, Len: 1}
	for {
		err := unix.FcntlFlock(uintptr(l.fd), l.cmd(true), &lk)
		if err != unix.EINTR {
			return err
		}
	}
}

// othersHold reports whether another open file description holds a lock
// that conflicts with a write lock on byte b.
func (l *Locker) othersHold(b int64) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: b, Len: 1}
	if err := unix.FcntlFlock(uintptr(l.fd), l.cmd(false), &lk); err != nil {
		return false, fmt.Errorf("checking lock byte %d of %s: %w", b, l.path, err)
	}
	return lk.Type != unix.F_UNLCK, nil
}

// bytesFor is the set of bytes that (perm, shared) hold.
func bytesFor(perm, shared Perm) map[int64]bool {
	m := map[int64]bool{}
	for i, bit := range bits {
		if perm&bit != 0 {
			m[permByteBase+int64(i)] = true
		}
		if shared&bit == 0 {
			m[sharedByteBase+int64(i)] = true
		}
	}
	return m
}

// Prepare takes the locks (perm, shared) needs, keeping the old ones, and
// checks for conflicts with other holders. On error the lock set is as
// before. Exactly one of Commit and Abort must follow a successful Prepare.
func (l *Locker) Prepare(perm, shared Perm) error {
	want := bytesFor(perm, shared)
	if l.kind == lockNone {
		l.want = want
		return nil
	}
	old := clone(l.held)
	restore := func() {
		for b := range l.held {
			if !old[b] {
				_ = l.setByte(b, unix.F_UNLCK)
			}
		}
		l.held = old
	}
	for _, b := range sortedBytes(want) {
		if l.held[b] {
			continue
		}
		if err := l.setByte(b, unix.F_RDLCK); err != nil {
			restore()
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
				return l.conflict(b)
			}
			return fmt.Errorf("locking byte %d of %s: %w", b, l.path, err)
		}
		l.held[b] = true
	}
	// Needed bits conflict with others' unshared bytes; unshared bits
	// conflict with others' held bytes. QEMU checks in this order.
	for i, bit := range bits {
		if perm&bit == 0 {
			continue
		}
		busy, err := l.othersHold(sharedByteBase + int64(i))
		if err != nil {
			restore()
			return err
		}
		if busy {
			restore()
			return &LockError{Perm: bit, Path: l.path}
		}
	}
	for i, bit := range bits {
		if shared&bit != 0 {
			continue
		}
		busy, err := l.othersHold(permByteBase + int64(i))
		if err != nil {
			restore()
			return err
		}
		if busy {
			restore()
			return &LockError{Perm: bit, Shared: true, Path: l.path}
		}
	}
	l.old, l.want = old, want
	return nil
}

func (l *Locker) conflict(b int64) error {
	if b >= sharedByteBase {
		return &LockError{Perm: bits[b-sharedByteBase], Shared: true, Path: l.path}
	}
	return &LockError{Perm: bits[b-permByteBase], Path: l.path}
}

// Commit drops the locks the prepared state no longer needs.
func (l *Locker) Commit() {
	if l.kind != lockNone {
		for b := range l.held {
			if !l.want[b] {
				_ = l.setByte(b, unix.F_UNLCK)
				delete(l.held, b)
			}
		}
	}
	l.old, l.want = nil, nil
}

// Abort returns to the lock set from before Prepare.
func (l *Locker) Abort() {
	if l.kind != lockNone && l.old != nil {
		for b := range l.held {
			if !l.old[b] {
				_ = l.setByte(b, unix.F_UNLCK)
			}
		}
		l.held = l.old
	}
	l.old, l.want = nil, nil
}

// Set is Prepare followed by Commit, or nothing on error.
func (l *Locker) Set(perm, shared Perm) error {
	if err := l.Prepare(perm, shared); err != nil {
		return err
	}
	l.Commit()
	return nil
}

// Held returns the permissions whose bytes are locked now, as (perm,
// shared).
func (l *Locker) Held() (perm, shared Perm) {
	shared = All
	for i, bit := range bits {
		if l.held[permByteBase+int64(i)] {
			perm |= bit
		}
		if l.held[sharedByteBase+int64(i)] {
			shared &^= bit
		}
	}
	return perm, shared
}

// Close releases every lock byte. Safe twice.
func (l *Locker) Close() error {
	var errs []error
	if l.kind != lockNone {
		for b := range l.held {
			if err := l.setByte(b, unix.F_UNLCK); err != nil {
				errs = append(errs, err)
			}
		}
	}
	l.held = map[int64]bool{}
	return errors.Join(errs...)
}

func clone(m map[int64]bool) map[int64]bool {
	c := make(map[int64]bool, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func sortedBytes(m map[int64]bool) []int64 {
	out := make([]int64, 0, len(m))
	for b := range m {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}
