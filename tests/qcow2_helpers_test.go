package tests

// Helpers for the qcow2 tests (interop matrix, model test, crash test):
// building images with qemu-img and qemu-io while the test keeps its own
// model of their contents, QEMU's view of an image (qemu-img convert -O raw,
// check, compare), and blockbackend's view in-process through the graph.
//
// Nothing here names the qcow2 driver package: the driver is registered by
// the blank import in qcow2_driver_test.go, and the tests that need it ask
// the registry (needDriver), so that the harness builds and its raw-format
// controls run on their own.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	_ "blockbackend/drivers/file"
	_ "blockbackend/drivers/raw"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// needDriver fails the test when a driver is not registered in this test
// binary (the qcow2 driver comes from the blank import in
// qcow2_driver_test.go).
func needDriver(t *testing.T, name string) *graph.Driver {
	t.Helper()
	d := graph.Lookup(name)
	if d == nil {
		t.Fatalf("driver %q is not registered in the test binary (have %v)", name, graph.Drivers())
	}
	return d
}

// needQemuTools fails (not skips) when a QEMU tool is missing: the qcow2
// acceptance tests are meaningless without the real peer.
func needQemuTools(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Fatalf("%s is not installed (apt-get install qemu-utils); the qcow2 interop tests need it", n)
		}
	}
}

// qemu runs a QEMU tool and fails the test on a non-zero exit or on
// qemu-io's in-band error lines (qemu-io exits 0 after a failed command).
func qemu(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := cmdOut(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	if name == "qemu-io" {
		// qemu-io prints one "wrote"/"discard" line and one statistics
		// line per command: show the failing ones with the command that
		// preceded them.
		var bad []string
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "failed") || strings.Contains(l, "error") || strings.Contains(l, "Pattern verification") {
				bad = append(bad, l)
			}
		}
		if len(bad) > 0 {
			t.Fatalf("%s %s:\n%s", name, strings.Join(args, " "), strings.Join(bad, "\n"))
		}
	}
	return out
}

// ---------------------------------------------------------------- model

// model is what the test expects an image to read as. Bytes marked
// unsure are not predicted (a discard may leave the old data, zeros or
// the backing file's data there); comparisons against QEMU skip them,
// comparisons between QEMU and blockbackend never do.
type model struct {
	data   []byte
	unsure []bool
}

func newModel(size int64) *model {
	return &model{data: make([]byte, size), unsure: make([]bool, size)}
}

func (m *model) clone() *model {
	return &model{data: bytes.Clone(m.data), unsure: append([]bool(nil), m.unsure...)}
}

// resized is m cut or zero-extended to size.
func (m *model) resized(size int64) *model {
	n := newModel(size)
	copy(n.data, m.data)
	copy(n.unsure, m.unsure)
	return n
}

func (m *model) set(off int64, p []byte) {
	copy(m.data[off:], p)
	for i := range p {
		m.unsure[off+int64(i)] = false
	}
}

func (m *model) fill(off, n int64, b byte) {
	for i := off; i < off+n; i++ {
		m.data[i], m.unsure[i] = b, false
	}
}

func (m *model) markUnsure(off, n int64) {
	for i := off; i < off+n; i++ {
		m.unsure[i] = true
	}
}

// mismatch returns a description of the first byte where got differs
// from the model's sure bytes, or "".
func (m *model) mismatch(got []byte) string {
	if len(got) != len(m.data) {
		return fmt.Sprintf("size %d, want %d", len(got), len(m.data))
	}
	for i := range got {
		if !m.unsure[i] && got[i] != m.data[i] {
			end := i
			for end < len(got) && end-i < 1<<20 && !m.unsure[end] && got[end] != m.data[end] {
				end++
			}
			return fmt.Sprintf("byte %#x: %#02x, want %#02x (%d bytes differ from there)", i, got[i], m.data[i], end-i)
		}
	}
	return ""
}

// firstDiff describes where a and b differ, or "" when they are equal.
func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("sizes %d and %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			end := i
			for end < len(a) && a[end] != b[end] {
				end++
			}
			return fmt.Sprintf("at byte %#x: %#02x vs %#02x (%d bytes differ from there)", i, a[i], b[i], end-i)
		}
	}
	return ""
}

// ------------------------------------------------------- qemu-io operations

// ioOp is one qemu-io command applied to an image and to its model.
type ioOp struct {
	kind byte // 'w' write -P, 'z' write -z, 'u' write -z -u, 'd' discard, 'c' write -c (compressed)
	off  int64
	n    int64
	pat  byte
}

