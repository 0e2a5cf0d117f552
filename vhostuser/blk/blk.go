// Package blk is the virtio-blk device of the vhost-user-blk export: it
// turns virtio-blk requests (virtio spec, "Block Device") into calls on a
// graph node, moving data straight between guest memory and the node, and
// registers the "vhost-user-blk" export type. The vhost-user transport is
// package vhostuser; the rings are package vhostuser/virtq.
package blk

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"math/bits"
	"sync/atomic"

	"blockbackend/graph"
	"blockbackend/vhostuser/virtq"
)

// virtio-blk feature bits.
const (
	fSizeMax     = 1
	fSegMax      = 2
	fRO          = 5
	fBlkSize     = 6
	fFlush       = 9
	fTopology    = 10
	fConfigWCE   = 11
	fMQ          = 12
	fDiscard     = 13
	fWriteZeroes = 14
)

// Request types and status values.
const (
	tIn          = 0
	tOut         = 1
	tFlush       = 4
	tGetID       = 8
	tDiscard     = 11
	tWriteZeroes = 13

	sOK     = 0
	sIOErr  = 1
	sUnsupp = 2
)

// Limits advertised in config space. seg_max is qemu-storage-daemon's
// (queue size 128 minus header and status), which fits every queue size
// QEMU uses even without indirect descriptors. size_max is 64 KiB because
// SeaBIOS sizes its requests as (u16)(size_max*seg_max/512) computed in 32
// bits: with 1 GiB that is 0, and the firmware loops on empty reads, so a
// guest cannot boot from the disk. 126 segments of 64 KiB still allow 8
// MiB requests.
const (
	segMax         = 126
	sizeMax        = 64 << 10
	maxDiscardSecs = 1 << 22 // 2 GiB a segment; punching holes is cheap
	maxDiscardSeg  = 128
	maxZeroesSecs  = 1 << 22
	maxZeroesSeg   = 128
	maxDataLen     = 1 << 30 // bound on one read or write
	configSize     = 60
	idLen          = 20
)

// Serial is the GET_ID answer, qemu-storage-daemon's, so that guests see
// the same /dev/disk/by-id names with either backend.
const Serial = "vhost_user_blk"

// Options configure a Device.
type Options struct {
	NumQueues        int
	LogicalBlockSize uint32
	Writable         bool
	Writethrough     bool
}

// Device serves one node as a virtio-blk device.
type Device struct {
	node *graph.Node
	log  *slog.Logger
	opt  Options
	ctx  context.Context

	shift     uint // log2(LogicalBlockSize)
	writeback atomic.Bool
	capacity  atomic.Uint64 // in 512-byte sectors
	minIO     uint16
}

// NewDevice makes a device for node.
func NewDevice(ctx context.Context, node *graph.Node, o Options, log *slog.Logger) *Device {
	d := &Device{node: node, log: log, opt: o, ctx: ctx}
	d.shift = uint(bits.TrailingZeros32(o.LogicalBlockSize))
	d.writeback.Store(!o.Writethrough)
	d.Resized()
	d.minIO = 1
	if a, ok := node.Instance().(interface{ Alignment() int }); ok && a.Alignment() > int(o.LogicalBlockSize) {
		d.minIO = uint16(min(a.Alignment()>>d.shift, 1<<15))
	}
	return d
}

// Resized reads the node's size again; the caller then tells the frontend.
func (d *Device) Resized() {
	d.capacity.Store(uint64(d.node.SizeNow()) >> 9)
}

// Features implements vhostuser.Device.
func (d *Device) Features() uint64 {
	f := uint64(1<<fSizeMax | 1<<fSegMax | 1<<fBlkSize | 1<<fFlush | 1<<fTopology |
		1<<fConfigWCE | 1<<fMQ | 1<<fDiscard | 1<<fWriteZeroes)
	if !d.opt.Writable {
		f |= 1 << fRO
	}
	return f
}

// NumQueues implements vhostuser.Device.
func (d *Device) NumQueues() int { return d.opt.NumQueues }

