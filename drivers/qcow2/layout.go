package qcow2

// The on-disk layout of qcow2 (QEMU's docs/interop/qcow2.txt): pure types
// and functions over byte slices and an io.ReaderAt, with no knowledge of
// the graph. The driver, check/repair, snapshots, amend and measure all
// build on this file; nothing here does I/O beyond reading.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"sort"
	"strings"
)

var be = binary.BigEndian

// Magic is "QFI\xfb" (qcow2.txt "Header", bytes 0-3).
const Magic uint32 = 0x514649fb

// Header sizes (qcow2.txt "Header").
const (
	HeaderSizeV2 = 72  // version 2 header, also the v3 fields' start
	HeaderSizeV3 = 104 // minimum header_length for version 3
	// HeaderSizeCurrent is the header_length we write for version 3: the
	// fields through compression_type (byte 104), padded to 8 as QEMU 7.2.
	HeaderSizeCurrent = 112
)

// Incompatible feature bits (qcow2.txt "Header", bytes 72-79).
const (
	IncompatDirty       uint64 = 1 << 0 // refcounts may be inconsistent
	IncompatCorrupt     uint64 = 1 << 1 // any structure may be corrupt: no writes
	IncompatDataFile    uint64 = 1 << 2 // guest clusters live in an external data file
	IncompatCompression uint64 = 1 << 3 // compression_type is non-zero
	IncompatExtendedL2  uint64 = 1 << 4 // 128-bit L2 entries with subclusters
	// IncompatKnown are the bits this implementation understands.
	IncompatKnown = IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtendedL2
)

// Compatible feature bits (bytes 80-87).
const (
	CompatLazyRefcounts uint64 = 1 << 0
	CompatKnown                = CompatLazyRefcounts
)

// Autoclear feature bits (bytes 88-95). An implementation that writes an
// image with autoclear bits it does not know must clear them first.
const (
	AutoclearBitmaps     uint64 = 1 << 0 // the bitmaps extension is consistent
	AutoclearDataFileRaw uint64 = 1 << 1 // the data file is a standalone raw image
	AutoclearKnown              = AutoclearBitmaps | AutoclearDataFileRaw
)

// Encryption methods (crypt_method, bytes 32-35).
const (
	CryptNone = 0
	CryptAES  = 1
	CryptLUKS = 2
)

// Compression types (compression_type, byte 104).
const (
	CompressionZlib = 0
	CompressionZstd = 1
)

// Header extension types (qcow2.txt "Header extensions").
const (
	ExtEnd           uint32 = 0x00000000
	ExtBackingFormat uint32 = 0xe2792aca
	ExtFeatureTable  uint32 = 0x6803f857
	ExtBitmaps       uint32 = 0x23852875
	ExtCrypto        uint32 = 0x0537be77
	ExtDataFile      uint32 = 0x44415441
)

// Limits: the spec's and QEMU's implementation limits, which QEMU applies
// when opening an image (so an image beyond them is one QEMU refuses too).
const (
	MinClusterBits      = 9
	MaxClusterBits      = 21 // QEMU: 2 MiB clusters at most
	MinClusterBitsExtL2 = 14 // extended L2: subclusters of at least 512 bytes
	MaxRefcountOrder    = 6
	MaxBackingFileSize  = 1023
	MaxL1Bytes          = 32 << 20 // QEMU: 32 MiB L1 table
	MaxRefcountTable    = 8 << 20  // QEMU: 8 MiB refcount table
	MaxSnapshots        = 65536
	MaxSnapshotTable    = 64 << 20 // QEMU: snapshot table size limit
	MaxSnapshotExtra    = 1024     // QEMU: extra data per snapshot entry
	MaxSnapshotIDLen    = 128      // longest unique ID QEMU reads
	MaxBitmaps          = 65535
	Subclusters         = 32 // per cluster with extended L2 entries
	// MaxHostOffset: L1/L2/refcount table entries hold bits 9-55.
	MaxHostOffset = 1<<56 - 1
)

// FormatError reports an image that does not follow the qcow2 format (or
// goes beyond QEMU's limits). Its message is QEMU's where QEMU has one;
// Offset is the file offset of the offending structure, -1 when unknown.
type FormatError struct {
	Offset int64
	Msg    string
}

func (e *FormatError) Error() string { return e.Msg }

func formatErr(off int64, format string, args ...any) error {
	return &FormatError{Offset: off, Msg: fmt.Sprintf(format, args...)}
}

// IsFormatError reports whether err is (or wraps) a FormatError.
func IsFormatError(err error) bool {
	var fe *FormatError
	return errors.As(err, &fe)
}

// FeatureName is an entry of the feature name table (qcow2.txt "Feature
// name table"): Type 0 incompatible, 1 compatible, 2 autoclear.
type FeatureName struct {
	Type uint8
	Bit  uint8
	Name string // at most 46 bytes
}

// Feature types of FeatureName.
const (
	FeatureIncompat  = 0
	FeatureCompat    = 1
	FeatureAutoclear = 2
)

// DefaultFeatureNames is the table QEMU 7.2 writes: every feature this
// implementation knows, so older readers can name what they refuse.
var DefaultFeatureNames = []FeatureName{
	{FeatureIncompat, 0, "dirty bit"},
	{FeatureIncompat, 1, "corrupt bit"},
	{FeatureIncompat, 2, "external data file"},
	{FeatureIncompat, 3, "compression type"},
	{FeatureIncompat, 4, "extended L2 entries"},
	{FeatureCompat, 0, "lazy refcounts"},
	{FeatureAutoclear, 0, "bitmaps"},
	{FeatureAutoclear, 1, "raw external data"},
}

const featureNameEntry = 48

