package img

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	_ "blockbackend/drivers/qcow2"
)

// TestInteropQcow2CreateBytes creates the same qcow2 images with qemu-img
// and with ours, and wants identical files (cmp), byte for byte: the
// header and its extensions, the refcount structures, the L1 table and
// where the file ends (right after the L1 table, mid-cluster), L2 tables
// and data clusters of preallocated images, and any data file.
//
// Layouts that still differ are listed in drivers/qcow2's package doc.
func TestInteropQcow2CreateBytes(t *testing.T) {
	needQEMU(t, "qemu-img")
	cases := []struct{ size, opts string }{
		{"64M", ""},
		{"64M", "compat=0.10"},
		{"64M", "compat=1.1"},
		{"64M", "cluster_size=512"},
		{"64M", "cluster_size=4k"},
		{"64M", "cluster_size=2M"},
		{"64M", "refcount_bits=1"},
		{"64M", "refcount_bits=64"},
		{"64M", "lazy_refcounts=on"},
		{"64M", "extended_l2=on"},
		{"64M", "compression_type=zstd"},
		{"64M", "backing_file=base.raw,backing_fmt=raw"},
		{"64M", "-b base.raw raw"},
		{"", "-b base.raw raw cluster_size=4k"},
		{"64M", "backing_file=base.raw,backing_fmt=raw,cluster_size=16k,extended_l2=on,preallocation=metadata"},
		{"64M", "preallocation=off"},
		{"64M", "preallocation=metadata"},
		{"64M", "preallocation=metadata,extended_l2=on"},
		{"64M", "preallocation=metadata,compat=0.10"},
		// Metadata preallocation past the first refcount block's range:
		// the next block follows the data run that reaches its range.
		{"64M", "preallocation=metadata,cluster_size=4k"},
		{"128M", "preallocation=metadata,cluster_size=16k,extended_l2=on"},
		{"8M", "preallocation=metadata,cluster_size=512,refcount_bits=1"},
		{"64M", "preallocation=falloc"},
		{"64M", "preallocation=full"},
		{"0", "preallocation=falloc"},
		{"8M", "preallocation=falloc,cluster_size=512"},
		{"1M", "preallocation=falloc,cluster_size=512,refcount_bits=1"},
		{"8M", "preallocation=full,cluster_size=4k,compat=0.10"},
		{"64M", "preallocation=falloc,extended_l2=on,backing_file=base.raw,backing_fmt=raw"},
		{"64M", "preallocation=falloc,cluster_size=2M,refcount_bits=64"},
		{"64M", "preallocation=falloc,data_file=img.data"},
		{"64M", "data_file=img.data"},
		{"64M", "data_file=img.data,preallocation=metadata"},
		{"64M", "data_file=img.data,data_file_raw=on"},
		{"1M", "data_file=img.data,data_file_raw=on,cluster_size=4k"},
		{"0", ""},
		{"1M", ""},
		{"100G", ""},
		{"4T", ""},
		{"4T", "cluster_size=4k"},
		{"4T", "cluster_size=2M"},
		{"1G", "compat=0.10,cluster_size=512"},
	}
	for _, c := range cases {
		t.Run(c.size+","+c.opts, func(t *testing.T) {
			qdir, odir := t.TempDir(), t.TempDir()
			needBase := strings.Contains(c.opts, "base.raw")
			args := []string{"create", "-q", "-f", "qcow2"}
			if rest, ok := strings.CutPrefix(c.opts, "-b "); ok {
				// The command line's -b FILE -F FMT.
				f := strings.Fields(rest)
				args = append(args, "-b", f[0], "-F", f[1])
				c.opts = strings.Join(f[2:], "")
			}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			args = append(args, "img.qcow2")
			if c.size != "" {
				args = append(args, c.size) // else the backing file's
			}
			for _, d := range []string{qdir, odir} {
				if needBase {
					if r := runTool(t, d, "qemu-img", "create", "-q", "-f", "raw", "base.raw", "64M"); r.code != 0 {
						t.Fatalf("base: %+v", r)
					}
				}
			}
			if r := runTool(t, qdir, "qemu-img", args...); r.code != 0 {
				t.Fatalf("qemu-img %q: %+v", args, r)
			}
			if r := runOurs(t, odir, args...); r.code != 0 || r.stdout != "" || r.stderr != "" {
				t.Fatalf("ours %q: %+v", args, r)
			}
			sameFiles(t, qdir, odir)
			if r := runTool(t, odir, "qemu-img", "check", "img.qcow2"); r.code != 0 || !strings.Contains(r.stdout, "No errors were found") {
				t.Errorf("qemu-img check of ours: %+v", r)
			}
		})
	}
}

// sameFiles wants the two directories to hold the same files with the
// same bytes.
func sameFiles(t *testing.T, qdir, odir string) {
	t.Helper()
	qents, err := os.ReadDir(qdir)
	if err != nil {
		t.Fatal(err)
	}
	oents, err := os.ReadDir(odir)
	if err != nil {
		t.Fatal(err)
	}
	if len(qents) != len(oents) {
		t.Errorf("qemu-img made %d files, ours %d", len(qents), len(oents))
	}
	for _, e := range qents {
		q, err1 := os.ReadFile(filepath.Join(qdir, e.Name()))
		o, err2 := os.ReadFile(filepath.Join(odir, e.Name()))
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		if !bytes.Equal(q, o) {
			at := 0
			for at < min(len(q), len(o)) && q[at] == o[at] {
				at++
			}
			t.Errorf("%s: qemu-img's is %d bytes, ours %d; first difference at byte %d", e.Name(), len(q), len(o), at)
		}
	}
}
