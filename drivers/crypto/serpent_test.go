package crypto

import (
	"bytes"
	"encoding/hex"
	"testing"
)

// Known answers: the AES submission's vectors (ecb_vk, ecb_vt, ecb_tbl
// and Monte Carlo, as Bouncy Castle's Serpent tests list them), turned
// into the standard byte order by reversing key, plaintext and
// ciphertext; and NESSIE's set 1 vector 0, already in that order.
var serpentKAT = []struct{ key, pt, ct string }{
	{"80000000000000000000000000000000", "00000000000000000000000000000000", "264e5481eff42a4606abda06c0bfda3d"},
	{"0000000000000000000000000000000000000000000000000000000000000000", "00000000000000000000000000000000", "49672ba898d98df95019180445491089"},
	{"00000000000000000000000000000000", "00000000000000000000000000000080", "4ae9a20b2b14a10290cbb820b7ffb510"},
	{"00000000000000000000000000000000", "00000000000000000000800000000000", "e5d5dc0d6834e44697bdd5d8427a054f"},
	{"00000000000000000000000000000000", "00000000004000000000000000000000", "b969f1b6f56e885025f12e58f87b4099"},
	{"000000000000000000000000000000000000000000000000", "00000000000000000000000000000040", "9668f388dd4f122a4d9dd8d6b8a322d5"},
	{"000000000000000000000000000000000000000000000000", "00000000000000000000020000000000", "324e96a82ce897dab3850047c38e9b18"},
	{"000000000000000000000000000000000000000000000000", "00000000800000000000000000000000", "99b0cc109580893a14b960f78c867df7"},
	{"0000000000000000000000000000000000000000000000000000000000000000", "00000000000000000000000000000008", "824c5f6fece3e0fc4293821b987b3bd4"},
	{"0000000000000000000000000000000000000000000000000000000000000000", "00000000000000010000000000000000", "a7126988773129d5f6cc330c1a0ef30b"},
	{"0000000000000000000000000000000000000000000000000000000000000000", "01000000000000000000000000000000", "07e5e5ad7097b849badc2d5d803b7f6a"},
	{"00000000000000000000000000000080", "00000000000000000000000000000000", "ddd26b98a5ffd82c05345a9dadbfaf49"},
	{"000000000000000000004000000000000000000000000000", "00000000000000000000000000000000", "174fc71f855d61484b8c05deb12988ba"},
	{"0000000001000000000000000000000000000000000000000000000000000000", "00000000000000000000000000000000", "986a05e8447024c8468a1ebf7743f689"},
}

// Monte Carlo: the block encrypted 100 times in a row with one key.
var serpentMonte = []struct{ key, pt, ct string }{
	{"199c332e34d13bb4679babda81f8f547", "6b3b208da378b711b7a8528cb37d4f7a", "46a0c5d135a96cccf7c215d80353b74d"},
	{"d692af3ea36f5ef30de8c5eb79a8fb31", "14f63ff537a39296008945f7125ea070", "2d74412f3d89016083c93b4d0fa553fc"},
	{"e853da8ea79aaeca77994f570ee8ae954698072339dde6bd", "d834bb54204eaaa04037a934d023c59c", "2d3c5755d7b7362a0bf4809e6a7e1177"},
	{"a187248fafc0797c31a901cfd9e714a92da9ccbba12109c59d699042adf8f660", "65ab4b85bf6c681d382dae6f10611aee", "4bb8ffe2421a9d13d0dfdca03ef1d7dc"},
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSerpentKnownAnswers(t *testing.T) {
	for i, v := range serpentKAT {
		c, err := newSerpent(unhex(t, v.key))
		if err != nil {
			t.Fatal(err)
		}
		pt, want := unhex(t, v.pt), unhex(t, v.ct)
		got := make([]byte, 16)
		c.Encrypt(got, pt)
		if !bytes.Equal(got, want) {
			t.Errorf("vector %d: encrypt = %x, want %x", i, got, want)
		}
		c.Decrypt(got, got)
		if !bytes.Equal(got, pt) {
			t.Errorf("vector %d: decrypt = %x, want %x", i, got, pt)
		}
	}
	for i, v := range serpentMonte {
		c, err := newSerpent(unhex(t, v.key))
		if err != nil {
			t.Fatal(err)
		}
		b := unhex(t, v.pt)
		for range 100 {
			c.Encrypt(b, b)
		}
		if want := unhex(t, v.ct); !bytes.Equal(b, want) {
			t.Errorf("monte carlo %d: %x, want %x", i, b, want)
		}
		for range 100 {
			c.Decrypt(b, b)
		}
		if want := unhex(t, v.pt); !bytes.Equal(b, want) {
			t.Errorf("monte carlo %d: decrypting back gave %x", i, b)
		}
	}
}

func TestSerpentKeySizes(t *testing.T) {
	for _, n := range []int{0, 8, 15, 17, 33} {
		if _, err := newSerpent(make([]byte, n)); err == nil {
			t.Errorf("a %d-byte key was accepted", n)
		}
	}
}

func BenchmarkSerpentEncrypt(b *testing.B) {
	c, _ := newSerpent(make([]byte, 32))
	buf := make([]byte, 16)
	b.SetBytes(16)
	for b.Loop() {
		c.Encrypt(buf, buf)
	}
}

// The generated S-box code equals the tables, on every input in every
// bit position.
func TestSerpentGeneratedSboxes(t *testing.T) {
	for i := range serpentSbox {
		for _, c := range []struct {
			f   func(*[4]uint32)
			ref *sboxANF
		}{{serpentSFns[i], &serpentFwd[i]}, {serpentSInvFns[i], &serpentInv[i]}} {
			for v := 0; v < 16; v++ {
				var x [4]uint32
				for b := 0; b < 4; b++ {
					if v>>b&1 != 0 {
						x[b] = 0x80000001
					}
				}
				want := x
				c.ref.apply(&want)
				c.f(&x)
				if x != want {
					t.Fatalf("S-box %d input %d: %x, want %x", i, v, x, want)
				}
			}
		}
	}
}