// BitmapsExt is the bitmaps header extension (qcow2.txt "Bitmaps
// extension"). The directory itself is not parsed here.
type BitmapsExt struct {
	NbBitmaps       uint32
	Reserved        uint32
	DirectorySize   uint64
	DirectoryOffset uint64
}

// CryptoExt is the full disk encryption header pointer (qcow2.txt "Full
// disk encryption header pointer").
type CryptoExt struct {
	Offset uint64
	Length uint64
}

// Extension is a header extension kept as raw bytes: the ones this
// implementation does not know are preserved when the header is rewritten.
type Extension struct {
	Type uint32
	Data []byte
}

// Header is the qcow2 header with its extensions and backing file name
// (qcow2.txt "Header", "Header extensions", "String header extensions").
// Version 2 images read as if the v3 fields were zero, with refcount_order
// 4 and header_length 72.
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64 // virtual disk size in bytes
	CryptMethod           uint32
	L1Size                uint32 // entries in the active L1 table
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64

	// Version 3.
	IncompatibleFeatures uint64
	CompatibleFeatures   uint64
	AutoclearFeatures    uint64
	RefcountOrder        uint32
	HeaderLength         uint32
	CompressionType      uint8
	// ExtraFields are the header bytes after compression_type up to
	// header_length (padding or fields of later versions), preserved.
	ExtraFields []byte

	// Header extensions, in the order they are written by Marshal.
	BackingFormat string // "" when absent
	DataFile      string // external data file name; "" when absent
	HasDataFile   bool   // the data file name extension is present (maybe empty)
	FeatureNames  []FeatureName
	Bitmaps       *BitmapsExt
	Crypto        *CryptoExt
	Unknown       []Extension

	// BackingFile is the backing file name ("" when none).
	BackingFile string
}

// ClusterSize is 1 << cluster_bits.
func (h *Header) ClusterSize() int64 { return 1 << h.ClusterBits }

// RefcountBits is 1 << refcount_order.
func (h *Header) RefcountBits() int { return 1 << h.RefcountOrder }

// ExtendedL2 reports incompatible bit 4.
func (h *Header) ExtendedL2() bool { return h.IncompatibleFeatures&IncompatExtendedL2 != 0 }

// ExternalData reports incompatible bit 2.
func (h *Header) ExternalData() bool { return h.IncompatibleFeatures&IncompatDataFile != 0 }

// DataFileRaw reports autoclear bit 1.
func (h *Header) DataFileRaw() bool { return h.AutoclearFeatures&AutoclearDataFileRaw != 0 }

// Geometry returns the table geometry the header describes.
func (h *Header) Geometry() Geometry {
	return Geometry{ClusterBits: h.ClusterBits, ExtendedL2: h.ExtendedL2(), RefcountOrder: h.RefcountOrder}
}

// ReadAtFull is io.ReaderAt's contract but maps a short read at EOF to
// io.ErrUnexpectedEOF.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// checkRange reports whether [off, off+n) lies within a file of size
// bytes, without overflowing.
func inFile(off, n uint64, size int64) bool {
	return size >= 0 && off <= uint64(size) && n <= uint64(size)-off
}

