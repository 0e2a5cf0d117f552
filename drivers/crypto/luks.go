package crypto

import (
	"bytes"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"time"
)

// LUKS1 on-disk constants (specification section 2.4, figures 1 and 2).
const (
	// HeaderSize is the phdr: the fixed fields and eight key slots.
	HeaderSize = 592
	// NumKeySlots is LUKS1's number of key slots.
	NumKeySlots = 8
	// SectorSize is LUKS1's sector: offsets in the header count it, and
	// key material is encrypted in sectors of it.
	SectorSize = 512
	// Stripes is the AF splitter's stripe count everybody uses.
	Stripes = 4000
	// MinIterations is the least PBKDF2 count LUKS accepts for a slot
	// or the master-key digest.
	MinIterations = 1000

	digestSize     = 20
	saltSize       = 32
	slotActive     = 0x00AC71F3
	slotInactive   = 0x0000DEAD
	keySlotAlign   = 4096 // key material and payload start on 4 KiB boundaries
	maxKeyBytes    = 64
	slotTableStart = 208
	slotEntrySize  = 48
)

// Magic is LUKS1's magic, the first six bytes of a header.
var Magic = []byte{'L', 'U', 'K', 'S', 0xba, 0xbe}

// KeySlot is one key slot of the header.
type KeySlot struct {
	Active     bool
	Iterations uint32
	Salt       [saltSize]byte
	KeyOffset  uint32 // in sectors, from the start of the header
	Stripes    uint32
}

// Header is a LUKS1 phdr. The strings are the header's NUL-padded fields.
type Header struct {
	Version       uint16
	CipherName    string // "aes"
	CipherMode    string // "xts-plain64", "cbc-essiv:sha256"
	HashSpec      string // "sha256"
	PayloadOffset uint32 // in sectors
	KeyBytes      uint32 // master key length
	MKDigest      [digestSize]byte
	MKDigestSalt  [saltSize]byte
	MKDigestIter  uint32
	UUID          string
	Slots         [NumKeySlots]KeySlot
}

// Params are a header's algorithms in QEMU's terms.
type Params struct {
	Cipher    CipherAlg
	Mode      CipherMode
	IVGen     IVGenAlg
	IVGenHash HashAlg // essiv only
	Hash      HashAlg
}

