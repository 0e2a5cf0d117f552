package tests

// The model test: random sequences of writes, write-zeroes, discards,
// flushes, concurrent writes into the same clusters and (when the node
// implements graph.Snapshotter) internal snapshot create/apply/delete,
// run in-process through the graph and checked after every step against
// a flat in-memory model; at the end qemu-img check must be clean and
// qemu-img must read the model's bytes (and each remaining snapshot's).

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"blockbackend/graph"
)

// modelConfig is one seed's image: its creation options and whether it
// has a backing file.
type modelConfig struct {
	fmt     string
	size    int64
	cluster int64
	create  map[string]any // qcow2 create options (besides file, size, backing)
	backing bool
	// qemuImg: the image is made by qemu-img create with the same
	// options instead of the driver's Create (QEMU's images mutated by
	// blockbackend).
	qemuImg bool
	steps   int
}

func (c modelConfig) String() string {
	var o []string
	for k, v := range c.create {
		o = append(o, fmt.Sprintf("%s=%v", k, v))
	}
	slices.Sort(o)
	return fmt.Sprintf("%s size=%d cluster=%d backing=%v by-qemu-img=%v %s", c.fmt, c.size, c.cluster, c.backing, c.qemuImg, strings.Join(o, ","))
}

// modelConfigFor derives a configuration from a seed, so that a failing
// seed names everything needed to replay it.
func modelConfigFor(seed uint64) modelConfig {
	r := rand.New(rand.NewPCG(seed, 0xc0f))
	c := modelConfig{fmt: "qcow2", size: 2*mib + int64(r.IntN(4))*512, create: map[string]any{}, steps: 150}
	c.cluster = []int64{512, 4096, 65536, 65536, 2 * mib}[r.IntN(5)]
	c.create["cluster-size"] = c.cluster
	switch r.IntN(4) {
	case 0:
		c.create["version"] = "v2"
	case 1:
		if c.cluster >= 16384 {
			c.create["extended-l2"] = true
		}
	case 2:
		c.create["refcount-bits"] = []int{2, 4, 8, 32, 64}[r.IntN(5)]
	case 3:
		c.create["lazy-refcounts"] = true
	}
	c.backing = seed%3 == 0
	c.qemuImg = seed%2 == 0
	return c
}

// TestIntegrationQcow2Model runs the model test on qcow2 images of several
// configurations (one per seed; every third with a backing file).
func TestIntegrationQcow2Model(t *testing.T) {
	needQemuTools(t, "qemu-img", "qemu-io")
	needDriver(t, "qcow2")
	for seed := uint64(1); seed <= 12; seed++ {
		c := modelConfigFor(seed)
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			t.Logf("%v", c)
			runModel(t, c, seed)
		})
	}
}

// TestIntegrationQcow2ModelRawControl runs the same sequences on raw images: the
// control that the model and the checks are right (and a test of the raw
// and file drivers' zeroes and discards).
func TestIntegrationQcow2ModelRawControl(t *testing.T) {
	needQemuTools(t, "qemu-img")
	for seed := uint64(1); seed <= 3; seed++ {
		c := modelConfig{fmt: "raw", size: 2*mib + 1024, cluster: 4096, steps: 150}
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { runModel(t, c, seed) })
	}
}

// modelRun is the state of one model test.
type modelRun struct {
	t       *testing.T
	ctx     context.Context
	c       modelConfig
	img     string
	g       *graph.Graph
	n       *graph.Node
	ss      graph.Snapshotter // nil when the node has no internal snapshots
	m       *model
	backing []byte
	snaps   map[string]*model
	nsnap   int
	log     []string
}

func (mr *modelRun) fatalf(format string, a ...any) {
	mr.t.Helper()
	last := mr.log[max(0, len(mr.log)-12):]
	mr.t.Fatalf("%s\nlast steps:\n  %s", fmt.Sprintf(format, a...), strings.Join(last, "\n  "))
}

// size is the image's current size (the model's).
func (mr *modelRun) size() int64 { return int64(len(mr.m.data)) }

// verify compares [off, off+n) read through blockbackend with the model.
func (mr *modelRun) verify(off, n int64) {
	mr.t.Helper()
	off = max(off, 0)
	n = min(n, mr.size()-off)
	if n <= 0 {
		return
	}
	got := make([]byte, n)
	if err := mr.n.ReadAt(mr.ctx, got, off); err != nil {
		mr.fatalf("read %d+%d: %v", off, n, err)
	}
	if d := firstDiff(got, mr.m.data[off:off+n]); d != "" {
		mr.fatalf("read %d+%d differs from the model %s", off, n, d)
	}
}

