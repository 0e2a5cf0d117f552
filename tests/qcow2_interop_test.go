package tests

// The qcow2 interop matrix, both directions, with the real QEMU tools:
//
//   - TestIntegrationQcow2InteropRead: images that qemu-img create/convert
//     and qemu-io write, one option combination per case, read through
//     blockbackend byte-identically to qemu-img convert -O raw, with block
//     status agreeing with qemu-img map; then opened writable
//     (a dirty lazy-refcounts image is repaired), written through
//     blockbackend, and checked by qemu-img check and convert again;
//     internal snapshots applied through blockbackend on a copy.
//   - TestIntegrationQcow2InteropCreate: images that blockbackend creates
//     (through the driver's Create, as blockdev-create) and writes pass
//     qemu-img check with no errors and no leaks, show the requested
//     options in qemu-img info, and qemu-img compare equals a raw image of
//     the data written; then qemu-io writes more and check stays clean.
//
// Every case first checks QEMU's own view against the test's model of
// the data, so that a wrong expectation shows as a harness failure, not
// as a blockbackend bug. Each case logs the commands that made it (go
// test -v). What QEMU 7.2's tools need, found while writing the cases:
//
//   - qemu-io -c "write -c ..." (compressed) takes exactly one whole
//     cluster that nothing has touched yet (else EIO); write -z on compat
//     0.10 deallocates; "-c abort" leaves a lazy-refcounts image dirty.
//   - refcount_bits other than 16, lazy_refcounts, extended_l2, zstd and
//     data_file need compat=1.1; extended_l2 needs cluster_size >= 16k.
//   - A json: backing name needs -F (qemu-img create refuses a backing
//     file without a format); qemu-img create with -b and no size takes
//     the backing file's size.
//   - A relative data_file name is resolved against the working
//     directory (at create and at open), unlike a backing name; a comma
//     in a -o value is written ",,".
//   - Compressed clusters share host clusters: with refcount_bits=2,
//     qemu-img snapshot -c then fails with EINVAL (refcount overflow).
//   - Writing to an image with bitmaps while clearing the bitmaps
//     autoclear bit makes QEMU report their clusters as leaks.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/graph"
)

const mib = 1 << 20

// interopCase is one row of the read matrix.
type interopCase struct {
	name string
	fmt  string // format of the top image (default qcow2)
	// build makes the image(s) with b and returns the image to open.
	build func(b *builder) string
	// bitmaps: the image has persistent dirty bitmaps (see
	// checkBitmapsAfterWrite).
	bitmaps bool
}

// oneImage is a case of one image made by qemu-img create -o opts and
// filled by two qemu-io passes (the second overwrites parts of the
// first, hitting compressed, zero and subcluster-allocated clusters).
func oneImage(opts string, size, cluster, align int64, kinds string, seed uint64) func(*builder) string {
	return func(b *builder) string {
		p := b.create("img.qcow2", "qcow2", opts, size, "", "", "")
		b.io(p, scatter(seed, size, 40, kinds, align, min(192<<10, 3*cluster), cluster))
		b.io(p, scatter(seed+1000, size, 20, strings.ReplaceAll(kinds, "c", "w"), align, min(96<<10, 2*cluster), cluster))
		return p
	}
}

// converted is a case of rich data in a raw image converted by qemu-img
// convert with args (-c for compression, -o options), then partly
// overwritten by qemu-io (compressed clusters rewritten).
func converted(size, cluster int64, seed uint64, args ...string) func(*builder) string {
	return func(b *builder) string {
		src := b.rawFile("src.raw", richData(seed, size))
		p := b.convert(src, "img.qcow2", "qcow2", args...)
		b.io(p, scatter(seed+1, size, 12, "wwzd", 512, min(96<<10, 2*cluster), cluster))
		return p
	}
}

