package graph

import (
	"fmt"
	"syscall"
)

// NoIO reports that the node is being opened for its metadata only, as
// qemu-img opens images with QEMU's BDRV_O_NO_IO: `img info` (with
// --backing-chain, the whole chain) and `img create -b` (the backing
// file, for its size and format). A driver that needs a key to read or
// write guest data (luks; qcow2 with encrypt.format=luks) then opens its
// header without the key, so no secret is required, looked up or checked,
// reports what info shows (size, encrypted, its format-specific block),
// and answers any guest data I/O with ErrNoIO. Drivers that need no key
// ignore it: their metadata reads go through their children as usual.
// The flag covers every node opened in the same open call (children,
// backing chain), as BDRV_O_NO_IO is inherited in QEMU; blockdev-add
// never sets it.
func (oc *OpenContext) NoIO() bool { return oc.txn.noIO }

// ErrNoIO is the error of a guest data request on a node opened with
// ImageOptions.NoIO by a driver that could not open its data path
// without a key (see OpenContext.NoIO).
var ErrNoIO = fmt.Errorf("node opened for metadata only (no key, no data I/O): %w", syscall.EPERM)
