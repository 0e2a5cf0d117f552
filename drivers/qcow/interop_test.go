package qcow

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	_ "blockbackend/drivers/file"
	_ "blockbackend/drivers/raw"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

var nameSeq atomic.Int64

func nextName() string { return fmt.Sprintf("n%d", nameSeq.Add(1)) }

const testSecret = "secret,id=s0,data=abc"

// qemu runs a QEMU tool and fails the test on error (and when the tool is
// missing: the interop tests do not skip).
func qemu(t testing.TB, name string, args ...string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is required for the qcow interop tests (apt-get install qemu-utils)", name)
	}
	cmd := exec.Command(p, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// newGraph is an image tool's graph with the secret s0 = "abc".
func newGraph(t testing.TB) *graph.Graph {
	t.Helper()
	g := graph.New(nil)
	g.ImageTool = true // AES images open in the image tool only
	if err := g.Objects.Add(map[string]any{"qom-type": "secret", "id": "s0", "data": "abc"}, qapi.JSON); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// openQcow opens path as a qcow node; enc adds encrypt.key-secret=s0.
func openQcow(t testing.TB, g *graph.Graph, path string, readOnly, enc bool) *graph.Node {
	t.Helper()
	opts := map[string]any{
		"driver": "qcow", "read-only": readOnly, "node-name": nextName(),
		"file": map[string]any{"driver": "file", "filename": path},
	}
	if enc {
		opts["encrypt"] = map[string]any{"key-secret": "s0"}
	}
	n, err := g.Add(context.Background(), opts, qapi.JSON)
	if err != nil {
		t.Fatalf("opening %s: %v", path, err)
	}
	return n
}

func readAll(t testing.TB, n *graph.Node) []byte {
	t.Helper()
	size := n.SizeNow()
	buf := make([]byte, size)
	const step = 300 << 10 // not a multiple of the cluster size
	for off := int64(0); off < size; off += step {
		if err := n.ReadAt(context.Background(), buf[off:min(off+step, size)], off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	return buf
}

// qemuRaw is qemu-img convert -O raw of an image (opts: --image-opts
// options when not empty).
func qemuRaw(t testing.TB, path string, enc bool) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	if enc {
		qemu(t, "qemu-img", "convert", "--object", testSecret, "--image-opts",
			"driver=qcow,file.filename="+path+",encrypt.key-secret=s0", "-O", "raw", out)
	} else {
		qemu(t, "qemu-img", "convert", "-O", "raw", path, out)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("lengths %d and %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at %d: %#x vs %#x", i, a[i], b[i])
		}
	}
	return "equal"
}

var ioCmds = []string{
	"write -P 0x11 0 100k",
	"write -P 0x22 300k 1000",
	"write -P 0x33 511 2",
	"write -P 0x44 1M 64k",
	"write -P 0x55 5000k 3",
}

// TestReadQemuImages reads images that qemu-img made and qemu-io wrote
// (sizes, backing files, compression, AES) and compares every byte with
// qemu-img convert -O raw.
func TestReadQemuImages(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	qemu(t, "qemu-img", "create", "-q", "-f", "raw", base, "6M")
	qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 6M", "-c", "write -P 0xbb 3M 5000", base)
	for _, tc := range []struct {
		name, size string
		create     []string
		io         []string
		enc        bool
	}{
		{"empty", "10M", nil, nil, false},
		{"written", "6M", nil, ioCmds, false},
		{"odd-size", "5123k", nil, ioCmds, false},
		{"backing", "", []string{"-b", "base.raw", "-F", "raw"}, ioCmds, false},
		{"backing-larger", "8M", []string{"-b", "base.raw", "-F", "raw"}, append(ioCmds, "write -P 0x88 7M 1000"), false},
		{"aes", "6M", []string{"--object", testSecret, "-o", "encrypt.format=aes,encrypt.key-secret=s0"}, ioCmds, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".qcow")
			args := append([]string{"create", "-q", "-f", "qcow"}, tc.create...)
			args = append(args, p)
			if tc.size != "" {
				args = append(args, tc.size)
			}
			qemu(t, "qemu-img", args...)
			if len(tc.io) > 0 {
				a := []string{}
				if tc.enc {
					a = append(a, "--object", testSecret, "--image-opts")
				} else {
					a = append(a, "-f", "qcow")
				}
				for _, c := range tc.io {
					a = append(a, "-c", c)
				}
				img := p
				if tc.enc {
					img = "driver=qcow,file.filename=" + p + ",encrypt.key-secret=s0"
				}
				qemu(t, "qemu-io", append(a, img)...)
			}
			want := qemuRaw(t, p, tc.enc)
			g := newGraph(t)
			n := openQcow(t, g, p, true, tc.enc)
			if got := readAll(t, n); !bytes.Equal(got, want) {
				t.Fatalf("%s: %s", tc.name, firstDiff(got, want))
			}
		})
	}
	t.Run("big", func(t *testing.T) {
		p := filepath.Join(dir, "big.qcow")
		qemu(t, "qemu-img", "create", "-q", "-f", "qcow", p, "100G")
		qemu(t, "qemu-io", "-f", "qcow", "-c", "write -P 0x66 99G 1M", "-c", "write -P 0x77 4k 4k", p)
		g := newGraph(t)
		n := openQcow(t, g, p, true, false)
		for _, r := range []struct {
			off, n int64
			b      byte
		}{{99 << 30, 1 << 20, 0x66}, {4096, 4096, 0x77}, {0, 4096, 0}, {50 << 30, 1 << 20, 0}, {100<<30 - 4096, 4096, 0}} {
			got := make([]byte, r.n)
			if err := n.ReadAt(context.Background(), got, r.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, bytes.Repeat([]byte{r.b}, int(r.n))) {
				t.Fatalf("at %d: want %#x", r.off, r.b)
			}
		}
	})
	t.Run("compressed", func(t *testing.T) {
		src := filepath.Join(dir, "src.raw")
		qemu(t, "qemu-img", "create", "-q", "-f", "raw", src, "3M")
		rng := rand.New(rand.NewPCG(1, 2))
		noise := make([]byte, 70000)
		for i := range noise {
			noise[i] = byte(rng.IntN(4)) // compressible, not trivially
		}
		if err := os.WriteFile(src, append(noise, make([]byte, 3<<20-len(noise))...), 0o644); err != nil {
			t.Fatal(err)
		}
		qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0x12 1M 100k", src)
		p := filepath.Join(dir, "c.qcow")
		// qemu-img 7.2 exits 1 without a message after every convert -c
		// to qcow (observed on every input tried), though the image is
		// complete: accept that status, then check the image.
		cmd := exec.Command("qemu-img", "convert", "-c", "-O", "qcow", src, p)
		if out, err := cmd.CombinedOutput(); err != nil && (cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 1 || len(out) != 0) {
			t.Fatalf("qemu-img convert -c: %v\n%s", err, out)
		}
		qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow", src, p)
		// and a partial overwrite of a compressed cluster
		qemu(t, "qemu-io", "-f", "qcow", "-c", "write -P 0x99 1000 10", p)
		want := qemuRaw(t, p, false)
		g := newGraph(t)
		if got := readAll(t, openQcow(t, g, p, true, false)); !bytes.Equal(got, want) {
			t.Fatalf("compressed: %s", firstDiff(got, want))
		}
	})
}