// ParseHeader reads and validates the header, its extensions and the
// backing file name of a qcow2 image of size bytes. Every offset and count
// is checked against size and the spec's (and QEMU's) limits before
// anything is allocated. Errors from the format are *FormatError with
// QEMU's message; I/O errors are returned wrapped.
//
// The dirty and corrupt bits and unknown autoclear bits are reported, not
// refused: the caller decides (a reader may open a corrupt image read-only).
// Unknown incompatible bits are refused, as the spec requires.
func ParseHeader(r io.ReaderAt, size int64) (*Header, error) {
	var b [HeaderSizeV3]byte
	if size < HeaderSizeV2 {
		return nil, formatErr(0, "Image is not in qcow2 format")
	}
	n := int64(HeaderSizeV3)
	if size < n {
		n = size
	}
	if err := readFull(r, b[:n], 0); err != nil {
		return nil, fmt.Errorf("Could not read qcow2 header: %w", err)
	}
	if be.Uint32(b[0:]) != Magic {
		return nil, formatErr(0, "Image is not in qcow2 format")
	}
	h := &Header{
		Version:               be.Uint32(b[4:]),
		BackingFileOffset:     be.Uint64(b[8:]),
		BackingFileSize:       be.Uint32(b[16:]),
		ClusterBits:           be.Uint32(b[20:]),
		Size:                  be.Uint64(b[24:]),
		CryptMethod:           be.Uint32(b[32:]),
		L1Size:                be.Uint32(b[36:]),
		L1TableOffset:         be.Uint64(b[40:]),
		RefcountTableOffset:   be.Uint64(b[48:]),
		RefcountTableClusters: be.Uint32(b[56:]),
		NbSnapshots:           be.Uint32(b[60:]),
		SnapshotsOffset:       be.Uint64(b[64:]),
	}
	if h.Version < 2 || h.Version > 3 {
		return nil, formatErr(4, "Unsupported qcow2 version %d", h.Version)
	}
	if h.ClusterBits < MinClusterBits || h.ClusterBits > MaxClusterBits {
		return nil, formatErr(20, "Unsupported cluster size: 2^%d", h.ClusterBits)
	}
	cs := uint64(1) << h.ClusterBits
	if h.Version == 2 {
		h.RefcountOrder = 4
		h.HeaderLength = HeaderSizeV2
	} else {
		if n < HeaderSizeV3 {
			return nil, formatErr(0, "qcow2 header too short")
		}
		h.IncompatibleFeatures = be.Uint64(b[72:])
		h.CompatibleFeatures = be.Uint64(b[80:])
		h.AutoclearFeatures = be.Uint64(b[88:])
		h.RefcountOrder = be.Uint32(b[96:])
		h.HeaderLength = be.Uint32(b[100:])
		if h.HeaderLength < HeaderSizeV3 {
			return nil, formatErr(100, "qcow2 header too short")
		}
	}
	if uint64(h.HeaderLength) > cs {
		return nil, formatErr(100, "qcow2 header exceeds cluster size")
	}
	if !inFile(0, uint64(h.HeaderLength), size) {
		return nil, formatErr(100, "qcow2 header exceeds the file size")
	}
	if h.HeaderLength > HeaderSizeV3 {
		rest := make([]byte, h.HeaderLength-HeaderSizeV3)
		if err := readFull(r, rest, HeaderSizeV3); err != nil {
			return nil, fmt.Errorf("Could not read qcow2 header: %w", err)
		}
		h.CompressionType = rest[0]
		if len(rest) > 1 {
			h.ExtraFields = rest[1:]
		}
	}

	// Header extensions: between header_length and the end of the first
	// cluster (or the backing file name, whichever comes first).
	extEnd := cs
	if h.BackingFileOffset != 0 && h.BackingFileOffset < extEnd {
		extEnd = h.BackingFileOffset
	}
	if extEnd > uint64(size) {
		extEnd = uint64(size)
	}
	if err := h.parseExtensions(r, uint64(h.HeaderLength), extEnd); err != nil {
		return nil, err
	}

	if h.IncompatibleFeatures&^IncompatKnown != 0 {
		return nil, formatErr(72, "Unsupported qcow2 feature(s): %s",
			h.featureList(FeatureIncompat, h.IncompatibleFeatures&^IncompatKnown))
	}
	if h.RefcountOrder > MaxRefcountOrder {
		return nil, formatErr(96, "Reference count entry width too large; may not exceed 64 bits")
	}
	if h.CryptMethod > CryptLUKS {
		return nil, formatErr(32, "Unsupported encryption method %d", h.CryptMethod)
	}
	if h.IncompatibleFeatures&IncompatCompression != 0 {
		if h.CompressionType == CompressionZlib {
			return nil, formatErr(104, "qcow2: Compression type incompatible feature bit must not be set")
		}
	} else if h.CompressionType != CompressionZlib {
		return nil, formatErr(104, "qcow2: Compression type incompatible feature bit must be set")
	}
	if h.CompressionType > CompressionZstd {
		return nil, formatErr(104, "qcow2: unknown compression type: %d", h.CompressionType)
	}
	if h.ExtendedL2() && h.ClusterBits < MinClusterBitsExtL2 {
		return nil, formatErr(20, "Unsupported subcluster size: %d", cs/Subclusters)
	}

	// Refcount table.
	rtBytes := uint64(h.RefcountTableClusters) << h.ClusterBits
	if rtBytes > MaxRefcountTable {
		return nil, formatErr(56, "Reference count table too large")
	}
	if h.RefcountTableClusters == 0 || h.RefcountTableOffset%cs != 0 ||
		!inFile(h.RefcountTableOffset, rtBytes, size) {
		return nil, formatErr(48, "Reference count table offset invalid")
	}

	// Snapshot table (its entries are parsed by ParseSnapshotTable).
	if h.NbSnapshots > MaxSnapshots {
		return nil, formatErr(60, "Snapshot table too large")
	}
	if h.NbSnapshots > 0 && (h.SnapshotsOffset%cs != 0 || h.SnapshotsOffset == 0 ||
		!inFile(h.SnapshotsOffset, uint64(h.NbSnapshots)*snapshotFixedSize, size)) {
		return nil, formatErr(64, "Snapshot table offset invalid")
	}

	// Active L1 table.
	if uint64(h.L1Size)*8 > MaxL1Bytes {
		return nil, formatErr(36, "Active L1 table too large")
	}
	g := h.Geometry()
	if h.Size > math.MaxInt64-uint64(cs) {
		return nil, formatErr(24, "Image is too big")
	}
	need := g.L1SizeFor(int64(h.Size))
	if need > MaxL1Bytes/8 {
		return nil, formatErr(24, "Image is too big")
	}
	if uint64(h.L1Size) < need {
		return nil, formatErr(36, "L1 table is too small")
	}
	if h.L1Size > 0 && (h.L1TableOffset%cs != 0 || h.L1TableOffset == 0 ||
		!inFile(h.L1TableOffset, uint64(h.L1Size)*8, size)) {
		return nil, formatErr(40, "Active L1 table offset invalid")
	}

	// Backing file name.
	if h.BackingFileOffset != 0 {
		if h.BackingFileOffset > cs {
			return nil, formatErr(8, "Invalid backing file offset")
		}
		if h.BackingFileSize > MaxBackingFileSize || uint64(h.BackingFileSize) > cs-h.BackingFileOffset {
			return nil, formatErr(16, "Backing file name too long")
		}
		if !inFile(h.BackingFileOffset, uint64(h.BackingFileSize), size) {
			return nil, formatErr(8, "Invalid backing file offset")
		}
		name := make([]byte, h.BackingFileSize)
		if err := readFull(r, name, int64(h.BackingFileOffset)); err != nil {
			return nil, fmt.Errorf("Could not read backing file name: %w", err)
		}
		h.BackingFile = string(name)
	}

	if h.ExternalData() && h.CryptMethod != CryptNone {
		return nil, formatErr(72, "data-file cannot be used with encryption")
	}
	if h.AutoclearFeatures&AutoclearDataFileRaw != 0 && !h.ExternalData() {
		// QEMU silently treats this as a normal image: the bit is an
		// autoclear bit and is dropped on the next write.
		h.AutoclearFeatures &^= AutoclearDataFileRaw
	}
	return h, nil
}

