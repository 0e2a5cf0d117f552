package file

import (
	"context"
	"math"
	"unsafe"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// PreallocMode is QAPI's PreallocMode.
type PreallocMode string

// EnumValues lists QEMU's values; "metadata" is in the enum but the file
// driver refuses it, as QEMU does.
func (PreallocMode) EnumValues() []string { return []string{"off", "metadata", "falloc", "full"} }

// CreateOptions is BlockdevCreateOptionsFile.
type CreateOptions struct {
	Filename      string       `qapi:"filename"`
	Size          qapi.Size    `qapi:"size"`
	Preallocation PreallocMode `qapi:"preallocation,optional"`
	Nocow         bool         `qapi:"nocow,optional"`
	// ExtentSizeHint defaults to 1 MiB, QEMU's default; 0 disables it.
	ExtentSizeHint *qapi.Size `qapi:"extent-size-hint,optional"`
}

func newCreateOptions() any { return &CreateOptions{Preallocation: "off"} }

// defaultExtentSizeHint is QEMU's default extent size hint.
const defaultExtentSizeHint = 1 << 20

// firstBlock is how much of a new image with preallocation=off is written
// with zeros, as QEMU does so that the alignment of O_DIRECT can later be
// probed from the first block (qemu-img create leaves 4 KiB allocated).
const firstBlock = 4096

// Locks held while creating: QEMU's image creation needs write and resize
// and shares everything but resize, so creating over an image that another
// process has open for writing without sharing it fails with
// `Failed to get "write" lock`, and one being resized with
// `Failed to get shared "resize" lock`.
const (
	createPerm   = permissions.Write | permissions.Resize
	createShared = permissions.All &^ permissions.Resize
)

// create makes (or truncates) the file and sizes it with the requested
// preallocation (blockdev-create with driver=file, img create).
func create(ctx context.Context, cc *graph.CreateContext, o any) error {
	opts := o.(*CreateOptions)
	if opts.Preallocation == "metadata" {
		return qapi.Errorf(qapi.GenericError, "Unsupported preallocation mode: metadata")
	}
	if opts.Size > math.MaxInt64 {
		return qapi.Errorf(qapi.GenericError, "Image size must be less than 8 EiB!")
	}
	hint := uint64(defaultExtentSizeHint)
	if opts.ExtentSizeHint != nil {
		hint = uint64(*opts.ExtentSizeHint)
	}
	if hint > math.MaxUint32 {
		return qapi.Errorf(qapi.GenericError, "Extent size hint is too large")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	path := opts.Filename
	log := cc.Logger()

	// No O_TRUNC: the locks must be checked before the contents go.
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return qapi.Errorf(qapi.GenericError, "Could not create '%s': %w", path, errnoText(err))
	}
	defer unix.Close(fd)

	lk, err := permissions.NewLocker(fd, path, permissions.LockAuto, log)
	if err != nil {
		return err
	}
	defer lk.Close()
	if err := lk.Set(createPerm, createShared); err != nil {
		return err
	}

	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return qapi.Errorf(qapi.GenericError, "Could not stat '%s': %w", path, errnoText(err))
	}
	regular := st.Mode&unix.S_IFMT == unix.S_IFREG
	if !regular {
		return qapi.Errorf(qapi.GenericError, "'file' driver requires '%s' to be a regular file", path)
	}
	if err := unix.Ftruncate(fd, 0); err != nil {
		return qapi.Errorf(qapi.GenericError, "Could not resize file: %w", err)
	}
	// Both attributes only take on an empty file, so they come first; a
	// file system without them is fine (QEMU ignores that too).
	if opts.Nocow {
		setNoCOW(fd)
	}
	if hint > 0 {
		if err := setExtentSizeHint(fd, uint32(hint)); err != nil && opts.ExtentSizeHint != nil {
			// Only a hint the user asked for is worth a warning, as in QEMU.
			cc.Warnf("Failed to set extent size hint: %v", errnoText(err))
		}
	}
	size := int64(opts.Size)
	if err := resize(ctx, fd, path, 0, size, string(opts.Preallocation)); err != nil {
		return err
	}
	if (opts.Preallocation == "off" || opts.Preallocation == "") && size > 0 {
		var zeros [firstBlock]byte
		if err := writeFlat(fd, 0, zeros[:min(size, firstBlock)]); err != nil {
			return qapi.Errorf(qapi.GenericError, "Could not write to the new file: %w", err)
		}
	}
	return nil
}

// fsNOCOWFL is FS_NOCOW_FL from linux/fs.h.
const fsNOCOWFL = 0x00800000

// setNoCOW sets FS_NOCOW_FL (btrfs). Errors are ignored: file systems
// without the flag answer ENOTTY or EOPNOTSUPP.
func setNoCOW(fd int) {
	flags, err := unix.IoctlGetInt(fd, unix.FS_IOC_GETFLAGS)
	if err != nil {
		return
	}
	_ = unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, flags|fsNOCOWFL)
}

// fsxattr is struct fsxattr from linux/fs.h.
type fsxattr struct {
	XFlags     uint32
	ExtSize    uint32
	NExtents   uint32
	ProjID     uint32
	CowExtSize uint32
	Pad        [8]byte
}

const (
	fsIOCFSGetXattr = 0x801c581f // _IOR('X', 31, struct fsxattr)
	fsIOCFSSetXattr = 0x401c5820 // _IOW('X', 32, struct fsxattr)
	fsXFlagExtSize  = 0x00000800
)

// setExtentSizeHint sets the extent size hint where the file system has
// one (XFS); elsewhere the ioctl fails and the caller ignores it.
func setExtentSizeHint(fd int, hint uint32) error {
	var attr fsxattr
	if err := ioctlPtr(fd, fsIOCFSGetXattr, unsafe.Pointer(&attr)); err != nil {
		return err
	}
	attr.XFlags |= fsXFlagExtSize
	attr.ExtSize = hint
	return ioctlPtr(fd, fsIOCFSSetXattr, unsafe.Pointer(&attr))
}

func ioctlPtr(fd int, req uintptr, p unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(p))
	if e != 0 {
		return e
	}
	return nil
}
