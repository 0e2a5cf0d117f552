package qcow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"syscall"

	"github.com/klauspost/compress/flate"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/qmp/keyval"
	"blockbackend/qmp/qapi"
)

// Encryption is BlockdevQcowEncryption (QCryptoBlockOptionsQCow).
type Encryption struct {
	// Format is BlockdevQcowEncryptionFormat ("aes"); QEMU takes any
	// value here and then compares it with the header's.
	Format    string `qapi:"format,optional"`
	KeySecret string `qapi:"key-secret,optional"`
}

// Options is QEMU 7.2's BlockdevOptionsQcow (with the base
// BlockdevOptionsGenericCOWFormat: file, backing).
type Options struct {
	File    graph.ChildRef  `qapi:"file"`
	Backing *graph.ChildRef `qapi:"backing,optional"`
	// Encrypt is BlockdevQcowEncryption, decoded into Encryption at
	// open (a map here, so that img convert passes -o encrypt.* on to
	// the new image's open options as it does for qcow2).
	Encrypt map[string]any `qapi:"encrypt,optional"`
}

// encryption decodes Encrypt (nil when absent).
func (o *Options) encryption() (*Encryption, error) {
	if o.Encrypt == nil {
		return nil, nil
	}
	enc := &Encryption{}
	if err := qapi.Decode(o.Encrypt, enc, qapi.JSON); err != nil {
		return nil, err
	}
	return enc, nil
}

func init() {
	graph.Register(&graph.Driver{
		Name:                  "qcow",
		NewOptions:            func() any { return &Options{} },
		Open:                  open,
		NewCreateOptions:      func() any { return &CreateOptions{} },
		Create:                create,
		NewImageCreateOptions: func() any { return &ImageCreateOptions{} },
		ImageCreate:           imageCreate,
		Probe:                 probe,
	})
}

// probe claims version 1 images (qcow2 claims 2 and 3).
func probe(hdr []byte, _ string) int {
	if len(hdr) >= 8 && be.Uint32(hdr) == Magic && be.Uint32(hdr[4:]) == 1 {
		return 100
	}
	return 0
}

const sectorSize = 512

// maxL2Cache is how many L2 tables stay cached (at most 64 KiB each).
const maxL2Cache = 256

// image is an open qcow node.
type image struct {
	log     *slog.Logger
	file    *graph.Node
	backing *graph.Node // nil without a backing node
	hdr     *Header     // immutable
	cs      int64       // cluster size
	size    int64       // virtual size (whole sectors)
	l1Off   int64

	// cipher decrypts and encrypts sectors of an AES image (nil: plain,
	// or no key given yet: see keyErr).
	cipher *crypto.SectorCipher
	keyErr error // set when an encrypted image was opened without its key

	readOnly bool
	secrets  func(id string) ([]byte, error) // the graph's secret objects, for reopen

	alloc sync.Mutex // see the package doc

	meta  sync.Mutex
	l1Len int64              // entries of the L1 table (immutable)
	l1    []uint64           // its first entries (the rest are 0); guarded by meta
	l2    map[int64][]uint64 // L2 tables by L1 index; guarded by meta

	dcMu  sync.Mutex
	dcOff int64 // host offset of the inflated cluster in dc (0: none)
	dc    []byte

	closeOnce sync.Once
}

var (
	_ graph.Instance         = (*image)(nil)
	_ graph.BlockStatuser    = (*image)(nil)
	_ graph.Infoer           = (*image)(nil)
	_ graph.BackingFiler     = (*image)(nil)
	_ graph.CompressedWriter = (*image)(nil)
)

