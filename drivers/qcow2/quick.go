package qcow2

import (
	"context"

	"blockbackend/graph"
)

var _ graph.QuickReader = (*image)(nil)

// ReadQuick serves, at once, a read that only reads zeros (zero clusters;
// unallocated ones without a backing node) and whose L2 slice, if any, is
// cached: no I/O, no allocation, and no wait — the locks are only tried,
// so a request that finds them held (a truncate, a metadata write-back)
// leaves the read to ReadV. Like ReadV's own zero path it does not
// register in the reuse quarantine: it reads no host cluster.
func (img *image) ReadQuick(off int64, iov [][]byte) bool {
	if !img.resize.TryRLock() {
		return false
	}
	defer img.resize.RUnlock()
	total := iovLen(iov)
	if img.backing == nil && img.meta.TryRLock() {
		unmapped := img.noL2Locked(off, total)
		img.meta.RUnlock()
		if unmapped {
			zeroIOV(iov)
			return true
		}
	}
	if !img.meta.TryLock() {
		return false
	}
	ok := false
	var m mapping
	if soff, _, err := img.l2SliceAddrLocked(context.Background(), off); err == nil && (soff == 0 || img.l2c.has(soff)) {
		// No I/O from here: the slice is cached (or there is none).
		m, err = img.lookupLocked(context.Background(), off, total)
		ok = err == nil && m.length == total && img.readsZeros(m)
	}
	img.meta.Unlock()
	if ok {
		zeroIOV(iov)
	}
	return ok
}
