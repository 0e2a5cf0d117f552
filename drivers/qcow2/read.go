package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"syscall"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// extKind is what a run of guest bytes maps to.
type extKind int

const (
	kindUnalloc    extKind = iota // falls through to the backing node, or zeros
	kindZero                      // reads as zeros
	kindData                      // host bytes in the data child
	kindCompressed                // a compressed cluster
)

// mapping is one run of guest bytes with the same kind (and, for data,
// contiguous host bytes), within one L2 slice.
type mapping struct {
	kind   extKind
	host   int64 // kindData, zeroAlloc: host offset of the first byte
	length int64
	entry  L2Entry // kindCompressed: the cluster's entry
	// zeroAlloc: kindZero or kindUnalloc with a host cluster behind it
	// (preallocated; block status reports where).
	zeroAlloc bool
}

// l2SliceLocked returns the L2 slice holding the entry of guest offset
// off, the index of that entry in the slice, and the slice's host offset.
// A nil slice means the L2 table is unallocated.
func (img *image) l2SliceLocked(ctx context.Context, off int64) ([]byte, int, int64, error) {
	soff, idx, err := img.l2SliceAddrLocked(ctx, off)
	if soff == 0 || err != nil {
		return nil, 0, 0, err
	}
	s, err := img.l2c.get(ctx, soff)
	if err != nil {
		return nil, 0, 0, err
	}
	return s, idx, soff, nil
}

// l2SliceAddrLocked returns the host offset of the L2 slice holding the
// entry of guest offset off (0: the L2 table is unallocated) and the index
// of that entry in the slice.
func (img *image) l2SliceAddrLocked(ctx context.Context, off int64) (int64, int, error) {
	l1i := img.geo.L1Index(off)
	if l1i >= uint64(len(img.l1)) {
		return 0, 0, nil
	}
	e := L1Entry(img.l1[l1i])
	l2off := e.Offset()
	if l2off == 0 {
		return 0, 0, nil
	}
	if l2off%img.cs != 0 || e.Reserved() {
		return 0, 0, img.corruptfLocked(ctx, "L2 table offset %#x unaligned (L1 index: %#x)", l2off, l1i)
	}
	esz := img.geo.L2EntrySize()
	perSlice := int(img.l2Slice / esz)
	l2i := img.geo.L2Index(off)
	sliceStart := l2i / perSlice * perSlice
	return l2off + int64(sliceStart)*esz, l2i - sliceStart, nil
}

// lookupLocked maps the guest bytes [off, off+n) as far as they share one
// kind, within one L2 slice.
func (img *image) lookupLocked(ctx context.Context, off, n int64) (mapping, error) {
	s, idx, _, err := img.l2SliceLocked(ctx, off)
	if err != nil {
		return mapping{}, err
	}
	esz := img.geo.L2EntrySize()
	perSlice := img.l2Slice / esz
	if s == nil {
		// The whole slice's range is unallocated.
		sliceSpan := perSlice * img.cs
		end := (off/sliceSpan + 1) * sliceSpan
		return mapping{kind: kindUnalloc, length: min(n, end-off)}, nil
	}
	sub := img.geo.SubclusterSize()
	var m mapping
	pos := off
	for i := idx; int64(i) < perSlice && pos < off+n; i++ {
		e := img.geo.GetL2(s, i)
		cstart := pos / img.cs * img.cs
		for p := pos; p < cstart+img.cs && p < off+n; {
			unitEnd := min((p/sub+1)*sub, off+n)
			kind, host, zalloc, err := img.classifyLocked(ctx, e, p, i)
			if err != nil {
				return mapping{}, err
			}
			if p == off {
				m = mapping{kind: kind, host: host, entry: e, zeroAlloc: zalloc}
			} else if kind != m.kind || ((kind == kindData || zalloc) && host != m.host+m.length) ||
				kind == kindCompressed || zalloc != m.zeroAlloc {
				return m, nil
			}
			m.length += unitEnd - p
			p = unitEnd
			if kind == kindCompressed {
				// A compressed cluster is one unit.
				m.length = min(cstart+img.cs, off+n) - off
				return m, nil
			}
		}
		pos = cstart + img.cs
	}
	return m, nil
}