// ReadConfig implements vhostuser.Device: struct virtio_blk_config.
func (d *Device) ReadConfig(dst []byte) int {
	var c [configSize]byte
	le := binary.LittleEndian
	le.PutUint64(c[0:], d.capacity.Load())
	le.PutUint32(c[8:], sizeMax)
	le.PutUint32(c[12:], segMax)
	// 16-19: geometry, not offered.
	le.PutUint32(c[20:], d.opt.LogicalBlockSize)
	c[24] = 0 // physical_block_exp
	c[25] = 0 // alignment_offset
	le.PutUint16(c[26:], d.minIO)
	le.PutUint32(c[28:], 0) // opt_io_size
	if d.writeback.Load() {
		c[32] = 1
	}
	le.PutUint16(c[34:], uint16(d.opt.NumQueues))
	le.PutUint32(c[36:], maxDiscardSecs)
	le.PutUint32(c[40:], maxDiscardSeg)
	le.PutUint32(c[44:], d.opt.LogicalBlockSize>>9)
	le.PutUint32(c[48:], maxZeroesSecs)
	le.PutUint32(c[52:], maxZeroesSeg)
	c[56] = 1 // write_zeroes_may_unmap
	return copy(dst, c[:])
}

// WriteConfig implements vhostuser.Device: only the writeback byte is
// writable (VIRTIO_BLK_F_CONFIG_WCE).
func (d *Device) WriteConfig(off uint32, data []byte) error {
	if off != 32 || len(data) != 1 {
		return errors.New("virtio-blk: only the writeback field of the config space is writable")
	}
	d.writeback.Store(data[0] != 0)
	return nil
}

// Handle implements vhostuser.Device.
func (d *Device) Handle(_ int, c *virtq.Chain) uint32 {
	// The status byte is the last byte of the last device-writable buffer.
	if !c.TailOK || c.InLen == 0 {
		// Nowhere to put a status: the driver broke the request format.
		// Return the chain untouched so the ring goes on.
		return 0
	}
	last := c.In[len(c.In)-1]
	status := &last[len(last)-1]
	if c.Err != nil {
		*status = sIOErr
		return 1
	}
	var hdr [16]byte
	if gather(hdr[:], c.Out) < len(hdr) {
		*status = sIOErr
		return 1
	}
	typ := binary.LittleEndian.Uint32(hdr[0:])
	sector := binary.LittleEndian.Uint64(hdr[8:])
	written := uint32(1)
	var st byte
	switch typ {
	// The data buffers are the chain's own slices, trimmed in place
	// (virtq.Chain allows it): no copy of the iovec per request.
	case tIn:
		n := c.InLen - 1
		st = d.rw(false, sector, n, trimTail(c.In, 1))
		if st == sOK {
			written += uint32(n)
		}
	case tOut:
		st = d.rw(true, sector, c.OutLen-16, skipHead(c.Out, 16))
	case tFlush:
		st = d.result(d.node.Flush(d.ctx), "flush")
	case tGetID:
		var id [idLen]byte
		copy(id[:], Serial)
		written += uint32(scatter(trimTail(c.In, 1), id[:]))
	case tDiscard, tWriteZeroes:
		st = d.ranges(typ, c)
	default:
		st = sUnsupp
	}
	*status = st
	return written
}

// quickMax bounds the reads HandleQuick serves on the ring's worker:
// clearing a larger buffer in line would hold up the requests behind it.
const quickMax = 64 << 10

// HandleQuick implements vhostuser.QuickHandler: a small read the node
// can serve without I/O or waiting (graph.QuickReader: zero clusters of a
// format image).
func (d *Device) HandleQuick(_ int, c *virtq.Chain) (uint32, bool) {
	if !c.TailOK || c.InLen == 0 || c.Err != nil || c.InLen-1 > quickMax {
		return 0, false
	}
	var hdr [16]byte
	if gather(hdr[:], c.Out) < len(hdr) || binary.LittleEndian.Uint32(hdr[0:]) != tIn {
		return 0, false
	}
	sector := binary.LittleEndian.Uint64(hdr[8:])
	n := c.InLen - 1
	if !d.inRange(sector, n) {
		return 0, false
	}
	// Only when the status byte has a buffer of its own (as guests
	// lay requests out): the data buffers are then the others, untouched,
	// and Handle gets c as it was if the node declines.
	last := c.In[len(c.In)-1]
	if len(last) != 1 || !d.node.ReadQuick(int64(sector<<9), c.In[:len(c.In)-1]) {
		return 0, false
	}
	last[0] = sOK
	return 1 + uint32(n), true
}

func (d *Device) result(err error, what string) byte {
	if err != nil {
		if !errors.Is(err, context.Canceled) {
			d.log.Warn("virtio-blk request failed", "request", what, "err", err)
		}
		return sIOErr
	}
	return sOK
}