// parseExtensions reads the extensions in [start, end).
func (h *Header) parseExtensions(r io.ReaderAt, start, end uint64) error {
	if start >= end {
		return nil
	}
	area := make([]byte, end-start) // at most one cluster (2 MiB)
	if err := readFull(r, area, int64(start)); err != nil {
		return fmt.Errorf("qcow2: Could not read header extensions: %w", err)
	}
	// Each known type should appear at most once; a duplicate replaces
	// the earlier one rather than failing.
	off := 0
	for {
		if len(area)-off < 8 {
			// No end marker: QEMU accepts an area cut by the cluster end.
			return nil
		}
		typ := be.Uint32(area[off:])
		length := uint64(be.Uint32(area[off+4:]))
		off += 8
		if typ == ExtEnd {
			return nil
		}
		if length > uint64(len(area)-off) {
			return formatErr(int64(start)+int64(off)-4, "Header extension too large")
		}
		data := area[off : off+int(length)]
		padded := (length + 7) &^ 7
		if padded > uint64(len(area)-off) {
			padded = uint64(len(area) - off)
		}
		off += int(padded)
		switch typ {
		case ExtBackingFormat:
			if length > 1023 {
				return formatErr(int64(start)+int64(off), "ERROR: ext_backing_format: len=%d too large (>=%d)", length, 1023)
			}
			h.BackingFormat = string(data)
		case ExtDataFile:
			h.DataFile = string(data)
			h.HasDataFile = true
		case ExtFeatureTable:
			h.FeatureNames = h.FeatureNames[:0]
			for i := 0; i+featureNameEntry <= len(data); i += featureNameEntry {
				e := data[i : i+featureNameEntry]
				name := e[2:]
				if j := bytes.IndexByte(name, 0); j >= 0 {
					name = name[:j]
				}
				h.FeatureNames = append(h.FeatureNames, FeatureName{Type: e[0], Bit: e[1], Name: string(name)})
			}
		case ExtBitmaps:
			if length != 24 {
				return formatErr(int64(start)+int64(off), "bitmaps_ext: Invalid extension length")
			}
			bm := &BitmapsExt{
				NbBitmaps:       be.Uint32(data[0:]),
				Reserved:        be.Uint32(data[4:]),
				DirectorySize:   be.Uint64(data[8:]),
				DirectoryOffset: be.Uint64(data[16:]),
			}
			h.Bitmaps = bm
		case ExtCrypto:
			if length != 16 {
				return formatErr(int64(start)+int64(off), "Unable to read CRYPTO header extension")
			}
			h.Crypto = &CryptoExt{Offset: be.Uint64(data[0:]), Length: be.Uint64(data[8:])}
		default:
			h.Unknown = append(h.Unknown, Extension{Type: typ, Data: append([]byte(nil), data...)})
		}
	}
}

// featureList names the bits of mask as QEMU's "Unsupported qcow2
// feature(s)" does: each bit the feature table names, then the unnamed
// ones together as "Unknown incompatible feature: %x".
func (h *Header) featureList(typ uint8, mask uint64) string {
	var parts []string
	var unnamed uint64
	for m := mask; m != 0; m &= m - 1 {
		bit := bits.TrailingZeros64(m)
		if name := h.featureName(typ, bit); name != "" {
			parts = append(parts, name)
		} else {
			unnamed |= 1 << bit
		}
	}
	if unnamed != 0 {
		parts = append(parts, fmt.Sprintf("Unknown incompatible feature: %x", unnamed))
	}
	return strings.Join(parts, ", ")
}

func (h *Header) featureName(typ uint8, bit int) string {
	for _, f := range h.FeatureNames {
		if f.Type == typ && int(f.Bit) == bit {
			return f.Name
		}
	}
	return ""
}

func putExt(buf []byte, typ uint32, data []byte) []byte {
	var hd [8]byte
	be.PutUint32(hd[0:], typ)
	be.PutUint32(hd[4:], uint32(len(data)))
	buf = append(buf, hd[:]...)
	buf = append(buf, data...)
	for len(buf)%8 != 0 {
		buf = append(buf, 0)
	}
	return buf
}

