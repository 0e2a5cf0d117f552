package crypto

import (
	"bytes"
	"crypto/cipher"
	"math/rand"
	"testing"

	"golang.org/x/crypto/xts"
)

// SectorCipher's XTS (plain64, and plain below 2^32) equals x/crypto/xts
// for every 16-byte-block cipher and key size, over runs of several
// sectors of random data, both directions, for 512- and 4096-byte sectors.
func TestXTSMatchesXCryptoMultiSector(t *testing.T) {
	rnd := rand.New(rand.NewSource(1))
	for _, f := range families {
		if f.blockSize != 16 {
			continue
		}
		for _, ks := range f.keySizes {
			alg := CipherAlg(f.name + "-" + itoa(ks*8))
			key := make([]byte, 2*ks)
			rnd.Read(key)
			ref, err := xts.NewCipher(func(k []byte) (cipher.Block, error) { return f.new(k) }, key)
			if err != nil {
				t.Fatal(err)
			}
			for _, ivg := range []IVGenAlg{IVPlain, IVPlain64} {
				for _, ss := range []int{512, 4096} {
					c, err := NewSectorCipher(alg, ModeXTS, ivg, "", key, ss)
					if err != nil {
						t.Fatal(err)
					}
					starts := []uint64{0, 1, 0xfffffffd, 12345}
					if ivg == IVPlain64 {
						starts = append(starts, 1<<40, ^uint64(0)-1)
					}
					for _, start := range starts {
						n := 1 + rnd.Intn(5)
						pt := make([]byte, n*ss)
						rnd.Read(pt)
						want := make([]byte, len(pt))
						for i := 0; i < n; i++ {
							sec := start + uint64(i)
							if ivg == IVPlain {
								sec = uint64(uint32(sec))
							}
							ref.Encrypt(want[i*ss:(i+1)*ss], pt[i*ss:(i+1)*ss], sec)
						}
						got := append([]byte(nil), pt...)
						if err := c.Encrypt(start, got); err != nil {
							t.Fatal(err)
						}
						if !bytes.Equal(got, want) {
							t.Fatalf("%s %s %d-byte sectors from %d: encryption differs from x/crypto/xts", alg, ivg, ss, start)
						}
						if err := c.Decrypt(start, got); err != nil {
							t.Fatal(err)
						}
						if !bytes.Equal(got, pt) {
							t.Fatalf("%s %s %d-byte sectors from %d: decryption differs", alg, ivg, ss, start)
						}
					}
				}
			}
		}
	}
}
