package graph

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"fmt"
	"os"
	"sort"
	"sync"

	"blockbackend/qmp/qapi"
)

// Objects holds user-created objects (QEMU's --object / object-add): for
// now the "secret" type, which drivers read by id (LUKS passphrases, ssh
// passwords). Secret values never leave this type except through Secret;
// nothing here logs them.
type Objects struct {
	mu      sync.Mutex
	secrets map[string][]byte // by id; guarded by mu
}

// NewObjects returns an empty object table.
func NewObjects() *Objects {
	return &Objects{secrets: map[string][]byte{}}
}

// SecretFormat is QCryptoSecretFormat.
type SecretFormat string

// EnumValues lists QEMU's values.
func (SecretFormat) EnumValues() []string { return []string{"raw", "base64"} }

type objectBase struct {
	QOMType string         `qapi:"qom-type"`
	ID      string         `qapi:"id"`
	Rest    map[string]any `qapi:",rest"`
}

// SecretOptions are the properties of a "secret" object.
type SecretOptions struct {
	Data   *string      `qapi:"data,optional"`
	File   *string      `qapi:"file,optional"`
	Format SecretFormat `qapi:"format,optional"`
	KeyID  string       `qapi:"keyid,optional"`
	IV     string       `qapi:"iv,optional"`
}

// qemuObjectTypes are user-creatable types of qemu-storage-daemon 7.2 that
// we have not built: they get a clear error.
var qemuObjectTypes = []string{
	"authz-list", "authz-listfile", "authz-pam", "authz-simple", "iothread",
	"secret_keyring", "throttle-group", "tls-creds-anon", "tls-creds-psk",
	"tls-creds-x509", "tls-cipher-suites", "memory-backend-file", "memory-backend-memfd",
}

// Add creates an object from ObjectOptions (object-add, --object).
func (o *Objects) Add(opts map[string]any, mode qapi.Mode) error {
	var b objectBase
	if err := qapi.Decode(opts, &b, mode); err != nil {
		return err
	}
	if !validNodeName(b.ID) {
		return qapi.Errorf(qapi.GenericError, "Parameter 'id' expects an identifier")
	}
	switch b.QOMType {
	case "secret":
	default:
		for _, t := range qemuObjectTypes {
			if t == b.QOMType {
				return qapi.Errorf(qapi.GenericError, "Object type '%s' is not built into blockbackend yet (see the feature table in README.md)", b.QOMType)
			}
		}
		return qapi.Errorf(qapi.GenericError, "Parameter 'qom-type' does not accept value '%s'", b.QOMType)
	}
	s := SecretOptions{Format: "raw"}
	if b.Rest == nil {
		b.Rest = map[string]any{}
	}
	if err := qapi.Decode(b.Rest, &s, mode); err != nil {
		return err
	}
	o.mu.Lock()
	_, dup := o.secrets[b.ID]
	o.mu.Unlock()
	if dup {
		return qapi.Errorf(qapi.GenericError, "attempt to add duplicate property '%s' to object (type 'container')", b.ID)
	}
	val, err := o.loadSecret(b.ID, s)
	if err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, dup := o.secrets[b.ID]; dup {
		return qapi.Errorf(qapi.GenericError, "attempt to add duplicate property '%s' to object (type 'container')", b.ID)
	}
	o.secrets[b.ID] = val
	return nil
}

func (o *Objects) loadSecret(id string, s SecretOptions) ([]byte, error) {
	var raw []byte
	switch {
	case s.Data != nil && s.File != nil:
		return nil, qapi.Errorf(qapi.GenericError, "'data' and 'file' are mutually exclusive")
	case s.Data != nil:
		raw = []byte(*s.Data)
	case s.File != nil:
		b, err := os.ReadFile(*s.File)
		if err != nil {
			return nil, qapi.Errorf(qapi.GenericError, "Unable to read %s: %v", *s.File, unwrapPathErr(err))
		}
		raw = b
	default:
		return nil, qapi.Errorf(qapi.GenericError, "Either 'data' or 'file' must be provided")
	}
	if s.KeyID != "" {
		return o.decryptSecret(id, s, raw)
	}
	if s.IV != "" {
		return nil, qapi.Errorf(qapi.GenericError, "'iv' is only valid when 'keyid' is present")
	}
	if s.Format == "base64" {
		dec, err := base64.StdEncoding.DecodeString(string(raw))
		if err != nil {
			return nil, qapi.Errorf(qapi.GenericError, "Secret '%s' is not valid base64: %v", id, err)
		}
		return dec, nil
	}
	return raw, nil
}

// decryptSecret handles a secret sent encrypted with another secret
// (keyid, iv): the data is base64 AES-256-CBC ciphertext with PKCS#7
// padding, the key is the 32-byte value of secret keyid.
func (o *Objects) decryptSecret(id string, s SecretOptions, data []byte) ([]byte, error) {
	key, err := o.Secret(s.KeyID)
	if err != nil {
		return nil, err
	}
	if len(key) != 32 {
		return nil, qapi.Errorf(qapi.GenericError, "Master key for secret '%s' must be 32 bytes, not %d", id, len(key))
	}
	if s.IV == "" {
		return nil, qapi.Errorf(qapi.GenericError, "IV is required to decrypt secret")
	}
	iv, err := base64.StdEncoding.DecodeString(s.IV)
	if err != nil || len(iv) != aes.BlockSize {
		return nil, qapi.Errorf(qapi.GenericError, "IV of secret '%s' must be 16 bytes in base64", id)
	}
	ct, err := base64.StdEncoding.DecodeString(string(data))
	if err != nil || len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
		return nil, qapi.Errorf(qapi.GenericError, "Encrypted secret '%s' must be base64 of a multiple of 16 bytes", id)
	}
	blk, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("secret '%s': %w", id, err)
	}
	pt := make([]byte, len(ct))
	cipher.NewCBCDecrypter(blk, iv).CryptBlocks(pt, ct)
	pad := int(pt[len(pt)-1])
	if pad == 0 || pad > aes.BlockSize || pad > len(pt) {
		return nil, qapi.Errorf(qapi.GenericError, "Incorrect number of padding bytes (%d) found on decrypted data", pad)
	}
	pt = pt[:len(pt)-pad]
	if s.Format == "base64" {
		dec, err := base64.StdEncoding.DecodeString(string(pt))
		if err != nil {
			return nil, qapi.Errorf(qapi.GenericError, "Decrypted secret '%s' is not valid base64", id)
		}
		return dec, nil
	}
	return pt, nil
}

// Secret returns a copy of the value of secret id.
func (o *Objects) Secret(id string) ([]byte, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	v, ok := o.secrets[id]
	if !ok {
		return nil, qapi.Errorf(qapi.GenericError, "No secret with id '%s'", id)
	}
	return append([]byte(nil), v...), nil
}

// Delete removes an object (object-del).
func (o *Objects) Delete(id string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	v, ok := o.secrets[id]
	if !ok {
		return qapi.Errorf(qapi.GenericError, "object '%s' not found", id)
	}
	clear(v)
	delete(o.secrets, id)
	return nil
}

// IDs lists the object ids.
func (o *Objects) IDs() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]string, 0, len(o.secrets))
	for id := range o.secrets {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

func unwrapPathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
