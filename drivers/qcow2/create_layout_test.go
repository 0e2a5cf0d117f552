package qcow2

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// TestCreateLayoutLikeQemuImg: our create writes the bytes qemu-img
// writes, the file ending right after the L1 table (mid-cluster); then
// writes made by our driver on ours and on a copy of qemu-img's image put
// their L2 table and data on cluster boundaries past that short end, and
// read back as the same writes made by qemu-io on qemu-img's image. (Which
// of the L2 table and the data cluster comes first differs from QEMU's
// order for guest writes, so the files are not compared after writes.)
func TestCreateLayoutLikeQemuImg(t *testing.T) {
	for _, c := range []struct {
		opts string
		cs   int64
		m    map[string]any
		size int64 // not a multiple of 8 L2 tables' span, for a short last cluster
	}{
		{"", 65536, map[string]any{}, 64 << 20},
		{"cluster_size=4096", 4096, map[string]any{"cluster-size": 4096}, 64 << 20},
		{"cluster_size=512,refcount_bits=1", 512, map[string]any{"cluster-size": 512, "refcount-bits": 1}, 64<<20 + 32<<10},
		{"cluster_size=1024,refcount_bits=64", 1024, map[string]any{"cluster-size": 1024, "refcount-bits": 64}, 64<<20 + 128<<10},
		{"cluster_size=2M,extended_l2=on", 2 << 20, map[string]any{"cluster-size": 2 << 20, "extended-l2": true}, 64 << 20},
	} {
		t.Run(c.opts, func(t *testing.T) {
			dir := t.TempDir()
			q := makeQemuImage(t, dir, "q.qcow2", c.opts, itoa(c.size))
			fi, err := os.Stat(q)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size()%c.cs == 0 {
				t.Fatalf("qemu-img's image ends at %d, a cluster boundary: the test wants a short last cluster", fi.Size())
			}
			o := filepath.Join(dir, "o.qcow2")
			createImage(t, o, c.size, c.m)
			if qb, ob := mustRead(t, q), mustRead(t, o); !bytes.Equal(qb, ob) {
				t.Fatalf("created: qemu-img's %d bytes, ours %d: %s", len(qb), len(ob), firstDiff(ob, qb))
			}
			// A copy of qemu-img's image for our driver to write.
			oq := filepath.Join(dir, "oq.qcow2")
			if err := os.WriteFile(oq, mustRead(t, q), 0o644); err != nil {
				t.Fatal(err)
			}
			writes := []struct {
				off, n int64
				pat    byte
			}{{0, 4096, 1}, {1 << 20, 3 * c.cs, 2}, {60 << 20, 512, 3}, {c.cs, 512, 4}}
			var cmds []string
			for _, w := range writes {
				cmds = append(cmds, "write -P "+itoa(int64(w.pat))+" "+itoa(w.off)+" "+itoa(w.n))
			}
			qemu(t, "qemu-io", append([]string{"-f", "qcow2", "-c", cmds[0], "-c", cmds[1], "-c", cmds[2], "-c", cmds[3]}, q)...)
			for _, p := range []string{o, oq} {
				g, n := openQcow2(t, p, false, nil)
				for _, w := range writes {
					if err := n.WriteAt(context.Background(), bytes.Repeat([]byte{w.pat}, int(w.n)), w.off, 0); err != nil {
						t.Fatalf("%s: write %d+%d: %v", p, w.off, w.n, err)
					}
				}
				if err := g.Close(); err != nil {
					t.Fatal(err)
				}
				qemuCheck(t, p)
				// Every cluster allocated by the writes lies past the
				// created file's end, rounded up to a cluster.
				first := (fi.Size() + c.cs - 1) / c.cs * c.cs
				var hosts []int64
				for _, w := range writes {
					e := peek64(t, p, l2EntryOffset(t, p, w.off)) & OffsetMask
					l2 := peek64(t, p, int64(peek64(t, p, 40))) & OffsetMask // L1[0]
					hosts = append(hosts, int64(e), int64(l2))
				}
				if m := slices.Min(hosts); m != first {
					t.Errorf("%s: first cluster allocated at %#x, want %#x", filepath.Base(p), m, first)
				}
				for _, h := range hosts {
					if h%c.cs != 0 {
						t.Errorf("%s: cluster allocated at %#x, not on a cluster boundary", filepath.Base(p), h)
					}
				}
				if qb, ob := qemuRaw(t, q), qemuRaw(t, p); !bytes.Equal(qb, ob) {
					t.Errorf("%s after the writes: %s", filepath.Base(p), firstDiff(ob, qb))
				}
			}
		})
	}
}

