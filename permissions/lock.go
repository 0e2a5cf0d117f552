package permissions

import (
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"

	"golang.org/x/sys/unix"
)

// Lock byte offsets: 100+bit for each permission held, 200+bit for each
// permission not shared (bit = the index of the permission bit).
const (
	PermByteBase   = 100
	SharedByteBase = 200
)

// LockError is a conflict with a lock held by another open file
// description, in QEMU's words.
//
// Error() is the first line only, `Failed to get "write" lock` or
// `Failed to get shared "write" lock`: that is what QEMU sends as a QMP
// error's "desc". Hint() is the second line, `Is another process using the
// image [PATH]?`, which QEMU prints only to people (qemu-img, qemu-io, a
// start-up error); Full() is both lines joined by "\n", as those print it.
type LockError struct {
	Perm   Perm // the one bit that conflicts
	Shared bool // false: someone does not share a bit we need; true: someone holds a bit we do not share
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

// Full is the message and the hint as QEMU's tools print them.
func (e *LockError) Full() string { return e.Error() + "\n" + e.Hint() }

// Is lets errors.Is(err, unix.EAGAIN) match: a conflict is EAGAIN, as the
// lock syscalls and QEMU report it.
func (e *LockError) Is(target error) bool { return target == unix.EAGAIN }

// ByteError is a failed lock or unlock of one byte, in QEMU's words
// ("Failed to lock byte 101"). Locking fails with EAGAIN only when another
// program holds a write lock on the byte, which QEMU never takes; the errno
// stays reachable with errors.Is.
type ByteError struct {
	Op   string // "lock" or "unlock"
	Byte int64
	Path string
	Err  error // the errno
}

func (e *ByteError) Error() string { return fmt.Sprintf("Failed to %s byte %d", e.Op, e.Byte) }
func (e *ByteError) Unwrap() error { return e.Err }

// lockKind says which syscalls a Locker uses.
type lockKind int

const (
	lockNone lockKind = iota
	lockOFD
	lockPOSIX
)

// Locker holds the lock bytes of one open file description (one file
// node). Its methods are safe for concurrent use, but a Prepare must be
// followed by Commit or Abort before another transaction starts; the graph
// serialises its permission changes anyway.
type Locker struct {
	fd   int
	path string
	kind lockKind

	mu      sync.Mutex
	held    map[int64]bool // guarded by mu: bytes locked now
	old     map[int64]bool // guarded by mu: bytes locked before the pending Prepare
	want    map[int64]bool // guarded by mu: bytes the pending Prepare asked for
	pending bool           // guarded by mu: a Prepare awaits Commit or Abort
}

// probeOFD is ProbeOFD; tests replace it to act out a kernel without OFD
// locks.
var probeOFD = ProbeOFD

// ProbeOFD reports whether the kernel supports OFD locks on fd: it asks
// F_OFD_GETLK about byte 0, which changes nothing.
func ProbeOFD(fd int) bool {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 1}
	return unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk) == nil
}

// NewLocker prepares locking on fd, an open descriptor of path (path is
// used in messages only). mode decides:
//
//   - LockAuto: OFD locks when the kernel has them on fd, else none;
//   - LockOn: OFD locks, or POSIX locks with QEMU's two warnings on log
//     (POSIX locks are process-wide: closing any descriptor of the file in
//     this process drops them, and this process's own locks never conflict);
//   - LockOff: no locks at all.
//
// It takes no lock; the first Prepare or Set does. fd stays the caller's.
func NewLocker(fd int, path string, mode LockMode, log *slog.Logger) (*Locker, error) {
	l := &Locker{fd: fd, path: path, held: map[int64]bool{}}
	switch mode {
	case LockOff:
		l.kind = lockNone
	case LockAuto:
		if probeOFD(fd) {
			l.kind = lockOFD
		}
	case LockOn:
		if probeOFD(fd) {
			l.kind = lockOFD
		} else {
			l.kind = lockPOSIX
			if log != nil {
				log.Warn("File lock requested but OFD locking syscall is unavailable, falling back to POSIX file locks")
				log.Warn("Due to the implementation, locks can be lost unexpectedly.")
			}
		}
	default:
		return nil, fmt.Errorf("permissions: bad lock mode %d", int(mode))
	}
	return l, nil
}