func (o ioOp) command() string {
	switch o.kind {
	case 'w':
		return fmt.Sprintf("write -P %#x %d %d", o.pat, o.off, o.n)
	case 'c':
		return fmt.Sprintf("write -c -P %#x %d %d", o.pat, o.off, o.n)
	case 'z':
		return fmt.Sprintf("write -z %d %d", o.off, o.n)
	case 'u':
		return fmt.Sprintf("write -z -u %d %d", o.off, o.n)
	case 'd':
		return fmt.Sprintf("discard %d %d", o.off, o.n)
	}
	panic("bad ioOp kind " + string(o.kind))
}

func (o ioOp) apply(m *model) {
	switch o.kind {
	case 'w', 'c':
		m.fill(o.off, o.n, o.pat)
	case 'z', 'u':
		m.fill(o.off, o.n, 0)
	case 'd':
		m.markUnsure(o.off, o.n)
	}
}

// scatter makes count operations at deterministic pseudo-random offsets
// in [0, size): kinds are drawn from the string kinds (repeat a letter to
// weigh it); offsets and lengths are multiples of align (1 for byte
// granularity) up to maxLen; compressed writes ('c') cover exactly one
// cluster, as qemu-io requires. Patterns are distinct and never zero.
func scatter(seed uint64, size int64, count int, kinds string, align, maxLen, cluster int64) []ioOp {
	r := rand.New(rand.NewPCG(seed, 0x9c0c2))
	ops := make([]ioOp, 0, count)
	// QEMU writes compressed data only into clusters that nothing has
	// touched (a compressed write over an allocated or zero cluster fails
	// with EIO): remember what the ops touch.
	touched := map[int64]bool{}
	for i := 0; i < count; i++ {
		k := kinds[r.IntN(len(kinds))]
		var off, n int64
		if k == 'c' {
			free := -int64(1)
			for try := 0; try < 20 && free < 0; try++ {
				if c := r.Int64N(size / cluster); !touched[c] {
					free = c
				}
			}
			if free >= 0 {
				off, n = free*cluster, cluster
			} else {
				k = 'w'
			}
		}
		if k != 'c' {
			n = (1 + r.Int64N(maxLen/align)) * align
			off = r.Int64N((size-n)/align+1) * align
		}
		for c := off / cluster; c*cluster < off+n; c++ {
			touched[c] = true
		}
		ops = append(ops, ioOp{kind: k, off: off, n: n, pat: byte(0x10 + i%0xe0)})
	}
	return ops
}

// ---------------------------------------------------------- image builder

// builder makes the images of one matrix case with the real QEMU tools,
// tracking the expected contents of each image (and of each internal
// snapshot) so that QEMU's own reading can be checked against it first:
// a disagreement there is a bug in the test, not in blockbackend.
type builder struct {
	t      *testing.T
	dir    string
	models map[string]*model // by absolute image path
	snaps  map[string]map[string]*model
	fmts   map[string]string
	// backingOf is each overlay's backing image (absolute path).
	backingOf map[string]string
	// cmds records every command run, for the report of what a case needs.
	cmds []string
}

func newBuilder(t *testing.T) *builder {
	return &builder{t: t, dir: t.TempDir(), models: map[string]*model{},
		snaps: map[string]map[string]*model{}, fmts: map[string]string{}, backingOf: map[string]string{}}
}

func (b *builder) path(name string) string { return filepath.Join(b.dir, name) }

func (b *builder) run(name string, args ...string) string {
	b.t.Helper()
	b.cmds = append(b.cmds, name+" "+strings.Join(args, " "))
	return qemu(b.t, name, args...)
}

// create runs qemu-img create. opts are -o options; backing (a name
// as it is to be recorded: relative to the new image's directory, or a
// json: name) and backingFmt are optional; backingPath is the backing
// image's path (for the model) when backing is set. A size of 0 takes the
// backing image's size.
func (b *builder) create(name, fmtName string, opts string, size int64, backing, backingFmt, backingPath string) string {
	b.t.Helper()
	p := b.path(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		b.t.Fatal(err)
	}
	args := []string{"create", "-q", "-f", fmtName}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	if backing != "" {
		args = append(args, "-b", backing, "-F", backingFmt)
	}
	args = append(args, p)
	if size > 0 {
		args = append(args, strconv.FormatInt(size, 10))
	}
	b.run("qemu-img", args...)
	var m *model
	switch {
	case backing != "" && size > 0:
		m = b.models[backingPath].resized(size)
	case backing != "":
		m = b.models[backingPath].clone()
	default:
		m = newModel(size)
	}
	b.models[p] = m
	b.fmts[p] = fmtName
	if backing != "" {
		b.backingOf[p] = backingPath
	}
	return p
}

