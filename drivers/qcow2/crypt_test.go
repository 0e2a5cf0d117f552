package qcow2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/graph/drivertest"
	"blockbackend/internal/qemutest"
	"blockbackend/qmp/qapi"
)

// The secrets of the encryption tests: "s" the passphrase, "w" a wrong
// one, "b" a backing file's, "l" one longer than legacy AES's 16 bytes.
var cryptSecrets = map[string]string{
	"s": "pässwörd 1",
	"w": "wrong",
	"b": "backing pass",
	"l": "a passphrase longer than sixteen bytes",
}

func cryptObjectArgs() []string {
	var a []string
	for id, v := range cryptSecrets {
		a = append(a, "--object", "secret,id="+id+",data="+v)
	}
	return a
}

// cryptGraph is a graph with the test secrets; imageTool makes it the
// image tool's (legacy AES allowed).
func cryptGraph(t testing.TB, imageTool bool) *graph.Graph {
	t.Helper()
	g := graph.New(nil)
	g.ImageTool = imageTool
	for id, v := range cryptSecrets {
		if err := g.Objects.Add(map[string]any{"qom-type": "secret", "id": id, "data": v}, qapi.JSON); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// qemuCrypt runs a QEMU tool with the test secrets, retrying qemu-img's
// PBKDF2 calibration failure on a busy machine ("Unable to get accurate
// CPU usage"); it fails the test on any other error.
func qemuCrypt(t testing.TB, name string, args ...string) string {
	t.Helper()
	p := qemuTool(t, name)
	if name == "qemu-img" {
		// qemu-img takes --object after its subcommand.
		args = append(append([]string{args[0]}, cryptObjectArgs()...), args[1:]...)
	} else {
		args = append(cryptObjectArgs(), args...)
	}
	out, err := qemutest.CombinedOutput(func() *exec.Cmd { return exec.Command(p, args...) })
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// cryptImageOpts is the --image-opts string of an encrypted image.
func cryptImageOpts(path, secret string) string {
	return "driver=qcow2,file.filename=" + path + ",encrypt.key-secret=" + secret
}

// qemuCryptRaw is what qemu-img convert reads from an encrypted image.
func qemuCryptRaw(t testing.TB, opts string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	qemuCrypt(t, "qemu-img", "convert", "--image-opts", opts, "-O", "raw", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// openCrypt opens path as qcow2 with encrypt options.
func openCrypt(g *graph.Graph, name, path string, readOnly bool, encrypt map[string]any) (*graph.Node, error) {
	opts := map[string]any{
		"driver": "qcow2", "node-name": name, "read-only": readOnly,
		"file": map[string]any{"driver": "file", "filename": path},
	}
	if encrypt != nil {
		opts["encrypt"] = encrypt
	}
	return g.Add(context.Background(), opts, qapi.JSON)
}

// The layouts of qemu-img's images the tests read.
// (qemu-img 7.2 aborts on 24-byte keys in qcow2: aes-192, twofish-192 and
// serpent-192 key material is not a whole number of sectors.)
var qemuCryptCases = []struct {
	name, opts, secret string
	aes                bool
}{
	{"luks-default", "encrypt.format=luks,encrypt.key-secret=s", "s", false},
	{"luks-aes128-cbc-essiv-v2-4k", "compat=0.10,cluster_size=4096,encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1", "s", false},
	{"luks-twofish256-xts-extl2", "cluster_size=32k,extended_l2=on,encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=twofish-256", "s", false},
	{"luks-serpent128-cbc-plain-512", "cluster_size=512,encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512", "s", false},
	{"luks-cast5-cbc-plain64", "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc", "s", false},
	{"luks-aes256-cbc-sha384", "cluster_size=8k,encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.hash-alg=sha384", "s", false},
	{"aes", "encrypt.format=aes,encrypt.key-secret=s", "s", true},
	{"aes-longpass-v2", "compat=0.10,cluster_size=4096,encryption=on,encrypt.key-secret=l", "l", true},
}

var cryptFillCmds = []string{
	"write -P 0x5a 0 64k",
	"write -P 0xa5 70000 3000", // unaligned: qemu's own read-modify-write
	"write -P 0x11 1040384 8192",
	"write -z 200k 64k",
	"write -P 0x33 300k 1k",
	"discard 300k 64k",
	"write -P 0x44 2047k 1k",
}

// TestCryptReadQemuImages: qcow2 images encrypted by qemu-img (LUKS with
// several ciphers, modes, IV generators and layouts; legacy AES) and
// written by qemu-io read as qemu-img convert reads them.
func TestCryptReadQemuImages(t *testing.T) {
	dir := t.TempDir()
	for _, c := range qemuCryptCases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".qcow2")
			opts := c.opts
			if !c.aes {
				opts += ",encrypt.iter-time=10"
			}
			qemuCrypt(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "2M")
			args := []string{"--image-opts", cryptImageOpts(p, c.secret)}
			for _, cmd := range cryptFillCmds {
				args = append(args, "-c", cmd)
			}
			qemuCrypt(t, "qemu-io", args...)
			want := qemuCryptRaw(t, cryptImageOpts(p, c.secret))
			g := cryptGraph(t, true)
			n, err := openCrypt(g, "q", p, true, map[string]any{"key-secret": c.secret})
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, n, 100000); !bytes.Equal(got, want) {
				t.Fatalf("our read differs from qemu-img's: %s", firstDiff(got, want))
			}
			part := make([]byte, 5000)
			if err := n.ReadAt(context.Background(), part, 69999); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(part, want[69999:74999]) {
				t.Fatal("unaligned read differs")
			}
		})
	}
}

