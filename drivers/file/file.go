// Package file is QEMU's "file" protocol driver: a block node backed by a
// regular file on the host, read and written with preadv/pwritev.
//
// It follows QEMU 7.2's BlockdevOptionsFile (filename, pr-manager, locking,
// aio, aio-max-batch, drop-cache, x-check-cache-dropped) and
// BlockdevCreateOptionsFile (filename, size, preallocation, nocow,
// extent-size-hint), the "raw" preallocation modes and the "Disk image file
// locking" section of QEMU's block driver documentation: image locks are
// OFD byte locks taken through package permissions, on a descriptor of
// their own that lives as long as the node, so that a reopen can swap the
// I/O descriptor without ever dropping a lock.
//
// What it is not:
//   - not host_device / host_cdrom: block and character devices are
//     refused with QEMU's "'file' driver requires '…' to be a regular file";
//   - not an AIO engine: aio=threads|native|io_uring are accepted for
//     compatibility (native still requires cache.direct=on, as in QEMU), but
//     every request is a blocking preadv/pwritev on the calling goroutine;
//     Go's scheduler is our thread pool;
//   - no persistent reservations: pr-manager is refused;
//   - drop-cache and x-check-cache-dropped only matter to QEMU's incoming
//     migration, which we do not do; they are accepted and ignored.
//
// With cache.direct=on the file is opened O_DIRECT. The alignment the
// kernel needs is asked with statx(STATX_DIOALIGN) and probed with reads
// when that is unavailable; requests that do not meet it go through aligned
// bounce buffers, and unaligned writes are read-modify-write cycles that are
// serialised against every overlapping write so that concurrent unaligned
// writes to the same block cannot lose each other's data (QEMU's
// "serialising requests").
package file

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// Locking is the OnOffAuto "locking" option.
type Locking string

// EnumValues lists QEMU's values.
func (Locking) EnumValues() []string { return []string{"auto", "on", "off"} }

// lockMode maps the option onto package permissions' lock modes.
func (l Locking) lockMode() permissions.LockMode {
	switch l {
	case "on":
		return permissions.LockOn
	case "off":
		return permissions.LockOff
	}
	return permissions.LockAuto
}

// AIO is BlockdevAioOptions.
type AIO string

// EnumValues lists QEMU's values.
func (AIO) EnumValues() []string { return []string{"threads", "native", "io_uring"} }

// Options is BlockdevOptionsFile.
type Options struct {
	Filename  string  `qapi:"filename"`
	PRManager string  `qapi:"pr-manager,optional"`
	Locking   Locking `qapi:"locking,optional"`
	// AIO is accepted and only validated: every request is a blocking
	// vectored syscall on the caller's goroutine whatever the value.
	AIO         AIO   `qapi:"aio,optional"`
	AIOMaxBatch int64 `qapi:"aio-max-batch,optional"`
	// DropCache and XCheckCacheDropped concern incoming migration only.
	DropCache          bool `qapi:"drop-cache,optional"`
	XCheckCacheDropped bool `qapi:"x-check-cache-dropped,optional"`
}

func newOptions() any {
	return &Options{Locking: "auto", AIO: "threads", DropCache: true}
}

func init() {
	graph.Register(&graph.Driver{
		Name:             "file",
		Protocol:         true,
		Prefixes:         []string{"file"},
		NewOptions:       newOptions,
		Open:             open,
		NewCreateOptions: newCreateOptions,
		Create:           create,
		ParseFilename:    parseFilename,
	})
}

// parseFilename strips QEMU's optional "file:" prefix.
func parseFilename(filename string) (map[string]any, error) {
	return map[string]any{"filename": strings.TrimPrefix(filename, "file:")}, nil
}