func open(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
	opts := o.(*Options)
	fc, err := oc.OpenChild(ctx, "file", &opts.File, graph.RoleImage, false)
	if err != nil {
		return nil, err
	}
	file := fc.Node()
	h, err := ParseHeader(nodeReaderAt{ctx, file}, file.SizeNow())
	if err != nil {
		var fe *FormatError
		if errors.As(err, &fe) {
			return nil, qapi.Errorf(qapi.GenericError, "%s", fe.Msg)
		}
		return nil, err
	}
	img := &image{
		log: oc.Logger(), file: file, hdr: h, cs: h.ClusterSize(),
		size: int64(h.Size) &^ (sectorSize - 1), l1Off: int64(h.L1TableOffset),
		l2: map[int64][]uint64{}, readOnly: oc.ReadOnly(), secrets: oc.Secret,
	}
	if img.log == nil {
		img.log = slog.New(slog.DiscardHandler)
	}
	enc, err := opts.encryption()
	if err != nil {
		return nil, err
	}
	if err := img.setupCipher(oc, enc); err != nil {
		return nil, err
	}
	// Only the part of the L1 table inside the file is read (and held):
	// the rest reads as zeros, as QEMU reads it, and a header cannot make
	// us allocate more than the file holds.
	img.l1Len = h.L1Entries()
	inFile := min(img.l1Len, max(file.SizeNow()-img.l1Off, 0)/8)
	buf := make([]byte, inFile*8)
	if err := img.readMeta(ctx, buf, img.l1Off); err != nil {
		return nil, fmt.Errorf("qcow: reading the L1 table at %#x: %w", img.l1Off, err)
	}
	img.l1 = make([]uint64, inFile)
	for i := range img.l1 {
		img.l1[i] = be.Uint64(buf[i*8:])
	}
	if err := img.openBacking(ctx, oc, opts); err != nil {
		return nil, err
	}
	return img, nil
}

// setupCipher makes the sector cipher of an AES image from its
// passphrase (encrypt.key-secret), after the daemon's refusal. Opened for
// metadata only (img info: OpenContext.NoIO) it needs no key, and data
// I/O then fails with graph.ErrNoIO.
func (img *image) setupCipher(oc *graph.OpenContext, enc *Encryption) error {
	if img.hdr.CryptMethod != CryptNone {
		if err := refuseOpen(oc); err != nil {
			return err
		}
	}
	c, keyErr, err := img.cipherFor(enc, oc.NoIO())
	if err != nil {
		return err
	}
	img.cipher, img.keyErr = c, keyErr
	return nil
}

// cipherFor checks the encrypt options against the header and returns
// the cipher (nil for a plain image). An AES image opened for metadata
// only (noIO) without its key gets keyErr instead.
func (img *image) cipherFor(enc *Encryption, noIO bool) (c *crypto.SectorCipher, keyErr, err error) {
	if img.hdr.CryptMethod == CryptNone {
		if enc != nil && enc.Format != "" {
			return nil, nil, qapi.Errorf(qapi.GenericError, "No encryption in image header, but options specified format '%s'", enc.Format)
		}
		return nil, nil, nil
	}
	if enc != nil && enc.Format != "" && enc.Format != "aes" {
		return nil, nil, qapi.Errorf(qapi.GenericError, "Header reported 'aes' encryption format but options specify '%s'", enc.Format)
	}
	if enc == nil || enc.KeySecret == "" {
		if !noIO {
			return nil, nil, qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.key-secret' is required for cipher")
		}
		return nil, graph.ErrNoIO, nil
	}
	pass, err := img.secrets(enc.KeySecret)
	if err != nil {
		return nil, nil, err
	}
	defer clear(pass)
	c, err = legacyCipher(pass)
	return c, nil, err
}

// legacyCipher is qcow's AES: the passphrase's first 16 bytes, zero
// padded, as the AES-128 key; CBC per 512-byte sector, IV plain64.
func legacyCipher(pass []byte) (*crypto.SectorCipher, error) {
	var key [16]byte
	defer clear(key[:])
	copy(key[:], pass)
	return crypto.NewSectorCipher(crypto.AES128, crypto.ModeCBC, crypto.IVPlain64, "", key[:], sectorSize)
}

// nodeReaderAt adapts a node to io.ReaderAt for ParseHeader.
type nodeReaderAt struct {
	ctx context.Context
	n   *graph.Node
}

func (r nodeReaderAt) ReadAt(p []byte, off int64) (int, error) {
	size := r.n.SizeNow()
	if off >= size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), size-off)
	if err := r.n.ReadV(r.ctx, off, [][]byte{p[:n]}); err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return len(p), nil
}