// TestWriteReadByQemu writes images we create (plain, with a backing
// file, AES) with random requests and checks qemu-img reads the same
// bytes as our model, and that compressed clusters we write read back in
// qemu-img.
func TestWriteReadByQemu(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	qemu(t, "qemu-img", "create", "-q", "-f", "raw", base, "4M")
	qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 4M", "-c", "write -P 0xbb 1M 5000", base)
	baseBytes, _ := os.ReadFile(base)
	for _, tc := range []struct {
		name    string
		opts    map[string]any
		backing bool
		enc     bool
	}{
		{"plain", nil, false, false},
		{"backing", map[string]any{"backing-file": "base.raw"}, true, false},
		{"aes", map[string]any{"encrypt": map[string]any{"format": "qcow", "key-secret": "s0"}}, false, true},
		{"aes-backing", map[string]any{"backing-file": "base.raw", "encrypt": map[string]any{"format": "qcow", "key-secret": "s0"}}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			p := filepath.Join(dir, tc.name+".qcow")
			g := newGraph(t)
			createImage(t, g, p, 4<<20, tc.opts)
			n := openQcow(t, g, p, false, tc.enc)
			model := make([]byte, 4<<20)
			if tc.backing {
				copy(model, baseBytes)
			}
			rng := rand.New(rand.NewPCG(3, 4))
			for i := 0; i < 150; i++ {
				off := rng.Int64N(4<<20 - 1)
				l := min(rng.Int64N(20000)+1, 4<<20-off)
				b := make([]byte, l)
				for j := range b {
					b[j] = byte(i + 1)
				}
				if err := n.WriteAt(ctx, b, off, 0); err != nil {
					t.Fatalf("write %d at %d: %v", l, off, err)
				}
				copy(model[off:], b)
			}
			if got := readAll(t, n); !bytes.Equal(got, model) {
				t.Fatalf("our read-back: %s", firstDiff(got, model))
			}
			if err := g.Delete(ctx, n.Name()); err != nil {
				t.Fatal(err)
			}
			if got := qemuRaw(t, p, tc.enc); !bytes.Equal(got, model) {
				t.Fatalf("qemu-img reads: %s", firstDiff(got, model))
			}
		})
	}
	t.Run("compressed", func(t *testing.T) {
		ctx := context.Background()
		p := filepath.Join(dir, "comp.qcow")
		g := newGraph(t)
		createImage(t, g, p, 1<<20, nil)
		n := openQcow(t, g, p, false, false)
		cw := n.CompressedWriter()
		cs := cw.ClusterSize()
		model := make([]byte, 1<<20)
		rng := rand.New(rand.NewPCG(5, 6))
		for c := int64(0); c < 40; c++ {
			b := model[c*cs : (c+1)*cs]
			for j := range b {
				b[j] = byte(rng.IntN(3 + int(c)*6)) // from compressible to not
			}
			if err := n.WriteCompressed(ctx, c*cs, b); err != nil {
				t.Fatal(err)
			}
		}
		// A partial write over a compressed cluster.
		patch := bytes.Repeat([]byte{0xee}, 700)
		if err := n.WriteAt(ctx, patch, 3*cs+100, 0); err != nil {
			t.Fatal(err)
		}
		copy(model[3*cs+100:], patch)
		if got := readAll(t, n); !bytes.Equal(got, model) {
			t.Fatalf("our read-back: %s", firstDiff(got, model))
		}
		if err := g.Delete(ctx, n.Name()); err != nil {
			t.Fatal(err)
		}
		if got := qemuRaw(t, p, false); !bytes.Equal(got, model) {
			t.Fatalf("qemu-img reads: %s", firstDiff(got, model))
		}
		raw := filepath.Join(dir, "comp.raw")
		os.WriteFile(raw, model, 0o644)
		qemu(t, "qemu-img", "compare", "-f", "qcow", "-F", "raw", p, raw)
	})
}