// io applies ops with one qemu-io run (absolute paths: a relative
// backing name must resolve against the image's directory, not ours).
func (b *builder) io(p string, ops []ioOp, extra ...string) {
	b.t.Helper()
	args := []string{"-f", b.fmts[p]}
	for _, o := range ops {
		args = append(args, "-c", o.command())
		o.apply(b.models[p])
	}
	args = append(args, extra...)
	b.run("qemu-io", append(args, p)...)
}

// abortAfter applies ops and then aborts qemu-io (SIGABRT), leaving a
// lazy-refcounts image dirty, as a crashed QEMU would.
func (b *builder) abortAfter(p string, ops []ioOp) {
	b.t.Helper()
	args := []string{"-f", b.fmts[p]}
	for _, o := range ops {
		args = append(args, "-c", o.command())
		o.apply(b.models[p])
	}
	args = append(args, "-c", "abort", p)
	b.cmds = append(b.cmds, "qemu-io "+strings.Join(args, " "))
	out, err := cmdOut("qemu-io", args...)
	if err == nil {
		b.t.Fatalf("qemu-io -c abort exited 0:\n%s", out)
	}
	if strings.Contains(out, "failed") {
		b.t.Fatalf("qemu-io before abort:\n%s", out)
	}
}

func (b *builder) snapshot(p, name string) {
	b.t.Helper()
	b.run("qemu-img", "snapshot", "-c", name, p)
	if b.snaps[p] == nil {
		b.snaps[p] = map[string]*model{}
	}
	b.snaps[p][name] = b.models[p].clone()
}

// richData is deterministic data of mixed compressibility: runs of random
// bytes, of text-like bytes from a small alphabet, of one repeated byte
// and of zeros, so that compressed clusters of every size occur.
func richData(seed uint64, size int64) []byte {
	r := rand.New(rand.NewPCG(seed, 0xda7a))
	p := make([]byte, size)
	const alphabet = "the quick brown fox jumps over a lazy dog; qcow2 clusters\n"
	for off := int64(0); off < size; {
		n := min(size-off, 512*(1+r.Int64N(256)))
		q := p[off : off+n]
		switch r.IntN(4) {
		case 0:
			for i := range q {
				q[i] = byte(r.Uint32())
			}
		case 1:
			for i := range q {
				q[i] = alphabet[r.IntN(len(alphabet))]
			}
		case 2:
			c := byte(1 + r.IntN(255))
			for i := range q {
				q[i] = c
			}
		case 3: // zeros
		}
		off += n
	}
	return p
}

// rawFile writes data as a raw image and registers it.
func (b *builder) rawFile(name string, data []byte) string {
	b.t.Helper()
	p := b.path(name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		b.t.Fatal(err)
	}
	m := newModel(int64(len(data)))
	m.set(0, data)
	b.models[p] = m
	b.fmts[p] = "raw"
	return p
}

// convert runs qemu-img convert from src to a new image name.
func (b *builder) convert(src, name, fmtName string, args ...string) string {
	b.t.Helper()
	p := b.path(name)
	all := append([]string{"convert", "-f", b.fmts[src], "-O", fmtName}, args...)
	b.run("qemu-img", append(all, src, p)...)
	b.models[p] = b.models[src].clone()
	b.fmts[p] = fmtName
	return p
}

// ------------------------------------------------------------ QEMU's view

// qemuRaw returns the image's guest-visible bytes as qemu-img convert -O
// raw produces them (optionally of an internal snapshot).
func qemuRaw(t *testing.T, img, fmtName, snapshot string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "ref.raw")
	args := []string{"convert", "-f", fmtName, "-O", "raw"}
	if snapshot != "" {
		args = append(args, "-l", "snapshot.name="+snapshot)
	}
	qemu(t, "qemu-img", append(args, img, out)...)
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// checkResult is qemu-img check --output=json (members absent when zero).
type checkResult struct {
	Filename           string `json:"filename"`
	Corruptions        int    `json:"corruptions"`
	Leaks              int    `json:"leaks"`
	CheckErrors        int    `json:"check-errors"`
	CorruptionsFixed   int    `json:"corruptions-fixed"`
	LeaksFixed         int    `json:"leaks-fixed"`
	TotalClusters      int64  `json:"total-clusters"`
	AllocatedClusters  int64  `json:"allocated-clusters"`
	CompressedClusters int64  `json:"compressed-clusters"`
	ImageEndOffset     int64  `json:"image-end-offset"`
	Format             string `json:"format"`
}

