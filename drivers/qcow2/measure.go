package qcow2

// img measure for qcow2: how large a qcow2 file must be for a disk of a
// given size (or holding a given source's data). The metadata counted is
// the layout of qcow2.txt: the header cluster, every L2 table the virtual
// size can need, the L1 table, and refcount blocks and table covering all
// of that plus the data. The results equal qemu-img 7.2's.

import (
	"context"
	"fmt"
	"syscall"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// measureParams are the create options that change the answer.
type measureParams struct {
	clusterBits   uint32
	refcountOrder uint32
	extendedL2    bool
	prealloc      string // "off", "metadata", "falloc", "full"
	v3            bool
}

func alignUp(n, to int64) int64 { return (n + to - 1) / to * to }

// refcountMetadataClusters is the number of refcount block and refcount
// table clusters needed to describe clusters clusters plus themselves.
func refcountMetadataClusters(clusters int64, clusterBits, refcountOrder uint32) int64 {
	perBlock := int64(1) << (clusterBits + 3 - refcountOrder)
	perTable := int64(1) << (clusterBits - 3)
	var blocks, table int64
	for {
		b := (clusters + blocks + table + perBlock - 1) / perBlock
		t := (b + perTable - 1) / perTable
		if b == blocks && t == table {
			return blocks + table
		}
		blocks, table = b, t
	}
}

// metadataSize is the space for header, tables and refcounts of a fully
// allocated image of virtualSize bytes.
func (p measureParams) metadataSize(virtualSize int64) int64 {
	cs := int64(1) << p.clusterBits
	entry := int64(8)
	if p.extendedL2 {
		entry = 16
	}
	data := alignUp(virtualSize, cs)
	meta := cs // header
	l2Entries := alignUp(data/cs, cs/entry)
	meta += l2Entries * entry
	l1Entries := l2Entries * entry / cs
	meta += alignUp(l1Entries*8, cs)
	meta += refcountMetadataClusters((meta+data)/cs, p.clusterBits, p.refcountOrder) * cs
	return meta
}

// measure answers img measure: for size bytes when src is nil, else for
// src's virtual size and allocated data.
func (p measureParams) measure(ctx context.Context, size int64, src *graph.Node) (graph.MeasureResult, error) {
	cs := int64(1) << p.clusterBits
	res := graph.MeasureResult{Bitmaps: -1}
	var dataClusters int64
	if src != nil {
		size = src.SizeNow()
		n, err := allocatedClusters(ctx, src, cs)
		if err != nil {
			return res, err
		}
		dataClusters = n
		if p.v3 {
			if res.Bitmaps, err = sourceBitmapsSize(ctx, src, cs); err != nil {
				return res, err
			}
		}
	}
	if size < 0 {
		return res, qapi.Errorf(qapi.GenericError, "Invalid image size specified. Must be between 0 and 9223372036854775807.")
	}
	meta := p.metadataSize(size)
	res.FullyAllocated = meta + alignUp(size, cs)
	res.Required = meta + dataClusters*cs
	if p.prealloc == "falloc" || p.prealloc == "full" {
		res.Required = res.FullyAllocated
	}
	return res, nil
}

// allocatedClusters counts the clusters of cs bytes in which src (with
// its backing chain) holds data that is not known to be zeros.
func allocatedClusters(ctx context.Context, src *graph.Node, cs int64) (int64, error) {
	size := src.SizeNow()
	var count int64
	next := int64(0) // first cluster not counted yet
	for off := int64(0); off < size; {
		ext, err := dataStatus(ctx, src, off, size-off)
		if err != nil {
			return 0, err
		}
		if ext.Status&graph.StatusData != 0 {
			first := max(off/cs, next)
			last := (off + ext.Length - 1) / cs
			if last >= first {
				count += last - first + 1
				next = last + 1
			}
		}
		off += ext.Length
	}
	return count, nil
}

// dataStatus is the block status of [off, off+n) of node seen through
// recursion into files and fall-through to backing nodes: its Status
// has StatusData only for bytes that read from some layer's data and are
// not known zeros.
func dataStatus(ctx context.Context, node *graph.Node, off, n int64) (graph.StatusExtent, error) {
	for depth := 0; depth < 64; depth++ {
		ext, err := node.BlockStatus(ctx, off, n)
		if err != nil {
			return ext, err
		}
		switch {
		case ext.Status&graph.StatusZero != 0:
			return graph.StatusExtent{Length: ext.Length}, nil
		case ext.Status&graph.StatusRecurse != 0 && ext.File != nil && ext.File != node:
			sub, err := dataStatus(ctx, ext.File, ext.Offset, min(ext.Length, ext.File.SizeNow()-ext.Offset))
			if err != nil {
				return sub, err
			}
			return graph.StatusExtent{Status: sub.Status, Length: min(sub.Length, ext.Length)}, nil
		case ext.Status&graph.StatusAllocated != 0:
			return graph.StatusExtent{Status: ext.Status & graph.StatusData, Length: ext.Length}, nil
		}
		// Not allocated here: the backing node decides, zeros beyond it.
		b := node.Child("backing")
		if b == nil || b.Node() == nil || off >= b.Node().SizeNow() {
			return graph.StatusExtent{Length: ext.Length}, nil
		}
		node, n = b.Node(), min(ext.Length, b.Node().SizeNow()-off)
	}
	return graph.StatusExtent{}, fmt.Errorf("qcow2: backing chain too deep: %w", syscall.ELOOP)
}

// sourceBitmapsSize is the space the persistent dirty bitmaps of a qcow2
// v3 source need in the new image (clusters of cs bytes): each bitmap's
// data, its bitmap table and its directory entry (qcow2.txt "Bitmaps").
// It is -1 when the source cannot hold persistent bitmaps.
func sourceBitmapsSize(ctx context.Context, src *graph.Node, cs int64) (int64, error) {
	if src.DriverName() != "qcow2" {
		return -1, nil
	}
	fc := src.Child("file")
	if fc == nil || fc.Node() == nil {
		return -1, nil
	}
	st := NodeStorage{fc.Node()}
	h, err := ParseHeader(storageReader{ctx, st}, fc.Node().SizeNow())
	if err != nil {
		return 0, err
	}
	if h.Version < 3 {
		return -1, nil
	}
	bms, err := readBitmapDirectory(ctx, st, h)
	if err != nil {
		return 0, err
	}
	var total, dir int64
	size := int64(h.Size)
	for _, b := range bms {
		gran := int64(1) << b.granularityBits
		bits := (size + gran - 1) / gran
		clusters := ((bits+7)/8 + cs - 1) / cs
		total += clusters*cs + alignUp(clusters*8, cs)
		dir += alignUp(24+int64(len(b.name)), 8)
	}
	return total + alignUp(dir, cs), nil
}

// bitmapEntry is what measure and amend need of a bitmap directory
// entry.
type bitmapEntry struct {
	tableOffset     int64
	tableSize       uint32
	granularityBits uint8
	name            string
}

// readBitmapDirectory reads the bitmap directory when the extension is
// present and consistent (autoclear bit 0).
func readBitmapDirectory(ctx context.Context, st Storage, h *Header) ([]bitmapEntry, error) {
	bm := h.Bitmaps
	if bm == nil || h.AutoclearFeatures&AutoclearBitmaps == 0 || bm.NbBitmaps == 0 {
		return nil, nil
	}
	if bm.DirectorySize > 64<<20 {
		return nil, &FormatError{Offset: -1, Msg: "Bitmap directory is too large"}
	}
	dir := make([]byte, bm.DirectorySize)
	if err := st.ReadAt(ctx, dir, int64(bm.DirectoryOffset)); err != nil {
		return nil, fmt.Errorf("qcow2: reading the bitmap directory: %w", err)
	}
	var out []bitmapEntry
	for p, n := 0, uint32(0); n < bm.NbBitmaps; n++ {
		if p+24 > len(dir) {
			return nil, &FormatError{Offset: int64(bm.DirectoryOffset), Msg: "Bitmap directory entry exceeds the directory"}
		}
		nameSize := int(be.Uint16(dir[p+18:]))
		extra := int(be.Uint32(dir[p+20:]))
		end := p + 24 + extra + nameSize
		if end > len(dir) {
			return nil, &FormatError{Offset: int64(bm.DirectoryOffset), Msg: "Bitmap directory entry exceeds the directory"}
		}
		out = append(out, bitmapEntry{
			tableOffset:     int64(be.Uint64(dir[p:])),
			tableSize:       be.Uint32(dir[p+8:]),
			granularityBits: dir[p+17],
			name:            string(dir[p+24+extra : end]),
		})
		p = (end + 7) &^ 7
	}
	return out, nil
}