func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// ParseHeader parses and checks the header in b (at least HeaderSize
// bytes) of a LUKS volume whose header, key material and payload span size
// bytes. Every key slot must lie inside size and outside the header and
// the payload; nothing is allocated from a field before it is checked.
// A header that is not LUKS or is inconsistent gives a *FormatError; a
// valid one that asks for something not built an *UnsupportedError.
func ParseHeader(b []byte, size int64) (*Header, error) {
	if len(b) < HeaderSize || !bytes.Equal(b[:6], Magic) {
		return nil, &FormatError{0, "Volume is not in LUKS format"}
	}
	be := binary.BigEndian
	h := &Header{
		Version:       be.Uint16(b[6:]),
		CipherName:    cstr(b[8:40]),
		CipherMode:    cstr(b[40:72]),
		HashSpec:      cstr(b[72:104]),
		PayloadOffset: be.Uint32(b[104:]),
		KeyBytes:      be.Uint32(b[108:]),
		MKDigestIter:  be.Uint32(b[112+digestSize+saltSize:]),
		UUID:          cstr(b[168:208]),
	}
	copy(h.MKDigest[:], b[112:])
	copy(h.MKDigestSalt[:], b[112+digestSize:])
	if h.Version != 1 {
		return nil, &UnsupportedError{fmt.Sprintf("LUKS version %d is not supported", h.Version)}
	}
	if _, err := h.Params(); err != nil {
		return nil, err
	}
	if h.MKDigestIter == 0 {
		return nil, &FormatError{112 + digestSize + saltSize, "LUKS master key digest has zero iterations"}
	}
	hdrEnd := int64(HeaderSize)
	payload := int64(h.PayloadOffset) * SectorSize
	if payload < hdrEnd {
		return nil, &FormatError{104, "LUKS payload is overlapping with the header"}
	}
	type span struct{ start, end int64 }
	var spans [NumKeySlots]span
	for i := range h.Slots {
		o := slotTableStart + i*slotEntrySize
		s := &h.Slots[i]
		state := be.Uint32(b[o:])
		switch state {
		case slotActive:
			s.Active = true
		case slotInactive:
		default:
			return nil, &FormatError{int64(o), fmt.Sprintf("Keyslot %d state (active/disable) is corrupted", i)}
		}
		s.Iterations = be.Uint32(b[o+4:])
		copy(s.Salt[:], b[o+8:o+8+saltSize])
		s.KeyOffset = be.Uint32(b[o+40:])
		s.Stripes = be.Uint32(b[o+44:])
		if !s.Active {
			continue
		}
		// LUKS1 has 4000 stripes (QEMU and cryptsetup refuse others);
		// any other count would also size the key material read at
		// unlock from the file alone.
		if s.Stripes != Stripes {
			return nil, &FormatError{int64(o + 44), fmt.Sprintf("Keyslot %d is corrupted (stripes %d != %d)", i, s.Stripes, Stripes)}
		}
		if s.Iterations == 0 {
			return nil, &FormatError{int64(o), fmt.Sprintf("Keyslot %d is corrupted (stripes %d, iterations %d)", i, s.Stripes, s.Iterations)}
		}
		start := int64(s.KeyOffset) * SectorSize
		end := start + materialSize(h.KeyBytes, s.Stripes)
		if start < hdrEnd {
			return nil, &FormatError{int64(o + 40), fmt.Sprintf("Keyslot %d is overlapping with the LUKS header", i)}
		}
		if end > payload {
			return nil, &FormatError{int64(o + 40), fmt.Sprintf("Keyslot %d is overlapping with the encrypted payload", i)}
		}
		if end > size {
			return nil, &FormatError{int64(o + 40), fmt.Sprintf("Keyslot %d key material ends at %d, beyond the end of the %d-byte volume", i, end, size)}
		}
		spans[i] = span{start, end}
		for j := 0; j < i; j++ {
			if h.Slots[j].Active && start < spans[j].end && spans[j].start < end {
				return nil, &FormatError{int64(o + 40), fmt.Sprintf("Keyslots %d and %d are overlapping in the header", j, i)}
			}
		}
	}
	return h, nil
}

// materialSize is the bytes a slot's split key occupies, whole sectors.
func materialSize(keyBytes, stripes uint32) int64 {
	n := int64(keyBytes) * int64(stripes)
	return (n + SectorSize - 1) / SectorSize * SectorSize
}

// Params decodes the cipher, mode and hash fields.
func (h *Header) Params() (Params, error) {
	var p Params
	if h.KeyBytes == 0 || h.KeyBytes > maxKeyBytes {
		return p, &UnsupportedError{fmt.Sprintf("Algorithm '%s' with key size %d bytes not supported", h.CipherName, h.KeyBytes)}
	}
	modeStr, ivStr, _ := strings.Cut(h.CipherMode, "-")
	p.Mode = CipherMode(modeStr)
	switch p.Mode {
	case ModeECB, ModeCBC, ModeCTR, ModeXTS:
	default:
		return p, &UnsupportedError{fmt.Sprintf("Cipher mode '%s' not supported", modeStr)}
	}
	keyBytes := int(h.KeyBytes)
	if p.Mode == ModeXTS {
		if keyBytes%2 != 0 {
			return p, &UnsupportedError{fmt.Sprintf("Algorithm '%s' with key size %d bytes not supported", h.CipherName, keyBytes)}
		}
		keyBytes /= 2
	}
	alg, err := cipherAlgFromLUKS(h.CipherName, keyBytes)
	if err != nil {
		return p, err
	}
	p.Cipher = alg
	ivName, ivHash, hasHash := strings.Cut(ivStr, ":")
	switch {
	case ivStr == "" && p.Mode == ModeECB:
		// cryptsetup writes a bare "ecb": ECB uses no IV.
		p.IVGen = IVPlain64
	case ivName == string(IVPlain) || ivName == string(IVPlain64):
		p.IVGen = IVGenAlg(ivName)
	case ivName == string(IVEssiv):
		p.IVGen = IVEssiv
		p.IVGenHash = HashAlg(ivHash)
		if !hasHash || !p.IVGenHash.Supported() {
			return p, &UnsupportedError{fmt.Sprintf("Hash algorithm '%s' not supported", ivHash)}
		}
	default:
		return p, &UnsupportedError{fmt.Sprintf("IV generator '%s' not supported", ivName)}
	}
	if p.Mode == ModeXTS && alg.BlockSize() != 16 {
		return p, &UnsupportedError{fmt.Sprintf("Unsupported cipher mode %s", p.Mode)}
	}
	p.Hash = HashAlg(h.HashSpec)
	if !p.Hash.Supported() {
		return p, &UnsupportedError{fmt.Sprintf("Hash algorithm '%s' not supported", h.HashSpec)}
	}
	return p, nil
}