// Enabled reports whether the Locker takes locks at all.
func (l *Locker) Enabled() bool { return l.kind != lockNone }

// OFD reports whether the Locker uses OFD locks (false: POSIX or none).
func (l *Locker) OFD() bool { return l.kind == lockOFD }

func (l *Locker) setCmd() int {
	if l.kind == lockOFD {
		return unix.F_OFD_SETLK
	}
	return unix.F_SETLK
}

func (l *Locker) getCmd() int {
	if l.kind == lockOFD {
		return unix.F_OFD_GETLK
	}
	return unix.F_GETLK
}

// setByte takes (F_RDLCK) or drops (F_UNLCK) the lock on byte b, without
// waiting for others.
func (l *Locker) setByte(b int64, typ int16) error {
	for {
		lk := unix.Flock_t{Type: typ, Whence: 0, Start: b, Len: 1}
		err := unix.FcntlFlock(uintptr(l.fd), l.setCmd(), &lk)
		if err != unix.EINTR {
			return err
		}
	}
}

// othersHold reports whether another open file description (another
// process, with POSIX locks) holds a lock that conflicts with a write lock
// on byte b, that is: any lock on b.
func (l *Locker) othersHold(b int64) (bool, error) {
	for {
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: b, Len: 1}
		err := unix.FcntlFlock(uintptr(l.fd), l.getCmd(), &lk)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("permissions: testing lock byte %d of %s: %w", b, l.path, err)
		}
		return lk.Type != unix.F_UNLCK, nil
	}
}

// bytesFor is the set of bytes that (perm, shared) hold. Bits outside All
// are never locked.
func bytesFor(perm, shared Perm) map[int64]bool {
	m := map[int64]bool{}
	for i, bit := range bits {
		if perm&bit != 0 {
			m[PermByteBase+int64(i)] = true
		}
		if shared&bit == 0 {
			m[SharedByteBase+int64(i)] = true
		}
	}
	return m
}

// Bytes lists, in ascending order, the lock bytes QEMU holds for (perm,
// shared): 100+bit for each bit in perm, 200+bit for each bit of All not in
// shared.
func Bytes(perm, shared Perm) []int64 { return sortedBytes(bytesFor(perm, shared)) }

// Check reports whether holding (perm, shared) would conflict with locks
// that other open file descriptions hold; it changes no lock. It returns
// nil when locking is off.
//
// Which conflict is named when there are several: first the bits of perm,
// in bit order (consistent read, write, write unchanged, resize), each
// tested on byte 200+bit (`Failed to get "…" lock`); then the bits not in
// shared, in the same order, each on byte 100+bit (`Failed to get shared
// "…" lock`). The first one found is returned, as QEMU does.
func (l *Locker) Check(perm, shared Perm) error {
	if l.kind == lockNone {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.check(perm, shared)
}

func (l *Locker) check(perm, shared Perm) error {
	for i, bit := range bits {
		if perm&bit == 0 {
			continue
		}
		busy, err := l.othersHold(SharedByteBase + int64(i))
		if err != nil {
			return err
		}
		if busy {
			return &LockError{Perm: bit, Path: l.path}
		}
	}
	for i, bit := range bits {
		if shared&bit != 0 {
			continue
		}
		busy, err := l.othersHold(PermByteBase + int64(i))
		if err != nil {
			return err
		}
		if busy {
			return &LockError{Perm: bit, Shared: true, Path: l.path}
		}
	}
	return nil
}

// Prepare is the first phase of a permission change: it takes the bytes
// that (perm, shared) need while keeping the ones held now (the union, so
// that no other process can slip in between the phases), then checks for
// conflicts with other holders (see Check for which one is reported). On
// error the lock set is exactly as before the call. After a successful
// Prepare exactly one of Commit and Abort must follow; a second Prepare
// before that replaces the pending request but keeps the same baseline
// for Abort.
//
// With locking off it only records the request.
func (l *Locker) Prepare(perm, shared Perm) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	want := bytesFor(perm, shared)
	if l.kind == lockNone {
		l.want, l.pending = want, true
		return nil
	}
	before := clone(l.held)
	for _, b := range sortedBytes(want) {
		if l.held[b] {
			continue
		}
		if err := l.setByte(b, unix.F_RDLCK); err != nil {
			l.dropExcept(before)
			return &ByteError{Op: "lock", Byte: b, Path: l.path, Err: err}
		}
		l.held[b] = true
	}
	if err := l.check(perm, shared); err != nil {
		l.dropExcept(before)
		return err
	}
	if !l.pending {
		l.old = before
	}
	l.want, l.pending = want, true
	return nil
}