// Marshal encodes the header, its extensions (backing format, external
// data file name, feature name table, crypto pointer, bitmaps, unknown
// ones, end marker) and the backing file name right after them, as QEMU
// lays out the first cluster. It sets HeaderLength (for version 3: at
// least HeaderSizeCurrent, keeping ExtraFields), BackingFileOffset and
// BackingFileSize to the values encoded. The caller checks that the result
// fits in one cluster (Fits).
func (h *Header) Marshal() []byte {
	var hdrLen uint32 = HeaderSizeV2
	if h.Version >= 3 {
		hdrLen = uint32(HeaderSizeV3 + 1 + len(h.ExtraFields))
		hdrLen = (hdrLen + 7) &^ 7
		if hdrLen < HeaderSizeCurrent {
			hdrLen = HeaderSizeCurrent
		}
	}
	h.HeaderLength = hdrLen
	buf := make([]byte, hdrLen, 4096)
	be.PutUint32(buf[0:], Magic)
	be.PutUint32(buf[4:], h.Version)
	be.PutUint32(buf[20:], h.ClusterBits)
	be.PutUint64(buf[24:], h.Size)
	be.PutUint32(buf[32:], h.CryptMethod)
	be.PutUint32(buf[36:], h.L1Size)
	be.PutUint64(buf[40:], h.L1TableOffset)
	be.PutUint64(buf[48:], h.RefcountTableOffset)
	be.PutUint32(buf[56:], h.RefcountTableClusters)
	be.PutUint32(buf[60:], h.NbSnapshots)
	be.PutUint64(buf[64:], h.SnapshotsOffset)
	if h.Version >= 3 {
		be.PutUint64(buf[72:], h.IncompatibleFeatures)
		be.PutUint64(buf[80:], h.CompatibleFeatures)
		be.PutUint64(buf[88:], h.AutoclearFeatures)
		be.PutUint32(buf[96:], h.RefcountOrder)
		be.PutUint32(buf[100:], hdrLen)
		buf[104] = h.CompressionType
		copy(buf[105:], h.ExtraFields)
	}
	if h.BackingFormat != "" {
		buf = putExt(buf, ExtBackingFormat, []byte(h.BackingFormat))
	}
	if h.HasDataFile || h.DataFile != "" {
		buf = putExt(buf, ExtDataFile, []byte(h.DataFile))
	}
	if h.Crypto != nil {
		var d [16]byte
		be.PutUint64(d[0:], h.Crypto.Offset)
		be.PutUint64(d[8:], h.Crypto.Length)
		buf = putExt(buf, ExtCrypto, d[:])
	}
	if len(h.FeatureNames) > 0 {
		d := make([]byte, featureNameEntry*len(h.FeatureNames))
		for i, f := range h.FeatureNames {
			e := d[i*featureNameEntry:]
			e[0], e[1] = f.Type, f.Bit
			copy(e[2:featureNameEntry], f.Name)
		}
		buf = putExt(buf, ExtFeatureTable, d)
	}
	if h.Bitmaps != nil {
		var d [24]byte
		be.PutUint32(d[0:], h.Bitmaps.NbBitmaps)
		be.PutUint32(d[4:], h.Bitmaps.Reserved)
		be.PutUint64(d[8:], h.Bitmaps.DirectorySize)
		be.PutUint64(d[16:], h.Bitmaps.DirectoryOffset)
		buf = putExt(buf, ExtBitmaps, d[:])
	}
	for _, e := range h.Unknown {
		buf = putExt(buf, e.Type, e.Data)
	}
	buf = putExt(buf, ExtEnd, nil)
	if h.BackingFile != "" {
		h.BackingFileOffset = uint64(len(buf))
		h.BackingFileSize = uint32(len(h.BackingFile))
		buf = append(buf, h.BackingFile...)
	} else {
		h.BackingFileOffset, h.BackingFileSize = 0, 0
	}
	be.PutUint64(buf[8:], h.BackingFileOffset)
	be.PutUint32(buf[16:], h.BackingFileSize)
	return buf
}

// Fits reports whether the encoded header fits in the first cluster.
func (h *Header) Fits() bool {
	c := *h
	return int64(len(c.Marshal())) <= h.ClusterSize()
}

// Geometry is the shape of an image's tables (qcow2.txt "Cluster mapping",
// "Extended L2 Entries", "Host cluster management").
type Geometry struct {
	ClusterBits   uint32
	ExtendedL2    bool
	RefcountOrder uint32
}

// ClusterSize in bytes.
func (g Geometry) ClusterSize() int64 { return 1 << g.ClusterBits }

// L2EntrySize is 8, or 16 with extended L2 entries.
func (g Geometry) L2EntrySize() int64 {
	if g.ExtendedL2 {
		return 16
	}
	return 8
}

// L2Bits is log2 of the number of entries of an L2 table.
func (g Geometry) L2Bits() uint32 {
	if g.ExtendedL2 {
		return g.ClusterBits - 4
	}
	return g.ClusterBits - 3
}

// L2Entries per L2 table.
func (g Geometry) L2Entries() int64 { return 1 << g.L2Bits() }

// SubclusterSize is the cluster size / 32 with extended L2 entries, else
// the cluster size.
func (g Geometry) SubclusterSize() int64 {
	if g.ExtendedL2 {
		return g.ClusterSize() / Subclusters
	}
	return g.ClusterSize()
}

// L1Index of a guest offset.
func (g Geometry) L1Index(off int64) uint64 {
	return uint64(off) >> (g.ClusterBits + g.L2Bits())
}

// L2Index of a guest offset within its L2 table.
func (g Geometry) L2Index(off int64) int {
	return int((uint64(off) >> g.ClusterBits) & uint64(g.L2Entries()-1))
}

// L1SizeFor is the number of L1 entries a disk of size bytes needs.
func (g Geometry) L1SizeFor(size int64) uint64 {
	span := uint64(1) << (g.ClusterBits + g.L2Bits())
	return (uint64(size) + span - 1) / span
}

// RefcountBlockEntries per refcount block: cluster_size * 8 / refcount_bits.
func (g Geometry) RefcountBlockEntries() int64 {
	return int64(1) << (g.ClusterBits + 3 - g.RefcountOrder)
}

// RefcountIndex splits a host offset into its refcount table index and
// its index within the refcount block.
func (g Geometry) RefcountIndex(hostOff int64) (table uint64, block int64) {
	cl := uint64(hostOff) >> g.ClusterBits
	shift := g.ClusterBits + 3 - g.RefcountOrder
	return cl >> shift, int64(cl & (1<<shift - 1))
}

// MaxRefcount is the largest refcount an entry can hold.
func (g Geometry) MaxRefcount() uint64 {
	if g.RefcountOrder >= 6 {
		return math.MaxUint64
	}
	return 1<<(1<<g.RefcountOrder) - 1
}