func interopCases() []interopCase {
	var cs []interopCase
	add := func(name string, build func(*builder) string) {
		cs = append(cs, interopCase{name: name, build: build})
	}
	// The control: a raw image through the raw driver.
	cs = append(cs, interopCase{name: "raw-control", fmt: "raw", build: func(b *builder) string {
		p := b.create("img.raw", "raw", "", 4*mib, "", "", "")
		b.io(p, scatter(1, 4*mib, 40, "wwwzd", 1, 192<<10, 512))
		return p
	}})

	// Both compat levels by cluster size; v2 has no zero flag (write -z
	// deallocates), v3 does. Compressed writes in every one.
	for _, compat := range []string{"0.10", "1.1"} {
		for _, cl := range []int64{512, 4096, 65536, 2 * mib} {
			opts := fmt.Sprintf("compat=%s,cluster_size=%d", compat, cl)
			add(opts, oneImage(opts, 4*mib, cl, 512, "wwwwzudc", uint64(cl)))
		}
	}
	// Unaligned writes (qemu-io does read-modify-write below the sector).
	add("compat=1.1,cluster_size=65536,unaligned", oneImage("compat=1.1", 4*mib, 65536, 1, "wwwzd", 77))
	// Refcount widths (16 is the default, covered above). 4 KiB clusters
	// so that the refcount table spans several refcount blocks.
	for _, rb := range []int{1, 2, 4, 8, 32, 64} {
		opts := fmt.Sprintf("compat=1.1,cluster_size=4096,refcount_bits=%d", rb)
		add(opts, oneImage(opts, 4*mib, 4096, 512, "wwwzudc", uint64(100+rb)))
	}
	// Lazy refcounts: closed cleanly, and left dirty by an aborted qemu-io
	// (refcounts stale; blockbackend must read it, and repair it when it
	// opens it writable).
	add("lazy_refcounts=on", oneImage("compat=1.1,lazy_refcounts=on", 4*mib, 65536, 512, "wwwzud", 200))
	add("lazy_refcounts=on,dirty", func(b *builder) string {
		p := b.create("img.qcow2", "qcow2", "compat=1.1,lazy_refcounts=on,cluster_size=4096", 4*mib, "", "", "")
		b.io(p, scatter(201, 4*mib, 20, "wwz", 512, 64<<10, 4096))
		b.abortAfter(p, scatter(202, 4*mib, 30, "wwwzd", 512, 64<<10, 4096))
		return p
	})

	// Compression: compressed writes from qemu-io (pattern data), and
	// qemu-img convert -c of data of mixed compressibility.
	add("compression_type=zlib,qemu-io", oneImage("compression_type=zlib", 4*mib, 65536, 512, "ccccwz", 300))
	add("compression_type=zstd,qemu-io", oneImage("compression_type=zstd", 4*mib, 65536, 512, "ccccwz", 301))
	add("convert -c zlib", converted(4*mib, 65536, 302, "-c"))
	add("convert -c zstd", converted(4*mib, 65536, 303, "-c", "-o", "compression_type=zstd"))
	add("convert -c zstd,cluster_size=4096", converted(4*mib, 4096, 304, "-c", "-o", "compression_type=zstd,cluster_size=4096"))
	add("convert -c zlib,cluster_size=2M", converted(4*mib, 2*mib, 305, "-c", "-o", "cluster_size=2M"))
	add("convert -c zlib,compat=0.10,cluster_size=512", converted(2*mib, 512, 306, "-c", "-o", "compat=0.10,cluster_size=512"))
	add("convert,cluster_size=512", converted(4*mib, 512, 307, "-o", "cluster_size=512"))

	// Backing chains of three, with writes at every layer.
	chain := func(compat string, baseCl, midCl, topCl int64, topOpts string, seed uint64) func(*builder) string {
		return func(b *builder) string {
			o := func(cl int64) string { return fmt.Sprintf("compat=%s,cluster_size=%d", compat, cl) }
			// sub/base.qcow2 <- sub/mid.qcow2 (backing "base.qcow2",
			// relative to sub/) <- top.qcow2 (backing "sub/mid.qcow2").
			base := b.create("sub/base.qcow2", "qcow2", o(baseCl), 4*mib, "", "", "")
			b.io(base, scatter(seed, 4*mib, 30, "wwwz", 512, 256<<10, baseCl))
			mid := b.create("sub/mid.qcow2", "qcow2", o(midCl), 0, "base.qcow2", "qcow2", base)
			b.io(mid, scatter(seed+1, 4*mib, 25, "wwzd", 512, 128<<10, midCl))
			opts := o(topCl)
			if topOpts != "" {
				opts += "," + topOpts
			}
			top := b.create("top.qcow2", "qcow2", opts, 0, "sub/mid.qcow2", "qcow2", mid)
			b.io(top, scatter(seed+2, 4*mib, 25, "wwzu", 512, 64<<10, topCl))
			return top
		}
	}
	add("backing chain 3,compat=1.1", chain("1.1", 65536, 65536, 65536, "", 400))
	add("backing chain 3,compat=0.10", chain("0.10", 65536, 65536, 65536, "", 401))
	add("backing chain 3,cluster sizes 512/2M/4k", chain("1.1", 512, 2*mib, 4096, "", 402))
	add("backing chain 3,extended_l2 top", chain("1.1", 4096, 65536, 65536, "extended_l2=on", 403))
	add("backing chain 3,raw base,json: backing name", func(b *builder) string {
		base := b.create("base.raw", "raw", "", 4*mib, "", "", "")
		b.io(base, scatter(410, 4*mib, 30, "wwz", 512, 256<<10, 512))
		mid := b.create("mid.qcow2", "qcow2", "", 0, "base.raw", "raw", base)
		b.io(mid, scatter(411, 4*mib, 25, "wwzd", 512, 128<<10, 65536))
		js := fmt.Sprintf(`json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"}}`, mid)
		top := b.create("top.qcow2", "qcow2", "", 0, js, "qcow2", mid)
		b.io(top, scatter(412, 4*mib, 25, "wwzu", 512, 64<<10, 65536))
		return top
	})
	add("backing shorter than overlay", func(b *builder) string {
		base := b.create("base.qcow2", "qcow2", "", 2*mib+512, "", "", "")
		b.io(base, scatter(420, 2*mib+512, 20, "ww", 512, 256<<10, 65536))
		top := b.create("top.qcow2", "qcow2", "", 4*mib, "base.qcow2", "qcow2", base)
		b.io(top, scatter(421, 4*mib, 10, "wwz", 512, 64<<10, 65536))
		return top
	})

	// Internal snapshots, with writes between them.
	snaps := func(opts, kinds string, seed uint64) func(*builder) string {
		return func(b *builder) string {
			p := b.create("img.qcow2", "qcow2", opts, 4*mib, "", "", "")
			b.io(p, scatter(seed, 4*mib, 30, kinds, 512, 128<<10, 65536))
			b.snapshot(p, "s1")
			b.io(p, scatter(seed+1, 4*mib, 20, "wwzd", 512, 128<<10, 65536))
			b.snapshot(p, "s2")
			b.io(p, scatter(seed+2, 4*mib, 20, "wwzud", 512, 128<<10, 65536))
			return p
		}
	}
	add("snapshots,compat=1.1", snaps("compat=1.1", "wwwzc", 500))
	add("snapshots,compat=0.10", snaps("compat=0.10", "wwwzc", 501))
	// Two snapshots bring refcounts to 3, the most two bits hold. (No
	// compressed clusters: several share a host cluster, whose refcount
	// would overflow, and qemu-img snapshot -c then fails with EINVAL.)
	add("snapshots,refcount_bits=2", snaps("refcount_bits=2", "wwwz", 502))

	// Extended L2 entries: 32 subclusters per cluster; writes, zeroes and
	// discards of single subclusters.
	for _, cl := range []int64{16384, 65536, 2 * mib} {
		sub := cl / 32
		opts := fmt.Sprintf("extended_l2=on,cluster_size=%d", cl)
		add(opts, oneImage(opts, 4*mib, cl, sub, "wwwzud", uint64(600+cl/sub)))
	}

	// Persistent dirty bitmaps (the bitmaps extension and its autoclear
	// bit): read as any image; after blockbackend writes, see
	// checkBitmapsAfterWrite.
	cs = append(cs, interopCase{name: "bitmaps", bitmaps: true, build: func(b *builder) string {
		p := b.create("img.qcow2", "qcow2", "", 4*mib, "", "", "")
		b.run("qemu-img", "bitmap", "--add", p, "b0")
		b.run("qemu-img", "bitmap", "--add", "--disable", p, "b1")
		b.io(p, scatter(800, 4*mib, 30, "wwwzud", 512, 128<<10, 65536))
		return p
	}})

	// External data file, named by its absolute path: QEMU 7.2 resolves a
	// relative data_file name against its working directory (at create
	// and at open), not against the image's directory as for backing
	// files, so a relative name would make the case depend on the cwd.
	dataFile := func(extra string, seed uint64) func(*builder) string {
		return func(b *builder) string {
			// ",," is a comma inside a -o value (the case names have commas,
			// and so have the test's directories).
			name := strings.ReplaceAll(b.path("img.data"), ",", ",,")
			return oneImage("data_file="+name+extra, 4*mib, 65536, 512, "wwwzud", seed)(b)
		}
	}
	add("data_file", dataFile("", 700))
	add("data_file,data_file_raw=on", dataFile(",data_file_raw=on", 701))
	return cs
}

