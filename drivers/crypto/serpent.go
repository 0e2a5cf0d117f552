package crypto

import (
	"crypto/cipher"
	"encoding/binary"
	"math/bits"
	"strconv"
)

// Serpent, written from its AES submission (Anderson, Biham, Knudsen:
// "Serpent: A Proposal for the Advanced Encryption Standard"), in the
// bitslice form the paper gives as equivalent to the IP/FP description.
// Byte order is the standard one, as Linux's "serpent", cryptsetup, nettle
// and QEMU use it: the key and each block are read as little-endian 32-bit
// words, word 0 first (not the reversed "tnepres" order of the
// submission's test files).
//
// The S-boxes are applied bitsliced: bit j of the four words is one
// 4-bit input (word 0 the least significant bit). Rather than hand-derived
// gate sequences, each S-box's output bits are evaluated from their
// algebraic normal form, computed from the paper's tables: at start-up
// for the key schedule (sboxANF.apply), and as straight-line code that
// serpent_gen.go writes into serpent_sbox.go for the rounds.
//
//go:generate go run serpent_gen.go

// serpentBlockSize is Serpent's block size in bytes.
const serpentBlockSize = 16

// The S-boxes S0..S7 of the paper.
var serpentSbox = [8][16]uint8{
	{3, 8, 15, 1, 10, 6, 5, 11, 14, 13, 4, 2, 7, 0, 9, 12},
	{15, 12, 2, 7, 9, 0, 5, 10, 1, 11, 14, 8, 6, 13, 3, 4},
	{8, 6, 7, 9, 3, 12, 10, 15, 13, 1, 14, 4, 0, 11, 5, 2},
	{0, 15, 11, 8, 12, 9, 6, 3, 13, 1, 2, 4, 10, 7, 5, 14},
	{1, 15, 8, 3, 12, 0, 11, 6, 2, 5, 4, 10, 9, 14, 7, 13},
	{15, 5, 2, 11, 4, 10, 9, 12, 0, 3, 14, 8, 13, 6, 7, 1},
	{7, 2, 12, 5, 8, 4, 6, 11, 14, 9, 1, 15, 13, 3, 10, 0},
	{1, 13, 15, 0, 14, 8, 2, 11, 7, 4, 12, 10, 9, 3, 5, 6},
}

// sboxANF is an S-box as, for each output bit, the list of monomials
// (subsets of the input bits, as 4-bit masks) whose XOR gives that bit.
type sboxANF [4][]uint8

var serpentFwd, serpentInv [8]sboxANF

func init() {
	for i, s := range serpentSbox {
		var inv [16]uint8
		for x, y := range s {
			inv[y] = uint8(x)
		}
		serpentFwd[i] = anf(s)
		serpentInv[i] = anf(inv)
	}
}

// anf computes the algebraic normal form of each output bit of s with the
// Möbius transform.
func anf(s [16]uint8) sboxANF {
	var out sboxANF
	for b := 0; b < 4; b++ {
		var f [16]uint8
		for x := range f {
			f[x] = s[x] >> b & 1
		}
		for i := 1; i < 16; i <<= 1 {
			for x := range f {
				if x&i != 0 {
					f[x] ^= f[x^i]
				}
			}
		}
		for m, c := range f {
			if c != 0 {
				out[b] = append(out[b], uint8(m))
			}
		}
	}
	return out
}

// apply evaluates the S-box on 32 nibbles at once.
func (s *sboxANF) apply(x *[4]uint32) {
	var mono [16]uint32
	x0, x1, x2, x3 := x[0], x[1], x[2], x[3]
	x01 := x0 & x1
	mono[0], mono[1], mono[2], mono[3] = ^uint32(0), x0, x1, x01
	mono[4], mono[5], mono[6], mono[7] = x2, x0&x2, x1&x2, x01&x2
	for m := 8; m < 16; m++ {
		mono[m] = mono[m-8] & x3
	}
	for b := 0; b < 4; b++ {
		var v uint32
		for _, m := range s[b] {
			v ^= mono[m&15]
		}
		x[b] = v
	}
}

func serpentLT(x *[4]uint32) {
	x[0] = bits.RotateLeft32(x[0], 13)
	x[2] = bits.RotateLeft32(x[2], 3)
	x[1] ^= x[0] ^ x[2]
	x[3] ^= x[2] ^ x[0]<<3
	x[1] = bits.RotateLeft32(x[1], 1)
	x[3] = bits.RotateLeft32(x[3], 7)
	x[0] ^= x[1] ^ x[3]
	x[2] ^= x[3] ^ x[1]<<7
	x[0] = bits.RotateLeft32(x[0], 5)
	x[2] = bits.RotateLeft32(x[2], 22)
}

func serpentInvLT(x *[4]uint32) {
	x[2] = bits.RotateLeft32(x[2], -22)
	x[0] = bits.RotateLeft32(x[0], -5)
	x[2] ^= x[3] ^ x[1]<<7
	x[0] ^= x[1] ^ x[3]
	x[3] = bits.RotateLeft32(x[3], -7)
	x[1] = bits.RotateLeft32(x[1], -1)
	x[3] ^= x[2] ^ x[0]<<3
	x[1] ^= x[0] ^ x[2]
	x[2] = bits.RotateLeft32(x[2], -3)
	x[0] = bits.RotateLeft32(x[0], -13)
}

