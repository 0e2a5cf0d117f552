package qcow2

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"blockbackend/qmp/qapi"
)

func ptr[T any](v T) *T { return &v }

func amend(t *testing.T, p string, o AmendOptions) error {
	t.Helper()
	st, h := openTestImage(t, p)
	return amendImage(context.Background(), st, h, &o, false)
}

func mustAmend(t *testing.T, p string, o AmendOptions) {
	t.Helper()
	if err := amend(t, p, o); err != nil {
		t.Fatalf("amend %+v: %v", o, err)
	}
}

func infoField(t *testing.T, p, field string) string {
	t.Helper()
	for _, l := range strings.Split(must(t, "qemu-img", "info", "-f", "qcow2", p), "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(l), ": "); ok && k == field {
			return v
		}
	}
	return ""
}

// snapshotData is the active data and each snapshot's, as qemu-img reads.
func snapshotData(t *testing.T, p string) map[string][]byte {
	t.Helper()
	d := map[string][]byte{"": readAs(t, p, "")}
	for _, s := range snapshotNames(t, p) {
		_, name, _ := strings.Cut(s, ":")
		d[name] = readAs(t, p, name)
	}
	return d
}

func sameData(t *testing.T, a, b map[string][]byte) {
	t.Helper()
	if len(a) != len(b) {
		t.Fatalf("snapshots: %d before, %d after", len(a), len(b))
	}
	for k := range a {
		if !bytes.Equal(a[k], b[k]) {
			t.Fatalf("data of %q changed", k)
		}
	}
}

func TestAmendCompat(t *testing.T) {
	for _, backing := range []bool{false, true} {
		name := "standalone"
		if backing {
			name = "with-backing"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if backing {
				base := filepath.Join(dir, "base.qcow2")
				must(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
				qemuIO(t, base, "write -P 9 0 16M")
				args = append(args, "-b", base, "-F", "qcow2")
			}
			must(t, "qemu-img", append(args, p, "16M")...)
			qemuIO(t, p, "write -P 1 0 1M", "write -z 2M 128k", "write -P 2 4M 64k", "write -z 4M 64k")
			must(t, "qemu-img", "snapshot", "-c", "s1", p)
			qemuIO(t, p, "write -z 0 64k", "write -z -u 8M 128k", "write -P 3 10M 64k")
			before := snapshotData(t, p)
			mustAmend(t, p, AmendOptions{Compat: "0.10"})
			if v := infoField(t, p, "compat"); v != "0.10" {
				t.Fatalf("compat %q after downgrade", v)
			}
			assertClean(t, p)
			sameData(t, before, snapshotData(t, p))
			mustAmend(t, p, AmendOptions{Compat: "v3", LazyRefcounts: ptr(true)})
			if v := infoField(t, p, "compat"); v != "1.1" || infoField(t, p, "lazy refcounts") != "true" {
				t.Fatalf("after upgrade: compat %q lazy %q", v, infoField(t, p, "lazy refcounts"))
			}
			assertClean(t, p)
			sameData(t, before, snapshotData(t, p))
		})
	}
}

func TestAmendLazyDirty(t *testing.T) {
	p := newImage(t, "lazy_refcounts=on", "10M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", "-c", "abort", p)
	mustAmend(t, p, AmendOptions{LazyRefcounts: ptr(false)})
	assertClean(t, p)
	if infoField(t, p, "lazy refcounts") != "false" {
		t.Fatal("lazy refcounts still on")
	}
	if got := readAs(t, p, ""); got[0] != 3 || got[1<<20-1] != 3 {
		t.Fatal("data lost")
	}
}

func TestAmendRefcountBits(t *testing.T) {
	p := newImage(t, "cluster_size=4k", "32M", "write -P 1 0 3M", "write -P 2 20M 64k")
	must(t, "qemu-img", "snapshot", "-c", "s1", p)
	qemuIO(t, p, "write -P 3 1M 64k")
	before := snapshotData(t, p)
	for _, w := range []int64{64, 2, 8, 16} {
		mustAmend(t, p, AmendOptions{RefcountBits: ptr(w)})
		if got := infoField(t, p, "refcount bits"); got != strconv.FormatInt(w, 10) {
			t.Fatalf("refcount bits %q, want %d", got, w)
		}
		assertClean(t, p)
		sameData(t, before, snapshotData(t, p))
	}
	err := amend(t, p, AmendOptions{RefcountBits: ptr(int64(1))})
	if err == nil || !strings.HasPrefix(err.Error(), "Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x") {
		t.Fatalf("refcount_bits=1 with shared clusters: %v", err)
	}
	assertClean(t, p)
}

