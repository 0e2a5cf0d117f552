package qcow2

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// createImage formats path with our Create code (the options are
// BlockdevCreateOptionsQcow2 members, minus file) and returns it.
func createImage(t testing.TB, path string, size int64, opts map[string]any) {
	t.Helper()
	ctx := context.Background()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	g := graph.New(nil)
	defer g.Close()
	f, err := g.Add(ctx, map[string]any{"driver": "file", "node-name": "f", "filename": path}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	var data *graph.Node
	if df, ok := opts["data-file"].(string); ok {
		os.WriteFile(df, nil, 0o644)
		if data, err = g.Add(ctx, map[string]any{"driver": "file", "node-name": "d", "filename": df}, qapi.JSON); err != nil {
			t.Fatal(err)
		}
		opts["data-file"] = "d"
	}
	co := newCreateOptions().(*CreateOptions)
	m := map[string]any{"file": "f", "size": size}
	for k, v := range opts {
		m[k] = v
	}
	if err := qapi.Decode(m, co, qapi.JSON); err != nil {
		t.Fatal(err)
	}
	if err := format(ctx, nil, f, data, co); err != nil {
		t.Fatalf("create: %v", err)
	}
}

// qemuCheck runs qemu-img check and fails on any error or leak.
func qemuCheck(t testing.TB, path string) {
	t.Helper()
	out := qemu(t, "qemu-img", "check", path)
	if !strings.Contains(out, "No errors were found") || strings.Contains(out, "leaked") {
		t.Fatalf("qemu-img check %s:\n%s", path, out)
	}
}

type model struct {
	data []byte
}

func (m *model) write(off int64, b []byte) { copy(m.data[off:], b) }

func randomOps(t *testing.T, n *graph.Node, m *model, rng *rand.Rand, count int, cs int64) {
	ctx := context.Background()
	size := int64(len(m.data))
	for i := 0; i < count; i++ {
		off := rng.Int63n(size)
		ln := min(rng.Int63n(3*cs)+1, size-off)
		if rng.Intn(3) == 0 {
			off = off / cs * cs
			ln = min(cs*int64(1+rng.Intn(3)), size-off)
		}
		switch rng.Intn(11) {
		case 10:
			if err := n.Discard(ctx, off, ln); err != nil {
				t.Fatalf("discard %d+%d: %v", off, ln, err)
			}
			// What a discarded range reads is up to the format (zeros
			// here, or the backing file's data in v2): take it from the
			// image, but whole clusters without a backing file must read
			// as zeros.
			b := make([]byte, ln)
			if err := n.ReadAt(ctx, b, off); err != nil {
				t.Fatal(err)
			}
			if n.Child("backing") == nil && n.Common().Discard.Unmap() && !inst(t, n).dataRaw {
				for c := (off + cs - 1) / cs * cs; c+cs <= off+ln; c += cs {
					if !bytes.Equal(b[c-off:c-off+cs], make([]byte, cs)) {
						t.Fatalf("discarded cluster at %d does not read as zeros", c)
					}
				}
			}
			m.write(off, b)
		case 0:
			if err := n.WriteZeroes(ctx, off, ln, graph.ZeroMayUnmap); err != nil {
				t.Fatalf("write zeroes %d+%d: %v", off, ln, err)
			}
			m.write(off, make([]byte, ln))
		case 1:
			if err := n.WriteZeroes(ctx, off, ln, 0); err != nil {
				t.Fatalf("write zeroes %d+%d: %v", off, ln, err)
			}
			m.write(off, make([]byte, ln))
		case 2:
			if err := n.Flush(ctx); err != nil {
				t.Fatal(err)
			}
		default:
			b := make([]byte, ln)
			rng.Read(b)
			if err := n.WriteAt(ctx, b, off, 0); err != nil {
				t.Fatalf("write %d+%d: %v", off, ln, err)
			}
			m.write(off, b)
		}
	}
}

func TestCreateWriteRead(t *testing.T) {
	dir := t.TempDir()
	for i, opts := range []map[string]any{
		{"cluster-size": 65536},
		{"cluster-size": 512, "refcount-bits": 1},
		{"cluster-size": 4096, "version": "v2"},
		{"cluster-size": 16384, "extended-l2": true, "refcount-bits": 64},
		{"cluster-size": 1 << 21, "refcount-bits": 8},
		{"cluster-size": 4096, "lazy-refcounts": true},
		{"cluster-size": 4096, "preallocation": "metadata"},
		{"cluster-size": 8192, "compression-type": "zstd", "refcount-bits": 2},
		{"cluster-size": 4096, "data-file": "DATA"},
		{"cluster-size": 65536, "data-file": "DATA", "data-file-raw": true},
	} {
		t.Run(strings.Trim(strings.ReplaceAll(strings.ReplaceAll(strings.TrimPrefix(fmtMap(opts), "map"), " ", ","), ":", "="), "[]"), func(t *testing.T) {
			p := filepath.Join(dir, "img"+string(rune('a'+i))+".qcow2")
			if _, ok := opts["data-file"]; ok {
				opts["data-file"] = p + ".data"
			}
			size := int64(5<<20 + 512)
			createImage(t, p, size, opts)
			qemuCheck(t, p)
			cs := int64(65536)
			if v, ok := opts["cluster-size"].(int); ok {
				cs = int64(v)
			}
			extra := map[string]any{"discard": "unmap"}
			if i%2 == 1 {
				// Tiny caches: eviction and write-back on every step.
				extra["l2-cache-size"] = 2 * cs
				extra["refcount-cache-size"] = 2 * cs
				if cs >= 4096 {
					extra["l2-cache-entry-size"] = 1024
				}
			}
			g, n := openQcow2(t, p, false, extra)
			m := &model{data: make([]byte, size)}
			rng := rand.New(rand.NewSource(int64(i)))
			randomOps(t, n, m, rng, 300, cs)
			if got := readAll(t, n, 1<<20); !bytes.Equal(got, m.data) {
				t.Fatalf("read back: %s", firstDiff(got, m.data))
			}
			if err := g.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, p)
			if got := qemuRaw(t, p); !bytes.Equal(got, m.data) {
				t.Fatalf("qemu-img convert: %s", firstDiff(got, m.data))
			}
		})
	}
}

