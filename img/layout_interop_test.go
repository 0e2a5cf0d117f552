package img

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestInteropConvertLayout pins convert's qcow2 layout to qemu-img's: the
// same raw source gives byte-identical images (each L2 table before the
// data it maps, refcount blocks where QEMU puts them), and so the same
// check report (fragmentation) and map. Ordered writes only: with -W the
// layout depends on which request allocates first, in both tools.
func TestInteropConvertLayout(t *testing.T) {
	needQEMU(t, "qemu-img", "qemu-io")
	for _, tc := range []struct {
		name, size string
		io         []string
		args       []string
	}{
		{"data-after-table", "4M", []string{"write -P 5 1M 1M", "write -P 6 3M 4k"}, nil},
		{"one-coroutine", "4M", []string{"write -P 5 1M 1M", "write -P 6 3M 4k"}, []string{"-m", "1"}},
		{"one-coroutine-unordered", "4M", []string{"write -P 5 1M 1M", "write -P 6 3M 4k"}, []string{"-m", "1", "-W"}},
		{"spread", "2G", []string{"write -P 1 0 1M", "write -P 2 600M 5M", "write -P 3 1500M 64k"}, nil},
		{"small-tables", "16M", []string{"write -P 1 100k 3M", "write -P 2 9M 7k"}, []string{"-o", "cluster_size=4k"}},
		{"refcount-blocks", "16M", []string{"write -P 1 100k 3M", "write -P 2 9M 7k"}, []string{"-o", "cluster_size=512"}},
		{"subclusters", "16M", []string{"write -P 1 100k 3M", "write -P 2 9M 7k"}, []string{"-o", "extended_l2=on,cluster_size=16k"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if r := runTool(t, dir, "qemu-img", "create", "-q", "-f", "raw", "s.raw", tc.size); r.code != 0 {
				t.Fatalf("qemu-img create: %+v", r)
			}
			io := []string{"-f", "raw"}
			for _, c := range tc.io {
				io = append(io, "-c", c)
			}
			if r := runTool(t, dir, "qemu-io", append(io, "s.raw")...); r.code != 0 {
				t.Fatalf("qemu-io: %+v", r)
			}
			conv := append(append([]string{"convert"}, tc.args...), "-O", "qcow2", "s.raw")
			if r := runTool(t, dir, "qemu-img", append(conv, "q.qcow2")...); r.code != 0 {
				t.Fatalf("qemu-img convert: %+v", r)
			}
			if r := runOurs(t, dir, append(conv, "o.qcow2")...); r.code != 0 {
				t.Fatalf("convert: %+v", r)
			}
			want, err := os.ReadFile(filepath.Join(dir, "q.qcow2"))
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(filepath.Join(dir, "o.qcow2"))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				qm := runTool(t, dir, "qemu-img", "map", "--output=json", "q.qcow2")
				om := runTool(t, dir, "qemu-img", "map", "--output=json", "o.qcow2")
				t.Errorf("images differ (%d and %d bytes)\nqemu-img:\n%sours:\n%s", len(want), len(got), qm.stdout, om.stdout)
			}
			// Our check reads our image as qemu-img's reads its own.
			qc := runTool(t, dir, "qemu-img", "check", "q.qcow2")
			oc := runOurs(t, dir, "check", "o.qcow2")
			if qc != oc || !strings.Contains(oc.stdout, "0.00% fragmented") {
				t.Errorf("check:\n qemu-img: %+v\n ours: %+v", qc, oc)
			}
		})
	}
}