// cryptModel applies random writes (aligned and not, inside and across
// clusters), zeroes and discards to n and to a byte slice.
func cryptModel(t *testing.T, n *graph.Node, model []byte, seed uint64, ops int) {
	t.Helper()
	ctx := context.Background()
	r := rand.New(rand.NewPCG(seed, 7))
	size := int64(len(model))
	for i := 0; i < ops; i++ {
		off := r.Int64N(size)
		l := min(1+r.Int64N(150000), size-off)
		if r.IntN(2) == 0 {
			off &^= 511
			l = max(l&^511, 512)
			l = min(l, size-off)
		}
		switch k := r.IntN(10); {
		case k < 7:
			buf := make([]byte, l)
			for j := range buf {
				buf[j] = byte(i) ^ byte(j*7)
			}
			if err := n.WriteAt(ctx, buf, off, 0); err != nil {
				t.Fatalf("write [%d,+%d): %v", off, l, err)
			}
			copy(model[off:], buf)
		case k < 9:
			if err := n.WriteZeroes(ctx, off, l, graph.ZeroMayUnmap); err != nil {
				t.Fatalf("write zeroes [%d,+%d): %v", off, l, err)
			}
			clear(model[off : off+l])
		default:
			// Discard is advisory: read back what it left.
			if err := n.Discard(ctx, off, l); err != nil {
				t.Fatalf("discard [%d,+%d): %v", off, l, err)
			}
			if err := n.ReadAt(ctx, model[off:off+l], off); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// createCrypt makes an encrypted qcow2 image at path through
// blockdev-create's path (file create, then qcow2 create on it).
func createCrypt(t *testing.T, g *graph.Graph, path string, size int64, opts map[string]any) error {
	t.Helper()
	ctx := context.Background()
	run, err := g.PrepareCreate(map[string]any{"driver": "file", "filename": path, "size": 0}, qapi.JSON, "options")
	if err != nil {
		t.Fatal(err)
	}
	if err := run(ctx); err != nil {
		t.Fatal(err)
	}
	f, err := g.Add(ctx, map[string]any{"driver": "file", "filename": path, "node-name": "create-file"}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Delete(ctx, "create-file")
	o := map[string]any{"driver": "qcow2", "file": f.Name(), "size": size}
	for k, v := range opts {
		o[k] = v
	}
	run, err = g.PrepareCreate(o, qapi.JSON, "options")
	if err != nil {
		return err
	}
	return run(ctx)
}

var ourCryptCases = []struct {
	name   string
	opts   map[string]any
	secret string
	format string
}{
	{"luks-default", map[string]any{"encrypt": map[string]any{"format": "luks", "key-secret": "s", "iter-time": 10}}, "s", "luks"},
	{"luks-serpent-cbc-essiv-v2-4k", map[string]any{"version": "v2", "cluster-size": 4096, "encrypt": map[string]any{
		"format": "luks", "key-secret": "s", "iter-time": 10, "cipher-alg": "serpent-256", "cipher-mode": "cbc",
		"ivgen-alg": "essiv", "ivgen-hash-alg": "sha256", "hash-alg": "sha1"}}, "s", "luks"},
	{"luks-twofish-extl2-zstd", map[string]any{"cluster-size": 32768, "extended-l2": true, "compression-type": "zstd",
		"encrypt": map[string]any{"format": "luks", "key-secret": "s", "iter-time": 10, "cipher-alg": "twofish-128"}}, "s", "luks"},
	{"luks-cast5-512", map[string]any{"cluster-size": 512, "encrypt": map[string]any{"format": "luks", "key-secret": "s",
		"iter-time": 10, "cipher-alg": "cast5-128", "cipher-mode": "cbc"}}, "s", "luks"},
	{"aes", map[string]any{"encrypt": map[string]any{"format": "qcow", "key-secret": "l"}}, "l", "aes"},
}

// TestCryptOurImagesInQemu: images we create and write (random writes,
// zeroes, discards, partial sectors and clusters copied on write) pass
// qemu-img check and read in qemu-img as in our model; qemu-io then
// writes into them and we read what qemu-img reads.
func TestCryptOurImagesInQemu(t *testing.T) {
	dir := t.TempDir()
	const size = 3 << 20
	for i, c := range ourCryptCases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".qcow2")
			g := cryptGraph(t, true)
			if err := createCrypt(t, g, p, size, c.opts); err != nil {
				t.Fatal(err)
			}
			n, err := openCrypt(g, "q", p, false, map[string]any{"key-secret": c.secret})
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, size)
			cryptModel(t, n, model, uint64(i), 60)
			if got := readAll(t, n, 1<<20); !bytes.Equal(got, model) {
				t.Fatalf("read back: %s", firstDiff(got, model))
			}
			if err := g.Delete(context.Background(), "q"); err != nil {
				t.Fatal(err)
			}
			opts := cryptImageOpts(p, c.secret)
			qemuCrypt(t, "qemu-img", "check", "--image-opts", opts)
			if got := qemuCryptRaw(t, opts); !bytes.Equal(got, model) {
				t.Fatalf("qemu-img reads: %s", firstDiff(got, model))
			}
			var info struct {
				Encrypted      bool `json:"encrypted"`
				FormatSpecific struct {
					Data struct {
						Encrypt map[string]any `json:"encrypt"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal([]byte(qemuCrypt(t, "qemu-img", "info", "--output=json", p)), &info); err != nil {
				t.Fatal(err)
			}
			if !info.Encrypted || info.FormatSpecific.Data.Encrypt["format"] != c.format {
				t.Fatalf("qemu-img info: encrypted %v, encrypt %v", info.Encrypted, info.FormatSpecific.Data.Encrypt)
			}
			// qemu-io writes into our image; we read what qemu-img reads.
			qemuCrypt(t, "qemu-io", "--image-opts", opts, "-c", "write -P 0x66 1000 70000", "-c", "write -P 0x67 2M 4k")
			want := qemuCryptRaw(t, opts)
			n, err = openCrypt(g, "q2", p, true, map[string]any{"key-secret": c.secret})
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, n, 1<<20); !bytes.Equal(got, want) {
				t.Fatalf("after qemu-io: %s", firstDiff(got, want))
			}
		})
	}
}

// TestCryptBacking: an encrypted overlay over an encrypted backing file
// with its own secret (backing.encrypt.key-secret); a partial write
// copies the backing cluster on write, decrypted with the backing key
// and encrypted with the overlay's.
func TestCryptBacking(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	ov := filepath.Join(dir, "ov.qcow2")
	qemuCrypt(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=b,encrypt.iter-time=10", base, "1M")
	qemuCrypt(t, "qemu-io", "--image-opts", cryptImageOpts(base, "b"), "-c", "write -P 0x77 0 1M")
	qemuCrypt(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2",
		"-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,cluster_size=4096", ov, "1M")
	g := cryptGraph(t, true)
	n, err := g.Add(context.Background(), map[string]any{
		"driver": "qcow2", "node-name": "q", "file": map[string]any{"driver": "file", "filename": ov},
		"encrypt": map[string]any{"key-secret": "s"}, "backing": map[string]any{"encrypt": map[string]any{"key-secret": "b"}},
	}, qapi.Keyval)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(context.Background(), bytes.Repeat([]byte{0x12}, 3000), 1000, 0); err != nil {
		t.Fatal(err)
	}
	if err := g.Delete(context.Background(), "q"); err != nil {
		t.Fatal(err)
	}
	opts := cryptImageOpts(ov, "s") + ",backing.encrypt.key-secret=b"
	qemuCrypt(t, "qemu-img", "check", "--image-opts", opts)
	got := qemuCryptRaw(t, opts)
	want := bytes.Repeat([]byte{0x77}, 1<<20)
	copy(want[1000:], bytes.Repeat([]byte{0x12}, 3000))
	if !bytes.Equal(got, want) {
		t.Fatalf("qemu-img reads the overlay: %s", firstDiff(got, want))
	}
	// Without the backing file's secret: QEMU's message.
	_, err = g.Add(context.Background(), map[string]any{
		"driver": "qcow2", "node-name": "q3", "file": map[string]any{"driver": "file", "filename": ov},
		"encrypt": map[string]any{"key-secret": "s"},
	}, qapi.Keyval)
	if err == nil || !strings.Contains(err.Error(), "Parameter 'encrypt.key-secret' is required for cipher") {
		t.Fatalf("backing without its secret: %v", err)
	}
}

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestCryptErrors: a missing, unknown or wrong secret, a format that does
// not match the header, legacy AES in the daemon and bad create options
// fail with QEMU's messages (naming the option), and nothing is written.
func TestCryptErrors(t *testing.T) {
	dir := t.TempDir()
	luks := filepath.Join(dir, "l.qcow2")
	aes := filepath.Join(dir, "a.qcow2")
	plain := filepath.Join(dir, "p.qcow2")
	qemuCrypt(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", luks, "1M")
	qemuCrypt(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=s", aes, "1M")
	qemuCrypt(t, "qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")
	sums := map[string][32]byte{luks: fileSum(t, luks), aes: fileSum(t, aes), plain: fileSum(t, plain)}
	for _, c := range []struct {
		path      string
		imageTool bool
		encrypt   map[string]any
		want      string
	}{
		{luks, false, nil, "Parameter 'encrypt.key-secret' is required for cipher"},
		{luks, false, map[string]any{"format": "luks"}, "Parameter 'encrypt.key-secret' is required for cipher"},
		{luks, false, map[string]any{"key-secret": "s"}, "Parameter 'encrypt.format' is missing"},
		{luks, false, map[string]any{"format": "luks", "key-secret": "w"}, "Invalid password, cannot unlock any keyslot"},
		{luks, true, map[string]any{"key-secret": "nosuch"}, "No secret with id 'nosuch'"},
		{luks, true, map[string]any{"format": "aes", "key-secret": "s"}, "Header reported 'luks' encryption format but options specify 'aes'"},
		{luks, true, map[string]any{"format": "foo", "key-secret": "s"}, "Parameter 'encrypt.format' does not accept value 'foo'"},
		{luks, false, map[string]any{"format": "luks", "key-secret": "s", "iter-time": 10}, "Parameter 'encrypt.iter-time' is unexpected"},
		{aes, true, map[string]any{"format": "luks", "key-secret": "s"}, "Header reported 'aes' encryption format but options specify 'luks'"},
		{aes, true, nil, "Parameter 'encrypt.key-secret' is required for cipher"},
		{aes, false, map[string]any{"format": "aes", "key-secret": "s"}, "Use of AES-CBC encrypted qcow2 images is refused in node 'q'"},
		{aes, false, nil, "predictable IVs"},
		{plain, true, map[string]any{"format": "luks", "key-secret": "s"}, "No encryption in image header, but options specified format 'luks'"},
	} {
		for _, ro := range []bool{false, true} {
			g := cryptGraph(t, c.imageTool)
			_, err := openCrypt(g, "q", c.path, ro, c.encrypt)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s %v (image tool %v): %v, want %q", filepath.Base(c.path), c.encrypt, c.imageTool, err, c.want)
			}
			var le *crypto.LegacyAESError
			if strings.Contains(c.want, "AES-CBC") && !errors.As(err, &le) {
				t.Errorf("the daemon's AES refusal is not a crypto.LegacyAESError: %T", err)
			}
		}
	}
	for p, sum := range sums {
		if fileSum(t, p) != sum {
			t.Errorf("%s changed by failed opens", filepath.Base(p))
		}
	}

	// Create.
	for _, c := range []struct {
		imageTool bool
		encrypt   map[string]any
		want      string
	}{
		{true, map[string]any{"format": "luks"}, "Parameter 'encrypt.key-secret' is required for cipher"},
		{true, map[string]any{"format": "luks", "key-secret": "nosuch"}, "No secret with id 'nosuch'"},
		{true, map[string]any{"format": "luks", "key-secret": "s", "cipher-alg": "foo"}, "does not accept value 'foo'"},
		{true, map[string]any{"format": "luks", "key-secret": "s", "cipher-alg": "cast5-128", "cipher-mode": "cbc", "ivgen-alg": "essiv"}, "Cipher cast5-128 not supported with essiv"},
		{true, map[string]any{"format": "qcow", "key-secret": "s", "cipher-alg": "aes-128"}, "Parameter 'encrypt.cipher-alg' is unexpected"},
		{true, map[string]any{"key-secret": "s"}, "encrypt.format' is missing"},
		{false, map[string]any{"format": "qcow", "key-secret": "s"}, "Use of AES-CBC encrypted qcow2 images is refused"},
	} {
		g := cryptGraph(t, c.imageTool)
		p := filepath.Join(dir, "new.qcow2")
		err := createCrypt(t, g, p, 1<<20, map[string]any{"encrypt": c.encrypt})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("create %v: %v, want %q", c.encrypt, err, c.want)
		}
		if st, err := os.Stat(p); err != nil || st.Size() != 0 {
			t.Errorf("create %v wrote to the image (%v)", c.encrypt, err)
		}
	}

	// Compressed writes are refused in encrypted images, as in QEMU.
	g := cryptGraph(t, true)
	n, err := openCrypt(g, "q", luks, false, map[string]any{"key-secret": "s"})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.WriteCompressed(context.Background(), 0, make([]byte, 65536)); err == nil ||
		!strings.Contains(err.Error(), "Compression and encryption not supported at the same time") {
		t.Errorf("compressed write: %v", err)
	}
}

// TestCryptInfo: opened for metadata only (img info's way), an encrypted
// image needs no secret and reports qemu-img info's encrypt block.
func TestCryptInfo(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ name, opts string }{
		{"luks", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10"},
		{"luks-essiv", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"},
		{"aes", "encrypt.format=aes,encrypt.key-secret=s"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".qcow2")
			qemuCrypt(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", c.opts, p, "1M")
			qemuCrypt(t, "qemu-io", "--image-opts", cryptImageOpts(p, "s"), "-c", "write -P 1 0 4k")
			var info struct {
				FormatSpecific struct {
					Data struct {
						Encrypt any `json:"encrypt"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal([]byte(qemuCrypt(t, "qemu-img", "info", "--output=json", p)), &info); err != nil {
				t.Fatal(err)
			}
			g := graph.New(nil) // no secrets at all
			defer g.Close()
			g.ImageTool = true
			n, err := g.OpenImage(context.Background(), p, graph.ImageOptions{Format: "qcow2", ReadOnly: true, NoIO: true})
			if err != nil {
				t.Fatal(err)
			}
			im := n.Instance().(*image)
			if !im.Encrypted() {
				t.Error("not reported encrypted")
			}
			ours, _ := json.Marshal(im.Info()["data"].(map[string]any)["encrypt"])
			var got any
			_ = json.Unmarshal(ours, &got)
			if w, _ := json.Marshal(info.FormatSpecific.Data.Encrypt); string(w) != mustJSON(got) {
				t.Errorf("encrypt info:\n ours %s\n qemu %s", mustJSON(got), w)
			}
			if err := n.ReadAt(context.Background(), make([]byte, 512), 0); !errors.Is(err, graph.ErrNoIO) && c.name != "aes" {
				// Legacy AES needs no key to open; LUKS without one reads nothing.
				t.Errorf("data read without the key: %v", err)
			}
		})
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestConformanceEncrypted: the conformance suite on encrypted layouts.
// A new encrypted image reads as zeros (no cluster is allocated), and
// every cluster written is written whole, so the suite runs unchanged.
func TestConformanceEncrypted(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opts   map[string]any
		secret string
	}{
		{"luks-xts", map[string]any{"encrypt": map[string]any{"format": "luks", "key-secret": "s", "iter-time": 1}}, "s"},
		{"luks-cbc-essiv-extl2", map[string]any{"extended-l2": true, "cluster-size": 16384, "encrypt": map[string]any{
			"format": "luks", "key-secret": "s", "iter-time": 1, "cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv"}}, "s"},
		{"aes-4k", map[string]any{"cluster-size": 4096, "encrypt": map[string]any{"format": "qcow", "key-secret": "s"}}, "s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			addFormat := func(t *testing.T, g *graph.Graph) *graph.Node {
				n, err := g.Add(ctx, map[string]any{"driver": "qcow2", "file": "f", "node-name": "q", "discard": "unmap",
					"encrypt": map[string]any{"key-secret": tc.secret}}, qapi.JSON)
				if err != nil {
					t.Fatal(err)
				}
				return n
			}
			open := func(t *testing.T, g *graph.Graph, size int64) *graph.Node {
				g.ImageTool = true // legacy AES opens in the image tool only
				for id, v := range cryptSecrets {
					if err := g.Objects.Add(map[string]any{"qom-type": "secret", "id": id, "data": v}, qapi.JSON); err != nil {
						t.Fatal(err)
					}
				}
				name := "drivertest-mem:qcow2-" + t.Name()
				drivertest.NewFile(name, 0)
				t.Cleanup(func() { drivertest.RemoveFile(name) })
				if _, err := g.Add(ctx, map[string]any{"driver": drivertest.DriverName, "filename": name, "node-name": "f"}, qapi.JSON); err != nil {
					t.Fatal(err)
				}
				opts := map[string]any{"driver": "qcow2", "file": "f", "size": size}
				for k, v := range tc.opts {
					opts[k] = v
				}
				run, err := g.PrepareCreate(opts, qapi.JSON, "options")
				if err != nil {
					t.Fatal(err)
				}
				if err := run(ctx); err != nil {
					t.Fatal(err)
				}
				return addFormat(t, g)
			}
			reopen := func(t *testing.T, g *graph.Graph, n *graph.Node) *graph.Node {
				if err := g.Delete(ctx, n.Name()); err != nil {
					t.Fatal(err)
				}
				return addFormat(t, g)
			}
			drivertest.Run(t, drivertest.Config{Open: open, Reopen: reopen, Resizable: true, Size: 4 << 20, Ops: 150})
		})
	}
}

// TestCryptSnapshot: a write into a cluster an internal snapshot shares
// copies it on write (decrypted from the old host cluster, encrypted for
// the new one); qemu-img reads both states.
func TestCryptSnapshot(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "s.qcow2")
	g := cryptGraph(t, true)
	if err := createCrypt(t, g, p, 1<<20, map[string]any{"cluster-size": 4096,
		"encrypt": map[string]any{"format": "luks", "key-secret": "s", "iter-time": 10}}); err != nil {
		t.Fatal(err)
	}
	n, err := openCrypt(g, "q", p, false, map[string]any{"key-secret": "s"})
	if err != nil {
		t.Fatal(err)
	}
	a := bytes.Repeat([]byte{0xaa}, 1<<20)
	if err := n.WriteAt(ctx, a, 0, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Instance().(graph.Snapshotter).CreateSnapshot(ctx, graph.SnapshotInfo{Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	b := append([]byte(nil), a...)
	copy(b[5000:], bytes.Repeat([]byte{0xbb}, 3000))
	if err := n.WriteAt(ctx, b[5000:8000], 5000, 0); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, n, 1<<20); !bytes.Equal(got, b) {
		t.Fatalf("after the copy on write: %s", firstDiff(got, b))
	}
	if err := g.Delete(ctx, "q"); err != nil {
		t.Fatal(err)
	}
	opts := cryptImageOpts(p, "s")
	qemuCrypt(t, "qemu-img", "check", "--image-opts", opts)
	if got := qemuCryptRaw(t, opts); !bytes.Equal(got, b) {
		t.Fatalf("qemu-img reads the active state: %s", firstDiff(got, b))
	}
	qemuCrypt(t, "qemu-img", "snapshot", "-a", "s1", "--image-opts", opts)
	if got := qemuCryptRaw(t, opts); !bytes.Equal(got, a) {
		t.Fatalf("qemu-img reads the snapshot: %s", firstDiff(got, a))
	}
}

// TestCryptConcurrentPartialSectors: writes to different bytes of the
// same encrypted sectors, at once, all land (each reads, merges and
// rewrites whole sectors).
func TestCryptConcurrentPartialSectors(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "c.qcow2")
	g := cryptGraph(t, true)
	if err := createCrypt(t, g, p, 1<<20, map[string]any{"encrypt": map[string]any{"format": "luks", "key-secret": "s", "iter-time": 10}}); err != nil {
		t.Fatal(err)
	}
	n, err := openCrypt(g, "q", p, false, map[string]any{"key-secret": "s"})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, make([]byte, 8192), 0, 0); err != nil {
		t.Fatal(err)
	}
	const writers = 16
	want := make([]byte, 8192)
	done := make(chan error, writers)
	for w := 0; w < writers; w++ {
		go func(w int) {
			var err error
			for k := 0; k < 20 && err == nil; k++ {
				// Writer w owns bytes [w*32, w*32+32) of every sector.
				off := int64(k%16)*512 + int64(w)*32
				err = n.WriteAt(ctx, bytes.Repeat([]byte{byte(w + 1)}, 32), off, 0)
			}
			done <- err
		}(w)
		for k := 0; k < 16; k++ {
			copy(want[k*512+w*32:], bytes.Repeat([]byte{byte(w + 1)}, 32))
		}
	}
	for w := 0; w < writers; w++ {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 8192)
	if err := n.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("lost partial writes: %s", firstDiff(got, want))
	}
}