func runModel(t *testing.T, c modelConfig, seed uint64) {
	ctx := context.Background()
	dir := t.TempDir()
	img := filepath.Join(dir, "img."+c.fmt)
	mr := &modelRun{t: t, ctx: ctx, c: c, m: newModel(c.size), snaps: map[string]*model{}}
	r := rand.New(rand.NewPCG(seed, 0x30de1))

	switch c.fmt {
	case "raw":
		g := graph.New(nil)
		if err := bbCreateWith(ctx, g, "file", map[string]any{"filename": img, "size": c.size}); err != nil {
			t.Fatal(err)
		}
		bbClose(t, g)
	default:
		opts := map[string]any{"size": c.size}
		for k, v := range c.create {
			opts[k] = v
		}
		if c.backing {
			base := filepath.Join(dir, "base.qcow2")
			// A backing file a little shorter than the image: reads
			// past its end are zeros.
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", base, fmt.Sprint(c.size-mib/2))
			args := []string{"-f", "qcow2"}
			for _, o := range scatter(seed, c.size-mib/2, 30, "wwz", 512, 128<<10, 65536) {
				args = append(args, "-c", o.command())
			}
			qemu(t, "qemu-io", append(args, base)...)
			mr.backing = qemuRaw(t, base, "qcow2", "")
			copy(mr.m.data, mr.backing)
			opts["backing-file"] = "base.qcow2"
			opts["backing-fmt"] = "qcow2"
		}
		if c.qemuImg {
			qemu(t, "qemu-img", append(qemuImgCreateArgs(opts), img, fmt.Sprint(c.size))...)
		} else {
			bbCreate(t, img, c.fmt, opts, nil)
		}
	}

	mr.img = img
	mr.open()
	if c.fmt == "qcow2" && mr.ss == nil {
		t.Logf("the qcow2 node does not implement graph.Snapshotter: no snapshot steps")
	}
	mr.verify(0, mr.size())

	for step := 0; step < c.steps; step++ {
		mr.step(r)
		if step%25 == 24 {
			mr.verify(0, mr.size())
		}
	}
	mr.verify(0, mr.size())
	final := mr.m.clone()
	bbClose(t, mr.g)

	if c.fmt != "raw" {
		requireCleanCheck(t, img, c.fmt)
	}
	if got := qemuRaw(t, img, c.fmt, ""); firstDiff(got, final.data) != "" {
		mr.fatalf("after close, qemu-img reads differently from the model: %s", firstDiff(got, final.data))
	}
	// Each snapshot as qemu-img applies it, on a copy. (qemu-img 7.2's
	// convert -l snapshot.name=X reads the snapshot's tables with the
	// active state's virtual size, not the snapshot's own, so after a
	// resize it cannot show a snapshot's size; snapshot -a restores it.
	// The other snapshots are deleted first: at refcount_bits=2 clusters
	// shared by two snapshots and the active state are at the maximum,
	// and qemu-img snapshot -a then fails with EINVAL.)
	for name, sm := range mr.snaps {
		cp := filepath.Join(dir, "apply-"+name+".qcow2")
		copyFile(t, img, cp)
		for other := range mr.snaps {
			if other != name {
				qemu(t, "qemu-img", "snapshot", "-d", other, cp)
			}
		}
		qemu(t, "qemu-img", "snapshot", "-a", name, cp)
		requireCleanCheck(t, cp, c.fmt)
		if got := qemuRaw(t, cp, c.fmt, ""); firstDiff(got, sm.data) != "" {
			mr.fatalf("snapshot %s as qemu-img applies it differs from the model: %s", name, firstDiff(got, sm.data))
		}
	}
	if c.fmt == "qcow2" {
		out := qemu(t, "qemu-img", "snapshot", "-l", img)
		for name := range mr.snaps {
			if !strings.Contains(out, " "+name+" ") {
				t.Errorf("qemu-img snapshot -l does not list %s:\n%s", name, out)
			}
		}
	}
	// Reopened, it reads the same.
	g, n := bbOpen(t, img, c.fmt, true, nil)
	if d := firstDiff(bbReadAll(t, n, mib), final.data); d != "" {
		t.Fatalf("reopened, blockbackend reads: %s", d)
	}
	bbClose(t, g)
	if c.fmt != "raw" {
		raw := filepath.Join(dir, "final.raw")
		if err := os.WriteFile(raw, final.data, 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := cmdOut("qemu-img", "compare", "-f", c.fmt, "-F", "raw", img, raw); err != nil {
			t.Fatalf("qemu-img compare with the model: %v\n%s", err, out)
		}
	}
}

// qemuImgCreateArgs turns qcow2 create options (QAPI names) into
// qemu-img create's arguments (before the filename and size).
func qemuImgCreateArgs(opts map[string]any) []string {
	var o []string
	var args []string
	for k, v := range opts {
		switch k {
		case "size":
		case "version":
			o = append(o, "compat="+map[any]string{"v2": "0.10", "v3": "1.1"}[v])
		case "backing-file":
			args = append(args, "-b", v.(string))
		case "backing-fmt":
			args = append(args, "-F", v.(string))
		default:
			s := fmt.Sprint(v)
			if b, ok := v.(bool); ok {
				s = map[bool]string{false: "off", true: "on"}[b]
			}
			o = append(o, strings.ReplaceAll(k, "-", "_")+"="+s)
		}
	}
	slices.Sort(o)
	args = append([]string{"create", "-q", "-f", "qcow2"}, args...)
	if len(o) > 0 {
		args = append(args, "-o", strings.Join(o, ","))
	}
	return args
}

// maxSnaps is how many snapshots may exist at once: at most 4, and
// fewer when the refcount width could not count the references (each
// snapshot adds one to every cluster it shares; refcount_bits=1 allows
// none, 2 allows 2).
func (mr *modelRun) maxSnaps() int {
	bits, ok := mr.c.create["refcount-bits"].(int)
	if !ok || bits >= 8 {
		return 4
	}
	return min(4, 1<<bits-2)
}

// open opens the image writable, with discards passed down.
func (mr *modelRun) open() {
	mr.t.Helper()
	mr.g, mr.n = bbOpen(mr.t, mr.img, mr.c.fmt, false, map[string]any{"discard": "unmap"})
	mr.ss, _ = mr.n.Instance().(graph.Snapshotter)
}

// reopen closes the image, has qemu-img check it, and opens it again:
// what the driver kept in its caches must have reached the file.
func (mr *modelRun) reopen() {
	mr.t.Helper()
	mr.log = append(mr.log, "close, qemu-img check, reopen")
	bbClose(mr.t, mr.g)
	if mr.c.fmt != "raw" {
		if r, out := qemuCheck(mr.t, mr.img, mr.c.fmt); r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
			mr.fatalf("closed mid-sequence, qemu-img check finds %d corruptions, %d leaks, %d check errors:\n%s",
				r.Corruptions, r.Leaks, r.CheckErrors, out)
		}
	}
	mr.open()
	mr.verify(0, mr.size())
}

