package qcow2

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"blockbackend/graph"
)

// snapOp runs one of our snapshot operations on the image at p, with the
// file opened for just that operation (as the driver quiesces the node).
func snapCreate(t *testing.T, p, name string) graph.SnapshotInfo {
	t.Helper()
	st, h := openTestImage(t, p)
	info, err := createSnapshot(context.Background(), st, h, graph.SnapshotInfo{Name: name, ICount: -1})
	if err != nil {
		t.Fatalf("create snapshot %s: %v", name, err)
	}
	return info
}

func snapApply(t *testing.T, p, name string) {
	t.Helper()
	st, h := openTestImage(t, p)
	if err := applySnapshot(context.Background(), st, h, "", name); err != nil {
		t.Fatalf("apply snapshot %s: %v", name, err)
	}
}

func snapDelete(t *testing.T, p, name string) {
	t.Helper()
	st, h := openTestImage(t, p)
	if _, err := deleteSnapshot(context.Background(), st, h, "", name); err != nil {
		t.Fatalf("delete snapshot %s: %v", name, err)
	}
}

// assertClean: qemu-img check finds nothing at all.
func assertClean(t *testing.T, p string) {
	t.Helper()
	q := runQemuCheck(t, p)
	if q.Corruptions != 0 || q.Leaks != 0 || q.CheckErrors != 0 {
		t.Fatalf("qemu-img check: %+v\n%s", q, strings.Join(q.Messages, "\n"))
	}
	// And ours agrees.
	st, h := openTestImage(t, p)
	res, err := checkImage(context.Background(), st, h, 0)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("our check: %v %+v", err, res)
	}
}