// classifyLocked returns what the guest byte at p maps to under entry e
// (entry index i of its slice, for messages).
func (img *image) classifyLocked(ctx context.Context, e L2Entry, p int64, i int) (extKind, int64, bool, error) {
	in := p % img.cs
	if e.Compressed() {
		if img.extData {
			return 0, 0, false, img.corruptfLocked(ctx, "Compressed cluster in an image with an external data file")
		}
		return kindCompressed, 0, false, nil
	}
	hostOK := func() error {
		if e.Offset()%img.cs != 0 {
			return img.corruptfLocked(ctx, "Cluster allocation offset %#x unaligned (guest offset: %#x)", e.Offset(), p-in)
		}
		return nil
	}
	if img.geo.ExtendedL2 {
		switch e.SubclusterType(int(in/img.geo.SubclusterSize()), img.extData) {
		case SubclusterNormal:
			if err := hostOK(); err != nil {
				return 0, 0, false, err
			}
			return kindData, e.Offset() + in, false, nil
		case SubclusterZeroPlain:
			return kindZero, 0, false, nil
		case SubclusterZeroAlloc:
			return kindZero, e.Offset() + in, true, nil
		case SubclusterUnallocatedAlloc:
			return kindUnalloc, e.Offset() + in, true, nil
		case SubclusterUnallocatedPlain:
			return kindUnalloc, 0, false, nil
		default:
			return 0, 0, false, img.corruptfLocked(ctx, "Invalid subcluster bitmap %#x (guest offset: %#x)", e.Bitmap, p-in)
		}
	}
	switch e.Type(false, img.extData) {
	case ClusterNormal:
		if err := hostOK(); err != nil {
			return 0, 0, false, err
		}
		return kindData, e.Offset() + in, false, nil
	case ClusterZeroPlain:
		if img.hdr.Version < 3 {
			return kindUnalloc, 0, false, nil
		}
		return kindZero, 0, false, nil
	case ClusterZeroAlloc:
		if img.hdr.Version < 3 {
			return kindData, e.Offset() + in, false, nil
		}
		return kindZero, e.Offset() + in, true, nil
	}
	return kindUnalloc, 0, false, nil
}

// iovSlice returns the part [start, start+n) of iov: iov itself when
// that is all of it (the common case, which then costs no allocation).
func iovSlice(iov [][]byte, start, n int64) [][]byte {
	if start == 0 && iovLen(iov) <= n {
		return iov
	}
	var out [][]byte
	for _, b := range iov {
		if n == 0 {
			break
		}
		if start >= int64(len(b)) {
			start -= int64(len(b))
			continue
		}
		b = b[start:]
		start = 0
		if int64(len(b)) > n {
			b = b[:n]
		}
		out = append(out, b)
		n -= int64(len(b))
	}
	return out
}

func iovLen(iov [][]byte) int64 {
	var n int64
	for _, b := range iov {
		n += int64(len(b))
	}
	return n
}

func zeroIOV(iov [][]byte) {
	for _, b := range iov {
		clear(b)
	}
}

// copyToIOV copies src into iov.
func copyToIOV(iov [][]byte, src []byte) {
	for _, b := range iov {
		src = src[copy(b, src):]
	}
}

