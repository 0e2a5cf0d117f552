package crypto

import (
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
)

// SectorCipher encrypts and decrypts whole sectors with a block cipher,
// a mode and an IV generator, as dm-crypt, cryptsetup and QEMU do: each
// sector is encrypted on its own, its IV (or XTS tweak) derived from its
// sector number. It is safe for concurrent use.
type SectorCipher struct {
	alg        CipherAlg
	mode       CipherMode
	ivgen      IVGenAlg
	sectorSize int
	bs         int          // the cipher's block size
	block      cipher.Block // the data cipher (xts: the first key half)
	tweak      cipher.Block // xts: the second key half
	essiv      cipher.Block // essiv: the cipher keyed with hash(key)
}

// NewSectorCipher makes a sector cipher. key is the whole key (both
// halves for xts: twice alg's key size); it is not retained. ivHash is
// only used (and required) for essiv.
func NewSectorCipher(alg CipherAlg, mode CipherMode, ivgen IVGenAlg, ivHash HashAlg, key []byte, sectorSize int) (*SectorCipher, error) {
	fam, ks, ok := familyOf(alg)
	if !ok {
		return nil, &UnsupportedError{fmt.Sprintf("Cipher algorithm '%s' not supported", alg)}
	}
	c := &SectorCipher{alg: alg, mode: mode, ivgen: ivgen, sectorSize: sectorSize, bs: fam.blockSize}
	if sectorSize <= 0 || sectorSize%fam.blockSize != 0 {
		return nil, fmt.Errorf("sector size %d is not a multiple of the %d-byte block", sectorSize, fam.blockSize)
	}
	want := ks
	if mode == ModeXTS {
		want *= 2
	}
	if len(key) != want {
		return nil, fmt.Errorf("Cipher key length %d should be %d", len(key), want)
	}
	var err error
	switch mode {
	case ModeECB, ModeCBC, ModeCTR:
		c.block, err = fam.new(key)
	case ModeXTS:
		if fam.blockSize != 16 {
			return nil, &UnsupportedError{fmt.Sprintf("Unsupported cipher mode %s", mode)}
		}
		if c.block, err = fam.new(key[:ks]); err == nil {
			c.tweak, err = fam.new(key[ks:])
		}
	default:
		return nil, &UnsupportedError{fmt.Sprintf("Cipher mode '%s' not supported", mode)}
	}
	if err != nil {
		return nil, err
	}
	switch ivgen {
	case IVPlain, IVPlain64:
	case IVEssiv:
		if fam.name == "cast5" {
			return nil, &UnsupportedError{fmt.Sprintf("Cipher %s not supported with essiv", alg)}
		}
		h := ivHash.New()
		if h == nil {
			return nil, &UnsupportedError{fmt.Sprintf("Hash algorithm '%s' not supported", ivHash)}
		}
		h.Write(key)
		salt := h.Sum(nil)
		defer clear(salt)
		ok := false
		for _, k := range fam.keySizes {
			ok = ok || k == len(salt)
		}
		if !ok {
			return nil, &UnsupportedError{fmt.Sprintf("No %s cipher with key size %d available", fam.display, len(salt))}
		}
		if c.essiv, err = fam.new(salt); err != nil {
			return nil, err
		}
	default:
		return nil, &UnsupportedError{fmt.Sprintf("IV generator '%s' not supported", ivgen)}
	}
	return c, nil
}

// SectorSize is the unit of Encrypt and Decrypt.
func (c *SectorCipher) SectorSize() int { return c.sectorSize }

// iv computes sector's IV into iv (len: the block size).
func (c *SectorCipher) iv(sector uint64, iv []byte) {
	clear(iv)
	switch c.ivgen {
	case IVPlain:
		binary.LittleEndian.PutUint32(iv, uint32(sector))
	case IVPlain64, IVEssiv:
		if len(iv) >= 8 {
			binary.LittleEndian.PutUint64(iv, sector)
		} else {
			var b [8]byte
			binary.LittleEndian.PutUint64(b[:], sector)
			copy(iv, b[:])
		}
		if c.ivgen == IVEssiv {
			c.essiv.Encrypt(iv, iv)
		}
	}
}

// Encrypt encrypts buf in place: len(buf)/SectorSize() sectors numbered
// from sector on. len(buf) must be a multiple of the sector size.
func (c *SectorCipher) Encrypt(sector uint64, buf []byte) error {
	return c.crypt(sector, buf, true)
}

// Decrypt is Encrypt's inverse.
func (c *SectorCipher) Decrypt(sector uint64, buf []byte) error {
	return c.crypt(sector, buf, false)
}