// readAs converts the image (or one of its snapshots) to raw with
// qemu-img and returns the bytes.
func readAs(t *testing.T, p, snapshot string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	args := []string{"convert", "-f", "qcow2", "-O", "raw"}
	if snapshot != "" {
		args = append(args, "-l", "snapshot.name="+snapshot)
	}
	must(t, "qemu-img", append(args, p, out)...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func snapshotNames(t *testing.T, p string) []string {
	t.Helper()
	out := must(t, "qemu-img", "snapshot", "-l", p)
	var names []string
	for _, l := range strings.Split(out, "\n")[1:] {
		f := strings.Fields(l)
		if len(f) >= 2 && f[0] != "ID" {
			names = append(names, f[0]+":"+f[1])
		}
	}
	return names
}

func TestSnapshotLifecycle(t *testing.T) {
	for _, opts := range []string{"", "compat=0.10", "cluster_size=4k", "refcount_bits=2", "extended_l2=on", "lazy_refcounts=on", "cluster_size=512,refcount_bits=64"} {
		t.Run(opts, func(t *testing.T) {
			p := newImage(t, opts, "8M", "write -P 1 0 1M", "write -P 2 3M 64k")
			a := readAs(t, p, "")
			snapCreate(t, p, "s1")
			assertClean(t, p)
			qemuIO(t, p, "write -P 3 512k 1M", "write -P 4 6M 4k")
			b := readAs(t, p, "")
			snapCreate(t, p, "s2")
			assertClean(t, p)
			qemuIO(t, p, "write -P 5 0 8M")
			c := readAs(t, p, "")
			assertClean(t, p)
			if got := snapshotNames(t, p); fmt.Sprint(got) != "[1:s1 2:s2]" {
				t.Fatalf("qemu-img snapshot -l: %v", got)
			}
			if !bytes.Equal(readAs(t, p, "s1"), a) || !bytes.Equal(readAs(t, p, "s2"), b) {
				t.Fatal("snapshot data differs")
			}
			snapApply(t, p, "s1")
			assertClean(t, p)
			if !bytes.Equal(readAs(t, p, ""), a) {
				t.Fatal("applied s1: wrong data")
			}
			qemuIO(t, p, "write -P 6 0 64k")
			assertClean(t, p)
			snapDelete(t, p, "s1")
			assertClean(t, p)
			if !bytes.Equal(readAs(t, p, "s2"), b) {
				t.Fatal("s2 changed by deleting s1")
			}
			snapApply(t, p, "s2")
			snapDelete(t, p, "s2")
			assertClean(t, p)
			if !bytes.Equal(readAs(t, p, ""), b) {
				t.Fatal("applied s2: wrong data")
			}
			if got := snapshotNames(t, p); len(got) != 0 {
				t.Fatalf("snapshots left: %v", got)
			}
			_ = c
		})
	}
}

// TestSnapshotInterop: snapshots made by qemu-img, used by us, and the
// other way round.
func TestSnapshotInterop(t *testing.T) {
	p := newImage(t, "", "16M", "write -P 1 0 2M")
	a := readAs(t, p, "")
	must(t, "qemu-img", "snapshot", "-c", "theirs", p)
	qemuIO(t, p, "write -P 2 1M 2M")
	b := readAs(t, p, "")
	ours := snapCreate(t, p, "ours")
	if ours.ID != "2" {
		t.Errorf("ID %q, want 2", ours.ID)
	}
	qemuIO(t, p, "write -P 3 0 16M")
	assertClean(t, p)
	snapApply(t, p, "theirs")
	assertClean(t, p)
	if !bytes.Equal(readAs(t, p, ""), a) {
		t.Fatal("applied qemu-img's snapshot: wrong data")
	}
	must(t, "qemu-img", "snapshot", "-a", "ours", p)
	assertClean(t, p)
	if !bytes.Equal(readAs(t, p, ""), b) {
		t.Fatal("qemu-img applied our snapshot: wrong data")
	}
	must(t, "qemu-img", "snapshot", "-d", "ours", p)
	assertClean(t, p)
	snapDelete(t, p, "theirs")
	assertClean(t, p)
	st, h := openTestImage(t, p)
	if list, err := listSnapshots(context.Background(), st, h); err != nil || len(list) != 0 {
		t.Fatalf("list: %v %v", list, err)
	}
}

func TestSnapshotResize(t *testing.T) {
	p := newImage(t, "", "64M", "write -P 1 60M 1M")
	a := readAs(t, p, "")
	snapCreate(t, p, "small")
	must(t, "qemu-img", "resize", "-q", p, "3G")
	qemuIO(t, p, "write -P 2 2G 1M")
	snapCreate(t, p, "big")
	snapApply(t, p, "small")
	assertClean(t, p)
	if got := readAs(t, p, ""); !bytes.Equal(got, a) {
		t.Fatalf("after apply: %d bytes, want %d", len(got), len(a))
	}
	snapApply(t, p, "big")
	assertClean(t, p)
	if v := infoField(t, p, "virtual size"); !strings.HasPrefix(v, "3 GiB") {
		t.Fatalf("virtual size %q", v)
	}
	qemuIO(t, p, "read -P 2 2G 1M", "read -P 1 60M 1M", "read -P 0 64M 1M")
}

func TestSnapshotErrors(t *testing.T) {
	p := newImage(t, "refcount_bits=1", "8M", "write 0 64k")
	st, h := openTestImage(t, p)
	_, err := createSnapshot(context.Background(), st, h, graph.SnapshotInfo{Name: "x"})
	if !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("refcount_bits=1: %v, want EINVAL", err)
	}
	assertClean(t, p)
	if err := applySnapshot(context.Background(), st, h, "", "nope"); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("apply of a missing snapshot: %v", err)
	}
	if _, err := deleteSnapshot(context.Background(), st, h, "", "nope"); !errors.Is(err, syscall.ENOENT) || err.Error() != "snapshot not found" {
		t.Fatalf("delete of a missing snapshot: %v", err)
	}
	dir := t.TempDir()
	df := filepath.Join(dir, "df.qcow2")
	must(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "d.raw"), df, "1M")
	st, h = openTestImage(t, df)
	if _, err := createSnapshot(context.Background(), st, h, graph.SnapshotInfo{Name: "x"}); !errors.Is(err, syscall.ENOTSUP) {
		t.Fatalf("data file: %v", err)
	}
}

// TestSnapshotRandom: random writes, snapshot creates, applies and
// deletes, against a model of each snapshot's contents; qemu-img check
// and qemu-img convert judge every step's result.
func TestSnapshotRandom(t *testing.T) {
	const size = 4 << 20
	seed := int64(1)
	rng := rand.New(rand.NewSource(seed))
	p := newImage(t, "cluster_size=4k", "4M")
	active := make([]byte, size)
	model := map[string][]byte{}
	var names []string
	n := 0
	for step := 0; step < 40; step++ {
		switch op := rng.Intn(10); {
		case op < 5:
			off := rng.Int63n(size/512) * 512
			length := min(int64(rng.Intn(64)+1)*512, size-off)
			pat := byte(rng.Intn(250) + 1)
			qemuIO(t, p, fmt.Sprintf("write -P %d %d %d", pat, off, length))
			for i := off; i < off+length; i++ {
				active[i] = pat
			}
		case op < 7:
			n++
			name := fmt.Sprintf("r%d", n)
			snapCreate(t, p, name)
			model[name] = append([]byte(nil), active...)
			names = append(names, name)
		case op < 8 && len(names) > 0:
			name := names[rng.Intn(len(names))]
			snapApply(t, p, name)
			copy(active, model[name])
		case len(names) > 0:
			i := rng.Intn(len(names))
			snapDelete(t, p, names[i])
			delete(model, names[i])
			names = append(names[:i], names[i+1:]...)
		}
	}
	assertClean(t, p)
	if !bytes.Equal(readAs(t, p, ""), active) {
		t.Fatal("active data differs from the model")
	}
	for _, name := range names {
		if !bytes.Equal(readAs(t, p, name), model[name]) {
			t.Fatalf("snapshot %s differs from the model", name)
		}
	}
}