// TestRefcountBlockAfterRun: a write that takes the first cluster of a
// range without a refcount block puts the new block right after the
// clusters it takes, as QEMU does: one cluster at a time through a range
// boundary (512-byte clusters: a block per 256 clusters), qemu-io and our
// driver put the second block in the same cluster. (Whether a new L2
// table comes before or after the data cluster of the same write differs,
// so the files are not compared whole.)
func TestRefcountBlockAfterRun(t *testing.T) {
	dir := t.TempDir()
	q := makeQemuImage(t, dir, "q.qcow2", "cluster_size=512", "1M")
	o := filepath.Join(dir, "o.qcow2")
	if err := os.WriteFile(o, mustRead(t, q), 0o644); err != nil {
		t.Fatal(err)
	}
	const n = 300
	args := []string{"-f", "qcow2"}
	for i := range n {
		args = append(args, "-c", "write -P "+itoa(int64(i%250+1))+" "+itoa(int64(i)*512)+" 512")
	}
	qemu(t, "qemu-io", append(args, q)...)
	g, node := openQcow2(t, o, false, nil)
	for i := range n {
		if err := node.WriteAt(context.Background(), bytes.Repeat([]byte{byte(i%250 + 1)}, 512), int64(i)*512, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, o)
	rt := int64(peek64(t, q, 48))
	if rt != int64(peek64(t, o, 48)) {
		t.Fatalf("refcount tables at %#x (qemu-io) and %#x (ours)", rt, peek64(t, o, 48))
	}
	qb, ob := peek64(t, q, rt+8), peek64(t, o, rt+8)
	if qb == 0 || qb != ob {
		t.Errorf("second refcount block at %#x (qemu-io), %#x (ours)", qb, ob)
	}
	if qs, os := mustRead(t, q), mustRead(t, o); len(qs) != len(os) {
		t.Errorf("qemu-io's file is %d bytes, ours %d", len(qs), len(os))
	}
	if qr, or := qemuRaw(t, q), qemuRaw(t, o); !bytes.Equal(qr, or) {
		t.Errorf("contents: %s", firstDiff(or, qr))
	}
}

// TestCreateJobHoldsNamedFile: the file node a blockdev-create names is
// held from the moment the command returns (PrepareCreateJob), not only
// once the job's goroutine reaches OpenRef, so blockdev-del in between
// answers QEMU's "in use" and cannot pull the node from under the job.
func TestCreateJobHoldsNamedFile(t *testing.T) {
	ctx := context.Background()
	g := graph.New(nil)
	defer g.Close()
	path := filepath.Join(t.TempDir(), "h.qcow2")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Add(ctx, map[string]any{"driver": "file", "filename": path, "node-name": "hf"}, qapi.JSON); err != nil {
		t.Fatal(err)
	}
	run, release, err := g.PrepareCreateJob(map[string]any{"driver": "qcow2", "file": "hf", "size": 1 << 20}, qapi.JSON, "options")
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Delete(ctx, "hf"); err == nil || err.Error() != "Block device hf is in use" {
		t.Fatalf("blockdev-del before the job ran: %v, want \"Block device hf is in use\"", err)
	}
	if err := run(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Delete(ctx, "hf"); err == nil {
		t.Fatal("blockdev-del after the job but before release succeeded")
	}
	release()
	if err := g.Delete(ctx, "hf"); err != nil {
		t.Fatalf("blockdev-del after release: %v", err)
	}
}