// Marshal encodes the header (HeaderSize bytes).
func (h *Header) Marshal() []byte {
	b := make([]byte, HeaderSize)
	be := binary.BigEndian
	copy(b, Magic)
	be.PutUint16(b[6:], h.Version)
	copy(b[8:40], h.CipherName)
	copy(b[40:72], h.CipherMode)
	copy(b[72:104], h.HashSpec)
	be.PutUint32(b[104:], h.PayloadOffset)
	be.PutUint32(b[108:], h.KeyBytes)
	copy(b[112:], h.MKDigest[:])
	copy(b[112+digestSize:], h.MKDigestSalt[:])
	be.PutUint32(b[112+digestSize+saltSize:], h.MKDigestIter)
	copy(b[168:208], h.UUID)
	for i, s := range h.Slots {
		o := slotTableStart + i*slotEntrySize
		state := uint32(slotInactive)
		if s.Active {
			state = slotActive
		}
		be.PutUint32(b[o:], state)
		be.PutUint32(b[o+4:], s.Iterations)
		copy(b[o+8:], s.Salt[:])
		be.PutUint32(b[o+40:], s.KeyOffset)
		be.PutUint32(b[o+44:], s.Stripes)
	}
	return b
}

// SectorCipher returns the payload's cipher keyed with the master key.
func (h *Header) SectorCipher(masterKey []byte) (*SectorCipher, error) {
	p, err := h.Params()
	if err != nil {
		return nil, err
	}
	return NewSectorCipher(p.Cipher, p.Mode, p.IVGen, p.IVGenHash, masterKey, SectorSize)
}

// ReadFunc reads len(p) bytes at off, from the start of the header.
type ReadFunc func(p []byte, off int64) error

// WriteFunc writes p at off, from the start of the header.
type WriteFunc func(p []byte, off int64) error

// ErrInvalidPassword is QEMU's answer when no slot opens.
var ErrInvalidPassword = fmt.Errorf("Invalid password, cannot unlock any keyslot")

// Unlock tries pass on every active slot and returns the master key and
// the slot that opened. The caller clears the key when done with it.
func (h *Header) Unlock(read ReadFunc, pass []byte) ([]byte, int, error) {
	p, err := h.Params()
	if err != nil {
		return nil, -1, err
	}
	for i := range h.Slots {
		if !h.Slots[i].Active {
			continue
		}
		mk, err := h.tryKeySlot(p, i, read, pass)
		if err != nil {
			return nil, -1, err
		}
		if mk != nil {
			return mk, i, nil
		}
	}
	return nil, -1, ErrInvalidPassword
}

