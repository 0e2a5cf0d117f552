package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	_ "blockbackend/drivers/file"
	_ "blockbackend/drivers/raw"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// qemuTool returns the path of a QEMU tool; the interop tests fail (not
// skip) without it.
func qemuTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is required for the qcow2 interop tests (apt-get install qemu-utils)", name)
	}
	return p
}

// qemu runs a QEMU tool and fails the test on error.
func qemu(t testing.TB, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(qemuTool(t, name), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// openQcow2 opens path as a qcow2 node in a new graph.
func openQcow2(t testing.TB, path string, readOnly bool, extra map[string]any) (*graph.Graph, *graph.Node) {
	t.Helper()
	g := graph.New(nil)
	opts := map[string]any{
		"driver": "qcow2", "node-name": "q", "read-only": readOnly,
		"file": map[string]any{"driver": "file", "filename": path},
	}
	for k, v := range extra {
		opts[k] = v
	}
	n, err := g.Add(context.Background(), opts, qapi.JSON)
	if err != nil {
		t.Fatalf("opening %s: %v", path, err)
	}
	t.Cleanup(func() { g.Close() })
	return g, n
}

// readAll reads the whole virtual disk in chunks of step bytes.
func readAll(t testing.TB, n *graph.Node, step int64) []byte {
	t.Helper()
	size := n.SizeNow()
	buf := make([]byte, size)
	for off := int64(0); off < size; off += step {
		end := min(off+step, size)
		if err := n.ReadAt(context.Background(), buf[off:end], off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	return buf
}

// qemuRaw converts an image to raw with qemu-img and returns the bytes.
func qemuRaw(t testing.TB, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	qemu(t, "qemu-img", "convert", "-O", "raw", path, out)
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

// makeQemuImage creates an image with qemu-img and fills it with qemu-io
// commands.
func makeQemuImage(t testing.TB, dir, name, opts, size string, ioCmds ...string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	qemu(t, "qemu-img", append(args, p, size)...)
	if len(ioCmds) > 0 {
		a := []string{"-f", "qcow2"}
		for _, c := range ioCmds {
			a = append(a, "-c", c)
		}
		qemu(t, "qemu-io", append(a, p)...)
	}
	return p
}

var fillCmds = []string{
	"write -P 0x11 0 100k",
	"write -P 0x22 300k 5k",
	"write -z 400k 64k",
	"write -P 0x33 1000k 1k",
	"write -P 0x44 2047k 1k",
	"discard 0 64k",
}

func TestReadQemuImages(t *testing.T) {
	dir := t.TempDir()
	for _, opts := range []string{
		"compat=0.10,cluster_size=4096",
		"compat=1.1,cluster_size=512,refcount_bits=1",
		"cluster_size=65536,refcount_bits=64",
		"cluster_size=2M,refcount_bits=8",
		"cluster_size=16k,extended_l2=on",
		"cluster_size=64k,extended_l2=on,refcount_bits=32",
		"lazy_refcounts=on,cluster_size=8k",
		"preallocation=metadata,cluster_size=4k",
		"preallocation=full",
		"data_file=DATA,cluster_size=4k",
		"data_file=DATA,data_file_raw=on",
	} {
		t.Run(opts, func(t *testing.T) {
			name := strings.NewReplacer(",", "_", "=", "-").Replace(opts)
			o := strings.ReplaceAll(opts, "DATA", filepath.Join(dir, name+".data"))
			p := makeQemuImage(t, dir, name+".qcow2", o, "2M", fillCmds...)
			want := qemuRaw(t, p)
			_, n := openQcow2(t, p, true, nil)
			for _, step := range []int64{512, 3000, 1 << 20} {
				if got := readAll(t, n, step); !bytes.Equal(got, want) {
					t.Fatalf("step %d: %s", step, firstDiff(got, want))
				}
			}
		})
	}
}

func TestReadCompressed(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := make([]byte, 3<<20)
	for i := range data {
		switch {
		case i < 1<<20:
			data[i] = byte(i * 7 / 13)
		case i < 2<<20:
			data[i] = 0
		default:
			data[i] = byte(i >> 9)
		}
	}
	copy(data[1<<20+5000:], "a few bytes in a zero cluster")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, opts := range []string{"compression_type=zlib", "compression_type=zstd", "compression_type=zlib,cluster_size=4k", "compression_type=zstd,cluster_size=2M", "cluster_size=16k,extended_l2=on"} {
		t.Run(opts, func(t *testing.T) {
			p := filepath.Join(dir, strings.NewReplacer(",", "_", "=", "-").Replace(opts)+".qcow2")
			qemu(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, p)
			_, n := openQcow2(t, p, true, nil)
			if got := readAll(t, n, 1<<20); !bytes.Equal(got, data) {
				t.Fatalf("%s", firstDiff(got, data))
			}
		})
	}
}

func TestReadBackingChain(t *testing.T) {
	dir := t.TempDir()
	base := makeQemuImage(t, dir, "base.qcow2", "cluster_size=4k", "4M", "write -P 0xaa 0 4M")
	mid := filepath.Join(dir, "mid.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=64k", mid, "4M")
	qemu(t, "qemu-io", "-c", "write -P 0xbb 1M 100k", "-c", "write -z 3M 64k", mid)
	top := filepath.Join(dir, "sub", "top.qcow2")
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", "-o", "cluster_size=16k,extended_l2=on", top, "6M")
	qemu(t, "qemu-io", "-c", "write -P 0xcc 1030k 3k", "-c", "write -P 0xdd 5M 1k", top)
	_ = base
	want := qemuRaw(t, top)
	_, n := openQcow2(t, top, true, nil)
	if got := readAll(t, n, 7<<10); !bytes.Equal(got, want) {
		t.Fatalf("%s", firstDiff(got, want))
	}
	// backing: null: the unallocated parts read as zeros.
	g2, n2 := openQcow2(t, top, true, map[string]any{"backing": nil})
	_ = g2
	got := readAll(t, n2, 1<<20)
	if got[0] != 0 || got[1030<<10] != 0xcc {
		t.Fatalf("backing null: %#x %#x", got[0], got[1030<<10])
	}
}

func TestBackingNames(t *testing.T) {
	dir := t.TempDir()
	base := makeQemuImage(t, dir, "base.qcow2", "", "1M", "write -P 0x42 0 1M")
	// A json: backing file name.
	top := filepath.Join(dir, "json.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
		`json:{"driver":"qcow2","file":{"driver":"file","filename":"`+base+`"}}`, top, "1M")
	_, n := openQcow2(t, top, true, nil)
	if got := readAll(t, n, 1<<20); got[100] != 0x42 {
		t.Fatalf("json: backing: %#x", got[100])
	}
	// No backing format recorded: probed.
	top2 := filepath.Join(dir, "probe.qcow2")
	qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", top2, "1M")
	b := mustRead(t, top2)
	h, err := ParseHeader(bytes.NewReader(b), int64(len(b)))
	if err != nil || h.BackingFormat != "qcow2" {
		t.Fatalf("%v %+v", err, h)
	}
	h.BackingFormat = ""
	enc := h.Marshal()
	copy(b, enc)
	clear(b[len(enc):h.ClusterSize()])
	if err := os.WriteFile(top2, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, n2 := openQcow2(t, top2, true, nil)
	if got := readAll(t, n2, 1<<20); got[100] != 0x42 {
		t.Fatalf("probed backing: %#x", got[100])
	}
	if b := n2.Child("backing"); b == nil || b.Node().DriverName() != "qcow2" {
		t.Fatalf("backing child: %v", b)
	}
}

func mustRead(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