func (c *SectorCipher) crypt(sector uint64, buf []byte, enc bool) error {
	if len(buf)%c.sectorSize != 0 {
		return fmt.Errorf("crypto: %d bytes is not a whole number of %d-byte sectors", len(buf), c.sectorSize)
	}
	var ivb [16]byte
	iv := ivb[:c.bs]
	var xs *xtsScratch
	if c.mode == ModeXTS {
		xs = c.newXTSScratch(enc)
	}
	for ; len(buf) > 0; buf, sector = buf[c.sectorSize:], sector+1 {
		s := buf[:c.sectorSize]
		if c.mode != ModeECB {
			c.iv(sector, iv)
		}
		switch c.mode {
		case ModeECB:
			for i := 0; i < len(s); i += c.bs {
				if enc {
					c.block.Encrypt(s[i:], s[i:])
				} else {
					c.block.Decrypt(s[i:], s[i:])
				}
			}
		case ModeCBC:
			if enc {
				cbcEncrypt(c.block, iv, s)
			} else {
				cbcDecrypt(c.block, iv, s)
			}
		case ModeCTR:
			ctrXOR(c.block, iv, s)
		case ModeXTS:
			xs.crypt(c.block, c.tweak, iv, s, enc)
		}
	}
	return nil
}

func cbcEncrypt(b cipher.Block, iv, s []byte) {
	bs := len(iv)
	prev := iv
	for i := 0; i < len(s); i += bs {
		blk := s[i : i+bs]
		subtle.XORBytes(blk, blk, prev)
		b.Encrypt(blk, blk)
		prev = blk
	}
}

func cbcDecrypt(b cipher.Block, iv, s []byte) {
	bs := len(iv)
	var prevb, curb [16]byte
	prev, cur := prevb[:bs], curb[:bs]
	copy(prev, iv)
	for i := 0; i < len(s); i += bs {
		blk := s[i : i+bs]
		copy(cur, blk)
		b.Decrypt(blk, blk)
		subtle.XORBytes(blk, blk, prev)
		prev, cur = cur, prev
	}
}

// ctrXOR is CTR mode: the IV is the first counter block, incremented as
// one big-endian integer.
func ctrXOR(b cipher.Block, iv, s []byte) {
	bs := len(iv)
	var ctrb, ksb [16]byte
	ctr, ks := ctrb[:bs], ksb[:bs]
	copy(ctr, iv)
	for i := 0; i < len(s); i += bs {
		b.Encrypt(ks, ctr)
		subtle.XORBytes(s[i:i+bs], s[i:i+bs], ks)
		for j := bs - 1; j >= 0; j-- {
			ctr[j]++
			if ctr[j] != 0 {
				break
			}
		}
	}
}

// XTS (IEEE 1619) on whole sectors, with the IV (plain, plain64 or essiv)
// as the tweak input. The sector is a whole number of blocks, so there is
// no ciphertext stealing. The tweaks of a sector are computed first, so
// that the XORs run over the whole sector at once, and decryption uses the
// block cipher's CBC decrypter (pipelined in assembly for AES) for the
// bulk decryption: CBC-decrypting blocks x_0..x_n with a zero IV gives
// D(x_j) XOR x_{j-1}, and the x_{j-1} XOR is undone afterwards.
type xtsScratch struct {
	tw, saved []byte
	cbc       cipher.BlockMode // decryption only
	setIV     func([]byte)
	zero      [16]byte
}

func (c *SectorCipher) newXTSScratch(enc bool) *xtsScratch {
	x := &xtsScratch{tw: make([]byte, c.sectorSize)}
	if !enc {
		x.saved = make([]byte, c.sectorSize)
		x.cbc = cipher.NewCBCDecrypter(c.block, x.zero[:])
		if s, ok := x.cbc.(interface{ SetIV([]byte) }); ok {
			x.setIV = s.SetIV
		}
	}
	return x
}

func (x *xtsScratch) crypt(data, tweakKey cipher.Block, iv, s []byte, enc bool) {
	var t [16]byte
	tweakKey.Encrypt(t[:], iv)
	lo := binary.LittleEndian.Uint64(t[:8])
	hi := binary.LittleEndian.Uint64(t[8:])
	tw := x.tw[:len(s)]
	for i := 0; i < len(tw); i += 16 {
		binary.LittleEndian.PutUint64(tw[i:], lo)
		binary.LittleEndian.PutUint64(tw[i+8:], hi)
		// t *= α in GF(2^128), little-endian as IEEE 1619 orders it.
		carry := hi >> 63
		hi = hi<<1 | lo>>63
		lo = lo<<1 ^ carry*0x87
	}
	subtle.XORBytes(s, s, tw)
	if enc {
		for i := 0; i < len(s); i += 16 {
			data.Encrypt(s[i:i+16], s[i:i+16])
		}
	} else {
		copy(x.saved, s)
		if x.setIV != nil {
			x.setIV(x.zero[:])
		} else {
			x.cbc = cipher.NewCBCDecrypter(data, x.zero[:])
		}
		x.cbc.CryptBlocks(s, s)
		subtle.XORBytes(s[16:], s[16:], x.saved[:len(s)-16])
	}
	subtle.XORBytes(s, s, tw)
}

// xtsTweak is one sector of XTS with IV iv (for tests).
func xtsTweak(data, tweakKey cipher.Block, iv, s []byte, enc bool) {
	c := &SectorCipher{sectorSize: len(s), block: data}
	c.newXTSScratch(enc).crypt(data, tweakKey, iv, s, enc)
}
