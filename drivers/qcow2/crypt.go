package qcow2

// Encryption (qcow2.txt "Full disk encryption header pointer" and "Data
// encryption"). Guest data in host clusters is encrypted per 512-byte
// sector; metadata never is.
//
//   - LUKS (crypt_method 2): a LUKS1 header and its key material live in
//     clusters of the image, found through the full disk encryption
//     header extension (offset and length; key material offsets are
//     relative to the header's start). The algorithms are the header's;
//     the IV input is the physical (host) sector number, which qemu-img's
//     images confirm.
//   - Legacy AES (crypt_method 1): AES-128-CBC keyed with the passphrase's
//     bytes (at most 16, zero-padded), plain64 IVs from the virtual (guest)
//     sector number. It is refused outside the image tool
//     (crypto.LegacyAESRefusal): blockbackend only reads and writes it to
//     convert its data to something safe.
//
// The read and write paths call readData and writeData for host data;
// nothing else of the data path knows about encryption, except that
// encrypted clusters must always be written whole (no "virgin cluster"
// shortcut: zeros in the file do not decrypt to zeros), compressed writes
// are refused (as QEMU), and block status hides host offsets.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"syscall"
	"time"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// EncryptFormat is QCryptoBlockFormat as qcow2 takes it: "qcow" (legacy
// AES) or "luks"; "aes" is qemu-img's name for "qcow" (-o
// encrypt.format=aes).
type EncryptFormat string

// EnumValues lists the accepted values.
func (EncryptFormat) EnumValues() []string { return []string{"qcow", "luks", "aes"} }

// EncryptCreateOptions is QCryptoBlockCreateOptions (the qcow2 create
// options' encrypt member): the format, the passphrase's secret and, for
// LUKS, QCryptoBlockCreateOptionsLUKS's algorithms.
type EncryptCreateOptions struct {
	Format       EncryptFormat     `qapi:"format,optional"` // required; optional for encryption=on
	KeySecret    string            `qapi:"key-secret,optional"`
	CipherAlg    crypto.CipherAlg  `qapi:"cipher-alg,optional"`
	CipherMode   crypto.CipherMode `qapi:"cipher-mode,optional"`
	IVGenAlg     crypto.IVGenAlg   `qapi:"ivgen-alg,optional"`
	IVGenHashAlg crypto.HashAlg    `qapi:"ivgen-hash-alg,optional"`
	HashAlg      crypto.HashAlg    `qapi:"hash-alg,optional"`
	IterTime     *int64            `qapi:"iter-time,optional"`
}

// ImageCreateOptions are the options of `img create -f qcow2`: the
// blockdev-create ones plus qemu-img's deprecated `encryption=on`, an
// alias of encrypt.format=aes.
type ImageCreateOptions struct {
	CreateOptions
	Encryption bool `qapi:"encryption,optional"`
}

func newImageCreateOptions() any {
	return &ImageCreateOptions{CreateOptions: *newCreateOptions().(*CreateOptions)}
}

// imageCreate is img create's qcow2: the alias resolved, then create.
func imageCreate(ctx context.Context, cc *graph.CreateContext, o any) error {
	opts, err := o.(*ImageCreateOptions).resolve()
	if err != nil {
		return err
	}
	return create(ctx, cc, opts)
}

// resolve turns qemu-img's spellings into blockdev-create's options.
func (o *ImageCreateOptions) resolve() (*CreateOptions, error) {
	c := o.CreateOptions
	if o.Encryption {
		if c.Encrypt != nil && c.Encrypt.Format != "" {
			return nil, qapi.Errorf(qapi.GenericError, "'encrypt.format' and its alias 'encryption' can't be used at the same time")
		}
		e := EncryptCreateOptions{}
		if c.Encrypt != nil {
			e = *c.Encrypt
		}
		e.Format = "qcow"
		c.Encrypt = &e
	}
	return &c, nil
}