// step does one random operation and checks its range (and a random
// window elsewhere) against the model.
func (mr *modelRun) step(r *rand.Rand) {
	mr.t.Helper()
	c := mr.c
	ss := mr.ss
	// Lengths up to three clusters (at most 256 KiB), offsets aligned to
	// 512 mostly, sometimes byte-granular.
	align := int64(512)
	if r.IntN(5) == 0 {
		align = 1
	}
	maxLen := min(3*c.cluster, 256<<10)
	length := (1 + r.Int64N(maxLen/align)) * align
	off := r.Int64N((mr.size()-length)/align+1) * align
	// Snapshot steps only once in a while, and never more than 4 at once.
	kind := "write"
	switch x := r.IntN(100); {
	case x < 40:
		kind = "write"
	case x < 52:
		kind = "zero"
	case x < 60:
		kind = "zero-unmap"
	case x < 72:
		kind = "discard"
	case x < 78:
		kind = "flush"
	case x < 80:
		kind = "reopen"
	case x < 82:
		kind = "resize"
	case x < 90:
		kind = "parallel"
	case ss != nil && x < 94 && len(mr.snaps) < mr.maxSnaps():
		kind = "snapshot-create"
	case ss != nil && x < 97 && len(mr.snaps) > 0:
		kind = "snapshot-apply"
	case ss != nil && len(mr.snaps) > 0:
		kind = "snapshot-delete"
	}
	var op ioOp
	switch kind {
	case "write":
		op = ioOp{kind: 'w', off: off, n: length, pat: byte(1 + r.IntN(255))}
	case "zero":
		op = ioOp{kind: 'z', off: off, n: length}
	case "zero-unmap":
		op = ioOp{kind: 'u', off: off, n: length}
	case "discard":
		op = ioOp{kind: 'd', off: off, n: length}
	}
	switch kind {
	case "write", "zero", "zero-unmap", "discard":
		mr.log = append(mr.log, op.command())
		bbApply(mr.t, mr.n, []ioOp{op}, mr.m, mr.backing)
		mr.verify(off-c.cluster, length+2*c.cluster)
	case "flush":
		mr.log = append(mr.log, "flush")
		if err := mr.n.Flush(mr.ctx); err != nil {
			mr.fatalf("flush: %v", err)
		}
	case "reopen":
		mr.reopen()
	case "resize":
		// Between 1 and 3 MiB. QEMU's truncate makes a grown area read
		// as zeros even where a longer backing file has data (it
		// writes zeroes there), and an internal snapshot keeps its own
		// size: resizing with snapshots is allowed in qcow2 v3 only.
		newSize := mib + r.Int64N(2*mib/512+1)*512
		mr.log = append(mr.log, fmt.Sprintf("resize %d -> %d", mr.size(), newSize))
		if c.fmt == "qcow2" && c.create["version"] == "v2" && len(mr.snaps) > 0 {
			// Not in version 2 (qemu-img 7.2 refuses the same way).
			const want = "Can't resize a v2 image which has snapshots"
			if err := mr.g.Resize(mr.ctx, mr.n, newSize); err == nil || !strings.HasSuffix(err.Error(), want) {
				mr.fatalf("resize of a v2 image with snapshots: %v, want %q", err, want)
			}
			return
		}
		if err := mr.g.Resize(mr.ctx, mr.n, newSize); err != nil {
			mr.fatalf("resize to %d: %v", newSize, err)
		}
		mr.m = mr.m.resized(newSize)
		if got := mr.n.SizeNow(); got != newSize {
			mr.fatalf("after resize to %d the node's size is %d", newSize, got)
		}
		mr.verify(0, newSize)
		return
	case "parallel":
		mr.parallel(r)
	case "snapshot-create":
		mr.nsnap++
		name := fmt.Sprintf("snap%d", mr.nsnap)
		mr.log = append(mr.log, "snapshot create "+name)
		info, err := ss.CreateSnapshot(mr.ctx, graph.SnapshotInfo{Name: name})
		if err != nil {
			mr.fatalf("CreateSnapshot %s: %v", name, err)
		}
		if info.Name != name || info.ID == "" {
			mr.fatalf("CreateSnapshot %s returned %+v", name, info)
		}
		mr.snaps[name] = mr.m.clone()
	case "snapshot-apply", "snapshot-delete":
		names := make([]string, 0, len(mr.snaps))
		for n := range mr.snaps {
			names = append(names, n)
		}
		slices.Sort(names)
		name := names[r.IntN(len(names))]
		mr.log = append(mr.log, kind+" "+name)
		if kind == "snapshot-apply" {
			if err := ss.ApplySnapshot(mr.ctx, "", name); err != nil {
				mr.fatalf("ApplySnapshot %s: %v", name, err)
			}
			mr.m = mr.snaps[name].clone()
			// Applying a snapshot restores its size (the caller, like
			// QEMU's block layer, then refreshes the node's).
			if err := mr.n.RefreshSize(); err != nil {
				mr.fatalf("refresh size after applying %s: %v", name, err)
			}
			if got := mr.n.SizeNow(); got != mr.size() {
				mr.fatalf("after applying snapshot %s the size is %d, want the snapshot's %d", name, got, mr.size())
			}
			mr.verify(0, mr.size())
		} else {
			if _, err := ss.DeleteSnapshot(mr.ctx, "", name); err != nil {
				mr.fatalf("DeleteSnapshot %s: %v", name, err)
			}
			delete(mr.snaps, name)
		}
		list, err := ss.Snapshots(mr.ctx)
		if err != nil {
			mr.fatalf("Snapshots: %v", err)
		}
		if len(list) != len(mr.snaps) {
			mr.fatalf("Snapshots lists %d, want %d", len(list), len(mr.snaps))
		}
	}
	// A random window elsewhere: nothing else changed.
	w := r.Int64N(mr.size())
	mr.verify(w, 64<<10)
}

