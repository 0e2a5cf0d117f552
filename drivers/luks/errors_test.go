package luks

import (
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOpenErrors: QEMU's messages, and nothing written.
func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.luks")
	g := newGraph(t)
	createLUKS(t, g, img, 1<<20, nil)
	before, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, secret, want string }{
		{img, "w", "Invalid password, cannot unlock any keyslot"},
		{img, "", "Parameter 'key-secret' is required for cipher"},
		{img, "nosuch", "No secret with id 'nosuch'"},
		{plain, "s", "Volume is not in LUKS format"},
	} {
		_, err := openLUKS(t, g, "x", tc.path, tc.secret, false)
		if err == nil || err.Error() != tc.want {
			t.Errorf("open %s with %q: %v, want %q", filepath.Base(tc.path), tc.secret, err, tc.want)
		}
	}
	after, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if string(before) != string(after) {
		t.Fatal("a failed open changed the image")
	}
	// Corrupt headers: unknown cipher, mode, version.
	for _, tc := range []struct {
		off  int
		b    string
		want string
	}{
		{8, "foo\x00", "Algorithm 'foo' with key size 32 bytes not supported"},
		{40, "gcm-plain64\x00", "Cipher mode 'gcm' not supported"},
		{6, "\x00\x02", "LUKS version 2 is not supported"},
		{104, "\x00\x00\x00\x00", "LUKS payload is overlapping with the header"},
	} {
		bad := append([]byte(nil), before...)
		copy(bad[tc.off:], tc.b)
		p := filepath.Join(dir, "bad.luks")
		if err := os.WriteFile(p, bad, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := openLUKS(t, g, "x", p, "s", false)
		if err == nil || err.Error() != tc.want {
			t.Errorf("corrupt at %d: %v, want %q", tc.off, err, tc.want)
		}
	}
	// Create refuses what QEMU refuses, before touching anything.
	for _, tc := range []struct {
		opts map[string]any
		want string
	}{
		{map[string]any{"cipher-alg": "cast5-128", "cipher-mode": "xts"}, "Unsupported cipher mode xts"},
		{map[string]any{"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha1"}, "No AES cipher with key size 20 available"},
		{map[string]any{"cipher-alg": "cast5-128", "cipher-mode": "cbc", "ivgen-alg": "essiv"}, "Cipher cast5-128 not supported with essiv"},
	} {
		o := map[string]any{"driver": "luks", "file": "none", "size": 1 << 20, "key-secret": "s", "iter-time": 10}
		for k, v := range tc.opts {
			o[k] = v
		}
		run, err := g.PrepareCreate(o, 0, "options")
		if err == nil {
			err = run(ctx)
		}
		if err == nil || err.Error() != tc.want {
			t.Errorf("create %v: %v, want %q", tc.opts, err, tc.want)
		}
	}
}