// ReadV reads guest data: allocated clusters from the data child,
// compressed ones decompressed, zero clusters as zeros, and unallocated
// ones from the backing node (zeros past its end, or without one).
//
// Reads of zeros are the cheap case: a request whose range no L2 table
// maps (an empty image) is checked first, on the L1 table alone, so that
// this path stays short — an export's per-request goroutine then runs it
// within its first stack, with no stack growth to pay.
func (img *image) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	img.resize.RLock()
	defer img.resize.RUnlock()
	total := iovLen(iov)
	if img.backing == nil {
		// Concurrent reads of an empty image do not even queue behind
		// each other: the check only reads the L1 table, under meta
		// shared.
		img.meta.RLock()
		unmapped := img.noL2Locked(off, total)
		img.meta.RUnlock()
		if unmapped {
			zeroIOV(iov)
			return nil
		}
	}
	return img.readMapped(ctx, off, iov, total)
}

// readMapped is the rest of ReadV. The first mapping is looked up in the
// same critical section that registers the request; a request that then
// only reads zeros (zero clusters, unallocated ones without a backing
// node) reads no host cluster, so it is served without a place in the
// reuse quarantine of freed clusters.
func (img *image) readMapped(ctx context.Context, off int64, iov [][]byte, total int64) error {
	img.meta.Lock()
	m, err := img.lookupLocked(ctx, off, total)
	if err != nil {
		img.meta.Unlock()
		return err
	}
	if m.length == total && img.readsZeros(m) {
		img.meta.Unlock()
		zeroIOV(iov)
		return nil
	}
	seq := img.startReqLocked()
	img.meta.Unlock()
	defer img.endReq(seq)
	return img.readFrom(ctx, off, iov, total, m)
}

// noL2Locked reports whether no L2 table maps any of the guest bytes
// [off, off+n): they are all unallocated.
func (img *image) noL2Locked(off, n int64) bool {
	if n <= 0 {
		return true
	}
	for i := img.geo.L1Index(off); i <= img.geo.L1Index(off+n-1) && i < uint64(len(img.l1)); i++ {
		if L1Entry(img.l1[i]).Offset() != 0 {
			return false
		}
	}
	return true
}

// readsZeros reports whether the guest bytes of m read as zeros without
// any I/O.
func (img *image) readsZeros(m mapping) bool {
	return m.kind == kindZero || (m.kind == kindUnalloc && img.backing == nil)
}

// readLocked is ReadV with resize held (used by copy on write too).
func (img *image) readLocked(ctx context.Context, off int64, iov [][]byte) error {
	total := iovLen(iov)
	img.meta.Lock()
	m, err := img.lookupLocked(ctx, off, total)
	img.meta.Unlock()
	if err != nil {
		return err
	}
	return img.readFrom(ctx, off, iov, total, m)
}

// readFrom reads the total bytes of iov at off, m being the mapping of
// the first of them. A range that maps to contiguous host bytes is one
// request on the child (lookupLocked merges clusters), and the guest's
// buffers go down as they are when one mapping covers them all.
func (img *image) readFrom(ctx context.Context, off int64, iov [][]byte, total int64, m mapping) error {
	for pos := int64(0); ; {
		if err := img.readMapping(ctx, off+pos, m, iovSlice(iov, pos, m.length)); err != nil {
			return err
		}
		pos += m.length
		if pos >= total {
			return nil
		}
		var err error
		img.meta.Lock()
		m, err = img.lookupLocked(ctx, off+pos, total-pos)
		img.meta.Unlock()
		if err != nil {
			return err
		}
	}
}

func (img *image) readMapping(ctx context.Context, off int64, m mapping, sub [][]byte) error {
	switch m.kind {
	case kindZero:
		zeroIOV(sub)
	case kindUnalloc:
		return img.readBacking(ctx, off, sub)
	case kindData:
		return img.readData(ctx, off, m.host, sub)
	case kindCompressed:
		buf, err := img.decompressed(ctx, m.entry)
		if err != nil {
			return err
		}
		in := off % img.cs
		copyToIOV(sub, buf[in:])
	}
	return nil
}

// readBacking reads an unallocated range from the backing node; what lies
// past the backing node's end reads as zeros.
func (img *image) readBacking(ctx context.Context, off int64, iov [][]byte) error {
	if img.backing == nil {
		zeroIOV(iov)
		return nil
	}
	return readClamped(ctx, img.backing, off, iov)
}