func TestAmendSize(t *testing.T) {
	p := newImage(t, "cluster_size=4k", "4M", "write -P 1 0 4M")
	must(t, "qemu-img", "snapshot", "-c", "s1", p)
	before := readAs(t, p, "")
	// Grow far enough to move the L1 table.
	mustAmend(t, p, AmendOptions{Size: ptr(qapi.Size(5 << 30))})
	assertClean(t, p)
	if v := infoField(t, p, "virtual size"); !strings.HasPrefix(v, "5 GiB") {
		t.Fatalf("virtual size %q", v)
	}
	qemuIO(t, p, "write -P 2 4G 64k", "read -P 1 0 4M", "read -P 0 4M 1M", "read -P 2 4G 64k")
	assertClean(t, p)
	// Shrink across a table the snapshot shares, and one it does not.
	mustAmend(t, p, AmendOptions{Size: ptr(qapi.Size(3<<20 + 512))})
	assertClean(t, p)
	got := readAs(t, p, "")
	if len(got) != 3<<20+512 || !bytes.Equal(got, before[:len(got)]) {
		t.Fatal("shrunk image: wrong data")
	}
	// qemu-img reads a snapshot at the image's current size.
	if s1 := readAs(t, p, "s1"); !bytes.Equal(s1, before[:len(s1)]) {
		t.Fatal("snapshot changed by the shrink")
	}
	// Growing again reads zeros where clusters were dropped (the tail
	// of the cluster cut in the middle keeps its bytes, as with qemu-img).
	mustAmend(t, p, AmendOptions{Size: ptr(qapi.Size(4 << 20))})
	assertClean(t, p)
	got = readAs(t, p, "")
	if !bytes.Equal(got[3<<20+4096:], make([]byte, 1<<20-4096)) {
		t.Fatal("dropped data came back")
	}
	must(t, "qemu-img", "snapshot", "-a", "s1", p)
	assertClean(t, p)
	if !bytes.Equal(readAs(t, p, ""), before) {
		t.Fatal("snapshot data changed")
	}
}

// TestAmendErrors: what qemu-img amend refuses, we refuse with its words.
func TestAmendErrors(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		create string
		qemu   string // qemu-img amend -o
		o      AmendOptions
	}{
		{"refcount_bits=8", "compat=0.10", AmendOptions{Compat: "0.10"}},
		{"extended_l2=on", "compat=0.10", AmendOptions{Compat: "0.10"}},
		{"data_file=" + filepath.Join(dir, "d.raw"), "compat=0.10", AmendOptions{Compat: "0.10"}},
		{"compat=0.10", "lazy_refcounts=on", AmendOptions{LazyRefcounts: ptr(true)}},
		{"compat=0.10", "refcount_bits=8", AmendOptions{RefcountBits: ptr(int64(8))}},
		{"", "refcount_bits=3", AmendOptions{RefcountBits: ptr(int64(3))}},
		{"", "refcount_bits=128", AmendOptions{RefcountBits: ptr(int64(128))}},
		{"", "compat=0.11", AmendOptions{Compat: "0.11"}},
		{"", "backing_file=x.qcow2", AmendOptions{BackingFile: ptr("x.qcow2")}},
		{"", "backing_fmt=qcow2", AmendOptions{BackingFmt: ptr("qcow2")}},
		{"", "data_file=d.raw", AmendOptions{DataFile: ptr("d.raw")}},
		{"", "data_file_raw=on", AmendOptions{DataFileRaw: ptr(true)}},
		{"", "size=1000", AmendOptions{Size: ptr(qapi.Size(1000))}},
	}
	for _, c := range cases {
		t.Run(c.create+"/"+c.qemu, func(t *testing.T) {
			p := newImage(t, c.create, "64M")
			_, errs, code := run(t, "qemu-img", "amend", "-f", "qcow2", "-o", c.qemu, p)
			if code == 0 {
				t.Fatalf("qemu-img amend -o %s succeeded", c.qemu)
			}
			want := strings.TrimSpace(strings.TrimPrefix(errs, "qemu-img: "))
			err := amend(t, p, c.o)
			if err == nil || err.Error() != want {
				t.Fatalf("got %v, want %q", err, want)
			}
			assertClean(t, p)
		})
	}
}

// TestAmendOptionsDecode: the options decode strictly, with -o's names.
func TestAmendOptionsDecode(t *testing.T) {
	o := newAmendOptions().(*AmendOptions)
	m := map[string]any{"compat": "1.1", "lazy-refcounts": "on", "refcount-bits": "8", "size": "1G", "data-file": "d.raw"}
	if err := qapi.Decode(m, o, qapi.Keyval); err != nil {
		t.Fatal(err)
	}
	if o.Compat != "1.1" || !*o.LazyRefcounts || *o.RefcountBits != 8 || *o.Size != 1<<30 || *o.DataFile != "d.raw" {
		t.Fatalf("decoded %+v", o)
	}
	err := qapi.Decode(map[string]any{"cluster-size": "4k"}, newAmendOptions(), qapi.Keyval)
	if err == nil || !strings.Contains(err.Error(), "cluster-size") {
		t.Fatalf("unknown option: %v", err)
	}
}

func TestAmendDataFileName(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "df.qcow2")
	must(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "d.raw"), p, "4M")
	qemuIO(t, p, "write -P 1 0 64k")
	if err := os.Rename(filepath.Join(dir, "d.raw"), filepath.Join(dir, "e.raw")); err != nil {
		t.Fatal(err)
	}
	mustAmend(t, p, AmendOptions{DataFile: ptr(filepath.Join(dir, "e.raw"))})
	if v := infoField(t, p, "data file"); v != filepath.Join(dir, "e.raw") {
		t.Fatalf("data file %q", v)
	}
	qemuIO(t, p, "read -P 1 0 64k")
	assertClean(t, p)
}