// TestIntegrationQcow2InteropRead: every image QEMU's tools write reads through
// blockbackend as qemu-img convert -O raw reads it.
func TestIntegrationQcow2InteropRead(t *testing.T) {
	needQemuTools(t, "qemu-img", "qemu-io")
	for _, tc := range interopCases() {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.fmt
			if f == "" {
				f = "qcow2"
			}
			b := newBuilder(t)
			img := tc.build(b)
			t.Logf("commands:\n  %s", strings.Join(b.cmds, "\n  "))
			checkInteropRead(t, b, img, f, tc.bitmaps)
		})
	}
}

func checkInteropRead(t *testing.T, b *builder, img, f string, bitmaps bool) {
	ctx := context.Background()
	ref := qemuRaw(t, img, f, "")
	if d := b.models[img].mismatch(ref); d != "" {
		t.Fatalf("harness: qemu-img convert -O raw differs from the test's model: %s", d)
	}
	snapRef := map[string][]byte{}
	for name, m := range b.snaps[img] {
		snapRef[name] = qemuRaw(t, img, f, name)
		if d := m.mismatch(snapRef[name]); d != "" {
			t.Fatalf("harness: snapshot %s as qemu-img converts it differs from the model: %s", name, d)
		}
	}
	needDriver(t, f)

	// Read-only, as qemu-img convert reads it.
	g, n := bbOpen(t, img, f, true, nil)
	// Requests of 1 MiB + 4.5 KiB: many clusters each, and boundaries
	// that fall everywhere within clusters and subclusters.
	if got := bbReadAll(t, n, mib+4096+512); firstDiff(got, ref) != "" {
		t.Fatalf("blockbackend reads %s differently from qemu-img convert -O raw: %s", img, firstDiff(got, ref))
	}
	bbSpotReads(t, n, ref, 1, 100, 128<<10)
	if f == "qcow2" {
		// img map and NBD block status depend on it: which parts this
		// image allocates must agree with qemu-img map.
		if d := allocDiff(bbAllocMap(t, n, ref), qemuAllocMap(t, img, f, int64(len(ref)))); d != "" {
			t.Fatalf("block status of %s: %s", img, d)
		}
	}
	if len(snapRef) > 0 {
		ss, ok := n.Instance().(graph.Snapshotter)
		if !ok {
			t.Fatalf("the %s node does not implement graph.Snapshotter", f)
		}
		list, err := ss.Snapshots(ctx)
		if err != nil {
			t.Fatalf("Snapshots: %v", err)
		}
		var names []string
		for _, s := range list {
			names = append(names, s.Name)
		}
		if len(names) != len(snapRef) || !strings.Contains(strings.Join(names, ","), "s1") {
			t.Errorf("snapshots listed: %v, want s1 and s2", names)
		}
	}
	bbClose(t, g)

	// Snapshots applied through blockbackend, on a copy.
	for name, want := range snapRef {
		cp := filepath.Join(filepath.Dir(img), "copy-"+name+".qcow2")
		copyFile(t, img, cp)
		g, n := bbOpen(t, cp, f, false, nil)
		if err := n.Instance().(graph.Snapshotter).ApplySnapshot(ctx, "", name); err != nil {
			t.Fatalf("ApplySnapshot %s: %v", name, err)
		}
		if got := bbReadAll(t, n, mib); firstDiff(got, want) != "" {
			t.Fatalf("after applying snapshot %s, blockbackend reads: %s", name, firstDiff(got, want))
		}
		bbClose(t, g)
		requireCleanCheck(t, cp, f)
		if got := qemuRaw(t, cp, f, ""); firstDiff(got, want) != "" {
			t.Fatalf("after applying snapshot %s through blockbackend, qemu-img reads: %s", name, firstDiff(got, want))
		}
	}

	// Writable: opening repairs a dirty image; then writes of every kind
	// over what QEMU wrote, checked by qemu-img.
	g, n = bbOpen(t, img, f, false, map[string]any{"discard": "unmap"})
	if got := bbReadAll(t, n, mib); firstDiff(got, ref) != "" {
		t.Fatalf("opened writable, blockbackend reads: %s", firstDiff(got, ref))
	}
	m := newModel(int64(len(ref)))
	m.set(0, ref)
	// A discarded cluster of a v2 overlay reads from the backing file.
	var backing [][]byte
	if bk := b.backingOf[img]; bk != "" {
		backing = append(backing, qemuRaw(t, bk, b.fmts[bk], ""))
	}
	cl := int64(512)
	bbApply(t, n, scatter(9, int64(len(ref)), 40, "wwwwzud", cl, 160<<10, cl), m, backing...)
	if err := n.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	bbApply(t, n, scatter(10, int64(len(ref)), 20, "wwzd", 1, 100<<10, cl), m, backing...)
	after := bbReadAll(t, n, mib)
	if d := m.mismatch(after); d != "" {
		t.Fatalf("after writes through blockbackend, it reads: %s", d)
	}
	bbClose(t, g)
	switch {
	case bitmaps:
		checkBitmapsAfterWrite(t, img)
	case f != "raw":
		requireCleanCheck(t, img, f)
	}
	if got := qemuRaw(t, img, f, ""); firstDiff(got, after) != "" {
		t.Fatalf("after writes through blockbackend, qemu-img reads differently: %s", firstDiff(got, after))
	}
}