// dropExcept unlocks every held byte not in keep. Unlocking a byte we hold
// cannot fail on a valid descriptor; should it fail, the byte is forgotten
// anyway (it would be released when the descriptor closes).
func (l *Locker) dropExcept(keep map[int64]bool) error {
	var errs []error
	for _, b := range sortedBytes(l.held) {
		if keep[b] {
			continue
		}
		if err := l.setByte(b, unix.F_UNLCK); err != nil {
			errs = append(errs, &ByteError{Op: "unlock", Byte: b, Path: l.path, Err: err})
		}
		delete(l.held, b)
	}
	return errors.Join(errs...)
}

// Commit is the second phase: it drops the bytes the prepared state no
// longer needs, leaving exactly Bytes(perm, shared) of the last Prepare.
// Without a pending Prepare it does nothing.
func (l *Locker) Commit() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.pending {
		return
	}
	if l.kind != lockNone {
		_ = l.dropExcept(l.want)
	}
	l.old, l.want, l.pending = nil, nil, false
}

// Abort undoes a pending Prepare: the bytes held before it are held again,
// and no others. Without a pending Prepare it does nothing.
func (l *Locker) Abort() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.pending {
		return
	}
	if l.kind != lockNone {
		// Prepare only ever adds bytes, so held ⊇ old: dropping the extra
		// ones restores the old set.
		_ = l.dropExcept(l.old)
	}
	l.old, l.want, l.pending = nil, nil, false
}

// Set is Prepare followed by Commit; on error nothing has changed.
func (l *Locker) Set(perm, shared Perm) error {
	if err := l.Prepare(perm, shared); err != nil {
		return err
	}
	l.Commit()
	return nil
}

// Held returns the permissions whose bytes are locked now, as (perm,
// shared): during a pending Prepare that is the union of the old and the
// new state. With locking off nothing is ever locked: (0, All).
func (l *Locker) Held() (perm, shared Perm) {
	l.mu.Lock()
	defer l.mu.Unlock()
	shared = All
	for i, bit := range bits {
		if l.held[PermByteBase+int64(i)] {
			perm |= bit
		}
		if l.held[SharedByteBase+int64(i)] {
			shared &^= bit
		}
	}
	return perm, shared
}

// HeldBytes lists the bytes locked now, ascending.
func (l *Locker) HeldBytes() []int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return sortedBytes(l.held)
}

// Close releases every lock byte and forgets any pending Prepare. Closing
// the descriptor would release OFD locks too; Close does it explicitly so
// that a descriptor kept open (or a POSIX lock, which any close in the
// process drops) is not left holding bytes. Safe to call twice; the Locker
// may be used again afterwards.
func (l *Locker) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var err error
	if l.kind != lockNone {
		err = l.dropExcept(nil)
	}
	l.held = map[int64]bool{}
	l.old, l.want, l.pending = nil, nil, false
	return err
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
