package graph

// ZeroIniter is an optional capability of formats that can say whether
// a newly created image reads as zeros (QEMU's bdrv_has_zero_init).
// LUKS cannot: its fresh payload decrypts to noise, so img convert must
// write the source's zeros rather than skip them. A format without it is
// taken to read as zeros when new (raw over a file, qcow2).
type ZeroIniter interface {
	HasZeroInit() bool
}
