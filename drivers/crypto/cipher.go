package crypto

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"hash"
	"strings"

	"golang.org/x/crypto/cast5"
	"golang.org/x/crypto/ripemd160"
	"golang.org/x/crypto/twofish"
)

// CipherAlg is QCryptoCipherAlgorithm, restricted to what LUKS can use.
type CipherAlg string

// The cipher algorithms.
const (
	AES128     CipherAlg = "aes-128"
	AES192     CipherAlg = "aes-192"
	AES256     CipherAlg = "aes-256"
	Twofish128 CipherAlg = "twofish-128"
	Twofish192 CipherAlg = "twofish-192"
	Twofish256 CipherAlg = "twofish-256"
	Serpent128 CipherAlg = "serpent-128"
	Serpent192 CipherAlg = "serpent-192"
	Serpent256 CipherAlg = "serpent-256"
	CAST5128   CipherAlg = "cast5-128"
)

// EnumValues lists QEMU 7.2's values (for the options decoder; sm4 came
// later).
func (CipherAlg) EnumValues() []string {
	return []string{"aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128",
		"serpent-128", "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256"}
}

// cipherFamily is one block cipher and its key sizes.
type cipherFamily struct {
	name      string // LUKS cipher-name
	display   string // in QEMU's messages
	blockSize int
	new       func(key []byte) (cipher.Block, error)
	keySizes  []int
}

var families = []*cipherFamily{
	{"aes", "AES", 16, aes.NewCipher, []int{16, 24, 32}},
	{"twofish", "Twofish", 16, func(k []byte) (cipher.Block, error) { return twofish.NewCipher(k) }, []int{16, 24, 32}},
	{"serpent", "Serpent", 16, newSerpent, []int{16, 24, 32}},
	{"cast5", "CAST5", 8, func(k []byte) (cipher.Block, error) { return cast5.NewCipher(k) }, []int{16}},
}

func familyOf(alg CipherAlg) (*cipherFamily, int, bool) {
	name, bits, ok := strings.Cut(string(alg), "-")
	if !ok {
		return nil, 0, false
	}
	for _, f := range families {
		if f.name != name {
			continue
		}
		for _, k := range f.keySizes {
			if fmt.Sprint(k*8) == bits {
				return f, k, true
			}
		}
	}
	return nil, 0, false
}

// KeySize is the algorithm's key length in bytes (0: unknown algorithm).
func (a CipherAlg) KeySize() int {
	_, k, _ := familyOf(a)
	return k
}

// BlockSize is the algorithm's block length in bytes (0: unknown).
func (a CipherAlg) BlockSize() int {
	f, _, ok := familyOf(a)
	if !ok {
		return 0
	}
	return f.blockSize
}

// Supported reports whether the algorithm is built.
func (a CipherAlg) Supported() bool { _, _, ok := familyOf(a); return ok }

// LUKSName is the cipher-name field LUKS stores ("aes").
func (a CipherAlg) LUKSName() string {
	f, _, ok := familyOf(a)
	if !ok {
		return ""
	}
	return f.name
}

// cipherAlgFromLUKS maps a LUKS cipher-name and a key length to the
// algorithm, with QEMU's message when there is none.
func cipherAlgFromLUKS(name string, keyBytes int) (CipherAlg, error) {
	for _, f := range families {
		if f.name != name {
			continue
		}
		for _, k := range f.keySizes {
			if k == keyBytes {
				return CipherAlg(fmt.Sprintf("%s-%d", name, k*8)), nil
			}
		}
	}
	return "", &UnsupportedError{fmt.Sprintf("Algorithm '%s' with key size %d bytes not supported", name, keyBytes)}
}

func newBlock(alg CipherAlg, key []byte) (cipher.Block, error) {
	f, k, ok := familyOf(alg)
	if !ok {
		return nil, &UnsupportedError{fmt.Sprintf("Cipher algorithm '%s' not supported", alg)}
	}
	if len(key) != k {
		return nil, fmt.Errorf("Cipher key length %d should be %d", len(key), k)
	}
	return f.new(key)
}

// HashAlg is QCryptoHashAlgorithm.
type HashAlg string

// The hash algorithms.
const (
	MD5       HashAlg = "md5"
	SHA1      HashAlg = "sha1"
	SHA224    HashAlg = "sha224"
	SHA256    HashAlg = "sha256"
	SHA384    HashAlg = "sha384"
	SHA512    HashAlg = "sha512"
	RIPEMD160 HashAlg = "ripemd160"
)

// EnumValues lists QEMU's values.
func (HashAlg) EnumValues() []string {
	return []string{"md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"}
}

// New returns a new hash.Hash, or nil for an unknown algorithm.
func (h HashAlg) New() hash.Hash {
	switch h {
	case MD5:
		return md5.New()
	case SHA1:
		return sha1.New()
	case SHA224:
		return sha256.New224()
	case SHA256:
		return sha256.New()
	case SHA384:
		return sha512.New384()
	case SHA512:
		return sha512.New()
	case RIPEMD160:
		return ripemd160.New()
	}
	return nil
}

func (h HashAlg) newFunc() func() hash.Hash {
	if h.New() == nil {
		return nil
	}
	return h.New
}

// Size is the digest length in bytes (0: unknown).
func (h HashAlg) Size() int {
	if n := h.New(); n != nil {
		return n.Size()
	}
	return 0
}

// Supported reports whether the algorithm is built.
func (h HashAlg) Supported() bool { return h.New() != nil }

// CipherMode is QCryptoCipherMode.
type CipherMode string

// The modes.
const (
	ModeECB CipherMode = "ecb"
	ModeCBC CipherMode = "cbc"
	ModeXTS CipherMode = "xts"
	ModeCTR CipherMode = "ctr"
)

// EnumValues lists QEMU's values.
func (CipherMode) EnumValues() []string { return []string{"ecb", "cbc", "xts", "ctr"} }

// IVGenAlg is QCryptoIVGenAlgorithm.
type IVGenAlg string

// The IV generators.
const (
	IVPlain   IVGenAlg = "plain"
	IVPlain64 IVGenAlg = "plain64"
	IVEssiv   IVGenAlg = "essiv"
)

// EnumValues lists QEMU's values.
func (IVGenAlg) EnumValues() []string { return []string{"plain", "plain64", "essiv"} }

// UnsupportedError is a well-formed header or option asking for something
// that is not built (an algorithm, a mode, a version).
type UnsupportedError struct{ Msg string }

func (e *UnsupportedError) Error() string { return e.Msg }

// FormatError is a malformed header: a field that contradicts the format
// or the size of the file it sits in.
type FormatError struct {
	Offset int64 // of the field, from the start of the header
	Msg    string
}

func (e *FormatError) Error() string { return e.Msg }