// defaultIterTime is QEMU's iter-time default, in milliseconds.
const defaultIterTime = 2000

// validateEncrypt checks the encrypt member of the create options.
func validateEncrypt(e *EncryptCreateOptions, imageTool bool) error {
	if e == nil {
		return nil
	}
	if e.Format == "" {
		return qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.format' is missing")
	}
	if e.Format == "aes" {
		e.Format = "qcow"
	}
	if e.KeySecret == "" {
		return qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.key-secret' is required for cipher")
	}
	if e.Format == "qcow" {
		for name, set := range map[string]bool{
			"cipher-alg": e.CipherAlg != "", "cipher-mode": e.CipherMode != "", "ivgen-alg": e.IVGenAlg != "",
			"ivgen-hash-alg": e.IVGenHashAlg != "", "hash-alg": e.HashAlg != "", "iter-time": e.IterTime != nil,
		} {
			if set {
				return qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.%s' is unexpected", name)
			}
		}
		return nil
	}
	_, err := e.params()
	if err != nil {
		return err
	}
	if e.IterTime != nil && (*e.IterTime <= 0 || *e.IterTime > math.MaxInt32) {
		return qapi.Errorf(qapi.GenericError, "Parameter 'iter-time' must be between 1 and %d", math.MaxInt32)
	}
	return nil
}

