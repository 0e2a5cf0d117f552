package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// TestInstanceTools drives check, snapshots and amend through an open
// node while the driver writes, then lets qemu-img judge the file.
func TestInstanceTools(t *testing.T) {
	ctx := context.Background()
	p := newImage(t, "", "8M", "write -P 1 0 1M")
	g, n := openQcow2(t, p, false, nil)
	inst := n.Instance()
	write := func(pat byte, off, length int64) {
		t.Helper()
		if err := n.WriteAt(ctx, bytes.Repeat([]byte{pat}, int(length)), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	write(2, 512<<10, 1<<20)
	want1 := readAll(t, n, 1<<20)
	s1, err := inst.(graph.Snapshotter).CreateSnapshot(ctx, graph.SnapshotInfo{Name: "one", ICount: -1})
	if err != nil || s1.ID != "1" {
		t.Fatalf("create: %+v %v", s1, err)
	}
	write(3, 0, 64<<10) // copy on write after the snapshot
	write(4, 7<<20, 1<<20)
	want2 := readAll(t, n, 1<<20)
	res, err := inst.(graph.Checker).Check(ctx, 0)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("check while open: %v %+v", err, res)
	}
	if err := inst.(graph.Snapshotter).ApplySnapshot(ctx, "", "one"); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, n, 1<<20); !bytes.Equal(got, want1) {
		t.Fatal("after apply: wrong data")
	}
	write(5, 2<<20, 8<<10)
	want3 := readAll(t, n, 1<<20)
	if err := inst.(graph.Amender).Amend(ctx, &AmendOptions{RefcountBits: ptr(int64(8)), Size: ptr(qapi.Size(16 << 20))}, false); err != nil {
		t.Fatal(err)
	}
	if err := n.RefreshSize(); err != nil || n.SizeNow() != 16<<20 {
		t.Fatalf("size after amend: %d %v", n.SizeNow(), err)
	}
	write(6, 12<<20, 64<<10)
	list, err := inst.(graph.Snapshotter).Snapshots(ctx)
	if err != nil || len(list) != 1 || list[0].Name != "one" {
		t.Fatalf("list: %+v %v", list, err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	assertClean(t, p)
	if infoField(t, p, "refcount bits") != "8" {
		t.Fatal("refcount bits not amended")
	}
	got := readAs(t, p, "")
	if !bytes.Equal(got[:8<<20], want3) || got[12<<20] != 6 {
		t.Fatal("final data differs")
	}
	_ = want2
}

// TestInstanceRepair: Check with fix through the node repairs what
// qemu-img check -r all repairs.
func TestInstanceRepair(t *testing.T) {
	ctx := context.Background()
	p := newImage(t, "", "64M", "write -P 1 0 1M", "write -P 2 10M 64k")
	setStoredRefcount(t, p, 5, 0)
	setStoredRefcount(t, p, 7, 3)
	_, n := openQcow2(t, p, false, nil)
	c := n.Instance().(graph.Checker)
	res, err := c.Check(ctx, 0)
	if err != nil || res.Corruptions != 3 || res.Leaks != 1 {
		t.Fatalf("check: %v %+v", err, res)
	}
	res, err = c.Check(ctx, graph.CheckFixLeaks|graph.CheckFixErrors)
	if err != nil || res.CorruptionsFixed != 1 || res.LeaksFixed != 1 {
		t.Fatalf("repair: %v %+v\n%s", err, res, strings.Join(res.Messages, "\n"))
	}
	if err := n.WriteAt(ctx, bytes.Repeat([]byte{9}, 64<<10), 20<<20, 0); err != nil {
		t.Fatal(err)
	}
	res, err = c.Check(ctx, 0)
	if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
		t.Fatalf("check after repair: %v %+v", err, res)
	}
}

// TestDirtyRepairOnOpen: a lazy-refcounts image left dirty is repaired
// when opened for writing.
func TestDirtyRepairOnOpen(t *testing.T) {
	p := newImage(t, "lazy_refcounts=on", "10M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", "-c", "abort", p)
	if q := runQemuCheck(t, p); q.Corruptions == 0 {
		t.Fatalf("the image should be dirty: %+v", q)
	}
	g, n := openQcow2(t, p, false, nil)
	if err := n.WriteAt(context.Background(), bytes.Repeat([]byte{4}, 4096), 2<<20, 0); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	assertClean(t, p)
	got := readAs(t, p, "")
	if got[0] != 3 || got[1<<20-1] != 3 || got[2<<20] != 4 {
		t.Fatal("data lost")
	}
}

func TestMeasureDriver(t *testing.T) {
	d := graph.Lookup("qcow2")
	o := d.NewCreateOptions().(*CreateOptions)
	o.ClusterSize = 4096
	o.RefcountBits = 64
	got, err := measureImage(context.Background(), o, 1<<30, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := qemuMeasure(t, "-o", "cluster_size=4k,refcount_bits=64", "--size", "1G")
	if got != want {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	// Refusals in qemu-img measure's words.
	for _, c := range []struct {
		opts string
		set  func(*CreateOptions)
	}{
		{"cluster_size=1000", func(o *CreateOptions) { o.ClusterSize = 1000 }},
		{"refcount_bits=3", func(o *CreateOptions) { o.RefcountBits = 3 }},
		{"compat=0.10,refcount_bits=8", func(o *CreateOptions) { o.Version = "v2"; o.RefcountBits = 8 }},
		{"extended_l2=on,cluster_size=4k", func(o *CreateOptions) { o.ExtendedL2 = true; o.ClusterSize = 4096 }},
	} {
		o := d.NewCreateOptions().(*CreateOptions)
		c.set(o)
		_, err := measureImage(context.Background(), o, 1<<30, nil)
		_, errs, code := run(t, "qemu-img", "measure", "-O", "qcow2", "-o", c.opts, "--size", "1G")
		want := strings.TrimSpace(strings.TrimPrefix(errs, "qemu-img: "))
		if code == 0 || err == nil || err.Error() != want {
			t.Errorf("%s: got %v, want %q", c.opts, err, want)
		}
	}
	// A qcow2 source with persistent bitmaps.
	p := newImage(t, "", "1G", "write -P 1 0 3M", "write -z 5M 64k", "write 100M 64k")
	must(t, "qemu-img", "bitmap", "--add", p, "b0")
	must(t, "qemu-img", "bitmap", "--add", "-g", "512", p, "longername1")
	_, n := openQcow2(t, p, true, nil)
	for _, cs := range []int64{4096, 65536} {
		o := d.NewCreateOptions().(*CreateOptions)
		o.ClusterSize = qapi.Size(cs)
		got, err := measureImage(context.Background(), o, 0, n)
		if err != nil {
			t.Fatal(err)
		}
		want := qemuMeasure(t, "-o", fmt.Sprintf("cluster_size=%d", cs), p)
		if got != want {
			t.Errorf("cluster size %d: got %+v, want %+v", cs, got, want)
		}
	}
	// An overlay: the chain's data counts, the overlay's bitmaps only.
	ov := filepath.Join(t.TempDir(), "ov.qcow2")
	must(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", p, "-F", "qcow2", ov)
	qemuIO(t, ov, "write -P 5 200M 1M", "write -z 0 64k")
	_, on := openQcow2(t, ov, true, nil)
	got, err = measureImage(context.Background(), d.NewCreateOptions(), 0, on)
	if err != nil {
		t.Fatal(err)
	}
	if want := qemuMeasure(t, ov); got != want {
		t.Errorf("overlay: got %+v, want %+v", got, want)
	}
}

// TestInstanceRepairCorrupt: an image the driver marked corrupt is
// repaired through Check and becomes writable again.
func TestInstanceRepairCorrupt(t *testing.T) {
	ctx := context.Background()
	p := newImage(t, "", "16M", "write -P 1 0 64k")
	_, n := openQcow2(t, p, false, nil)
	img := n.Instance().(*image)
	img.meta.Lock()
	img.corruptfLocked(ctx, "test")
	img.meta.Unlock()
	if err := n.WriteAt(ctx, []byte{1}, 1<<20, 0); err == nil {
		t.Fatal("write to a corrupt image succeeded")
	}
	if _, err := img.CreateSnapshot(ctx, graph.SnapshotInfo{Name: "x"}); err == nil {
		t.Fatal("snapshot of a corrupt image succeeded")
	}
	if _, err := img.Check(ctx, graph.CheckFixLeaks|graph.CheckFixErrors); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte{1}, 1<<20, 0); err != nil {
		t.Fatalf("write after repair: %v", err)
	}
}

// TestInstanceSnapshotsUnderLoad: snapshots are created and deleted
// while writers run; every write lands, and qemu-img check is clean.
func TestInstanceSnapshotsUnderLoad(t *testing.T) {
	ctx := context.Background()
	p := newImage(t, "cluster_size=4k", "8M")
	g, n := openQcow2(t, p, false, nil)
	s := n.Instance().(graph.Snapshotter)
	const writers, region = 4, 2 << 20
	last := make([]byte, writers)
	done := make(chan error, writers)
	stop := make(chan struct{})
	for w := 0; w < writers; w++ {
		go func(w int) {
			for i := 1; ; i++ {
				select {
				case <-stop:
					done <- nil
					return
				default:
				}
				pat := byte(i%250 + 1)
				off := int64(w)*region + int64(i%8)*64<<10
				if err := n.WriteAt(ctx, bytes.Repeat([]byte{pat}, 64<<10), off, 0); err != nil {
					done <- err
					return
				}
				if i%8 == 7 {
					last[w] = pat // the whole region now ends in this round
				}
			}
		}(w)
	}
	for i := 0; i < 10; i++ {
		if _, err := s.CreateSnapshot(ctx, graph.SnapshotInfo{Name: fmt.Sprint("l", i)}); err != nil {
			t.Fatal(err)
		}
		if i%3 == 2 {
			if _, err := s.DeleteSnapshot(ctx, "", fmt.Sprint("l", i-1)); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	for w := 0; w < writers; w++ {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	assertClean(t, p)
	if got := len(snapshotNames(t, p)); got != 7 {
		t.Fatalf("%d snapshots, want 7", got)
	}
	data := readAs(t, p, "")
	for w := 0; w < writers; w++ {
		if last[w] != 0 && data[int64(w)*region+7*64<<10] != last[w] {
			t.Fatalf("writer %d: last write lost", w)
		}
	}
}