// createImage runs blockdev-create driver=qcow on a new file at path.
func createImage(t testing.TB, g *graph.Graph, path string, size int64, extra map[string]any) {
	t.Helper()
	ctx := context.Background()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	fn, err := g.Add(ctx, map[string]any{"driver": "file", "filename": path, "node-name": nextName()}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	opts := map[string]any{"driver": "qcow", "file": fn.Name(), "size": size}
	for k, v := range extra {
		opts[k] = v
	}
	run, err := g.PrepareCreate(opts, qapi.JSON, "options")
	if err != nil {
		t.Fatal(err)
	}
	if err := run(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Delete(ctx, fn.Name()); err != nil {
		t.Fatal(err)
	}
}

// TestCreateLikeQemuImg: blockdev-create writes the bytes qemu-img
// create writes.
func TestCreateLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		size int64
		opts map[string]any
		qemu []string
	}{
		{"small", 512, nil, nil},
		{"10M", 10 << 20, nil, nil},
		{"100G", 100 << 30, nil, nil},
		{"backing", 10 << 20, map[string]any{"backing-file": "base.raw"}, []string{"-u", "-b", "base.raw", "-F", "raw"}},
		{"aes", 1 << 20, map[string]any{"encrypt": map[string]any{"format": "qcow", "key-secret": "s0"}},
			[]string{"--object", testSecret, "-o", "encryption=on,encrypt.key-secret=s0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ours := filepath.Join(dir, tc.name+"-ours.qcow")
			theirs := filepath.Join(dir, tc.name+"-theirs.qcow")
			createImage(t, newGraph(t), ours, tc.size, tc.opts)
			qemu(t, "qemu-img", append(append([]string{"create", "-q", "-f", "qcow"}, tc.qemu...), theirs, fmt.Sprint(tc.size))...)
			a, _ := os.ReadFile(ours)
			b, _ := os.ReadFile(theirs)
			if !bytes.Equal(a, b) {
				t.Fatalf("created images differ: %s", firstDiff(a, b))
			}
		})
	}
}

