package crypto

import "testing"

func benchSector(b *testing.B, alg CipherAlg, mode CipherMode, iv IVGenAlg) {
	p := Params{Cipher: alg, Mode: mode, IVGen: iv, IVGenHash: SHA256}
	c, err := NewSectorCipher(alg, mode, iv, SHA256, make([]byte, p.keyBytes()), SectorSize)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if err := c.Decrypt(0, buf); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAES256XTSPlain64(b *testing.B) { benchSector(b, AES256, ModeXTS, IVPlain64) }
func BenchmarkAES256XTSEssiv(b *testing.B)   { benchSector(b, AES256, ModeXTS, IVEssiv) }
func BenchmarkAES256CBCEssiv(b *testing.B)   { benchSector(b, AES256, ModeCBC, IVEssiv) }

func BenchmarkAES256XTSPlain64Encrypt(b *testing.B) {
	c, err := NewSectorCipher(AES256, ModeXTS, IVPlain64, "", make([]byte, 64), SectorSize)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if err := c.Encrypt(0, buf); err != nil {
			b.Fatal(err)
		}
	}
}