// readClamped reads iov at off from n; bytes past n's end read as zeros
// (QEMU reads zeros past the end of a growable file).
func readClamped(ctx context.Context, n interface {
	ReadV(context.Context, int64, [][]byte) error
	SizeNow() int64
}, off int64, iov [][]byte) error {
	size := n.SizeNow()
	total := iovLen(iov)
	if off+total <= size {
		return n.ReadV(ctx, off, iov)
	}
	avail := max(size-off, 0)
	if avail > 0 {
		if err := n.ReadV(ctx, off, iovSlice(iov, 0, avail)); err != nil {
			return err
		}
	}
	zeroIOV(iovSlice(iov, avail, total-avail))
	return nil
}

// readCompressed reads and inflates a compressed cluster (qcow2.txt
// "Compressed Clusters Descriptor"; compression_type says deflate or zstd).
func (img *image) readCompressed(ctx context.Context, e L2Entry) ([]byte, error) {
	host, length := img.geo.CompressedSpan(e)
	fsize := img.file.SizeNow()
	if host >= fsize {
		return nil, fmt.Errorf("qcow2: compressed cluster at %#x lies past the end of the file: %w", host, syscall.EIO)
	}
	length = min(length, fsize-host)
	src := make([]byte, length)
	if err := img.file.ReadV(ctx, host, [][]byte{src}); err != nil {
		return nil, err
	}
	out := make([]byte, img.cs)
	if err := decompress(img.compression, src, out); err != nil {
		return nil, fmt.Errorf("qcow2: compressed cluster at %#x: %v: %w", host, err, syscall.EIO)
	}
	return out, nil
}

// decompressed returns the contents of a compressed cluster, from a small
// cache of the last clusters inflated (guests read compressed images in
// pieces much smaller than a cluster).
func (img *image) decompressed(ctx context.Context, e L2Entry) ([]byte, error) {
	img.dcMu.Lock()
	for _, d := range img.dc {
		if d.entry == e.Entry {
			buf := d.buf
			img.dcMu.Unlock()
			return buf, nil
		}
	}
	img.dcMu.Unlock()
	buf, err := img.readCompressed(ctx, e)
	if err != nil {
		return nil, err
	}
	img.dcMu.Lock()
	copy(img.dc[1:], img.dc[:len(img.dc)-1])
	img.dc[0] = decompressedCluster{entry: e.Entry, buf: buf}
	img.dcMu.Unlock()
	return buf, nil
}

// decompressedCluster is an entry of the inflated-cluster cache. The
// entry (host offset and length) identifies the data: a compressed
// cluster is never rewritten in place, and its host bytes are not reused
// while a reader that could see the old entry runs (the free quarantine);
// the cache is dropped when clusters are freed.
type decompressedCluster struct {
	entry uint64
	buf   []byte
}

var zstdDecoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
	if err != nil {
		return nil
	}
	return d
}}

// decompress fills out (one cluster) from the compressed bytes in src,
// which may carry trailing bytes of the last sector.
func decompress(typ uint8, src, out []byte) error {
	switch typ {
	case CompressionZlib:
		// Raw deflate (no zlib header), as QEMU writes it.
		r := flate.NewReader(bytes.NewReader(src))
		defer r.Close()
		if _, err := io.ReadFull(r, out); err != nil {
			return err
		}
		return nil
	case CompressionZstd:
		d, _ := zstdDecoders.Get().(*zstd.Decoder)
		if d == nil {
			return fmt.Errorf("zstd decoder unavailable")
		}
		defer zstdDecoders.Put(d)
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			return err
		}
		if _, err := io.ReadFull(d, out); err != nil {
			return err
		}
		return nil
	}
	return fmt.Errorf("unknown compression type %d", typ)
}