// qemuCheck runs qemu-img check and decodes its answer. qemu-img check
// exits 0 (clean), 2 (corruptions), 3 (leaks only); other codes are
// failures of the check itself.
func qemuCheck(t *testing.T, img, fmtName string) (checkResult, string) {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "--output=json", "-f", fmtName, img)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("qemu-img check %s: %v", img, err)
	}
	var r checkResult
	if jerr := json.Unmarshal(stdout.Bytes(), &r); jerr != nil || (code != 0 && code != 2 && code != 3) {
		t.Fatalf("qemu-img check %s: exit %d, %v\n%s%s", img, code, jerr, stdout.String(), stderr.String())
	}
	return r, stdout.String() + stderr.String()
}

// requireCleanCheck fails unless qemu-img check finds no corruption, no
// leak and no check error.
func requireCleanCheck(t *testing.T, img, fmtName string) checkResult {
	t.Helper()
	r, out := qemuCheck(t, img, fmtName)
	if r.Corruptions != 0 || r.Leaks != 0 || r.CheckErrors != 0 {
		human, _ := cmdOut("qemu-img", "check", "-f", fmtName, img)
		t.Fatalf("qemu-img check %s: %d corruptions, %d leaks, %d check errors\n%s\n%s",
			img, r.Corruptions, r.Leaks, r.CheckErrors, out, human)
	}
	return r
}

// qemuInfo is qemu-img info --output=json, decoded loosely.
func qemuInfo(t *testing.T, img string, fmtName string) map[string]any {
	t.Helper()
	out := qemu(t, "qemu-img", "info", "--output=json", "-f", fmtName, img)
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	return m
}

// ------------------------------------------------------ blockbackend's view

// bbOpen opens an image in-process the way qemu-img opens it (a filename,
// a json: name), in its own graph that the test closes.
func bbOpen(t *testing.T, img, fmtName string, readOnly bool, extra map[string]any) (*graph.Graph, *graph.Node) {
	t.Helper()
	g := graph.New(nil)
	n, err := g.OpenImage(context.Background(), img, graph.ImageOptions{
		Format: fmtName, ReadOnly: readOnly, Extra: extra,
		Warn: func(s string) { t.Logf("warning: %s", s) },
	})
	if err != nil {
		g.Close()
		t.Fatalf("blockbackend: opening %s (%s, read-only=%v): %v", img, fmtName, readOnly, err)
	}
	return g, n
}

// bbClose closes the graph and fails the test on an error.
func bbClose(t *testing.T, g *graph.Graph) {
	t.Helper()
	if err := g.Close(); err != nil {
		t.Fatalf("blockbackend: closing: %v", err)
	}
}

// bbReadAll reads the whole node in chunks of chunk bytes.
func bbReadAll(t *testing.T, n *graph.Node, chunk int64) []byte {
	t.Helper()
	size := n.SizeNow()
	p := make([]byte, size)
	ctx := context.Background()
	for off := int64(0); off < size; off += chunk {
		if err := n.ReadAt(ctx, p[off:min(off+chunk, size)], off); err != nil {
			t.Fatalf("blockbackend: read %d+%d: %v", off, min(chunk, size-off), err)
		}
	}
	return p
}

// bbSpotReads reads count random byte ranges, unaligned, of up to maxLen
// bytes (crossing cluster and subcluster boundaries), and compares each
// with ref. A vectored read into several buffers is part of it.
func bbSpotReads(t *testing.T, n *graph.Node, ref []byte, seed uint64, count int, maxLen int64) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 0x5e0))
	ctx := context.Background()
	size := int64(len(ref))
	for i := 0; i < count; i++ {
		l := 1 + r.Int64N(min(maxLen, size))
		off := r.Int64N(size - l + 1)
		p := make([]byte, l)
		cut := r.Int64N(l + 1)
		if err := n.ReadV(ctx, off, [][]byte{p[:cut], p[cut:]}); err != nil {
			t.Fatalf("blockbackend: read %d+%d: %v", off, l, err)
		}
		if d := firstDiff(p, ref[off:off+l]); d != "" {
			t.Fatalf("blockbackend: read %d+%d (iov split at %d) differs from qemu-img's: %s", off, l, cut, d)
		}
	}
}

