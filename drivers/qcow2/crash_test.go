package qcow2

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// crashFile is an in-memory file that remembers which writes were not
// flushed yet, so that a "crash" can keep any subset of them (a disk may
// persist unflushed writes in any order).
type crashFile struct {
	mu      sync.Mutex
	cur     []byte
	durable []byte
	pending []pendingWrite // since the last flush, in order
	// rng, when set, takes crash images at random writes (inside the
	// driver's metadata updates) into snaps.
	rng   *rand.Rand
	snaps [][]byte
}

type pendingWrite struct {
	off  int64
	data []byte // nil: a truncate to off
}

var (
	crashFilesMu sync.Mutex
	crashFiles   = map[string]*crashFile{}
)

type crashOpts struct {
	Filename string `qapi:"filename"`
}

type crashNode struct{ f *crashFile }

func init() {
	graph.Register(&graph.Driver{
		Name: "qcow2test-crash", Protocol: true, Prefixes: []string{"qcow2test-crash"},
		NewOptions: func() any { return &crashOpts{} },
		Open: func(_ context.Context, _ *graph.OpenContext, o any) (graph.Instance, error) {
			crashFilesMu.Lock()
			defer crashFilesMu.Unlock()
			f := crashFiles[o.(*crashOpts).Filename]
			if f == nil {
				return nil, errors.New("no such crash file")
			}
			return &crashNode{f}, nil
		},
	})
}

func (c *crashNode) ReadV(_ context.Context, off int64, iov [][]byte) error {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	for _, b := range iov {
		off += int64(copy(b, c.f.cur[off:]))
	}
	return nil
}

func (c *crashNode) WriteV(_ context.Context, off int64, iov [][]byte, _ graph.WriteFlags) error {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	for _, b := range iov {
		copy(c.f.cur[off:], b)
		c.f.pending = append(c.f.pending, pendingWrite{off, append([]byte(nil), b...)})
		off += int64(len(b))
	}
	if c.f.rng != nil && c.f.rng.Intn(16) == 0 {
		c.f.snaps = append(c.f.snaps, c.f.crashLocked(c.f.rng))
	}
	return nil
}

func (c *crashNode) Truncate(_ context.Context, size int64, _ bool, _ string) error {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	c.f.cur = resize(c.f.cur, size)
	c.f.pending = append(c.f.pending, pendingWrite{off: size})
	return nil
}

func resize(b []byte, size int64) []byte {
	if int64(len(b)) >= size {
		return b[:size:size]
	}
	return append(b, make([]byte, size-int64(len(b)))...)
}

func (c *crashNode) Flush(context.Context) error {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	c.f.durable = append([]byte(nil), c.f.cur...)
	c.f.pending = nil
	return nil
}

func (c *crashNode) Size() (int64, error) {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	return int64(len(c.f.cur)), nil
}

func (c *crashNode) Close() error { return nil }

// crash returns what the disk might hold after a crash now: the durable
// state plus a random subset of the unflushed writes, in order.
func (f *crashFile) crash(rng *rand.Rand) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.crashLocked(rng)
}

func (f *crashFile) crashLocked(rng *rand.Rand) []byte {
	img := append([]byte(nil), f.durable...)
	for _, p := range f.pending {
		if p.data == nil {
			// Size changes are metadata of the host file system: keep them.
			img = resize(img, p.off)
			continue
		}
		if rng.Intn(2) == 0 {
			continue
		}
		if end := p.off + int64(len(p.data)); end > int64(len(img)) {
			img = resize(img, end)
		}
		copy(img[p.off:], p.data)
	}
	return img
}

