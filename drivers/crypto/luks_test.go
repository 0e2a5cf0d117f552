package crypto

import (
	"bytes"
	"crypto/aes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/crypto/xts"
)

// testdata/*.hdr are the first 592 bytes of volumes made by qemu-img and
// cryptsetup; their volumes were at least this big.
const seedVolumeSize = 4 << 20

func seeds(t testing.TB) map[string][]byte {
	paths, err := filepath.Glob("testdata/*.hdr")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no seed headers: %v", err)
	}
	out := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(p)] = b
	}
	return out
}

func TestParseMarshalRoundTrip(t *testing.T) {
	for name, b := range seeds(t) {
		h, err := ParseHeader(b, seedVolumeSize)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := h.Marshal(); !bytes.Equal(got, b) {
			t.Errorf("%s: marshal does not give the bytes back", name)
		}
		if _, err := h.Params(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestParseChecksSize(t *testing.T) {
	b := seeds(t)["qemu-aes-xts.hdr"]
	var fe *FormatError
	if _, err := ParseHeader(b, 8192); !errors.As(err, &fe) {
		t.Fatalf("key material beyond the file: %v", err)
	}
	if _, err := ParseHeader(b[:100], seedVolumeSize); !errors.As(err, &fe) {
		t.Fatalf("short header: %v", err)
	}
	v2 := append([]byte(nil), b...)
	v2[7] = 2
	var ue *UnsupportedError
	if _, err := ParseHeader(v2, seedVolumeSize); !errors.As(err, &ue) {
		t.Fatalf("version 2: %v", err)
	}
}

func FuzzParseHeader(f *testing.F) {
	for _, b := range seeds(f) {
		f.Add(b, int64(seedVolumeSize))
	}
	f.Fuzz(func(t *testing.T, b []byte, size int64) {
		h, err := ParseHeader(b, size)
		if err != nil {
			var fe *FormatError
			var ue *UnsupportedError
			if !errors.As(err, &fe) && !errors.As(err, &ue) {
				t.Fatalf("error of type %T: %v", err, err)
			}
			return
		}
		// What parses marshals back to the same fields.
		h2, err := ParseHeader(h.Marshal(), size)
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if *h2 != *h {
			t.Fatalf("round trip changed the header")
		}
	})
}

func TestAFRoundTrip(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef!")
	for _, h := range []HashAlg{SHA1, SHA256, SHA512, RIPEMD160, MD5} {
		s, err := AFSplit(h, key, 100)
		if err != nil {
			t.Fatal(err)
		}
		got, err := AFMerge(h, s, len(key), 100)
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("%s: merge gave %x, %v", h, got, err)
		}
		s[7] ^= 1
		if got, _ := AFMerge(h, s, len(key), 100); bytes.Equal(got, key) {
			t.Fatalf("%s: a damaged stripe still merges", h)
		}
	}
}

// The XTS with an arbitrary tweak (for essiv) equals x/crypto/xts when
// the tweak is the plain64 IV.
func TestXTSTweakMatchesXTS(t *testing.T) {
	key := bytes.Repeat([]byte{7, 9, 13}, 22)[:64]
	ref, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	k1, _ := aes.NewCipher(key[:32])
	k2, _ := aes.NewCipher(key[32:])
	for _, sector := range []uint64{0, 1, 1 << 40} {
		pt := bytes.Repeat([]byte{byte(sector), 3}, 256)
		want := make([]byte, 512)
		ref.Encrypt(want, pt, sector)
		var iv [16]byte
		for i := 0; i < 8; i++ {
			iv[i] = byte(sector >> (8 * i))
		}
		got := append([]byte(nil), pt...)
		xtsTweak(k1, k2, iv[:], got, true)
		if !bytes.Equal(got, want) {
			t.Fatalf("sector %d differs", sector)
		}
		xtsTweak(k1, k2, iv[:], got, false)
		if !bytes.Equal(got, pt) {
			t.Fatalf("sector %d does not decrypt", sector)
		}
	}
}

// Every cipher, mode and IV generator round-trips, and sectors differ.
func TestSectorCipherRoundTrip(t *testing.T) {
	for _, f := range families {
		for _, ks := range f.keySizes {
			alg := CipherAlg(f.name + "-" + itoa(ks*8))
			for _, mode := range []CipherMode{ModeECB, ModeCBC, ModeCTR, ModeXTS} {
				for _, iv := range []IVGenAlg{IVPlain, IVPlain64, IVEssiv} {
					p := Params{Cipher: alg, Mode: mode, IVGen: iv, IVGenHash: SHA256, Hash: SHA256}
					if CheckParams(p) != nil {
						continue
					}
					key := bytes.Repeat([]byte{0x42}, p.keyBytes())
					c, err := NewSectorCipher(alg, mode, iv, SHA256, key, 512)
					if err != nil {
						t.Fatal(err)
					}
					pt := bytes.Repeat([]byte("sixteen byte blk"), 64)
					buf := append([]byte(nil), pt...)
					if err := c.Encrypt(5, buf); err != nil {
						t.Fatal(err)
					}
					if mode != ModeECB && bytes.Equal(buf[:512], buf[512:]) {
						t.Errorf("%s-%s-%s: two sectors encrypt alike", alg, mode, iv)
					}
					if err := c.Decrypt(5, buf); err != nil || !bytes.Equal(buf, pt) {
						t.Errorf("%s-%s-%s: round trip failed", alg, mode, iv)
					}
				}
			}
		}
	}
}

func itoa(n int) string {
	return string(rune('0'+n/100)) + string(rune('0'+n/10%10)) + string(rune('0'+n%10))
}

func TestFormatUnlock(t *testing.T) {
	vol := make([]byte, 0)
	write := func(p []byte, off int64) error {
		if need := off + int64(len(p)); need > int64(len(vol)) {
			vol = append(vol, make([]byte, need-int64(len(vol)))...)
		}
		copy(vol[off:], p)
		return nil
	}
	read := func(p []byte, off int64) error { copy(p, vol[off:]); return nil }
	o := CreateOptions{Params: Params{Cipher: Serpent128, Mode: ModeCBC, IVGen: IVEssiv, IVGenHash: SHA256, Hash: SHA1}, IterTime: time.Millisecond}
	h, mk, err := Format(o, []byte("pw"), write)
	if err != nil {
		t.Fatal(err)
	}
	if h.MKDigestIter < MinIterations || h.Slots[0].Iterations < MinIterations {
		t.Fatalf("iterations below the minimum: %d, %d", h.MKDigestIter, h.Slots[0].Iterations)
	}
	if err := write(h.Marshal(), 0); err != nil {
		t.Fatal(err)
	}
	size := PayloadOffset(o.Params)
	h2, err := ParseHeader(vol, size)
	if err != nil {
		t.Fatal(err)
	}
	got, slot, err := h2.Unlock(read, []byte("pw"))
	if err != nil || slot != 0 || !bytes.Equal(got, mk) {
		t.Fatalf("unlock: slot %d, %v", slot, err)
	}
	if _, _, err := h2.Unlock(read, []byte("px")); !errors.Is(err, ErrInvalidPassword) {
		t.Fatalf("wrong passphrase: %v", err)
	}
}