// TestSameBytesAsQemuIO: the same writes through qemu-io and through us
// leave byte-identical image files (allocation order, L2 placement,
// copy on write, AES of the untouched sectors of a new cluster).
func TestSameBytesAsQemuIO(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	qemu(t, "qemu-img", "create", "-q", "-f", "raw", base, "4M")
	qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 4M", base)
	writes := []struct{ off, n int64 }{{512, 1024}, {1 << 20, 65536}, {100, 10}, {3<<20 + 7, 9000}, {0, 4096}, {2 << 20, 1}}
	for _, tc := range []struct {
		name   string
		create []string
		opts   map[string]any
		enc    bool
	}{
		{"plain", nil, nil, false},
		{"backing", []string{"-b", "base.raw", "-F", "raw"}, map[string]any{"backing-file": "base.raw"}, false},
		{"aes", []string{"--object", testSecret, "-o", "encryption=on,encrypt.key-secret=s0"},
			map[string]any{"encrypt": map[string]any{"format": "qcow", "key-secret": "s0"}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			theirs := filepath.Join(dir, tc.name+"-theirs.qcow")
			ours := filepath.Join(dir, tc.name+"-ours.qcow")
			qemu(t, "qemu-img", append(append([]string{"create", "-q", "-f", "qcow"}, tc.create...), theirs, "4M")...)
			var args []string
			for i, w := range writes {
				args = append(args, "-c", fmt.Sprintf("write -P %d %d %d", i+1, w.off, w.n))
			}
			if tc.enc {
				args = append(args, "--object", testSecret, "--image-opts", "driver=qcow,file.filename="+theirs+",encrypt.key-secret=s0")
			} else {
				args = append(args, "-f", "qcow", theirs)
			}
			qemu(t, "qemu-io", args...)
			g := newGraph(t)
			createImage(t, g, ours, 4<<20, tc.opts)
			n := openQcow(t, g, ours, false, tc.enc)
			for i, w := range writes {
				if err := n.WriteAt(context.Background(), bytes.Repeat([]byte{byte(i + 1)}, int(w.n)), w.off, 0); err != nil {
					t.Fatal(err)
				}
			}
			if err := g.Delete(context.Background(), n.Name()); err != nil {
				t.Fatal(err)
			}
			a, _ := os.ReadFile(ours)
			b, _ := os.ReadFile(theirs)
			if !bytes.Equal(a, b) {
				t.Fatalf("files differ: %s", firstDiff(a, b))
			}
		})
	}
}

// TestLargeClustersByQemu: an image with 64 KiB clusters (not what
// qemu-img makes, but what the format allows) written by us, compressed
// clusters included whose data repeats at distances beyond 4 KiB, reads
// in qemu-img as in our model (QEMU inflates with a 4 KiB window).
func TestLargeClustersByQemu(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "big-clusters.qcow")
	size := int64(2 << 20)
	h := &Header{Version: 1, Size: uint64(size), ClusterBits: 16, L2Bits: 9, L1TableOffset: 48}
	img := append(h.Marshal(), make([]byte, 8*h.L1Entries())...)
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	g := newGraph(t)
	n := openQcow(t, g, p, false, false)
	cs := int64(65536)
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(7, 8))
	block := make([]byte, 8192)
	for i := range block {
		block[i] = byte(rng.IntN(16)) // compressible, and repeating 8 KiB apart
	}
	for c := int64(0); c < 4; c++ {
		b := model[c*cs : (c+1)*cs]
		for off := 0; off < len(b); off += len(block) {
			copy(b[off:], block)
		}
		if err := n.WriteCompressed(ctx, c*cs, b); err != nil {
			t.Fatal(err)
		}
	}
	patch := bytes.Repeat([]byte{0x5e}, 70000)
	if err := n.WriteAt(ctx, patch, 5*cs-100, 0); err != nil {
		t.Fatal(err)
	}
	copy(model[5*cs-100:], patch)
	if err := g.Delete(ctx, n.Name()); err != nil {
		t.Fatal(err)
	}
	if got := qemuRaw(t, p, false); !bytes.Equal(got, model) {
		t.Fatalf("qemu-img reads: %s", firstDiff(got, model))
	}
	if out := qemu(t, "qemu-img", "map", "--output=json", p); !strings.Contains(out, `"start": 0, "length": 262144, "depth": 0, "present": true, "zero": false, "data": true}`) {
		t.Fatalf("compressed clusters not mapped as such:\n%s", out)
	}
}