// params resolves the LUKS algorithms with QEMU's defaults (aes-256,
// xts, plain64, sha256).
func (e *EncryptCreateOptions) params() (crypto.Params, error) {
	p := crypto.Params{Cipher: e.CipherAlg, Mode: e.CipherMode, IVGen: e.IVGenAlg, Hash: e.HashAlg}
	if p.Cipher == "" {
		p.Cipher = crypto.AES256
	}
	if p.Mode == "" {
		p.Mode = crypto.ModeXTS
	}
	if p.IVGen == "" {
		p.IVGen = crypto.IVPlain64
	}
	if p.Hash == "" {
		p.Hash = crypto.SHA256
	}
	if p.IVGen == crypto.IVEssiv {
		p.IVGenHash = e.IVGenHashAlg
		if p.IVGenHash == "" {
			p.IVGenHash = crypto.SHA256
		}
	}
	if err := crypto.CheckParams(p); err != nil {
		return p, qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	return p, nil
}

func (e *EncryptCreateOptions) iterTime() time.Duration {
	if e.IterTime == nil {
		return defaultIterTime * time.Millisecond
	}
	return time.Duration(*e.IterTime) * time.Millisecond
}

// legacyAESKey is the key of crypt_method 1: the passphrase's first 16
// bytes (up to a NUL, as QEMU reads it as a C string), zero-padded.
func legacyAESKey(pass []byte) []byte {
	key := make([]byte, 16)
	for i := 0; i < len(pass) && i < 16 && pass[i] != 0; i++ {
		key[i] = pass[i]
	}
	return key
}

// imageCrypt is the encryption state of an open image.
type imageCrypt struct {
	method uint32 // CryptAES or CryptLUKS
	// cipher is nil when the image was opened for metadata only (NoIO).
	cipher *crypto.SectorCipher
	// mu guards hdr and mk (amend changes them; I/O does not read them).
	mu  sync.Mutex
	hdr *crypto.Header // LUKS
	mk  []byte         // LUKS: the master key, kept for amend; cleared on close
	// secrets are the graph's secret objects (amend's new and old secrets).
	secrets func(id string) ([]byte, error)
	// rmw orders writes by sector (striped): a write that reads, merges
	// and rewrites a partially written sector holds its stripe
	// exclusively, every other write holds the stripes of its sectors
	// shared, so that no write lands between an RMW's read and write.
	rmw [64]sync.RWMutex
}

// openEncryptOptions is the encrypt member of the open options
// (BlockdevQcow2Encryption: format, key-secret).
type openEncryptOptions struct {
	format    string // "", "aes" or "luks"
	keySecret string
}

// lukscreateOnly are encrypt.* create options that the image tool passes
// along when it opens an image it has just created (img convert -o).
var createOnly = map[string]bool{"cipher-alg": true, "cipher-mode": true, "ivgen-alg": true,
	"ivgen-hash-alg": true, "hash-alg": true, "iter-time": true}

func parseOpenEncrypt(m map[string]any, imageTool bool) (*openEncryptOptions, error) {
	if m == nil {
		return nil, nil
	}
	o := &openEncryptOptions{}
	for k, v := range m {
		s, ok := v.(string)
		switch {
		case k == "format" || k == "key-secret":
			if !ok {
				return nil, qapi.Errorf(qapi.GenericError, "Invalid parameter type for 'encrypt.%s', expected: string", k)
			}
			if k == "format" {
				if s != "aes" && s != "luks" {
					return nil, qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.format' does not accept value '%s'", s)
				}
				o.format = s
			} else {
				o.keySecret = s
			}
		case imageTool && createOnly[k]:
		default:
			return nil, qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.%s' is unexpected", k)
		}
	}
	if o.format == "" && !imageTool {
		// blockdev-add's BlockdevQcow2Encryption is a union on format;
		// qemu-img's options take it from the header.
		return nil, qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.format' is missing")
	}
	return o, nil
}

var methodName = map[uint32]string{CryptNone: "none", CryptAES: "aes", CryptLUKS: "luks"}

// openCrypt sets up the image's encryption from its header and the
// encrypt options, before anything is written.
func (img *image) openCrypt(ctx context.Context, oc *graph.OpenContext, opts *Options) error {
	eo, err := parseOpenEncrypt(opts.Encrypt, oc.ImageTool())
	if err != nil {
		return err
	}
	h := img.hdr
	if h.CryptMethod == CryptNone {
		if eo != nil && eo.format != "" {
			return qapi.Errorf(qapi.GenericError, "No encryption in image header, but options specified format '%s'", eo.format)
		}
		return nil
	}
	if eo != nil && eo.format != "" && eo.format != methodName[h.CryptMethod] {
		return qapi.Errorf(qapi.GenericError, "Header reported '%s' encryption format but options specify '%s'",
			methodName[h.CryptMethod], eo.format)
	}
	if h.CryptMethod == CryptAES && !oc.ImageTool() {
		return crypto.LegacyAESRefusal("qcow2", oc.NodeName())
	}
	c := &imageCrypt{method: h.CryptMethod, secrets: oc.Secret}
	if h.CryptMethod == CryptLUKS {
		if c.hdr, err = img.readLUKSHeader(ctx); err != nil {
			return err
		}
	} else if h.Crypto != nil {
		return qapi.Errorf(qapi.GenericError, "Encryption header extension is only valid with LUKS encryption")
	}
	if oc.NoIO() {
		img.crypt = c
		return nil
	}
	if eo == nil || eo.keySecret == "" {
		return qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.key-secret' is required for cipher")
	}
	pass, err := oc.Secret(eo.keySecret)
	if err != nil {
		return err
	}
	defer clear(pass)
	if c.method == CryptAES {
		key := legacyAESKey(pass)
		defer clear(key)
		c.cipher, err = crypto.NewSectorCipher(crypto.AES128, crypto.ModeCBC, crypto.IVPlain64, "", key, crypto.SectorSize)
		if err != nil {
			return err
		}
		img.crypt = c
		return nil
	}
	base := int64(h.Crypto.Offset)
	mk, _, err := c.hdr.Unlock(func(p []byte, off int64) error {
		if off < 0 || base+off+int64(len(p)) > img.file.SizeNow() {
			return fmt.Errorf("qcow2: LUKS key material [%#x,+%d) beyond the end of the file: %w", base+off, len(p), syscall.EIO)
		}
		return img.file.ReadAt(ctx, p, base+off)
	}, pass)
	if err != nil {
		if errors.Is(err, crypto.ErrInvalidPassword) {
			return qapi.Errorf(qapi.GenericError, "%s", err.Error())
		}
		return err
	}
	if c.cipher, err = c.hdr.SectorCipher(mk); err != nil {
		clear(mk)
		return err
	}
	c.mk = mk
	img.crypt = c
	return nil
}

// readLUKSHeader reads the LUKS header that the encryption header
// extension points at.
func (img *image) readLUKSHeader(ctx context.Context) (*crypto.Header, error) {
	ext := img.hdr.Crypto
	if ext == nil {
		return nil, qapi.Errorf(qapi.GenericError, "Could not read encryption header: the full disk encryption header extension is missing")
	}
	fsize := img.file.SizeNow()
	if ext.Offset%uint64(img.cs) != 0 || ext.Offset == 0 {
		return nil, qapi.Errorf(qapi.GenericError, "Encryption header offset '%d' is not a multiple of cluster size '%d'", ext.Offset, img.cs)
	}
	if ext.Offset >= uint64(fsize) || ext.Length > uint64(fsize)-ext.Offset || ext.Length < crypto.HeaderSize {
		return nil, qapi.Errorf(qapi.GenericError, "Encryption header [%#x,+%#x) lies outside the image file", ext.Offset, ext.Length)
	}
	b := make([]byte, crypto.HeaderSize)
	if err := img.file.ReadAt(ctx, b, int64(ext.Offset)); err != nil {
		return nil, fmt.Errorf("Could not read encryption header: %w", err)
	}
	h, err := crypto.ParseHeader(b, int64(ext.Length))
	if err != nil {
		return nil, qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	return h, nil
}

// Encrypted marks the node encrypted (img info, query-named-block-nodes).
func (img *image) Encrypted() bool { return img.crypt != nil }

// HasZeroInit: a new image reads as zeros, except an encrypted one with
// preallocated clusters (they decrypt to noise), as QEMU says.
func (img *image) HasZeroInit() bool {
	if img.crypt == nil {
		return true
	}
	img.meta.Lock()
	defer img.meta.Unlock()
	for _, e := range img.l1 {
		if L1Entry(e).Offset() != 0 {
			return false
		}
	}
	return true
}

// encryptInfo is the "encrypt" member of ImageInfoSpecificQCow2
// (QCryptoBlockInfo: format, and LUKS's header facts).
func (img *image) encryptInfo() map[string]any {
	c := img.crypt
	if c == nil {
		return nil
	}
	if c.method == CryptAES {
		return map[string]any{"format": "aes"}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, _ := c.hdr.Params()
	slots := make([]map[string]any, 0, crypto.NumKeySlots)
	for _, s := range c.hdr.Slots {
		m := map[string]any{"active": s.Active, "key-offset": int64(s.KeyOffset) * crypto.SectorSize}
		if s.Active {
			m["iters"] = s.Iterations
			m["stripes"] = s.Stripes
		}
		slots = append(slots, m)
	}
	d := map[string]any{
		"format":           "luks",
		"cipher-alg":       string(p.Cipher),
		"cipher-mode":      string(p.Mode),
		"ivgen-alg":        string(p.IVGen),
		"hash-alg":         string(p.Hash),
		"payload-offset":   int64(c.hdr.PayloadOffset) * crypto.SectorSize,
		"master-key-iters": c.hdr.MKDigestIter,
		"uuid":             c.hdr.UUID,
		"slots":            slots,
	}
	if p.IVGen == crypto.IVEssiv {
		d["ivgen-hash-alg"] = string(p.IVGenHash)
	}
	return d
}

// ivSector is the IV input of the sector at host offset host (guest
// offset guest): the host sector for LUKS, the guest sector for AES.
func (c *imageCrypt) ivSector(guest, host int64) uint64 {
	if c.method == CryptLUKS {
		return uint64(host / crypto.SectorSize)
	}
	return uint64(guest / crypto.SectorSize)
}

// cryptChunk bounds the bounce buffer of one step of a large request.
const cryptChunk = 1 << 20

var cryptBufs = sync.Pool{New: func() any { b := make([]byte, cryptChunk+2*crypto.SectorSize); return &b }}

// readData reads guest bytes [guest, +len(iov)) stored at host in the
// data child, decrypting them when the image is encrypted.
func (img *image) readData(ctx context.Context, guest, host int64, iov [][]byte) error {
	c := img.crypt
	if c == nil {
		return readClamped(ctx, img.data, host, iov)
	}
	if c.cipher == nil {
		return graph.ErrNoIO
	}
	const ss = crypto.SectorSize
	total := iovLen(iov)
	bp := cryptBufs.Get().(*[]byte)
	defer cryptBufs.Put(bp)
	for done := int64(0); done < total; {
		pos := host + done
		start := pos &^ (ss - 1)
		l := min(total-done, cryptChunk)
		end := (pos + l + ss - 1) &^ (ss - 1)
		buf := (*bp)[:end-start]
		if err := readClamped(ctx, img.data, start, [][]byte{buf}); err != nil {
			return err
		}
		if err := c.cipher.Decrypt(c.ivSector(guest+done-(pos-start), start), buf); err != nil {
			return err
		}
		copyToIOV(iovSlice(iov, done, l), buf[pos-start:])
		done += l
	}
	return nil
}

// writeData writes guest bytes [guest, +len(iov)) to host in the data
// child, encrypting them when the image is encrypted. The sectors a
// write covers only partly must hold valid ciphertext already (they are
// read, decrypted and merged).
func (img *image) writeData(ctx context.Context, guest, host int64, iov [][]byte, flags graph.WriteFlags) error {
	c := img.crypt
	if c == nil {
		return img.data.WriteV(ctx, host, iov, flags)
	}
	if c.cipher == nil {
		return graph.ErrNoIO
	}
	const ss = crypto.SectorSize
	total := iovLen(iov)
	bp := cryptBufs.Get().(*[]byte)
	defer cryptBufs.Put(bp)
	for done := int64(0); done < total; {
		pos := host + done
		start := pos &^ (ss - 1)
		l := min(total-done, cryptChunk)
		end := (pos + l + ss - 1) &^ (ss - 1)
		buf := (*bp)[:end-start]
		gstart := guest + done - (pos - start)
		if err := img.writeCryptChunk(ctx, c, buf, gstart, start, pos, l, iovSlice(iov, done, l), flags); err != nil {
			return err
		}
		done += l
	}
	return nil
}

// writeCryptChunk encrypts and writes [pos, pos+l) through buf, which
// covers it in whole sectors from start (guest offset gstart).
func (img *image) writeCryptChunk(ctx context.Context, c *imageCrypt, buf []byte, gstart, start, pos, l int64, data [][]byte, flags graph.WriteFlags) error {
	const ss = crypto.SectorSize
	end := start + int64(len(buf))
	head, tail := pos != start, pos+l != end
	defer c.lockSectors(start, end, head, tail)()
	if head {
		if err := img.readSector(ctx, c, buf[:ss], gstart, start); err != nil {
			return err
		}
	}
	if tail && (!head || end-start > ss) {
		if err := img.readSector(ctx, c, buf[len(buf)-ss:], gstart+int64(len(buf))-ss, end-ss); err != nil {
			return err
		}
	}
	dst := buf[pos-start : pos-start+l]
	for _, d := range data {
		dst = dst[copy(dst, d):]
	}
	if err := c.cipher.Encrypt(c.ivSector(gstart, start), buf); err != nil {
		return err
	}
	return img.data.WriteV(ctx, start, [][]byte{buf}, flags)
}

// lockSectors locks the stripes of the host sectors [start, end): the
// first (head) and last (tail) exclusively when they are partially
// written, the rest shared. Stripes are taken in index order.
func (c *imageCrypt) lockSectors(start, end int64, head, tail bool) func() {
	const ss = crypto.SectorSize
	n := int64(len(c.rmw))
	var mode [len(imageCrypt{}.rmw)]uint8 // 0 unused, 1 shared, 2 exclusive
	if (end-start)/ss >= n {
		for i := range mode {
			mode[i] = 1
		}
	} else {
		for s := start; s < end; s += ss {
			mode[s/ss%n] = 1
		}
	}
	if head {
		mode[start/ss%n] = 2
	}
	if tail {
		mode[(end-ss)/ss%n] = 2
	}
	for i, m := range mode {
		switch m {
		case 1:
			c.rmw[i].RLock()
		case 2:
			c.rmw[i].Lock()
		}
	}
	return func() {
		for i, m := range mode {
			switch m {
			case 1:
				c.rmw[i].RUnlock()
			case 2:
				c.rmw[i].Unlock()
			}
		}
	}
}

func (img *image) readSector(ctx context.Context, c *imageCrypt, b []byte, guest, host int64) error {
	if err := readClamped(ctx, img.data, host, [][]byte{b}); err != nil {
		return err
	}
	return c.cipher.Decrypt(c.ivSector(guest, host), b)
}

// closeCrypt drops the key schedule.
func (img *image) closeCrypt() {
	if c := img.crypt; c != nil {
		c.mu.Lock()
		clear(c.mk)
		c.mk = nil
		c.cipher = nil
		c.mu.Unlock()
	}
}

// formatLUKS writes the LUKS header and key material of a new image into
// clusters allocated for them, and records them in the header (crypt
// method 2 and the encryption header extension).
func (img *image) formatLUKSLocked(ctx context.Context, e *EncryptCreateOptions, pass []byte) error {
	p, err := e.params()
	if err != nil {
		return err
	}
	length := crypto.PayloadOffset(p)
	n := (length + img.cs - 1) / img.cs
	base, err := img.allocLocked(ctx, n)
	if err != nil {
		return err
	}
	if err := img.growFileLocked(ctx, img.file, base+n*img.cs); err != nil {
		return err
	}
	// The space beyond the header and key material reads as zeros
	// (qcow2.txt asks for that): the clusters are new, past the old end.
	write := func(b []byte, off int64) error {
		if off < 0 || off+int64(len(b)) > length {
			return fmt.Errorf("qcow2: LUKS key material beyond its clusters: %w", syscall.EINVAL)
		}
		return img.file.WriteAt(ctx, b, base+off, 0)
	}
	h, mk, err := crypto.Format(crypto.CreateOptions{Params: p, IterTime: e.iterTime()}, pass, write)
	if err != nil {
		return qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	clear(mk)
	if err := img.file.WriteAt(ctx, h.Marshal(), base, 0); err != nil {
		return err
	}
	nh := *img.hdr
	nh.CryptMethod = CryptLUKS
	nh.Crypto = &CryptoExt{Offset: uint64(base), Length: uint64(length)}
	if !nh.Fits() {
		return qapi.Errorf(qapi.GenericError, "Header extensions too large for the cluster size")
	}
	return img.writeHeaderLocked(ctx, &nh)
}

// setUpEncryptionLocked makes a new image encrypted as e asks.
func (img *image) setUpEncryptionLocked(ctx context.Context, cc *graph.CreateContext, e *EncryptCreateOptions) error {
	pass, err := cc.Secret(e.KeySecret)
	if err != nil {
		return err
	}
	defer clear(pass)
	if e.Format == "qcow" {
		nh := *img.hdr
		nh.CryptMethod = CryptAES
		return img.writeHeaderLocked(ctx, &nh)
	}
	return img.formatLUKSLocked(ctx, e, pass)
}

// cryptRefusesCompression is QEMU's answer to compressed writes in an
// encrypted image.
func (img *image) cryptRefusesCompression() error {
	if img.crypt == nil {
		return nil
	}
	return fmt.Errorf("Compression and encryption not supported at the same time: %w", graph.ErrNotSupported)
}