// readMeta reads metadata at off; what lies past the end of the file
// reads as zeros (as QEMU's file driver gives it).
func (img *image) readMeta(ctx context.Context, p []byte, off int64) error {
	clear(p)
	size := img.file.SizeNow()
	if off >= size || len(p) == 0 {
		return nil
	}
	n := min(int64(len(p)), size-off)
	return img.file.ReadV(ctx, off, [][]byte{p[:n]})
}

// openBacking opens the backing child from the options or from the
// header's backing file name, whose format qcow does not record: it is
// probed, as QEMU does.
func (img *image) openBacking(ctx context.Context, oc *graph.OpenContext, opts *Options) error {
	ref := opts.Backing
	if ref == nil || !ref.Present() {
		if img.hdr.BackingFile == "" {
			return nil
		}
		m, err := img.backingOptions(img.hdr.BackingFile)
		if err != nil {
			return err
		}
		ref = &graph.ChildRef{Options: m, Mode: qapi.JSON}
	} else if ref.Null {
		return nil
	}
	bc, err := oc.OpenChild(ctx, "backing", ref, graph.RoleBacking, true)
	if err != nil {
		return err
	}
	if bc != nil {
		img.backing = bc.Node()
	}
	return nil
}

func (img *image) backingOptions(name string) (map[string]any, error) {
	if m, ok, err := keyval.ParseJSONFilename(name); ok {
		if err != nil {
			return nil, err
		}
		if _, has := m["driver"]; !has {
			return nil, qapi.Errorf(qapi.GenericError, "Could not open backing file: json: backing file name without a driver")
		}
		return m, nil
	}
	path := graph.ResolveImageName(img.file, name)
	proto, err := graph.ProtocolFor(path)
	if err != nil {
		return nil, qapi.Errorf(qapi.GenericError, "Could not open backing file: %v", err)
	}
	pname := "file"
	if proto != nil {
		pname = proto.Name
	}
	fileOpts := map[string]any{"driver": pname, "filename": path}
	format := "raw"
	if proto == nil {
		if f, err := os.Open(path); err == nil {
			hdr := make([]byte, 2048)
			n, _ := f.ReadAt(hdr, 0)
			f.Close()
			if d, _ := graph.ProbeFormat(hdr[:n], path); d != nil {
				format = d.Name
			}
		}
	}
	return map[string]any{"driver": format, "file": fileOpts}, nil
}

func (img *image) Size() (int64, error) { return img.size, nil }

// ClusterSize is img info's cluster_size and the unit of compressed
// writes.
func (img *image) ClusterSize() int64 { return img.cs }

// Encrypted is img info's "encrypted: yes".
func (img *image) Encrypted() bool { return img.hdr.CryptMethod != CryptNone }

// BackingFile is the name the header records; qcow records no format.
func (img *image) BackingFile() (string, string) { return img.hdr.BackingFile, "" }

// Info: qemu-img 7.2 shows no format-specific information for qcow.
func (img *image) Info() map[string]any { return nil }

func (img *image) Flush(ctx context.Context) error { return img.file.Flush(ctx) }

func (img *image) Close() error {
	img.closeOnce.Do(func() {
		img.cipher = nil
	})
	return nil
}

// mapping is where one run of guest bytes lives.
type mapping struct {
	kind   int
	host   int64 // kindData: host offset of the first byte
	entry  Entry // kindCompressed
	length int64
}

const (
	kindUnalloc = iota
	kindData
	kindCompressed
)

// l2Locked returns the L2 table of L1 index i (nil when unallocated).
func (img *image) l2Locked(ctx context.Context, i int64) ([]uint64, error) {
	if i < 0 || i >= img.l1Len {
		return nil, fmt.Errorf("qcow: L1 index %d out of range: %w", i, syscall.EIO)
	}
	off := int64(img.l1EntryLocked(i))
	if off == 0 {
		return nil, nil
	}
	if t, ok := img.l2[i]; ok {
		return t, nil
	}
	if off < 0 || off >= img.file.SizeNow() {
		return nil, fmt.Errorf("qcow: L2 table at %#x beyond the end of the file: %w", off, syscall.EIO)
	}
	buf := make([]byte, img.hdr.L2Bytes())
	if err := img.readMeta(ctx, buf, off); err != nil {
		return nil, fmt.Errorf("qcow: L2 table at %#x: %w", off, err)
	}
	t := make([]uint64, img.hdr.L2Entries())
	for k := range t {
		t[k] = be.Uint64(buf[k*8:])
	}
	if len(img.l2) >= maxL2Cache {
		for k := range img.l2 { // drop one; entries are never dirty
			delete(img.l2, k)
			break
		}
	}
	img.l2[i] = t
	return t, nil
}