func fmtMap(m map[string]any) string {
	var b strings.Builder
	for _, k := range []string{"cluster-size", "version", "refcount-bits", "extended-l2", "lazy-refcounts", "preallocation", "compression-type", "data-file", "data-file-raw"} {
		if v, ok := m[k]; ok {
			if k == "data-file" {
				v = "yes"
			}
			b.WriteString(k + "=" + strings.TrimSpace(strings.ReplaceAll(fmtAny(v), " ", "")) + ",")
		}
	}
	return strings.TrimSuffix(b.String(), ",")
}

func fmtAny(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case bool:
		if x {
			return "on"
		}
		return "off"
	case int:
		return itoa(int64(x))
	}
	return "?"
}

func itoa(v int64) string {
	if v == 0 {
		return "0"
	}
	var b []byte
	for v > 0 {
		b = append([]byte{byte('0' + v%10)}, b...)
		v /= 10
	}
	return string(b)
}

// Writes over images qemu-img made: backing chains (copy on write from
// the backing file), internal snapshots (clusters with refcount 2),
// compressed clusters, extended L2 entries.
func TestWriteQemuImages(t *testing.T) {
	dir := t.TempDir()
	base := makeQemuImage(t, dir, "base.qcow2", "cluster_size=4k", "3M", "write -P 0xaa 0 3M")
	cases := map[string]func() string{
		"backing": func() string {
			p := filepath.Join(dir, "over.qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", p, "3M")
			return p
		},
		"backing-extl2": func() string {
			p := filepath.Join(dir, "over2.qcow2")
			qemu(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", "extended_l2=on,cluster_size=32k", p, "3M")
			qemu(t, "qemu-io", "-c", "write -P 0x55 40k 3k", "-c", "write -z 100k 2k", p)
			return p
		},
		"snapshot": func() string {
			p := makeQemuImage(t, dir, "snap.qcow2", "cluster_size=4k", "3M", "write -P 0x11 0 2M")
			qemu(t, "qemu-img", "snapshot", "-c", "s1", p)
			qemu(t, "qemu-io", "-c", "write -P 0x12 1M 8k", p)
			return p
		},
		"compressed": func() string {
			p := filepath.Join(dir, "comp.qcow2")
			qemu(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", base, p)
			return p
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			p := mk()
			want := qemuRaw(t, p)
			g, n := openQcow2(t, p, false, map[string]any{"discard": "unmap"})
			m := &model{data: want}
			randomOps(t, n, m, rand.New(rand.NewSource(7)), 200, 4096)
			if got := readAll(t, n, 1<<20); !bytes.Equal(got, m.data) {
				t.Fatalf("read back: %s", firstDiff(got, m.data))
			}
			if err := g.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, p)
			if got := qemuRaw(t, p); !bytes.Equal(got, m.data) {
				t.Fatalf("qemu-img convert: %s", firstDiff(got, m.data))
			}
			if name == "snapshot" {
				// The snapshot still holds what it held.
				qemu(t, "qemu-img", "snapshot", "-a", "s1", p)
				got := qemuRaw(t, p)
				if got[1<<20] != 0x11 || got[2<<20] != 0 {
					t.Fatalf("snapshot changed: %#x %#x", got[1<<20], got[2<<20])
				}
				qemuCheck(t, p)
			}
		})
	}
}