// tryKeySlot returns the master key, or nil when pass does not open slot i.
func (h *Header) tryKeySlot(p Params, i int, read ReadFunc, pass []byte) ([]byte, error) {
	s := &h.Slots[i]
	slotKey, err := PBKDF2(p.Hash, pass, s.Salt[:], s.Iterations, int(h.KeyBytes))
	if err != nil {
		return nil, err
	}
	defer clear(slotKey)
	material := make([]byte, materialSize(h.KeyBytes, s.Stripes))
	defer clear(material)
	if err := read(material, int64(s.KeyOffset)*SectorSize); err != nil {
		return nil, fmt.Errorf("reading key slot %d: %w", i, err)
	}
	sc, err := NewSectorCipher(p.Cipher, p.Mode, p.IVGen, p.IVGenHash, slotKey, SectorSize)
	if err != nil {
		return nil, err
	}
	if err := sc.Decrypt(0, material); err != nil {
		return nil, err
	}
	mk, err := AFMerge(p.Hash, material, int(h.KeyBytes), int(s.Stripes))
	if err != nil {
		return nil, err
	}
	ok, err := h.checkMasterKey(p, mk)
	if err != nil || !ok {
		clear(mk)
		return nil, err
	}
	return mk, nil
}

func (h *Header) checkMasterKey(p Params, mk []byte) (bool, error) {
	d, err := PBKDF2(p.Hash, mk, h.MKDigestSalt[:], h.MKDigestIter, digestSize)
	if err != nil {
		return false, err
	}
	return subtle.ConstantTimeCompare(d, h.MKDigest[:]) == 1, nil
}

// CreateOptions are what a new LUKS volume is made with (QEMU's
// QCryptoBlockCreateOptionsLUKS, resolved).
type CreateOptions struct {
	Params
	IterTime time.Duration
}

// slotLayout is QEMU's and cryptsetup's layout: the header padded to
// 4 KiB, then eight slots of key material each padded to 4 KiB, then the
// payload.
func slotLayout(keyBytes uint32) (offsets [NumKeySlots]uint32, payload uint32) {
	align := func(n int64) int64 { return (n + keySlotAlign - 1) / keySlotAlign * keySlotAlign }
	start := align(HeaderSize)
	slot := align(int64(keyBytes) * Stripes)
	for i := range offsets {
		offsets[i] = uint32((start + int64(i)*slot) / SectorSize)
	}
	return offsets, uint32((start + NumKeySlots*slot) / SectorSize)
}

// CheckParams checks a combination before anything is written, with
// QEMU's messages.
func CheckParams(p Params) error {
	if !p.Cipher.Supported() {
		return &UnsupportedError{fmt.Sprintf("Algorithm '%s' not supported", p.Cipher)}
	}
	if !p.Hash.Supported() {
		return &UnsupportedError{fmt.Sprintf("Hash algorithm '%s' not supported", p.Hash)}
	}
	key := make([]byte, p.keyBytes())
	_, err := NewSectorCipher(p.Cipher, p.Mode, p.IVGen, p.IVGenHash, key, SectorSize)
	return err
}

func (p Params) keyBytes() int {
	n := p.Cipher.KeySize()
	if p.Mode == ModeXTS {
		n *= 2
	}
	return n
}

// Format makes a new header with a random master key, and pass in slot
// 0. It writes the key material through write and returns the header
// (for the caller to write at offset 0) and the master key.
func Format(o CreateOptions, pass []byte, write WriteFunc) (*Header, []byte, error) {
	if err := CheckParams(o.Params); err != nil {
		return nil, nil, err
	}
	p := o.Params
	keyBytes := uint32(p.keyBytes())
	h := &Header{
		Version:    1,
		CipherName: p.Cipher.LUKSName(),
		CipherMode: string(p.Mode) + "-" + string(p.IVGen),
		HashSpec:   string(p.Hash),
		KeyBytes:   keyBytes,
		UUID:       newUUID(),
	}
	if p.IVGen == IVEssiv {
		h.CipherMode += ":" + string(p.IVGenHash)
	}
	offsets, payload := slotLayout(keyBytes)
	h.PayloadOffset = payload
	for i := range h.Slots {
		h.Slots[i] = KeySlot{KeyOffset: offsets[i], Stripes: Stripes}
	}
	mk := make([]byte, keyBytes)
	if _, err := rand.Read(mk); err != nil {
		return nil, nil, err
	}
	if _, err := rand.Read(h.MKDigestSalt[:]); err != nil {
		return nil, nil, err
	}
	// The digest's iterations: an eighth of the time, as the
	// specification suggests and QEMU does.
	n, err := Iterations(p.Hash, digestSize, o.IterTime)
	if err != nil {
		return nil, nil, err
	}
	n /= 8
	if n > math.MaxUint32 {
		return nil, nil, fmt.Errorf("Too many pbkdf iterations for LUKS format")
	}
	h.MKDigestIter = uint32(max(n, MinIterations))
	d, err := PBKDF2(p.Hash, mk, h.MKDigestSalt[:], h.MKDigestIter, digestSize)
	if err != nil {
		return nil, nil, err
	}
	copy(h.MKDigest[:], d)
	if err := h.SetKeySlot(0, mk, pass, o.IterTime, write); err != nil {
		clear(mk)
		return nil, nil, err
	}
	return h, mk, nil
}