// Table entry bits (qcow2.txt "Cluster mapping").
const (
	// L1/L2 entry flag: refcount is exactly one (bit 63).
	FlagCopied uint64 = 1 << 63
	// L2 entry flag: compressed cluster (bit 62).
	FlagCompressed uint64 = 1 << 62
	// Standard cluster descriptor flag: reads as zeros (bit 0, v3 only,
	// never with extended L2 entries).
	FlagZero uint64 = 1 << 0
	// OffsetMask selects bits 9-55 of an L1, L2 or refcount table entry.
	OffsetMask uint64 = 0x00fffffffffffe00
	// L1ReservedMask: bits that must be zero in an L1 entry.
	L1ReservedMask uint64 = 0x7f000000000001ff
	// L2ReservedMask: bits that must be zero in a standard L2 entry.
	L2ReservedMask uint64 = 0x3f000000000001fe
	// RefcountTableReservedMask: bits 0-8 of a refcount table entry.
	RefcountTableReservedMask uint64 = 0x1ff
)

// L1Entry is an active or snapshot L1 table entry.
type L1Entry uint64

// Offset of the L2 table (0: unallocated).
func (e L1Entry) Offset() int64 { return int64(uint64(e) & OffsetMask) }

// Copied reports bit 63.
func (e L1Entry) Copied() bool { return uint64(e)&FlagCopied != 0 }

// Reserved reports whether reserved bits are set (a corruption).
func (e L1Entry) Reserved() bool { return uint64(e)&L1ReservedMask != 0 }

// MakeL1Entry encodes an L2 table offset, with COPIED when copied.
func MakeL1Entry(l2Offset int64, copied bool) L1Entry {
	e := uint64(l2Offset) & OffsetMask
	if copied && e != 0 {
		e |= FlagCopied
	}
	return L1Entry(e)
}

// ClusterType classifies an L2 entry (QEMU's names).
type ClusterType int

const (
	ClusterUnallocated ClusterType = iota // falls through to the backing file
	ClusterZeroPlain                      // zero flag, no host cluster
	ClusterZeroAlloc                      // zero flag, host cluster preallocated
	ClusterNormal                         // data at a host offset
	ClusterCompressed                     // compressed data
)

func (t ClusterType) String() string {
	return [...]string{"unallocated", "zero-plain", "zero-alloc", "normal", "compressed"}[t]
}

// L2Entry is a (possibly extended) L2 table entry: Entry is the standard
// 64 bits, Bitmap the subcluster allocation bitmap of an extended entry
// (always 0 for standard entries).
type L2Entry struct {
	Entry  uint64
	Bitmap uint64
}

// Compressed reports bit 62.
func (e L2Entry) Compressed() bool { return e.Entry&FlagCompressed != 0 }

// Copied reports bit 63.
func (e L2Entry) Copied() bool { return e.Entry&FlagCopied != 0 }

// Offset is the host cluster offset of a standard entry.
func (e L2Entry) Offset() int64 { return int64(e.Entry & OffsetMask) }

// Type classifies a standard (non-extended) entry. With extended L2
// entries, use SubclusterType per subcluster; Type then only tells
// compressed, normal (an offset is set) or unallocated apart. externalData
// says that an offset of 0 with COPIED set is host offset 0.
func (e L2Entry) Type(extended, externalData bool) ClusterType {
	if e.Compressed() {
		return ClusterCompressed
	}
	off := e.Entry & OffsetMask
	allocated := off != 0 || (externalData && e.Entry&FlagCopied != 0)
	if !extended && e.Entry&FlagZero != 0 {
		if allocated {
			return ClusterZeroAlloc
		}
		return ClusterZeroPlain
	}
	if allocated {
		return ClusterNormal
	}
	return ClusterUnallocated
}

// SubclusterType is the state of one subcluster of an extended entry.
type SubclusterType int

const (
	SubclusterUnallocatedPlain SubclusterType = iota // no host cluster, falls through
	SubclusterUnallocatedAlloc                       // host cluster, but this subcluster falls through
	SubclusterZeroPlain                              // reads as zeros, no host cluster
	SubclusterZeroAlloc                              // reads as zeros, host cluster
	SubclusterNormal                                 // data in the host cluster
	SubclusterCompressed                             // the whole cluster is compressed
	SubclusterInvalid                                // both bits set, or allocated without an offset
)

// SubclusterType returns the state of subcluster i (0..31) of an extended
// entry (qcow2.txt "Extended L2 Entries").
func (e L2Entry) SubclusterType(i int, externalData bool) SubclusterType {
	if e.Compressed() {
		return SubclusterCompressed
	}
	alloc := e.Bitmap&(1<<uint(i)) != 0
	zero := e.Bitmap&(1<<uint(32+i)) != 0
	hasHost := e.Entry&OffsetMask != 0 || (externalData && e.Entry&FlagCopied != 0)
	switch {
	case alloc && zero:
		return SubclusterInvalid
	case alloc && !hasHost:
		return SubclusterInvalid
	case alloc:
		return SubclusterNormal
	case zero && hasHost:
		return SubclusterZeroAlloc
	case zero:
		return SubclusterZeroPlain
	case hasHost:
		return SubclusterUnallocatedAlloc
	}
	return SubclusterUnallocatedPlain
}

// AllocBitmap and ZeroBitmap are the two halves of the subcluster bitmap.
func (e L2Entry) AllocBitmap() uint32 { return uint32(e.Bitmap) }

// ZeroBitmap is the "reads as zeros" half.
func (e L2Entry) ZeroBitmap() uint32 { return uint32(e.Bitmap >> 32) }

// MakeBitmap builds a subcluster bitmap.
func MakeBitmap(alloc, zero uint32) uint64 { return uint64(alloc) | uint64(zero)<<32 }

