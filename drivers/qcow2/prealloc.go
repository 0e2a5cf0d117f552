package qcow2

import (
	"context"
	"os"
	"syscall"
)

// metaPrealloc remembers whether the image looks metadata-preallocated:
// its refcounts claim clearly more clusters than its file occupies on
// disk, so many allocated clusters lie in holes of the file and read as
// zeros. QEMU 7.2 decides this once per open with the same rule and only
// then asks the file, for each allocated data run, whether it reads as
// zeros (qemu-img map shows such runs as "data" and "zero"); for any
// other image, e.g. preallocation=falloc whose file extents are
// allocated but unwritten, it reports plain data, and so do we. Guarded
// by img.meta.
type metaPrealloc struct {
	checked, yes bool
}

// metaPreallocatedLocked returns the (once computed) verdict. Errors and
// files that cannot say how much of them is allocated give false, as an
// image that is not preallocated.
func (img *image) metaPreallocatedLocked(ctx context.Context) bool {
	if img.mp.checked {
		return img.mp.yes
	}
	img.mp.checked = true
	if img.extData {
		// Data clusters live in the data file and are not refcounted.
		return false
	}
	st, err := os.Stat(img.file.Filename())
	if err != nil {
		return false
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || !st.Mode().IsRegular() {
		return false
	}
	onDisk := sys.Blocks * 512 / img.cs
	// A margin of a ninth (and at least two clusters) keeps metadata,
	// file-system rounding and a few holes from tipping the verdict.
	threshold := max(onDisk*10/9, onDisk+2)
	var used int64
	for k := int64(0); k < (st.Size()+img.cs-1)/img.cs; k++ {
		if ctx.Err() != nil {
			return false
		}
		rc, err := img.refcountLocked(ctx, k)
		if err != nil {
			return false
		}
		if rc > 0 {
			if used++; used > threshold {
				img.mp.yes = true
				return true
			}
		}
	}
	return false
}