// bbCreateWith runs driver's Create with opts (BlockdevCreateOptions
// without "driver") the way blockdev-create does, without the job.
func bbCreateWith(ctx context.Context, g *graph.Graph, driver string, opts map[string]any) error {
	o := qapi.Clone(opts)
	o["driver"] = driver
	run, err := g.PrepareCreate(o, qapi.JSON, "")
	if err != nil {
		return err
	}
	return run(ctx)
}

// bbCreate makes an image through the driver's Create, as blockdev-create
// does: the file is created by the file driver, opened as a protocol node,
// and formatted by the format driver, which names that node as its
// "file". children maps other node-valued create options (backing is a
// name, but data-file is a node) to filenames, created and opened alike.
func bbCreate(t *testing.T, img, fmtName string, opts map[string]any, children map[string]string) {
	t.Helper()
	ctx := context.Background()
	g := graph.New(nil)
	defer bbClose(t, g)
	mk := func(member, path string) {
		if err := bbCreateWith(ctx, g, "file", map[string]any{"filename": path, "size": 0}); err != nil {
			t.Fatalf("blockbackend: creating %s: %v", path, err)
		}
		node := "create-" + member
		if _, err := g.Add(ctx, map[string]any{"driver": "file", "node-name": node, "filename": path}, qapi.JSON); err != nil {
			t.Fatalf("blockbackend: opening %s: %v", path, err)
		}
		opts[member] = node
	}
	mk("file", img)
	for member, path := range children {
		mk(member, path)
	}
	if err := bbCreateWith(ctx, g, fmtName, opts); err != nil {
		t.Fatalf("blockbackend: %s create %v: %v", fmtName, opts, err)
	}
}

// allocMap is, per 512-byte sector, whether the top image itself decides
// the contents (QEMU's block status "allocated": data, zero or
// compressed clusters of this layer, as opposed to falling through to the
// backing file or being unallocated).
type allocMap []bool

// qemuAllocMap is qemu-img map's view: entries "present" at depth 0.
func qemuAllocMap(t *testing.T, img, fmtName string, size int64) allocMap {
	t.Helper()
	out := qemu(t, "qemu-img", "map", "--output=json", "-f", fmtName, img)
	var ext []struct {
		Start, Length int64
		Depth         int
		Present       bool
	}
	if err := json.Unmarshal([]byte(out), &ext); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	m := make(allocMap, size/512)
	for _, e := range ext {
		if e.Present && e.Depth == 0 {
			for s := e.Start / 512; s < (e.Start+e.Length)/512 && s < int64(len(m)); s++ {
				m[s] = true
			}
		}
	}
	return m
}

// bbAllocMap walks blockbackend's block status over the node and checks
// on the way that every extent reported as zero reads as zeros in ref.
func bbAllocMap(t *testing.T, n *graph.Node, ref []byte) allocMap {
	t.Helper()
	ctx := context.Background()
	size := n.SizeNow()
	m := make(allocMap, size/512)
	for off := int64(0); off < size; {
		ext, err := n.BlockStatus(ctx, off, size-off)
		if err != nil {
			t.Fatalf("blockbackend: block status at %d: %v", off, err)
		}
		if ext.Status&graph.StatusZero != 0 {
			for i := off; i < off+ext.Length; i++ {
				if ref[i] != 0 {
					t.Fatalf("blockbackend: block status says %d+%d reads as zeros, but byte %#x is %#02x", off, ext.Length, i, ref[i])
				}
			}
		}
		if ext.Status&graph.StatusAllocated != 0 {
			for s := off / 512; s < (off+ext.Length+511)/512 && s < int64(len(m)); s++ {
				m[s] = true
			}
		}
		off += ext.Length
	}
	return m
}

// allocDiff describes the first sector where two maps disagree, or "".
func allocDiff(ours, theirs allocMap) string {
	for s := range theirs {
		if s >= len(ours) || ours[s] != theirs[s] {
			e := s
			for e < len(theirs) && e < len(ours) && ours[e] != theirs[e] {
				e++
			}
			return fmt.Sprintf("sector %d (byte %#x): blockbackend says allocated=%v, qemu-img map says %v (%d sectors differ from there)",
				s, int64(s)*512, s < len(ours) && ours[s], theirs[s], e-s)
		}
	}
	return ""
}