type serpentCipher struct {
	k [33][4]uint32 // round keys K0..K32
}

// serpentKeySizeError reports a key that is not 16, 24 or 32 bytes.
type serpentKeySizeError int

func (k serpentKeySizeError) Error() string {
	return "crypto: invalid Serpent key size " + strconv.Itoa(int(k))
}

// newSerpent returns Serpent keyed with a 16-, 24- or 32-byte key.
func newSerpent(key []byte) (cipher.Block, error) {
	switch len(key) {
	case 16, 24, 32:
	default:
		return nil, serpentKeySizeError(len(key))
	}
	// A short key is padded to 256 bits with a single 1 bit after its
	// most significant bit (the byte after it, in this byte order).
	var kb [32]byte
	copy(kb[:], key)
	if len(key) < 32 {
		kb[len(key)] = 1
	}
	var w [140]uint32 // w[0..7] are the paper's w_-8..w_-1
	for i := 0; i < 8; i++ {
		w[i] = binary.LittleEndian.Uint32(kb[4*i:])
	}
	clear(kb[:])
	const phi = 0x9e3779b9
	for i := 0; i < 132; i++ {
		t := w[i] ^ w[i+3] ^ w[i+5] ^ w[i+7] ^ phi ^ uint32(i)
		w[i+8] = bits.RotateLeft32(t, 11)
	}
	c := &serpentCipher{}
	for i := 0; i < 33; i++ {
		k := [4]uint32{w[8+4*i], w[9+4*i], w[10+4*i], w[11+4*i]}
		// K_i goes through S_{(3-i) mod 8}.
		serpentFwd[(35-i)%8].apply(&k)
		c.k[i] = k
	}
	clear(w[:])
	return c, nil
}

func (c *serpentCipher) BlockSize() int { return serpentBlockSize }

func load4(b []byte) [4]uint32 {
	_ = b[15]
	return [4]uint32{
		binary.LittleEndian.Uint32(b[0:]), binary.LittleEndian.Uint32(b[4:]),
		binary.LittleEndian.Uint32(b[8:]), binary.LittleEndian.Uint32(b[12:]),
	}
}

func store4(b []byte, x [4]uint32) {
	_ = b[15]
	binary.LittleEndian.PutUint32(b[0:], x[0])
	binary.LittleEndian.PutUint32(b[4:], x[1])
	binary.LittleEndian.PutUint32(b[8:], x[2])
	binary.LittleEndian.PutUint32(b[12:], x[3])
}

func xor4(x *[4]uint32, k *[4]uint32) {
	x[0] ^= k[0]
	x[1] ^= k[1]
	x[2] ^= k[2]
	x[3] ^= k[3]
}

func (c *serpentCipher) Encrypt(dst, src []byte) {
	if len(src) < serpentBlockSize || len(dst) < serpentBlockSize {
		panic("crypto: serpent: input not full block")
	}
	x := load4(src)
	k := &c.k
	for i := 0; i < 32; i += 8 {
		xor4(&x, &k[i])
		serpentS0(&x)
		serpentLT(&x)
		xor4(&x, &k[i+1])
		serpentS1(&x)
		serpentLT(&x)
		xor4(&x, &k[i+2])
		serpentS2(&x)
		serpentLT(&x)
		xor4(&x, &k[i+3])
		serpentS3(&x)
		serpentLT(&x)
		xor4(&x, &k[i+4])
		serpentS4(&x)
		serpentLT(&x)
		xor4(&x, &k[i+5])
		serpentS5(&x)
		serpentLT(&x)
		xor4(&x, &k[i+6])
		serpentS6(&x)
		serpentLT(&x)
		xor4(&x, &k[i+7])
		serpentS7(&x)
		if i < 24 {
			serpentLT(&x)
		}
	}
	xor4(&x, &k[32])
	store4(dst, x)
}

func (c *serpentCipher) Decrypt(dst, src []byte) {
	if len(src) < serpentBlockSize || len(dst) < serpentBlockSize {
		panic("crypto: serpent: input not full block")
	}
	x := load4(src)
	k := &c.k
	xor4(&x, &k[32])
	for i := 24; i >= 0; i -= 8 {
		if i < 24 {
			serpentInvLT(&x)
		}
		serpentSInv7(&x)
		xor4(&x, &k[i+7])
		serpentInvLT(&x)
		serpentSInv6(&x)
		xor4(&x, &k[i+6])
		serpentInvLT(&x)
		serpentSInv5(&x)
		xor4(&x, &k[i+5])
		serpentInvLT(&x)
		serpentSInv4(&x)
		xor4(&x, &k[i+4])
		serpentInvLT(&x)
		serpentSInv3(&x)
		xor4(&x, &k[i+3])
		serpentInvLT(&x)
		serpentSInv2(&x)
		xor4(&x, &k[i+2])
		serpentInvLT(&x)
		serpentSInv1(&x)
		xor4(&x, &k[i+1])
		serpentInvLT(&x)
		serpentSInv0(&x)
		xor4(&x, &k[i])
	}
	store4(dst, x)
}