// node is an open file node.
//
// The descriptors and the alignment below are swapped only by a reopen
// commit, which the graph calls with the node's I/O drained; requests read
// them without a lock (the graph's I/O lock orders them).
type node struct {
	path  string
	opts  Options
	log   *slog.Logger
	gnode *graph.Node

	lockFD int                 // O_RDONLY descriptor carrying the OFD locks; -1 when closed
	locker *permissions.Locker // does nothing itself with locking=off

	fd       int  // I/O descriptor (O_DIRECT when direct)
	bfd      int  // buffered descriptor: == fd unless direct
	readOnly bool // fd is O_RDONLY
	direct   bool
	align    int64 // request (offset and length) alignment for fd
	memAlign int64 // buffer address alignment for fd

	mapped  *mapping     // shared mapping of a tmpfs file (not direct), or nil
	bounce  *sync.Pool   // *[]byte of bounceSize, memAlign-aligned (direct only)
	tracker rangeTracker // overlapping writes vs read-modify-write (direct only)

	noRWFDSync  atomic.Bool // the kernel refused RWF_DSYNC: fdatasync after FUA writes
	noZeroRange atomic.Bool // FALLOC_FL_ZERO_RANGE is not supported here
	noPunchHole atomic.Bool // FALLOC_FL_PUNCH_HOLE is not supported here

	closeOnce sync.Once
	closeErr  error
}

// Compile-time checks of the capabilities the graph looks for.
var (
	_ graph.Instance      = (*node)(nil)
	_ graph.Discarder     = (*node)(nil)
	_ graph.ZeroWriter    = (*node)(nil)
	_ graph.BlockStatuser = (*node)(nil)
	_ graph.Truncater     = (*node)(nil)
	_ graph.PermHandler   = (*node)(nil)
	_ graph.Reopener      = (*node)(nil)
	_ graph.Filenamer     = (*node)(nil)
	_ graph.Infoer        = (*node)(nil)
)

// validateOptions checks what the decoder cannot, in QEMU's words.
func validateOptions(o *Options, direct bool) error {
	if o.PRManager != "" {
		// QEMU says "No persistent reservation manager with id '…'" when the
		// object is missing; we have no such objects at all.
		return qapi.Errorf(qapi.GenericError,
			"No persistent reservation manager with id '%s' (pr-manager is not built into blockbackend)", o.PRManager)
	}
	if o.AIO == "native" && !direct {
		return qapi.Errorf(qapi.GenericError,
			"aio=native was specified, but it requires cache.direct=on, which was not specified.")
	}
	return nil
}

func open(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
	opts := o.(*Options)
	direct := oc.Common().Cache.Direct
	if err := validateOptions(opts, direct); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	n := &node{
		path:   opts.Filename,
		opts:   *opts,
		log:    oc.Logger(),
		gnode:  oc.Node(),
		lockFD: -1, fd: -1, bfd: -1,
	}
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}

	readOnly := oc.ReadOnly()
	io, err := openIO(n.path, readOnly, direct)
	if err != nil && !readOnly && oc.AutoReadOnly() && isPermissionErrno(err) {
		// auto-read-only: QEMU falls back to read-only when the file
		// cannot be opened for writing.
		io, err = openIO(n.path, true, direct)
		if err == nil {
			readOnly = true
			oc.SetReadOnly()
		}
	}
	if err != nil {
		return nil, err
	}
	n.setIO(io)

	lfd, err := unix.Open(n.path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		n.closeIO()
		return nil, couldNotOpen(n.path, err)
	}
	n.lockFD = lfd
	lk, err := permissions.NewLocker(lfd, n.path, opts.Locking.lockMode(), n.log)
	if err != nil {
		n.closeIO()
		_ = unix.Close(lfd)
		return nil, err
	}
	n.locker = lk
	return n, nil
}

func isPermissionErrno(err error) bool {
	return errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EROFS)
}

// couldNotOpen is QEMU's wording, with the errno kept for errors.Is.
func couldNotOpen(path string, err error) error {
	return qapi.Errorf(qapi.GenericError, "Could not open '%s': %w", path, errnoText(err))
}

// errnoText returns err as C's strerror words it ("No such file or
// directory", where Go says "no such file or directory"), still unwrapping
// to the errno for errors.Is.
func errnoText(err error) error {
	var e syscall.Errno
	if errors.As(err, &e) {
		return strerror{e}
	}
	return err
}

type strerror struct{ errno syscall.Errno }

func (s strerror) Error() string {
	t := s.errno.Error()
	if t != "" && t[0] >= 'a' && t[0] <= 'z' {
		t = string(t[0]-'a'+'A') + t[1:]
	}
	return t
}

func (s strerror) Unwrap() error { return s.errno }

// ioFiles is one generation of I/O descriptors (swapped by reopen).
type ioFiles struct {
	fd, bfd         int
	readOnly        bool
	direct          bool
	align, memAlign int64
	mapped          *mapping
}