// Concurrent writers to the same clusters (each writes its own sectors)
// must not lose each other's data.
func TestConcurrentAllocation(t *testing.T) {
	dir := t.TempDir()
	for _, opts := range []map[string]any{{"cluster-size": 65536}, {"cluster-size": 16384, "extended-l2": true}} {
		p := filepath.Join(dir, "c.qcow2")
		const size = 4 << 20
		createImage(t, p, size, opts)
		g, n := openQcow2(t, p, false, nil)
		ctx := context.Background()
		var wg sync.WaitGroup
		const writers = 8
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				buf := bytes.Repeat([]byte{byte(w + 1)}, 512)
				for off := int64(w * 512); off < size; off += writers * 512 {
					if err := n.WriteAt(ctx, buf, off, 0); err != nil {
						t.Error(err)
						return
					}
				}
			}(w)
		}
		// Readers alongside.
		for r := 0; r < 2; r++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := make([]byte, 64<<10)
				for off := int64(0); off < size; off += int64(len(b)) {
					if err := n.ReadAt(ctx, b, off); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		got := readAll(t, n, 1<<20)
		for i := 0; i < size; i += 512 {
			if want := byte(i/512%writers + 1); got[i] != want || got[i+511] != want {
				t.Fatalf("%v: sector %d holds %#x, want %#x", opts, i/512, got[i], want)
			}
		}
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		qemuCheck(t, p)
	}
}

// Concurrent writes, zeroes, discards, flushes and reads, each goroutine
// on its own clusters (so the expected contents are known) but all of
// them sharing L2 tables, refcount blocks and the allocator.
func TestConcurrentMixed(t *testing.T) {
	dir := t.TempDir()
	for ci, opts := range []map[string]any{{"cluster-size": 4096}, {"cluster-size": 16384, "extended-l2": true}, {"cluster-size": 1024, "refcount-bits": 2}} {
		p := filepath.Join(dir, "m.qcow2")
		const size = 4 << 20
		createImage(t, p, size, opts)
		cs := int64(opts["cluster-size"].(int))
		g, n := openQcow2(t, p, false, map[string]any{"discard": "unmap", "l2-cache-size": 4 * cs, "refcount-cache-size": 2 * cs})
		ctx := context.Background()
		const workers = 6
		models := make([][]byte, workers)
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			models[w] = make([]byte, size)
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				rng := rand.New(rand.NewSource(int64(ci*100 + w)))
				m := models[w]
				for i := 0; i < 150; i++ {
					c := (rng.Int63n(size/cs/workers)*workers + int64(w)) * cs
					a := rng.Int63n(cs/512) * 512
					ln := cs - a
					if rng.Intn(2) == 0 {
						ln = (rng.Int63n((cs-a)/512) + 1) * 512
					}
					var err error
					switch rng.Intn(8) {
					case 0:
						err = n.Discard(ctx, c, cs)
						clear(m[c : c+cs])
					case 1:
						err = n.WriteZeroes(ctx, c+a, ln, graph.ZeroMayUnmap)
						clear(m[c+a : c+a+ln])
					case 2:
						err = n.Flush(ctx)
					case 3:
						b := make([]byte, ln)
						err = n.ReadAt(ctx, b, c+a)
						if err == nil && !bytes.Equal(b, m[c+a:c+a+ln]) {
							t.Errorf("worker %d: read %d+%d: %s", w, c+a, ln, firstDiff(b, m[c+a:c+a+ln]))
							return
						}
					default:
						b := make([]byte, ln)
						rng.Read(b)
						err = n.WriteAt(ctx, b, c+a, 0)
						copy(m[c+a:], b)
					}
					if err != nil {
						t.Error(err)
						return
					}
				}
			}(w)
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		got := readAll(t, n, 1<<20)
		for c := int64(0); c < size; c += cs {
			w := int(c / cs % workers)
			if !bytes.Equal(got[c:c+cs], models[w][c:c+cs]) {
				t.Fatalf("%v: cluster at %d: %s", opts, c, firstDiff(got[c:c+cs], models[w][c:c+cs]))
			}
		}
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		qemuCheck(t, p)
	}
}