// checkBitmapsAfterWrite: after blockbackend wrote to an image with
// persistent bitmaps, either it kept them (the bitmaps autoclear bit still
// set: qemu-img info lists them and check is clean), or, as qcow2.txt
// requires of a program that does not update bitmaps, it cleared the
// autoclear bit; QEMU then warns "a program lacking bitmap support
// modified this file", ignores the bitmaps and counts their clusters as
// leaks (observed with QEMU 7.2 by clearing the bit by hand). Either way
// there must be no corruption.
func checkBitmapsAfterWrite(t *testing.T, img string) {
	t.Helper()
	r, out := qemuCheck(t, img, "qcow2")
	if r.Corruptions != 0 || r.CheckErrors != 0 {
		t.Fatalf("qemu-img check after writes to an image with bitmaps: %d corruptions, %d check errors\n%s", r.Corruptions, r.CheckErrors, out)
	}
	if strings.Contains(out, "lacking bitmap support") {
		t.Logf("blockbackend cleared the bitmaps autoclear bit: QEMU drops the bitmaps (%d leaked clusters)", r.Leaks)
		return
	}
	if r.Leaks != 0 {
		t.Fatalf("qemu-img check after writes to an image with bitmaps kept valid: %d leaks\n%s", r.Leaks, out)
	}
	info := qemuInfo(t, img, "qcow2")
	data, _ := info["format-specific"].(map[string]any)["data"].(map[string]any)
	if bm, _ := data["bitmaps"].([]any); len(bm) != 2 {
		t.Fatalf("bitmaps kept valid, but qemu-img info lists %v, want b0 and b1", data["bitmaps"])
	}
}