func (f *ioFiles) close() {
	f.mapped.close()
	f.mapped = nil
	if f.bfd >= 0 && f.bfd != f.fd {
		_ = unix.Close(f.bfd)
	}
	if f.fd >= 0 {
		_ = unix.Close(f.fd)
	}
	f.fd, f.bfd = -1, -1
}

// openIO opens the I/O descriptor(s) for path. The file must be a regular
// file (QEMU's file driver refuses anything else).
func openIO(path string, readOnly, direct bool) (*ioFiles, error) {
	flags := unix.O_CLOEXEC
	if readOnly {
		flags |= unix.O_RDONLY
	} else {
		flags |= unix.O_RDWR
	}
	fd, err := unix.Open(path, flags, 0)
	if err != nil {
		return nil, couldNotOpen(path, err)
	}
	f := &ioFiles{fd: fd, bfd: fd, readOnly: readOnly, align: 1, memAlign: 1}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.close()
		return nil, qapi.Errorf(qapi.GenericError, "Could not stat '%s': %w", path, errnoText(err))
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.close()
		return nil, qapi.Errorf(qapi.GenericError, "'file' driver requires '%s' to be a regular file", path)
	}
	if !direct {
		f.mapped = newMapping(fd, !readOnly)
		return f, nil
	}
	// The O_DIRECT descriptor is a second open rather than fcntl(F_SETFL)
	// on the first, so that the buffered one stays available for the
	// unaligned tail of a file whose size is not a multiple of the
	// alignment (an aligned write there would grow the file).
	dfd, err := unix.Open(path, flags|unix.O_DIRECT, 0)
	if err != nil {
		f.close()
		return nil, couldNotOpen(path, err)
	}
	f.fd, f.direct = dfd, true
	f.align, f.memAlign = probeAlignment(dfd)
	return f, nil
}

func (n *node) setIO(f *ioFiles) {
	n.fd, n.bfd, n.readOnly, n.direct = f.fd, f.bfd, f.readOnly, f.direct
	n.align, n.memAlign = f.align, f.memAlign
	n.mapped = f.mapped
	n.bounce = nil
	if f.direct {
		n.bounce = newBouncePool(f.align, f.memAlign)
	}
}

func (n *node) ioFiles() *ioFiles {
	return &ioFiles{fd: n.fd, bfd: n.bfd, readOnly: n.readOnly, direct: n.direct, align: n.align, memAlign: n.memAlign,
		mapped: n.mapped}
}

func (n *node) closeIO() {
	f := n.ioFiles()
	f.close()
	n.fd, n.bfd, n.mapped = -1, -1, nil
}

// Close releases the I/O descriptors, the locks and the lock descriptor.
// It is safe to call more than once.
func (n *node) Close() error {
	n.closeOnce.Do(func() {
		n.closeIO()
		if n.locker != nil {
			if err := n.locker.Close(); err != nil {
				n.closeErr = fmt.Errorf("file: releasing image locks on '%s': %w", n.path, err)
			}
		}
		if n.lockFD >= 0 {
			_ = unix.Close(n.lockFD)
			n.lockFD = -1
		}
	})
	return n.closeErr
}

// Filename is the file's path, as QEMU shows it.
func (n *node) Filename() string { return n.path }

// Info has no format-specific facts for a protocol node.
func (n *node) Info() map[string]any { return nil }

// Alignment reports the request and buffer alignment that I/O on the node
// meets without bounce buffers (1 without O_DIRECT). Format drivers and
// exports may use it as QEMU uses request_alignment.
func (n *node) Alignment() (request, memory int64) { return n.align, n.memAlign }

// CheckPerm takes the image locks that perm and shared need, tentatively.
func (n *node) CheckPerm(perm, shared permissions.Perm) error {
	// Lock errors carry QEMU's text ("Failed to get "write" lock") and go
	// up unchanged.
	return n.locker.Prepare(perm, shared)
}

// SetPerm makes the prepared locks final.
func (n *node) SetPerm(perm, shared permissions.Perm) { n.locker.Commit() }

// AbortPerm returns to the locks held before CheckPerm.
func (n *node) AbortPerm() { n.locker.Abort() }

// Size is the file's current size.
func (n *node) Size() (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(n.fd, &st); err != nil {
		return 0, fmt.Errorf("file: stat '%s': %w", n.path, err)
	}
	return st.Size, nil
}