// 512-byte clusters with 64-bit refcounts: a refcount table cluster
// covers 2 MiB, so writing a few MiB grows the table several times and
// adds refcount blocks on the way.
func TestRefcountTableGrowth(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "g.qcow2")
	const size = 7 << 20
	createImage(t, p, size, map[string]any{"cluster-size": 512, "refcount-bits": 64})
	g, n := openQcow2(t, p, false, map[string]any{"refcount-cache-size": 2048})
	data := make([]byte, size)
	rand.New(rand.NewSource(3)).Read(data)
	ctx := context.Background()
	for off := int64(0); off < size; off += 96 << 10 {
		end := min(off+96<<10, size)
		if err := n.WriteAt(ctx, data[off:end], off, 0); err != nil {
			t.Fatal(err)
		}
	}
	// An L1 table longer than a refcount block's range must still be
	// contiguous (256 MiB: 128 L1 clusters, 64 clusters per block).
	if err := n.Truncate(ctx, 256<<20, true, "off"); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte("far"), 200<<20, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.Truncate(ctx, size, true, "off"); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, p)
	b := mustRead(t, p)
	h, _ := ParseHeader(bytes.NewReader(b), int64(len(b)))
	if h.RefcountTableClusters < 2 {
		t.Errorf("refcount table did not grow: %d clusters", h.RefcountTableClusters)
	}
	if got := qemuRaw(t, p); !bytes.Equal(got, data) {
		t.Fatalf("%s", firstDiff(got, data))
	}
}

// TestWriteIntoMissingL2BeforeAllocatedOne: a write that starts in the
// range of an L2 table that does not exist yet and runs into the range of
// one that does must not take the second table's entries as unallocated
// (they were overwritten without being released: leaked clusters).
func TestWriteIntoMissingL2BeforeAllocatedOne(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	const cs = 512
	span := int64(cs / 8 * cs) // guest bytes per L2 table
	createImage(t, p, 4*span, map[string]any{"cluster-size": cs})
	g, n := openQcow2(t, p, false, nil)
	want := make([]byte, 4*span)
	// The second table's range: allocated.
	first := bytes.Repeat([]byte{1}, int(span))
	if err := n.WriteAt(ctx, first, span, 0); err != nil {
		t.Fatal(err)
	}
	copy(want[span:], first)
	// From the end of the first (missing) table into the second.
	over := bytes.Repeat([]byte{2}, 8*cs)
	if err := n.WriteAt(ctx, over, span-4*cs, 0); err != nil {
		t.Fatal(err)
	}
	copy(want[span-4*cs:], over)
	if got := readAll(t, n, span); !bytes.Equal(got, want) {
		t.Fatalf("reads back: %s", firstDiff(got, want))
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, p)
}

// TestWriteSubclusterPastFileEnd: with extended L2 entries QEMU allocates
// a host cluster but writes only the subclusters it needs, so the file may
// end inside the cluster; writing (or zeroing part of) another subcluster
// there grows the file first.
func TestWriteSubclusterPastFileEnd(t *testing.T) {
	ctx := context.Background()
	p := makeQemuImage(t, t.TempDir(), "img.qcow2", "extended_l2=on,cluster_size=2M", "4M", "write -P 0x11 0 64k")
	g, n := openQcow2(t, p, false, nil)
	want := make([]byte, 4<<20)
	copy(want, bytes.Repeat([]byte{0x11}, 64<<10))
	data := bytes.Repeat([]byte{0x22}, 64<<10)
	if err := n.WriteAt(ctx, data, 1<<20, 0); err != nil {
		t.Fatalf("write past the file's end inside a cluster: %v", err)
	}
	copy(want[1<<20:], data)
	if err := n.WriteZeroes(ctx, 1<<20+(64<<10)+1000, 70000, 0); err != nil {
		t.Fatalf("write zeroes past the file's end inside a cluster: %v", err)
	}
	if got := readAll(t, n, 1<<20); !bytes.Equal(got, want) {
		t.Fatalf("reads back: %s", firstDiff(got, want))
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, p)
	if got := qemuRaw(t, p); !bytes.Equal(got, want) {
		t.Fatalf("qemu-img reads: %s", firstDiff(got, want))
	}
}