// MakeStandard encodes a standard entry for a host offset, with flags
// (FlagCopied, FlagZero) or'ed in.
func MakeStandard(hostOff int64, flags uint64) uint64 {
	return uint64(hostOff)&OffsetMask | flags
}

// CompressedOffsetBits is x of the compressed cluster descriptor:
// 62 - (cluster_bits - 8).
func (g Geometry) CompressedOffsetBits() uint32 { return 62 - (g.ClusterBits - 8) }

// CompressedSpan decodes a compressed entry into the host offset of the
// compressed data and the number of bytes that may hold it (to the end of
// its last 512-byte sector).
func (g Geometry) CompressedSpan(e L2Entry) (hostOff int64, length int64) {
	x := g.CompressedOffsetBits()
	desc := e.Entry &^ (FlagCopied | FlagCompressed)
	hostOff = int64(desc & (1<<x - 1))
	sectors := int64(desc>>x) + 1
	length = sectors*512 - hostOff&511
	return hostOff, length
}

// MakeCompressed encodes a compressed entry for length bytes of
// compressed data at hostOff. It fails when the data cannot be described
// (offset beyond the x bits, or more sectors than the field holds).
func (g Geometry) MakeCompressed(hostOff, length int64) (L2Entry, error) {
	x := g.CompressedOffsetBits()
	if hostOff < 0 || uint64(hostOff) >= 1<<x || length <= 0 {
		return L2Entry{}, fmt.Errorf("qcow2: compressed cluster at %#x cannot be described", hostOff)
	}
	// Additional sectors beyond the one holding hostOff.
	extra := (hostOff+length-1)/512 - hostOff/512
	if uint64(extra) >= 1<<(62-x) {
		return L2Entry{}, fmt.Errorf("qcow2: compressed cluster of %d bytes is too large", length)
	}
	return L2Entry{Entry: FlagCompressed | uint64(extra)<<x | uint64(hostOff)}, nil
}

// GetL2 decodes entry i of an L2 table (standard or extended).
func (g Geometry) GetL2(table []byte, i int) L2Entry {
	if g.ExtendedL2 {
		return L2Entry{Entry: be.Uint64(table[i*16:]), Bitmap: be.Uint64(table[i*16+8:])}
	}
	return L2Entry{Entry: be.Uint64(table[i*8:])}
}

// SetL2 encodes entry i of an L2 table.
func (g Geometry) SetL2(table []byte, i int, e L2Entry) {
	if g.ExtendedL2 {
		be.PutUint64(table[i*16:], e.Entry)
		be.PutUint64(table[i*16+8:], e.Bitmap)
		return
	}
	be.PutUint64(table[i*8:], e.Entry)
}

// GetRefcount returns entry i of a refcount block whose entries are
// 1<<order bits wide (qcow2.txt "Host cluster management": for sub-byte
// widths bit 0 is the least significant bit; wider entries are big
// endian).
func GetRefcount(block []byte, order uint32, i int64) uint64 {
	switch order {
	case 0, 1, 2:
		w := uint(1) << order
		perByte := 8 / w
		b := block[i/int64(perByte)]
		shift := uint(i%int64(perByte)) * w
		return uint64(b>>shift) & (1<<w - 1)
	case 3:
		return uint64(block[i])
	case 4:
		return uint64(be.Uint16(block[i*2:]))
	case 5:
		return uint64(be.Uint32(block[i*4:]))
	default:
		return be.Uint64(block[i*8:])
	}
}

// ErrRefcountOverflow is returned by SetRefcount for a value wider than
// the entries.
var ErrRefcountOverflow = errors.New("qcow2: refcount overflow")

// SetRefcount stores v in entry i of a refcount block.
func SetRefcount(block []byte, order uint32, i int64, v uint64) error {
	if order < 6 && v>>(1<<order) != 0 {
		return ErrRefcountOverflow
	}
	switch order {
	case 0, 1, 2:
		w := uint(1) << order
		perByte := 8 / w
		p := &block[i/int64(perByte)]
		shift := uint(i%int64(perByte)) * w
		mask := byte(1<<w-1) << shift
		*p = *p&^mask | byte(v)<<shift
	case 3:
		block[i] = byte(v)
	case 4:
		be.PutUint16(block[i*2:], uint16(v))
	case 5:
		be.PutUint32(block[i*4:], uint32(v))
	default:
		be.PutUint64(block[i*8:], v)
	}
	return nil
}

// Snapshot is a snapshot table entry (qcow2.txt "Snapshots").
type Snapshot struct {
	L1TableOffset uint64
	L1Size        uint32
	ID            string
	Name          string
	DateSec       uint32
	DateNsec      uint32
	VMClockNsec   uint64
	// VMStateSize is the 32-bit field (bytes 32-35); when the extra data
	// holds vm_state_size_large, that is authoritative: see StateSize.
	VMStateSize uint32

	// Extra data (bytes 40-...). Has* say which fields were present.
	HasVMStateSizeLarge bool
	VMStateSizeLarge    uint64
	HasDiskSize         bool
	DiskSize            uint64
	HasICount           bool
	ICount              int64 // -1: not recorded
	// ExtraUnknown is extra data beyond the fields above, preserved.
	ExtraUnknown []byte
}

const (
	snapshotFixedSize = 40
	// SnapshotExtraSize is the extra data QEMU 7.2 writes:
	// vm_state_size_large, disk_size, icount.
	SnapshotExtraSize = 24
)

// StateSize is the VM state size in bytes.
func (s *Snapshot) StateSize() uint64 {
	if s.HasVMStateSizeLarge {
		return s.VMStateSizeLarge
	}
	return uint64(s.VMStateSize)
}

