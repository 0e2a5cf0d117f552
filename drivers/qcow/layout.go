package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

var be = binary.BigEndian

// Magic is "QFI\xfb", shared with qcow2; the version tells them apart.
const Magic = 0x514649fb

// HeaderSize is the size of the version 1 header.
const HeaderSize = 48

// Crypt methods.
const (
	CryptNone = 0
	CryptAES  = 1
)

// MaxBackingFileSize is the longest backing file name QEMU accepts.
const MaxBackingFileSize = 1023

// maxL1Entries bounds the L1 table: QEMU refuses larger images ("Image
// too large"); observed with 7.2 between 16 TiB and 2^62 bytes for 4 KiB
// clusters. 2^31/8 entries is a table of 2 GiB.
const maxL1Entries = math.MaxInt32 / 8

// Header is the version 1 header, big endian:
//
//	 0 magic                4 version
//	 8 backing_file_offset 16 backing_file_size (u32)
//	20 mtime (u32)         24 size (u64, bytes)
//	32 cluster_bits (u8)   33 l2_bits (u8)  34 padding (u16)
//	36 crypt_method (u32)  40 l1_table_offset (u64)
//
// The backing file name (not NUL-terminated) is stored at
// backing_file_offset; qemu-img puts it right after the header and the L1
// table after it, 8-byte aligned.
type Header struct {
	Version           uint32
	BackingFileOffset uint64
	BackingFileSize   uint32
	MTime             uint32
	Size              uint64
	ClusterBits       uint8
	L2Bits            uint8
	CryptMethod       uint32
	L1TableOffset     uint64
	// BackingFile is the name read from BackingFileOffset.
	BackingFile string
}

// FormatError is a header that is not a valid qcow image, with QEMU's
// message.
type FormatError struct{ Msg string }

func (e *FormatError) Error() string { return e.Msg }

func formatErr(f string, a ...any) error { return &FormatError{fmt.Sprintf(f, a...)} }

// ClusterSize is 1 << cluster_bits.
func (h *Header) ClusterSize() int64 { return 1 << h.ClusterBits }

// L2Entries is the number of entries of an L2 table.
func (h *Header) L2Entries() int64 { return 1 << h.L2Bits }

// L2Bytes is the size of an L2 table in bytes.
func (h *Header) L2Bytes() int64 { return 8 << h.L2Bits }

// L1Entries is the number of L1 entries for the image's size.
func (h *Header) L1Entries() int64 { return l1EntriesFor(h.Size, h.ClusterBits, h.L2Bits) }

func l1EntriesFor(size uint64, cb, l2b uint8) int64 {
	shift := uint(cb) + uint(l2b)
	n := size >> shift
	if size&(1<<shift-1) != 0 {
		n++
	}
	if n > maxL1Entries {
		return -1
	}
	return int64(n)
}

// ParseHeader reads and checks the header (and the backing file name) of
// the image r of fileSize bytes, with QEMU 7.2's messages.
func ParseHeader(r io.ReaderAt, fileSize int64) (*Header, error) {
	var b [HeaderSize]byte
	if fileSize < HeaderSize {
		return nil, formatErr("Image not in qcow format")
	}
	if _, err := r.ReadAt(b[:], 0); err != nil {
		return nil, fmt.Errorf("Could not read qcow header: %w", err)
	}
	if be.Uint32(b[0:]) != Magic {
		return nil, formatErr("Image not in qcow format")
	}
	h := &Header{
		Version:           be.Uint32(b[4:]),
		BackingFileOffset: be.Uint64(b[8:]),
		BackingFileSize:   be.Uint32(b[16:]),
		MTime:             be.Uint32(b[20:]),
		Size:              be.Uint64(b[24:]),
		ClusterBits:       b[32],
		L2Bits:            b[33],
		CryptMethod:       be.Uint32(b[36:]),
		L1TableOffset:     be.Uint64(b[40:]),
	}
	if h.Version != 1 {
		if h.Version == 2 || h.Version == 3 {
			return nil, formatErr("qcow (v1) does not support qcow version %d\nTry the 'qcow2' driver instead.", h.Version)
		}
		return nil, formatErr("qcow (v1) does not support qcow version %d", h.Version)
	}
	if h.Size <= 1 {
		return nil, formatErr("Image size is too small (must be at least 2 bytes)")
	}
	if h.ClusterBits < 9 || h.ClusterBits > 16 {
		return nil, formatErr("Cluster size must be between 512 and 64k")
	}
	// The L2 table is 8 << l2_bits bytes.
	if h.L2Bits < 6 || h.L2Bits > 13 {
		return nil, formatErr("L2 table size must be between 512 and 64k")
	}
	if h.CryptMethod > CryptAES {
		return nil, formatErr("invalid encryption method in qcow header")
	}
	if h.Size > math.MaxInt64 || h.L1Entries() < 0 {
		return nil, formatErr("Image too large")
	}
	if h.L1TableOffset > math.MaxInt64-uint64(h.L1Entries())*8 {
		return nil, formatErr("Invalid L1 table offset")
	}
	if h.BackingFileOffset != 0 {
		if h.BackingFileSize > MaxBackingFileSize {
			return nil, formatErr("Backing file name too long")
		}
		if h.BackingFileOffset > uint64(fileSize) || uint64(h.BackingFileSize) > uint64(fileSize)-h.BackingFileOffset {
			return nil, formatErr("Could not read backing file name: beyond the end of the file")
		}
		name := make([]byte, h.BackingFileSize)
		if len(name) > 0 {
			if _, err := r.ReadAt(name, int64(h.BackingFileOffset)); err != nil && !errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("Could not read backing file name: %w", err)
			}
		}
		h.BackingFile = string(name)
	}
	return h, nil
}

// Marshal encodes the 48-byte header (not the backing file name).
func (h *Header) Marshal() []byte {
	b := make([]byte, HeaderSize)
	be.PutUint32(b[0:], Magic)
	be.PutUint32(b[4:], h.Version)
	be.PutUint64(b[8:], h.BackingFileOffset)
	be.PutUint32(b[16:], h.BackingFileSize)
	be.PutUint32(b[20:], h.MTime)
	be.PutUint64(b[24:], h.Size)
	b[32] = h.ClusterBits
	b[33] = h.L2Bits
	be.PutUint32(b[36:], h.CryptMethod)
	be.PutUint64(b[40:], h.L1TableOffset)
	return b
}

// L2 entries: 0 is an unallocated cluster; otherwise the host offset of
// the cluster, or, with the top bit set, a compressed cluster: its
// compressed size in bytes in the cluster_bits bits below the top bit,
// and its host byte offset in the 63-cluster_bits bits below those.
const entryCompressed = uint64(1) << 63

// Entry is a decoded L2 entry.
type Entry struct {
	Compressed bool
	Offset     int64 // host byte offset (0: unallocated)
	CSize      int64 // compressed size in bytes
}

// DecodeEntry decodes an L2 entry of an image with cluster_bits cb.
func DecodeEntry(e uint64, cb uint8) Entry {
	if e&entryCompressed == 0 {
		return Entry{Offset: int64(e &^ entryCompressed)}
	}
	shift := 63 - uint(cb)
	return Entry{
		Compressed: true,
		Offset:     int64(e & (1<<shift - 1)),
		CSize:      int64((e &^ entryCompressed) >> shift),
	}
}

// CompressedEntry encodes a compressed cluster of csize bytes at off.
func CompressedEntry(off, csize int64, cb uint8) uint64 {
	return entryCompressed | uint64(csize)<<(63-uint(cb)) | uint64(off)
}