// l1EntryLocked is L1 entry i (0 past the part held).
func (img *image) l1EntryLocked(i int64) uint64 {
	if i < int64(len(img.l1)) {
		return img.l1[i]
	}
	return 0
}

// lookup maps the run of guest bytes at off (at most n) that lives in
// one kind of place.
func (img *image) lookup(ctx context.Context, off, n int64) (mapping, error) {
	img.meta.Lock()
	defer img.meta.Unlock()
	return img.lookupLocked(ctx, off, n)
}

func (img *image) lookupLocked(ctx context.Context, off, n int64) (mapping, error) {
	var m mapping
	cb := uint(img.hdr.ClusterBits)
	l2b := uint(img.hdr.L2Bits)
	for n > 0 {
		gc := off >> cb
		in := off & (img.cs - 1)
		l := min(n, img.cs-in)
		t, err := img.l2Locked(ctx, gc>>l2b)
		if err != nil {
			return m, err
		}
		var e Entry
		if t != nil {
			e = DecodeEntry(t[gc&(1<<l2b-1)], img.hdr.ClusterBits)
		}
		kind := kindData
		switch {
		case e.Compressed:
			kind = kindCompressed
		case e.Offset == 0:
			kind = kindUnalloc
		}
		if m.length == 0 {
			m = mapping{kind: kind, entry: e, length: l}
			if kind == kindData {
				m.host = e.Offset + in
			}
			if kind == kindCompressed {
				return m, nil // one cluster at a time
			}
		} else {
			if kind != m.kind || kind == kindData && e.Offset != m.host+m.length {
				return m, nil
			}
			m.length += l
		}
		off += l
		n -= l
	}
	return m, nil
}

// iovCursor walks a vector of buffers.
type iovCursor struct {
	iov [][]byte
}

// next returns the next n bytes as buffers (slices of iov).
func (c *iovCursor) next(n int64) [][]byte {
	var out [][]byte
	for n > 0 && len(c.iov) > 0 {
		b := c.iov[0]
		if int64(len(b)) > n {
			out = append(out, b[:n])
			c.iov[0] = b[n:]
			return out
		}
		out = append(out, b)
		n -= int64(len(b))
		c.iov = c.iov[1:]
	}
	return out
}

func iovLen(iov [][]byte) int64 {
	var t int64
	for _, b := range iov {
		t += int64(len(b))
	}
	return t
}

func scatter(dst [][]byte, src []byte) {
	for _, b := range dst {
		n := copy(b, src)
		src = src[n:]
	}
}

func gather(src [][]byte) []byte {
	out := make([]byte, 0, iovLen(src))
	for _, b := range src {
		out = append(out, b...)
	}
	return out
}

func zeroIOV(iov [][]byte) {
	for _, b := range iov {
		clear(b)
	}
}

func (img *image) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	c := iovCursor{iov: append([][]byte(nil), iov...)}
	total := iovLen(iov)
	for done := int64(0); done < total; {
		pos := off + done
		m, err := img.lookup(ctx, pos, total-done)
		if err != nil {
			return err
		}
		dst := c.next(m.length)
		if err := img.readRun(ctx, pos, m, dst); err != nil {
			return err
		}
		done += m.length
	}
	return nil
}

// readRun reads one mapped run into dst.
func (img *image) readRun(ctx context.Context, pos int64, m mapping, dst [][]byte) error {
	switch m.kind {
	case kindUnalloc:
		return img.readBacking(ctx, pos, dst)
	case kindCompressed:
		data, err := img.inflate(ctx, m.entry)
		if err != nil {
			return err
		}
		in := pos & (img.cs - 1)
		scatter(dst, data[in:in+m.length])
		return nil
	}
	if img.cipher == nil && img.keyErr == nil {
		return img.file.ReadV(ctx, m.host, dst)
	}
	buf, err := img.readDecrypted(ctx, pos, m.host, m.length)
	if err != nil {
		return err
	}
	scatter(dst, buf)
	return nil
}