// SetKeySlot stores mk in slot i under pass, with an iteration count
// calibrated to iterTime, writing the key material through write. The
// header is updated in memory: the caller writes it after the material.
func (h *Header) SetKeySlot(i int, mk, pass []byte, iterTime time.Duration, write WriteFunc) error {
	p, err := h.Params()
	if err != nil {
		return err
	}
	s := h.Slots[i]
	s.Stripes = Stripes
	n, err := Iterations(p.Hash, int(h.KeyBytes), iterTime)
	if err != nil {
		return err
	}
	if n > math.MaxUint32 {
		return fmt.Errorf("Too many pbkdf iterations for LUKS format")
	}
	s.Iterations = uint32(max(n, MinIterations))
	if _, err := rand.Read(s.Salt[:]); err != nil {
		return err
	}
	slotKey, err := PBKDF2(p.Hash, pass, s.Salt[:], s.Iterations, int(h.KeyBytes))
	if err != nil {
		return err
	}
	defer clear(slotKey)
	split, err := AFSplit(p.Hash, mk, int(s.Stripes))
	if err != nil {
		return err
	}
	material := make([]byte, materialSize(h.KeyBytes, s.Stripes))
	copy(material, split)
	clear(split)
	defer clear(material)
	sc, err := NewSectorCipher(p.Cipher, p.Mode, p.IVGen, p.IVGenHash, slotKey, SectorSize)
	if err != nil {
		return err
	}
	if err := sc.Encrypt(0, material); err != nil {
		return err
	}
	if err := write(material, int64(s.KeyOffset)*SectorSize); err != nil {
		return err
	}
	s.Active = true
	h.Slots[i] = s
	return nil
}

// EraseKeySlot overwrites slot i's key material with random bytes and
// clears the slot's fields in memory. The caller first writes a header
// that marks the slot inactive, so that a crash never leaves an active
// slot pointing at garbage, and writes the header again afterwards.
func (h *Header) EraseKeySlot(i int, write WriteFunc) error {
	s := &h.Slots[i]
	junk := make([]byte, materialSize(h.KeyBytes, max(s.Stripes, 1)))
	if _, err := rand.Read(junk); err != nil {
		return err
	}
	s.Active = false
	s.Iterations = 0
	s.Salt = [saltSize]byte{}
	return write(junk, int64(s.KeyOffset)*SectorSize)
}

// CheckMasterKey reports whether mk is this volume's master key.
func (h *Header) CheckMasterKey(mk []byte) (bool, error) {
	p, err := h.Params()
	if err != nil {
		return false, err
	}
	return h.checkMasterKey(p, mk)
}

// TrySlot returns the master key if pass opens slot i, or nil.
func (h *Header) TrySlot(i int, read ReadFunc, pass []byte) ([]byte, error) {
	p, err := h.Params()
	if err != nil {
		return nil, err
	}
	if !h.Slots[i].Active {
		return nil, nil
	}
	return h.tryKeySlot(p, i, read, pass)
}

func newUUID() string {
	var u [16]byte
	_, _ = rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// PayloadOffset is where Format puts the payload for p, in bytes.
func PayloadOffset(p Params) int64 {
	_, payload := slotLayout(uint32(p.keyBytes()))
	return int64(payload) * SectorSize
}
