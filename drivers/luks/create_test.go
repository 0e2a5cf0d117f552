package luks

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/drivers/crypto"
)

func pattern(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestCreateOpensInQEMU: images we create, written through our node, are
// equal to a raw copy for qemu-img compare with the same secret, and
// qemu-img info reports what we do.
func TestCreateOpensInQEMU(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []map[string]any{
		{},
		{"cipher-alg": "serpent-256", "cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha256", "hash-alg": "sha1"},
		{"cipher-alg": "twofish-192", "cipher-mode": "xts", "ivgen-alg": "plain", "hash-alg": "ripemd160"},
		{"cipher-alg": "cast5-128", "cipher-mode": "ctr", "hash-alg": "sha512"},
		{"cipher-alg": "aes-128", "cipher-mode": "ecb", "preallocation": "full"},
	} {
		name := "default"
		if a, ok := c["cipher-alg"].(string); ok {
			name = a + "-" + fmt.Sprint(c["cipher-mode"])
		}
		t.Run(name, func(t *testing.T) {
			img := filepath.Join(dir, "img.luks")
			raw := filepath.Join(dir, "img.raw")
			g := newGraph(t)
			const size = 1 << 20
			createLUKS(t, g, img, size, c)
			n, err := openLUKS(t, g, "l", img, "s", false)
			if err != nil {
				t.Fatal(err)
			}
			data := pattern(size, 3)
			if err := n.WriteAt(ctx, data[:777], 0, 0); err != nil {
				t.Fatal(err)
			}
			if err := n.WriteAt(ctx, data[777:], 777, 0); err != nil {
				t.Fatal(err)
			}
			if err := n.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			info := n.Instance().(*node).Info()["data"].(map[string]any)
			if err := g.Delete(ctx, "l"); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(raw, data, 0o644); err != nil {
				t.Fatal(err)
			}
			args := append([]string{"compare"}, secretArgs()...)
			args = append(args, "--image-opts", imageOpts(img), "driver=raw,file.filename="+raw)
			if out, err := qemuTool(t, "qemu-img", args...); err != nil {
				t.Fatalf("qemu-img compare: %v\n%s", err, out)
			}
			args = append([]string{"info", "--output=json"}, secretArgs()...)
			args = append(args, "--image-opts", imageOpts(img))
			out, err := qemuTool(t, "qemu-img", args...)
			if err != nil {
				t.Fatalf("qemu-img info: %v\n%s", err, out)
			}
			var qi struct {
				VirtualSize    int64 `json:"virtual-size"`
				FormatSpecific struct {
					Data map[string]any `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal([]byte(out), &qi); err != nil {
				t.Fatal(err)
			}
			if qi.VirtualSize != size {
				t.Errorf("qemu-img sees %d bytes", qi.VirtualSize)
			}
			if a, b := jsonStr(info), jsonStr(qi.FormatSpecific.Data); a != b {
				t.Errorf("info differs:\n ours %s\n qemu %s", a, b)
			}
			if _, err := exec.LookPath("/usr/sbin/cryptsetup"); err == nil {
				if out, err := exec.Command("/usr/sbin/cryptsetup", "luksDump", img).CombinedOutput(); err != nil {
					t.Errorf("cryptsetup luksDump: %v\n%s", err, out)
				}
			}
		})
	}
}

func jsonStr(v any) string {
	b, _ := json.Marshal(v)
	// Round-trip so that numbers compare alike.
	var x any
	_ = json.Unmarshal(b, &x)
	b, _ = json.Marshal(x)
	return string(b)
}

func cryptsetup(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("cryptsetup")
	if err != nil {
		p = "/usr/sbin/cryptsetup"
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("cryptsetup is needed for this test (apt package cryptsetup-bin; make deps installs it)")
		}
	}
	return p
}

// TestCryptsetup: cryptsetup reads our headers and accepts our
// passphrase; a cryptsetup luksFormat image opens here with the master
// key cryptsetup reports.
func TestCryptsetup(t *testing.T) {
	cs := cryptsetup(t)
	dir := t.TempDir()
	ours := filepath.Join(dir, "ours.luks")
	g := newGraph(t)
	createLUKS(t, g, ours, 1<<20, map[string]any{"hash-alg": "sha512"})
	out, err := exec.Command(cs, "luksDump", ours).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "xts-plain64") || !strings.Contains(string(out), "sha512") {
		t.Fatalf("cryptsetup luksDump: %v\n%s", err, out)
	}
	cmd := exec.Command(cs, "open", "--test-passphrase", "--key-file", "-", ours)
	cmd.Stdin = strings.NewReader(pass)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup open --test-passphrase: %v\n%s", err, out)
	}
	cmd = exec.Command(cs, "open", "--test-passphrase", "--key-file", "-", ours)
	cmd.Stdin = strings.NewReader("wrong")
	if err := cmd.Run(); err == nil {
		t.Fatal("cryptsetup accepted a wrong passphrase")
	}

	theirs := filepath.Join(dir, "theirs.luks")
	if err := os.WriteFile(theirs, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(theirs, 4<<20); err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command(cs, "luksFormat", "--type", "luks1", "--batch-mode", "--pbkdf-force-iterations", "1000", "--key-file", "-", theirs)
	cmd.Stdin = strings.NewReader(pass)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup luksFormat: %v\n%s", err, out)
	}
	cmd = exec.Command(cs, "luksDump", "--dump-master-key", "--batch-mode", "--key-file", "-", theirs)
	cmd.Stdin = strings.NewReader(pass)
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cryptsetup luksDump --dump-master-key: %v\n%s", err, out)
	}
	mk := masterKeyFromDump(t, string(out))
	n, err := openLUKS(t, g, "theirs", theirs, "s", false)
	if err != nil {
		t.Fatal(err)
	}
	if got := n.Instance().(*node).mk; !bytes.Equal(got, mk) {
		t.Fatalf("master key %x, cryptsetup says %x", got, mk)
	}
	data := pattern(int(n.SizeNow()), 9)
	if err := n.WriteAt(ctx, data, 0, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := n.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("data read back differs")
	}
	if err := g.Delete(ctx, "theirs"); err != nil {
		t.Fatal(err)
	}
	if _, err := openLUKS(t, g, "wrong", theirs, "w", true); err == nil || err.Error() != crypto.ErrInvalidPassword.Error() {
		t.Fatalf("wrong passphrase: %v", err)
	}
}

func masterKeyFromDump(t *testing.T, out string) []byte {
	t.Helper()
	i := strings.Index(out, "MK dump:")
	if i < 0 {
		t.Fatalf("no MK dump in:\n%s", out)
	}
	var hexs []byte
	for _, line := range strings.Split(out[i+len("MK dump:"):], "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		ok := true
		for _, x := range f {
			if len(x) != 2 {
				ok = false
			}
		}
		if !ok {
			break
		}
		hexs = append(hexs, strings.Join(f, "")...)
	}
	return unhex(t, string(hexs))
}

// TestMeasure: qemu-img measure's numbers.
func TestMeasure(t *testing.T) {
	d := newCreateOptions().(*CreateOptions)
	d.KeySecret = "s"
	for _, tc := range []struct {
		cipher crypto.CipherAlg
		mode   crypto.CipherMode
		size   int64
		want   int64
	}{
		{crypto.AES256, crypto.ModeXTS, 1 << 30, 1075810304},
		{crypto.AES256, crypto.ModeXTS, 1 << 20, 3117056},
		{crypto.AES128, crypto.ModeCBC, 1 << 30, 1074270208},
	} {
		o := *d
		o.CipherAlg, o.CipherMode = tc.cipher, tc.mode
		m, err := measure(ctx, &o, tc.size, nil)
		if err != nil || m.Required != tc.want || m.FullyAllocated != tc.want {
			t.Errorf("%s-%s %d: %+v %v, want %d", tc.cipher, tc.mode, tc.size, m, err, tc.want)
		}
	}
	if _, err := measure(ctx, newCreateOptions(), 1<<20, nil); err == nil || err.Error() != "Parameter 'key-secret' is required for cipher" {
		t.Errorf("no key-secret: %v", err)
	}
}