// parallel writes disjoint pieces of the same few clusters from several
// goroutines at once: requests that allocate the same cluster (or L2
// table, or refcount block) concurrently must not lose each other's data.
func (mr *modelRun) parallel(r *rand.Rand) {
	mr.t.Helper()
	c := mr.c
	span := min(4*c.cluster, mr.size())
	base := r.Int64N((mr.size()-span)/512+1) * 512
	const k = 8
	piece := max(span/k/512*512, 512)
	type w struct {
		off int64
		p   []byte
	}
	var ws []w
	for i := int64(0); i < k && (i+1)*piece <= span; i++ {
		p := make([]byte, piece)
		for j := range p {
			p[j] = byte(r.Uint32())
		}
		ws = append(ws, w{base + i*piece, p})
	}
	mr.log = append(mr.log, fmt.Sprintf("parallel %d writes of %d at %d", len(ws), piece, base))
	var wg sync.WaitGroup
	errs := make([]error, len(ws))
	for i, x := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = mr.n.WriteAt(mr.ctx, x.p, x.off, 0)
		}()
	}
	wg.Wait()
	for i, x := range ws {
		if errs[i] != nil {
			mr.fatalf("parallel write %d+%d: %v", x.off, len(x.p), errs[i])
		}
		mr.m.set(x.off, x.p)
	}
	mr.verify(base-c.cluster, span+2*c.cluster)
}