// TestSnapshotCompressed: snapshots over compressed clusters (several
// sharing a host cluster) keep the data and the refcounts right.
func TestSnapshotCompressed(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "src.raw")
	must(t, "qemu-img", "create", "-q", "-f", "raw", raw, "8M")
	must(t, "qemu-io", "-f", "raw", "-c", "write -P 7 0 2M", "-c", "write -P 8 6M 64k", raw)
	p := filepath.Join(dir, "c.qcow2")
	must(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", raw, p)
	a := readAs(t, p, "")
	snapCreate(t, p, "s1")
	qemuIO(t, p, "write -P 1 0 64k", "write -P 2 1M 4k")
	assertClean(t, p)
	snapDelete(t, p, "s1")
	assertClean(t, p)
	snapCreate(t, p, "s2")
	must(t, "qemu-img", "snapshot", "-c", "theirs", p)
	snapApply(t, p, "s2")
	snapDelete(t, p, "theirs")
	assertClean(t, p)
	if got := readAs(t, p, ""); bytes.Equal(got, a) || got[0] != 1 || got[2<<20-1] != 7 {
		t.Fatal("wrong data after apply")
	}
}

// TestSnapshotApplyAtMaxRefcount: with refcount_bits=2, clusters that two
// snapshots and the active state share have refcount 3, the most the
// width holds. Applying one of the snapshots leaves their refcount at 3
// (the active state's reference is replaced, not added to), so it works,
// where qemu-img 7.2's snapshot -a counts the new references first and
// fails with "Failed to load snapshot: Invalid argument".
func TestSnapshotApplyAtMaxRefcount(t *testing.T) {
	p := newImage(t, "refcount_bits=2", "4M", "write -P 1 0 1M")
	snapCreate(t, p, "s1")
	qemuIO(t, p, "write -P 2 1M 64k")
	snapCreate(t, p, "s2")
	qemuIO(t, p, "write -P 3 2M 64k")
	want := qemuRaw(t, p)
	copy(want[2<<20:], make([]byte, 64<<10))
	copy(want[1<<20:], make([]byte, 64<<10))
	snapApply(t, p, "s1")
	assertClean(t, p)
	if got := qemuRaw(t, p); !bytes.Equal(got, want) {
		t.Fatalf("after apply: %s", firstDiff(got, want))
	}
}

// TestSnapshotFreedClustersNotVirgin: clusters an offline snapshot
// operation wrote and freed again (the snapshot's L1 table, the old
// snapshot table) hold old bytes; a partial write into a new cluster that
// reuses one must still copy the zeros around it.
func TestSnapshotFreedClustersNotVirgin(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	createImage(t, p, 4<<20, map[string]any{})
	g, n := openQcow2(t, p, false, nil)
	ss := n.Instance().(graph.Snapshotter)
	want := make([]byte, 4<<20)
	one := bytes.Repeat([]byte{1}, 64<<10)
	if err := n.WriteAt(ctx, one, 0, 0); err != nil {
		t.Fatal(err)
	}
	copy(want, one)
	for _, name := range []string{"a", "b"} {
		if _, err := ss.CreateSnapshot(ctx, graph.SnapshotInfo{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"a", "b"} {
		if _, err := ss.DeleteSnapshot(ctx, "", name); err != nil {
			t.Fatal(err)
		}
	}
	// Partial writes into unallocated clusters, which take the freed ones.
	for i := int64(1); i <= 6; i++ {
		off := i<<19 + 1024
		if err := n.WriteAt(ctx, []byte{9, 9}, off, 0); err != nil {
			t.Fatal(err)
		}
		want[off], want[off+1] = 9, 9
	}
	if got := readAll(t, n, 1<<20); !bytes.Equal(got, want) {
		t.Fatalf("reads back: %s", firstDiff(got, want))
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, p)
}

// TestResizeV2WithSnapshots: QEMU 7.2 refuses to resize a version 2 image
// that has snapshots (qemu-img resize, block_resize), even to its size.
func TestResizeV2WithSnapshots(t *testing.T) {
	p := newImage(t, "compat=0.10", "1M")
	must(t, "qemu-img", "snapshot", "-c", "s", p)
	_, n := openQcow2(t, p, false, nil)
	for _, size := range []int64{2 << 20, 512 << 10, 1 << 20} {
		err := n.Instance().(graph.Truncater).Truncate(context.Background(), size, false, "off")
		if err == nil || err.Error() != "Can't resize a v2 image which has snapshots" || !errors.Is(err, syscall.ENOTSUP) {
			t.Errorf("resize to %d: %v", size, err)
		}
	}
}
