package qcow2

import (
	"context"
	"fmt"
	"syscall"

	"blockbackend/graph"
)

var _ graph.BackingChanger = (*image)(nil)

// ChangeBackingFile records a new backing file name and format in the
// header (img rebase); an empty name makes the image stand alone. The
// name lies right after the header extensions in the first cluster, so
// a name that does not fit there is refused (ENOSPC), as is one longer
// than readers accept (EINVAL, MaxBackingFileSize); nothing is written
// then. The open image keeps reading from its current backing node:
// the new one is for the next open.
func (img *image) ChangeBackingFile(ctx context.Context, filename, format string) error {
	if img.readOnly {
		return fmt.Errorf("qcow2: image is read-only: %w", syscall.EACCES)
	}
	if len(filename) > MaxBackingFileSize {
		return syscall.EINVAL
	}
	img.meta.Lock()
	defer img.meta.Unlock()
	if err := img.beginWriteLocked(ctx); err != nil {
		return err
	}
	h := *img.hdr
	h.BackingFile, h.BackingFormat = filename, format
	if filename == "" {
		h.BackingFormat = ""
	}
	if !h.Fits() {
		return syscall.ENOSPC
	}
	// Whatever the image holds must be on disk before the header points
	// elsewhere (a safe rebase copied data first).
	if err := img.syncLocked(ctx, true); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	if err := img.writeHeaderLocked(ctx, &h); err != nil {
		return err
	}
	return img.file.Flush(ctx)
}