// bbApply does ops through the graph's I/O calls and applies them to m.
// A discard's range is read back and adopted by the model after checking
// it holds, byte by byte, the old data or zeros (discard is advisory; a
// discarded cluster of an overlay may also read the backing file's data,
// which callers with a backing file allow by passing backing).
func bbApply(t *testing.T, n *graph.Node, ops []ioOp, m *model, backing ...[]byte) {
	t.Helper()
	ctx := context.Background()
	for _, o := range ops {
		var err error
		switch o.kind {
		case 'w', 'c':
			p := make([]byte, o.n)
			for i := range p {
				p[i] = o.pat
			}
			// Mix in the offset so that a write landing at the wrong
			// place cannot match by accident.
			for i := int64(0); i+8 <= o.n; i += 512 {
				v := uint64(o.off+i) ^ uint64(o.pat)<<56
				for k := 0; k < 8; k++ {
					p[i+int64(k)] = byte(v >> (8 * k))
				}
			}
			err = n.WriteAt(ctx, p, o.off, 0)
			if err == nil {
				m.set(o.off, p)
			}
		case 'z':
			err = n.WriteZeroes(ctx, o.off, o.n, 0)
			if err == nil {
				m.fill(o.off, o.n, 0)
			}
		case 'u':
			err = n.WriteZeroes(ctx, o.off, o.n, graph.ZeroMayUnmap)
			if err == nil {
				m.fill(o.off, o.n, 0)
			}
		case 'd':
			if err = n.Discard(ctx, o.off, o.n); err == nil {
				got := make([]byte, o.n)
				if err = n.ReadAt(ctx, got, o.off); err == nil {
					for i, c := range got {
						at := o.off + int64(i)
						ok := c == 0 || c == m.data[at] || m.unsure[at]
						for _, bk := range backing {
							ok = ok || (at < int64(len(bk)) && c == bk[at])
						}
						if !ok {
							t.Fatalf("after discard %d+%d, byte %#x reads %#02x: neither the old %#02x nor zero",
								o.off, o.n, at, c, m.data[at])
						}
					}
					m.set(o.off, got)
				}
			}
		}
		if err != nil {
			t.Fatalf("blockbackend: %s: %v", o.command(), err)
		}
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// createCase is one row of the creation matrix: create options (QAPI's
// BlockdevCreateOptionsQcow2 members, without file and size) and the
// facts qemu-img info must then show.
type createCase struct {
	name    string
	opts    map[string]any
	cluster int64
	// info: members of qemu-img info's format-specific data expected.
	info map[string]any
	// dataFile creates and names a data-file node.
	dataFile bool
	// backing creates a base image with qemu-img and records it by a
	// relative name (backing-file, backing-fmt).
	backing bool
}

func createCases() []createCase {
	return []createCase{
		{name: "v3 defaults", opts: map[string]any{}, cluster: 65536,
			info: map[string]any{"compat": "1.1", "refcount-bits": 16.0, "lazy-refcounts": false, "extended-l2": false}},
		{name: "v2", opts: map[string]any{"version": "v2"}, cluster: 65536, info: map[string]any{"compat": "0.10"}},
		{name: "v2 cluster 512", opts: map[string]any{"version": "v2", "cluster-size": 512}, cluster: 512, info: map[string]any{"compat": "0.10"}},
		{name: "v3 cluster 512 refcount 1", opts: map[string]any{"cluster-size": 512, "refcount-bits": 1}, cluster: 512,
			info: map[string]any{"refcount-bits": 1.0}},
		{name: "v3 cluster 4k refcount 4", opts: map[string]any{"cluster-size": 4096, "refcount-bits": 4}, cluster: 4096,
			info: map[string]any{"refcount-bits": 4.0}},
		{name: "v3 cluster 2M refcount 64", opts: map[string]any{"cluster-size": 2 * mib, "refcount-bits": 64}, cluster: 2 * mib,
			info: map[string]any{"refcount-bits": 64.0}},
		{name: "lazy refcounts", opts: map[string]any{"lazy-refcounts": true}, cluster: 65536,
			info: map[string]any{"lazy-refcounts": true}},
		{name: "extended l2", opts: map[string]any{"extended-l2": true}, cluster: 65536,
			info: map[string]any{"extended-l2": true}},
		{name: "extended l2 cluster 16k", opts: map[string]any{"extended-l2": true, "cluster-size": 16384}, cluster: 16384,
			info: map[string]any{"extended-l2": true}},
		{name: "compression zstd", opts: map[string]any{"compression-type": "zstd"}, cluster: 65536,
			info: map[string]any{"compression-type": "zstd"}},
		{name: "preallocation metadata", opts: map[string]any{"preallocation": "metadata"}, cluster: 65536, info: map[string]any{}},
		{name: "preallocation falloc", opts: map[string]any{"preallocation": "falloc"}, cluster: 65536, info: map[string]any{}},
		{name: "preallocation full", opts: map[string]any{"preallocation": "full"}, cluster: 65536, info: map[string]any{}},
		{name: "data file", opts: map[string]any{}, cluster: 65536, dataFile: true, info: map[string]any{}},
		{name: "data file raw", opts: map[string]any{"data-file-raw": true}, cluster: 65536, dataFile: true,
			info: map[string]any{"data-file-raw": true}},
		{name: "backing", opts: map[string]any{}, cluster: 65536, backing: true, info: map[string]any{}},
		{name: "backing v2 cluster 4k", opts: map[string]any{"version": "v2", "cluster-size": 4096}, cluster: 4096, backing: true,
			info: map[string]any{"compat": "0.10"}},
		{name: "backing extended l2", opts: map[string]any{"extended-l2": true}, cluster: 65536, backing: true,
			info: map[string]any{"extended-l2": true}},
	}
}

// TestIntegrationQcow2InteropCreate: images blockbackend creates and writes pass
// qemu-img check (no errors, no leaks) and compare equal to the data.
func TestIntegrationQcow2InteropCreate(t *testing.T) {
	needQemuTools(t, "qemu-img", "qemu-io")
	needDriver(t, "qcow2")
	for i, tc := range createCases() {
		t.Run(tc.name, func(t *testing.T) {
			checkCreate(t, tc, uint64(1000+i))
		})
	}
}

func checkCreate(t *testing.T, tc createCase, seed uint64) {
	ctx := context.Background()
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	const size = 4 * mib
	opts := map[string]any{"size": size}
	for k, v := range tc.opts {
		opts[k] = v
	}
	children := map[string]string{}
	if tc.dataFile {
		children["data-file"] = filepath.Join(dir, "img.data")
	}
	var backing []byte
	if tc.backing {
		base := filepath.Join(dir, "base.qcow2")
		qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", base, fmt.Sprint(size))
		var ops []string
		for _, o := range scatter(seed, size, 20, "wwz", 512, 256<<10, 65536) {
			ops = append(ops, "-c", o.command())
		}
		qemu(t, "qemu-io", append(append([]string{"-f", "qcow2"}, ops...), base)...)
		backing = qemuRaw(t, base, "qcow2", "")
		opts["backing-file"] = "base.qcow2"
		opts["backing-fmt"] = "qcow2"
	}
	bbCreate(t, img, "qcow2", opts, children)

	// qemu-img sees what was asked for.
	info := qemuInfo(t, img, "qcow2")
	if info["virtual-size"] != float64(size) || info["cluster-size"] != float64(tc.cluster) {
		t.Errorf("qemu-img info: virtual-size %v cluster-size %v, want %d and %d", info["virtual-size"], info["cluster-size"], size, tc.cluster)
	}
	spec, _ := info["format-specific"].(map[string]any)
	data, _ := spec["data"].(map[string]any)
	for k, want := range tc.info {
		if data[k] != want {
			t.Errorf("qemu-img info: %s is %v, want %v (format-specific data: %v)", k, data[k], want, data)
		}
	}
	if tc.dataFile && data["data-file"] != "img.data" && data["data-file"] != children["data-file"] {
		t.Errorf("qemu-img info: data-file %v, want img.data", data["data-file"])
	}
	if tc.backing && info["backing-filename"] != "base.qcow2" {
		t.Errorf("qemu-img info: backing-filename %v, want base.qcow2", info["backing-filename"])
	}
	// A new image is clean and reads as zeros (or as its backing file).
	requireCleanCheck(t, img, "qcow2")
	want := make([]byte, size)
	copy(want, backing)
	if got := qemuRaw(t, img, "qcow2", ""); firstDiff(got, want) != "" {
		t.Fatalf("a new image reads (qemu-img): %s", firstDiff(got, want))
	}

	// Writes of every kind, a flush, a resize, more writes.
	g, n := bbOpen(t, img, "qcow2", false, map[string]any{"discard": "unmap"})
	m := newModel(size)
	m.set(0, want)
	r := rand.New(rand.NewPCG(seed, 1))
	bbApply(t, n, scatter(r.Uint64(), size, 60, "wwwwzud", 512, 3*tc.cluster/2+4096, tc.cluster), m, backing)
	// Overwrites of what was just written.
	bbApply(t, n, scatter(r.Uint64(), size, 30, "wwz", 512, tc.cluster, tc.cluster), m, backing)
	if err := n.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	bbApply(t, n, scatter(r.Uint64(), size, 20, "wwzd", 1, 64<<10, tc.cluster), m, backing)
	if d := m.mismatch(bbReadAll(t, n, mib)); d != "" {
		t.Fatalf("blockbackend reads back: %s", d)
	}
	newSize := int64(size + mib + 4096)
	if err := g.Resize(ctx, n, newSize); err != nil {
		t.Fatalf("resize to %d: %v", newSize, err)
	}
	m = m.resized(newSize)
	bbApply(t, n, scatter(r.Uint64(), newSize, 20, "wwzd", 512, 128<<10, tc.cluster), m, backing)
	bbApply(t, n, []ioOp{{kind: 'w', off: newSize - 4096, n: 4096, pat: 0xee}}, m)
	got := bbReadAll(t, n, mib)
	if d := m.mismatch(got); d != "" {
		t.Fatalf("blockbackend reads back after resize: %s", d)
	}
	bbClose(t, g)

	requireCleanCheck(t, img, "qcow2")
	raw := filepath.Join(dir, "want.raw")
	if err := os.WriteFile(raw, got, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := cmdOut("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw); err != nil {
		t.Fatalf("qemu-img compare with the data written: %v\n%s", err, out)
	}
	// And reopened by blockbackend, it still reads the same.
	g, n = bbOpen(t, img, "qcow2", true, nil)
	if d := firstDiff(bbReadAll(t, n, mib), got); d != "" {
		t.Fatalf("blockbackend reopened reads: %s", d)
	}
	bbClose(t, g)

	// QEMU carries on where blockbackend stopped: its allocations in our
	// metadata (refcount blocks, free space, L2 tables) stay consistent.
	m = newModel(newSize)
	m.set(0, got)
	var args []string
	for _, o := range scatter(r.Uint64(), newSize, 30, "wwwzu", 512, 128<<10, tc.cluster) {
		args = append(args, "-c", o.command())
		o.apply(m)
	}
	qemu(t, "qemu-io", append(append([]string{"-f", "qcow2"}, args...), img)...)
	requireCleanCheck(t, img, "qcow2")
	if d := m.mismatch(qemuRaw(t, img, "qcow2", "")); d != "" {
		t.Fatalf("after qemu-io wrote to our image, qemu-img reads: %s", d)
	}
}