// TestCryptAmend: LUKS key slots through amend (encrypt.state,
// new-secret, old-secret, keyslot): a passphrase added opens the image in
// qemu-img, an erased one no longer does, the data stays; refusals in
// QEMU's words.
func TestCryptAmend(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "am.qcow2")
	g := cryptGraph(t, true)
	if err := createCrypt(t, g, p, 1<<20, map[string]any{"encrypt": map[string]any{"format": "luks", "key-secret": "s", "iter-time": 10}}); err != nil {
		t.Fatal(err)
	}
	n, err := openCrypt(g, "q", p, false, map[string]any{"key-secret": "s"})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0x3c}, 1<<20)
	if err := n.WriteAt(ctx, data, 0, 0); err != nil {
		t.Fatal(err)
	}
	am := n.Instance().(graph.Amender)
	it := int64(10)
	slot := func(i int64) *int64 { return &i }
	for _, c := range []struct {
		o    EncryptAmendOptions
		want string
	}{
		{EncryptAmendOptions{NewSecret: "b"}, "Parameter 'state' is missing"},
		{EncryptAmendOptions{State: "active"}, "'new-secret' is required to activate a keyslot"},
		{EncryptAmendOptions{State: "active", NewSecret: "b", Keyslot: slot(0)}, "Refusing to overwrite active keyslot 0 - please erase it first"},
		{EncryptAmendOptions{State: "inactive", Keyslot: slot(3)}, "Given keyslot 3 is already erased (inactive) "},
		{EncryptAmendOptions{State: "inactive", Keyslot: slot(8)}, "Invalid keyslot 8 specified, must be between 0 and 7"},
		{EncryptAmendOptions{State: "inactive", OldSecret: "s"}, "All the active keyslots match the (old) password"},
		{EncryptAmendOptions{State: "inactive", OldSecret: "w"}, "No keyslots match given (old) password for erase operation"},
		{EncryptAmendOptions{State: "inactive"}, "either explicit keyslot index or the password"},
	} {
		if err := am.Amend(ctx, &AmendOptions{Encrypt: &c.o}, false); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("amend %+v: %v, want %q", c.o, err, c.want)
		}
	}
	if err := am.Amend(ctx, &AmendOptions{Encrypt: &EncryptAmendOptions{State: "active", NewSecret: "b", IterTime: &it}}, false); err != nil {
		t.Fatal(err)
	}
	if err := am.Amend(ctx, &AmendOptions{Encrypt: &EncryptAmendOptions{State: "inactive", OldSecret: "s"}}, false); err != nil {
		t.Fatal(err)
	}
	var info struct {
		FormatSpecific struct {
			Data struct {
				Encrypt struct {
					Slots []struct {
						Active bool `json:"active"`
					} `json:"slots"`
				} `json:"encrypt"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(mustJSON(n.Instance().(*image).Info())), &info.FormatSpecific); err != nil {
		t.Fatal(err)
	}
	if s := info.FormatSpecific.Data.Encrypt.Slots; len(s) != 8 || s[0].Active || !s[1].Active {
		t.Errorf("slots after amend: %+v", s)
	}
	if err := g.Delete(ctx, "q"); err != nil {
		t.Fatal(err)
	}
	if got := qemuCryptRaw(t, cryptImageOpts(p, "b")); !bytes.Equal(got, data) {
		t.Fatalf("qemu-img with the new passphrase: %s", firstDiff(got, data))
	}
	qemuCrypt(t, "qemu-img", "check", "--image-opts", cryptImageOpts(p, "b"))
	if _, err := openCrypt(g, "q2", p, true, map[string]any{"key-secret": "s"}); err == nil ||
		!strings.Contains(err.Error(), "Invalid password, cannot unlock any keyslot") {
		t.Errorf("the erased passphrase: %v", err)
	}
}