// inRange checks a request against the logical block size and the disk.
func (d *Device) inRange(sector, n uint64) bool {
	lbsMask := uint64(d.opt.LogicalBlockSize) - 1
	if (sector<<9)&lbsMask != 0 || n&lbsMask != 0 || n > maxDataLen {
		return false
	}
	capa := d.capacity.Load()
	return sector <= capa && n>>9 <= capa-sector
}

func (d *Device) rw(write bool, sector, n uint64, iov [][]byte) byte {
	if !d.inRange(sector, n) {
		return sIOErr
	}
	off := int64(sector << 9)
	if !write {
		return d.result(d.node.ReadV(d.ctx, off, iov), "read")
	}
	if !d.opt.Writable {
		return sIOErr
	}
	var fl graph.WriteFlags
	if !d.writeback.Load() {
		fl = graph.WriteFUA
	}
	return d.result(d.node.WriteV(d.ctx, off, iov, fl), "write")
}

// ranges serves DISCARD and WRITE_ZEROES: a list of 16-byte segments
// (sector, num_sectors, flags) after the header.
func (d *Device) ranges(typ uint32, c *virtq.Chain) byte {
	if !d.opt.Writable {
		return sIOErr
	}
	n := c.OutLen - 16
	maxSeg, maxSecs := uint64(maxDiscardSeg), uint64(maxDiscardSecs)
	if typ == tWriteZeroes {
		maxSeg, maxSecs = maxZeroesSeg, maxZeroesSecs
	}
	if n == 0 || n%16 != 0 || n/16 > maxSeg {
		return sUnsupp
	}
	var segs [maxDiscardSeg * 16]byte
	if gatherFrom(segs[:n], c.Out, 16) < int(n) {
		return sIOErr
	}
	for i := uint64(0); i < n; i += 16 {
		sector := binary.LittleEndian.Uint64(segs[i:])
		num := uint64(binary.LittleEndian.Uint32(segs[i+8:]))
		flags := binary.LittleEndian.Uint32(segs[i+12:])
		if flags&^1 != 0 || (typ == tDiscard && flags != 0) {
			// Unknown flags, or unmap on a discard: the spec says UNSUPP.
			return sUnsupp
		}
		if num > maxSecs || !d.inRange(sector, num<<9) {
			return sIOErr
		}
		off, length := int64(sector<<9), int64(num<<9)
		var err error
		if typ == tDiscard {
			err = d.node.Discard(d.ctx, off, length)
		} else {
			var zf graph.ZeroFlags
			if flags&1 != 0 {
				zf |= graph.ZeroMayUnmap
			}
			if !d.writeback.Load() {
				zf |= graph.ZeroFUA
			}
			err = d.node.WriteZeroes(d.ctx, off, length, zf)
		}
		if st := d.result(err, "discard/write-zeroes"); st != sOK {
			return st
		}
	}
	return sOK
}

// gather copies the start of iov into dst.
func gather(dst []byte, iov [][]byte) int { return gatherFrom(dst, iov, 0) }

// gatherFrom copies iov's bytes from offset skip into dst.
func gatherFrom(dst []byte, iov [][]byte, skip uint64) int {
	n := 0
	for _, b := range iov {
		if skip >= uint64(len(b)) {
			skip -= uint64(len(b))
			continue
		}
		n += copy(dst[n:], b[skip:])
		skip = 0
		if n == len(dst) {
			break
		}
	}
	return n
}

// scatter copies src into iov.
func scatter(iov [][]byte, src []byte) int {
	n := 0
	for _, b := range iov {
		n += copy(b, src[n:])
		if n == len(src) {
			break
		}
	}
	return n
}

// trimTail drops the last n bytes of iov.
func trimTail(iov [][]byte, n int) [][]byte {
	for n > 0 && len(iov) > 0 {
		last := iov[len(iov)-1]
		if len(last) > n {
			iov[len(iov)-1] = last[:len(last)-n]
			break
		}
		n -= len(last)
		iov = iov[:len(iov)-1]
	}
	return iov
}

// skipHead drops the first n bytes of iov.
func skipHead(iov [][]byte, n int) [][]byte {
	for n > 0 && len(iov) > 0 {
		if len(iov[0]) > n {
			iov[0] = iov[0][n:]
			break
		}
		n -= len(iov[0])
		iov = iov[1:]
	}
	return iov
}