// ParseSnapshotTable reads nb entries at off from an image of size bytes
// with clusters of 1<<clusterBits. It checks each entry against the file
// size and QEMU's limits (ID and name lengths, extra data, total table
// size) before allocating. It returns the entries and the table's length
// in bytes.
func ParseSnapshotTable(r io.ReaderAt, size int64, off uint64, nb uint32, clusterBits uint32) ([]Snapshot, int64, error) {
	if nb == 0 {
		return nil, 0, nil
	}
	if nb > MaxSnapshots {
		return nil, 0, formatErr(60, "Snapshot table too large")
	}
	if off%(uint64(1)<<clusterBits) != 0 || off == 0 {
		return nil, 0, formatErr(64, "Snapshot table offset invalid")
	}
	start := off
	snaps := make([]Snapshot, 0, min(nb, 1024))
	var fixed [snapshotFixedSize]byte
	for i := uint32(0); i < nb; i++ {
		if !inFile(off, snapshotFixedSize, size) {
			return nil, 0, formatErr(int64(off), "Snapshot table offset invalid")
		}
		if err := readFull(r, fixed[:], int64(off)); err != nil {
			return nil, 0, fmt.Errorf("Failed to read snapshot table: %w", err)
		}
		s := Snapshot{
			L1TableOffset: be.Uint64(fixed[0:]),
			L1Size:        be.Uint32(fixed[8:]),
			DateSec:       be.Uint32(fixed[16:]),
			DateNsec:      be.Uint32(fixed[20:]),
			VMClockNsec:   be.Uint64(fixed[24:]),
			VMStateSize:   be.Uint32(fixed[32:]),
			ICount:        -1,
		}
		idLen := uint64(be.Uint16(fixed[12:]))
		nameLen := uint64(be.Uint16(fixed[14:]))
		extraLen := uint64(be.Uint32(fixed[36:]))
		if extraLen > MaxSnapshotExtra {
			return nil, 0, formatErr(int64(off)+36, "Too much extra metadata in snapshot table entry %d", i)
		}
		varLen := extraLen + idLen + nameLen
		if !inFile(off+snapshotFixedSize, varLen, size) {
			return nil, 0, formatErr(int64(off), "Snapshot table offset invalid")
		}
		v := make([]byte, varLen)
		if err := readFull(r, v, int64(off)+snapshotFixedSize); err != nil {
			return nil, 0, fmt.Errorf("Failed to read snapshot table: %w", err)
		}
		extra := v[:extraLen]
		if len(extra) >= 8 {
			s.HasVMStateSizeLarge, s.VMStateSizeLarge = true, be.Uint64(extra[0:])
		}
		if len(extra) >= 16 {
			s.HasDiskSize, s.DiskSize = true, be.Uint64(extra[8:])
		}
		if len(extra) >= 24 {
			s.HasICount, s.ICount = true, int64(be.Uint64(extra[16:]))
		}
		if len(extra) > 24 {
			s.ExtraUnknown = append([]byte(nil), extra[24:]...)
		}
		s.ID = string(v[extraLen : extraLen+idLen])
		s.Name = string(v[extraLen+idLen:])
		entryLen := (snapshotFixedSize + varLen + 7) &^ 7
		off += entryLen
		if off-start > MaxSnapshotTable {
			return nil, 0, formatErr(64, "Snapshot table too large")
		}
		snaps = append(snaps, s)
	}
	return snaps, int64(off - start), nil
}

// Marshal encodes the entry, with the extra data QEMU 7.2 writes
// (vm_state_size_large, disk_size, icount) followed by ExtraUnknown, and
// padding to 8 bytes.
func (s *Snapshot) Marshal() []byte {
	extra := make([]byte, SnapshotExtraSize, SnapshotExtraSize+len(s.ExtraUnknown))
	large := s.VMStateSizeLarge
	if !s.HasVMStateSizeLarge {
		large = uint64(s.VMStateSize)
	}
	be.PutUint64(extra[0:], large)
	be.PutUint64(extra[8:], s.DiskSize)
	icount := s.ICount
	if !s.HasICount {
		icount = -1
	}
	be.PutUint64(extra[16:], uint64(icount))
	extra = append(extra, s.ExtraUnknown...)
	n := snapshotFixedSize + len(extra) + len(s.ID) + len(s.Name)
	buf := make([]byte, (n+7)&^7)
	be.PutUint64(buf[0:], s.L1TableOffset)
	be.PutUint32(buf[8:], s.L1Size)
	be.PutUint16(buf[12:], uint16(len(s.ID)))
	be.PutUint16(buf[14:], uint16(len(s.Name)))
	be.PutUint32(buf[16:], s.DateSec)
	be.PutUint32(buf[20:], s.DateNsec)
	be.PutUint64(buf[24:], s.VMClockNsec)
	vm := s.VMStateSize
	if large > math.MaxUint32 {
		vm = 0
	} else {
		vm = uint32(large)
	}
	be.PutUint32(buf[32:], vm)
	be.PutUint32(buf[36:], uint32(len(extra)))
	p := copy(buf[snapshotFixedSize:], extra) + snapshotFixedSize
	p += copy(buf[p:], s.ID)
	copy(buf[p:], s.Name)
	return buf
}

// MarshalSnapshotTable encodes a whole table.
func MarshalSnapshotTable(snaps []Snapshot) []byte {
	var buf []byte
	for i := range snaps {
		buf = append(buf, snaps[i].Marshal()...)
	}
	return buf
}

// SortFeatureNames orders a feature table as QEMU writes it.
func SortFeatureNames(f []FeatureName) {
	sort.Slice(f, func(i, j int) bool {
		if f[i].Type != f[j].Type {
			return f[i].Type < f[j].Type
		}
		return f[i].Bit < f[j].Bit
	})
}
