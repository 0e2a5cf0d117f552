package crypto

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
)

// The anti-forensic splitter of the LUKS1 specification (section 2.4):
// a key is inflated to stripes times its length so that destroying any
// part of the stored material destroys the key.

// diffuse replaces each digest-sized piece j of b by H(be32(j) || piece);
// a final short piece is hashed the same way and truncated.
func diffuse(h HashAlg, b []byte) {
	hh := h.New()
	size := hh.Size()
	var idx [4]byte
	sum := make([]byte, 0, hh.Size())
	for j, off := uint32(0), 0; off < len(b); j, off = j+1, off+size {
		n := min(size, len(b)-off)
		hh.Reset()
		binary.BigEndian.PutUint32(idx[:], j)
		hh.Write(idx[:])
		hh.Write(b[off : off+n])
		sum = hh.Sum(sum[:0])
		copy(b[off:off+n], sum)
	}
	clear(sum[:cap(sum)])
}

// AFSplit spreads key over stripes stripes (len(key)*stripes bytes),
// with random stripes and the hash's diffusion.
func AFSplit(h HashAlg, key []byte, stripes int) ([]byte, error) {
	if !h.Supported() {
		return nil, &UnsupportedError{fmt.Sprintf("Hash algorithm '%s' not supported", h)}
	}
	if stripes < 1 {
		return nil, fmt.Errorf("crypto: %d stripes", stripes)
	}
	n := len(key)
	out := make([]byte, n*stripes)
	if _, err := rand.Read(out[:n*(stripes-1)]); err != nil {
		return nil, err
	}
	d := make([]byte, n)
	defer clear(d)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, out[i*n:(i+1)*n])
		diffuse(h, d)
	}
	subtle.XORBytes(out[(stripes-1)*n:], d, key)
	return out, nil
}

// AFMerge recovers a keyLen-byte key from split material (at least
// keyLen*stripes bytes).
func AFMerge(h HashAlg, material []byte, keyLen, stripes int) ([]byte, error) {
	if !h.Supported() {
		return nil, &UnsupportedError{fmt.Sprintf("Hash algorithm '%s' not supported", h)}
	}
	if stripes < 1 || keyLen < 1 || len(material)/keyLen < stripes {
		return nil, fmt.Errorf("crypto: %d bytes of key material for %d stripes of %d bytes", len(material), stripes, keyLen)
	}
	n := keyLen
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, material[i*n:(i+1)*n])
		diffuse(h, d)
	}
	subtle.XORBytes(d, d, material[(stripes-1)*n:stripes*n])
	return d, nil
}