// readDecrypted reads n guest bytes at pos, stored at host, through the
// cipher (whole sectors around them).
func (img *image) readDecrypted(ctx context.Context, pos, host, n int64) ([]byte, error) {
	if img.keyErr != nil {
		return nil, img.keyErr
	}
	head := pos & (sectorSize - 1)
	l := (head + n + sectorSize - 1) &^ (sectorSize - 1)
	buf := make([]byte, l)
	if err := img.readHost(ctx, buf, host-head); err != nil {
		return nil, err
	}
	if err := img.cipher.Decrypt(uint64((pos-head)/sectorSize), buf); err != nil {
		return nil, err
	}
	return buf[head : head+n], nil
}

// readHost reads a data cluster's bytes; past the end of the file reads
// zeros (a last cluster qemu-img left short).
func (img *image) readHost(ctx context.Context, p []byte, off int64) error {
	return img.readMeta(ctx, p, off)
}

// readBacking reads unallocated guest bytes: the backing node's, zeros
// past its end or without one.
func (img *image) readBacking(ctx context.Context, pos int64, dst [][]byte) error {
	if img.backing == nil {
		zeroIOV(dst)
		return nil
	}
	bsize := img.backing.SizeNow()
	n := iovLen(dst)
	if pos >= bsize {
		zeroIOV(dst)
		return nil
	}
	if pos+n <= bsize {
		return img.backing.ReadV(ctx, pos, dst)
	}
	c := iovCursor{iov: append([][]byte(nil), dst...)}
	in := c.next(bsize - pos)
	if err := img.backing.ReadV(ctx, pos, in); err != nil {
		return err
	}
	zeroIOV(c.iov)
	return nil
}

// inflate returns the cluster of a compressed entry (cached).
func (img *image) inflate(ctx context.Context, e Entry) ([]byte, error) {
	img.dcMu.Lock()
	if img.dcOff == e.Offset && img.dc != nil {
		out := img.dc
		img.dcMu.Unlock()
		return out, nil
	}
	img.dcMu.Unlock()
	fsize := img.file.SizeNow()
	if e.Offset <= 0 || e.Offset >= fsize || e.CSize <= 0 {
		return nil, fmt.Errorf("qcow: compressed cluster at %#x (%d bytes) outside the file: %w", e.Offset, e.CSize, syscall.EIO)
	}
	comp := make([]byte, min(e.CSize, fsize-e.Offset))
	if err := img.file.ReadV(ctx, e.Offset, [][]byte{comp}); err != nil {
		return nil, err
	}
	out := make([]byte, img.cs)
	r := flate.NewReader(bytes.NewReader(comp))
	_, err := io.ReadFull(r, out)
	r.Close()
	if err != nil {
		return nil, fmt.Errorf("qcow: compressed cluster at %#x does not inflate to a cluster: %v: %w", e.Offset, err, syscall.EIO)
	}
	img.dcMu.Lock()
	img.dcOff, img.dc = e.Offset, out
	img.dcMu.Unlock()
	return out, nil
}

// BlockStatus reports one run: allocated data (with where it lies, for
// plain clusters of unencrypted images), or unallocated (the backing
// node's, or zeros).
func (img *image) BlockStatus(ctx context.Context, off, n int64) (graph.StatusExtent, error) {
	m, err := img.lookup(ctx, off, n)
	if err != nil {
		return graph.StatusExtent{}, err
	}
	ext := graph.StatusExtent{Length: m.length}
	switch m.kind {
	case kindData:
		ext.Status = graph.StatusData | graph.StatusAllocated
		if img.hdr.CryptMethod == CryptNone {
			ext.Offset, ext.File = m.host, img.file
		}
	case kindCompressed:
		ext.Status = graph.StatusData | graph.StatusAllocated
	case kindUnalloc:
		if img.backing == nil || off >= img.backing.SizeNow() {
			ext.Status = graph.StatusZero
		}
	}
	return ext, nil
}