// TestCrashConsistency runs random writes, zeroes and discards on an
// image in a crashFile and, at many instants, checks with qemu-img check
// that a crash there leaves no corruption (leaks are allowed), and that
// what was written before the last flush reads back.
func TestCrashConsistency(t *testing.T) {
	dir := t.TempDir()
	for ci, opts := range []map[string]any{
		{"cluster-size": 4096},
		{"cluster-size": 512, "refcount-bits": 1},
		{"cluster-size": 16384, "extended-l2": true},
		{"cluster-size": 4096, "version": "v2"},
	} {
		src := filepath.Join(dir, "src.qcow2")
		const size = 8 << 20
		createImage(t, src, size, opts)
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		name := "c" + itoa(int64(ci))
		f := &crashFile{cur: b, durable: append([]byte(nil), b...), rng: rand.New(rand.NewSource(int64(ci) + 100))}
		crashFilesMu.Lock()
		crashFiles[name] = f
		crashFilesMu.Unlock()
		g := graph.New(nil)
		n, err := g.Add(context.Background(), map[string]any{
			"driver": "qcow2", "node-name": "q", "discard": "unmap",
			"l2-cache-size": 1024, "l2-cache-entry-size": 512, "refcount-cache-size": 1024,
			"file": map[string]any{"driver": "qcow2test-crash", "filename": name},
		}, qapi.JSON)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewSource(int64(ci)))
		cs := int64(opts["cluster-size"].(int))
		m := &model{data: make([]byte, size)}
		flushed := append([]byte(nil), m.data...)
		dirty := make([]bool, size/512)
		ctx := context.Background()
		for step := 0; step < 15; step++ {
			for k := 0; k < 20; k++ {
				off := rng.Int63n(size/512) * 512
				ln := min((rng.Int63n(2*cs/512)+1)*512, size-off)
				if rng.Intn(2) == 0 {
					// Keep half of the requests in the first megabyte so
					// that clusters are rewritten, zeroed and discarded.
					off %= 1 << 20
				}
				switch rng.Intn(6) {
				case 0:
					if err := n.Discard(ctx, off, ln); err != nil {
						t.Fatal(err)
					}
					// Discarded data is undefined until rewritten.
					for s := off / 512; s < (off+ln)/512; s++ {
						dirty[s] = true
					}
					// Discard may or may not happen: the model cannot
					// know, so read back what the image says.
					buf := make([]byte, ln)
					if err := n.ReadAt(ctx, buf, off); err != nil {
						t.Fatal(err)
					}
					m.write(off, buf)
				case 1:
					if err := n.WriteZeroes(ctx, off, ln, graph.ZeroMayUnmap); err != nil {
						t.Fatal(err)
					}
					m.write(off, make([]byte, ln))
				default:
					buf := make([]byte, ln)
					rng.Read(buf)
					if err := n.WriteAt(ctx, buf, off, 0); err != nil {
						t.Fatal(err)
					}
					m.write(off, buf)
				}
				for s := off / 512; s < (off+ln)/512; s++ {
					dirty[s] = true
				}
			}
			if rng.Intn(3) == 0 {
				if err := n.Flush(ctx); err != nil {
					t.Fatal(err)
				}
				flushed = append(flushed[:0], m.data...)
				clear(dirty)
			}
			f.mu.Lock()
			images := append(f.snaps, f.crashLocked(rng))
			f.snaps = nil
			f.mu.Unlock()
			var crashed []byte
			p := filepath.Join(dir, "crash.qcow2")
			for _, crashed = range images {
				if err := os.WriteFile(p, crashed, 0o644); err != nil {
					t.Fatal(err)
				}
				cmd := exec.Command(qemuTool(t, "qemu-img"), "check", p)
				out, err := cmd.CombinedOutput()
				var ee *exec.ExitError
				if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 3) {
					t.Fatalf("%v step %d: qemu-img check after a crash: %v\n%s", opts, step, err, out)
				}
			}
			got := qemuRaw(t, p)
			for s := range dirty {
				if !dirty[s] && !bytes.Equal(got[s*512:s*512+512], flushed[s*512:s*512+512]) {
					t.Fatalf("%v step %d: flushed sector %d lost after a crash", opts, step, s)
				}
			}
		}
		g.Close()
	}
}
