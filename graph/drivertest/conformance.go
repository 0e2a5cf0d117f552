package drivertest

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"blockbackend/graph"
)

// Config describes the driver under test to Run.
type Config struct {
	// Open returns a fresh writable node of size bytes that reads as
	// zeros, in g. Each subtest opens its own.
	Open func(t *testing.T, g *graph.Graph, size int64) *graph.Node
	// Reopen, if set, closes n and opens the same image again (data must
	// persist across it).
	Reopen func(t *testing.T, g *graph.Graph, n *graph.Node) *graph.Node
	// Size of the images (default 8 MiB).
	Size int64
	// Align is the driver's request alignment (default 1: any offset).
	Align int64
	// Resizable drivers must grow with Truncate; new bytes read as zeros.
	Resizable bool
	// Ops is the number of random operations of the model test (default 400).
	Ops int
}

func (c *Config) defaults() {
	if c.Size == 0 {
		c.Size = 8 << 20
	}
	if c.Align == 0 {
		c.Align = 1
	}
	if c.Ops == 0 {
		c.Ops = 400
	}
}

// Run is the conformance suite: every driver's tests call it with a way
// to open a fresh node. It checks semantics, not speed.
func Run(t *testing.T, c Config) {
	c.defaults()
	t.Run("ZeroFilled", func(t *testing.T) { testZeroFilled(t, c) })
	t.Run("Model", func(t *testing.T) { testModel(t, c) })
	t.Run("Concurrent", func(t *testing.T) { testConcurrent(t, c) })
	t.Run("BlockStatus", func(t *testing.T) { testBlockStatus(t, c) })
	if c.Resizable {
		t.Run("Grow", func(t *testing.T) { testGrow(t, c) })
	}
	if c.Reopen != nil {
		t.Run("Reopen", func(t *testing.T) { testReopen(t, c) })
	}
}

func open(t *testing.T, c Config) (*graph.Graph, *graph.Node) {
	t.Helper()
	g := graph.New(nil)
	t.Cleanup(func() { g.Close() })
	n := c.Open(t, g, c.Size)
	if n.SizeNow() != c.Size {
		t.Fatalf("new node has %d bytes, want %d", n.SizeNow(), c.Size)
	}
	return g, n
}

var ctx = context.Background()

func testZeroFilled(t *testing.T, c Config) {
	_, n := open(t, c)
	buf := make([]byte, 1<<20)
	for off := int64(0); off < c.Size; off += int64(len(buf)) {
		b := buf[:min(int64(len(buf)), c.Size-off)]
		if err := n.ReadAt(ctx, b, off); err != nil {
			t.Fatal(err)
		}
		if i := bytes.IndexFunc(b, func(r rune) bool { return r != 0 }); i >= 0 {
			t.Fatalf("new image: byte %d is not zero", off+int64(i))
		}
	}
}

// model is the flat image a node must equal. Bytes in maybe may read
// either as model's value or as zero (a discard may or may not have
// dropped them).
type model struct {
	data  []byte
	maybe []bool
}

func newModel(size int64) *model {
	return &model{data: make([]byte, size), maybe: make([]bool, size)}
}

func (m *model) write(off int64, b []byte) {
	copy(m.data[off:], b)
	clear(m.maybe[off : off+int64(len(b))])
}

func (m *model) zero(off, n int64) {
	clear(m.data[off : off+n])
	clear(m.maybe[off : off+n])
}

func (m *model) discard(off, n int64) {
	for i := off; i < off+n; i++ {
		m.maybe[i] = true
	}
}

// check reads [off, off+n) from node and compares.
func (m *model) check(t *testing.T, node *graph.Node, off, n int64, what string) {
	t.Helper()
	got := make([]byte, n)
	if err := node.ReadAt(ctx, got, off); err != nil {
		t.Fatalf("%s: read [%d,+%d): %v", what, off, n, err)
	}
	if bytes.Equal(got, m.data[off:off+n]) {
		return
	}
	for i := range got {
		p := off + int64(i)
		if got[i] != m.data[p] && !(m.maybe[p] && got[i] == 0) {
			t.Fatalf("%s: byte %d is %#x, want %#x", what, p, got[i], m.data[p])
		}
	}
}

// settle checks [off, off+n) after a discard (each byte old or zero) and
// then takes what the node reads as the model's, so later checks are exact
// again.
func (m *model) settle(t *testing.T, node *graph.Node, off, n int64, what string) {
	t.Helper()
	m.check(t, node, off, n, what)
	if err := node.ReadAt(ctx, m.data[off:off+n], off); err != nil {
		t.Fatal(err)
	}
	clear(m.maybe[off : off+n])
}

// randRange picks an aligned range, biased to small requests and to
// clusters that earlier requests touched.
func randRange(rng *rand.Rand, c Config) (off, n int64) {
	sizes := []int64{512, 4096, 65536, 1 << 20}
	n = sizes[rng.IntN(len(sizes))]
	if rng.IntN(4) == 0 {
		n = 1 + rng.Int64N(3*65536)
	}
	n = max(n/c.Align*c.Align, c.Align)
	// Half the requests land in the first 1 MiB, so they overlap.
	span := c.Size
	if rng.IntN(2) == 0 {
		span = min(c.Size, 1<<20)
	}
	n = min(n, span)
	off = rng.Int64N(span-n+1) / c.Align * c.Align
	return off, n
}

// splitIOV cuts b into 1..4 buffers at random aligned points, so drivers
// see vectored requests whose pieces cross their own boundaries.
func splitIOV(rng *rand.Rand, b []byte, align int64) [][]byte {
	var iov [][]byte
	for k := rng.IntN(4); k > 0 && int64(len(b)) > align; k-- {
		cut := (1 + rng.Int64N(int64(len(b))-1)) / align * align
		if cut == 0 {
			break
		}
		iov = append(iov, b[:cut])
		b = b[cut:]
	}
	return append(iov, b)
}

// pool is random non-zero bytes that writes copy their data from: filling
// each write byte by byte from the generator would dominate the suite's
// run time under the race detector.
var pool = func() []byte {
	rng := rand.New(rand.NewPCG(3, 3))
	b := make([]byte, 2<<20)
	for i := range b {
		b[i] = byte(rng.IntN(255) + 1)
	}
	return b
}()

func testModel(t *testing.T, c Config) {
	for seed := uint64(1); seed <= 3; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			_, n := open(t, c)
			rng := rand.New(rand.NewPCG(seed, 0x5eed))
			m := newModel(c.Size)
			for i := 0; i < c.Ops; i++ {
				off, l := randRange(rng, c)
				what := ""
				switch op := rng.IntN(10); {
				case op < 5:
					k := rng.Int64N(int64(len(pool)) - l + 1)
					b := append([]byte(nil), pool[k:k+l]...)
					flags := graph.WriteFlags(0)
					if op == 0 {
						flags = graph.WriteFUA
					}
					what = fmt.Sprintf("op %d: write [%d,+%d) flags %d", i, off, l, flags)
					if err := n.WriteV(ctx, off, splitIOV(rng, b, c.Align), flags); err != nil {
						t.Fatalf("%s: %v", what, err)
					}
					m.write(off, b)
				case op < 7:
					flags := graph.ZeroFlags(0)
					if op == 6 {
						flags = graph.ZeroMayUnmap
					}
					what = fmt.Sprintf("op %d: write-zeroes [%d,+%d) flags %d", i, off, l, flags)
					if err := n.WriteZeroes(ctx, off, l, flags); err != nil {
						t.Fatalf("%s: %v", what, err)
					}
					m.zero(off, l)
				case op < 8:
					what = fmt.Sprintf("op %d: discard [%d,+%d)", i, off, l)
					if err := n.Discard(ctx, off, l); err != nil {
						t.Fatalf("%s: %v", what, err)
					}
					m.discard(off, l)
					m.settle(t, n, off, l, what)
				case op < 9:
					what = fmt.Sprintf("op %d: flush", i)
					if err := n.Flush(ctx); err != nil {
						t.Fatalf("%s: %v", what, err)
					}
				default:
					what = fmt.Sprintf("op %d: read", i)
				}
				// Check around the request and somewhere else.
				lo := max(0, off-4096)
				m.check(t, n, lo, min(c.Size, off+l+4096)-lo, what)
				o2, l2 := randRange(rng, c)
				m.check(t, n, o2, l2, what+" (elsewhere)")
			}
			m.check(t, n, 0, c.Size, "final")
		})
	}
}

func testConcurrent(t *testing.T, c Config) {
	_, n := open(t, c)
	// Eight writers, each owning every eighth 512-byte piece (rounded up
	// to the alignment) of the first MiB: their requests share clusters,
	// so a driver that allocates a cluster twice loses data here.
	piece := max(512, c.Align)
	const writers = 8
	region := min(c.Size, 1<<20) / (piece * writers) * (piece * writers)
	m := newModel(c.Size)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := int64(0); w < writers; w++ {
		b := bytes.Repeat([]byte{byte(0x10 + w)}, int(piece))
		for off := w * piece; off < region; off += piece * writers {
			m.write(off, b)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := w * piece; off < region; off += piece * writers {
				if err := n.WriteAt(ctx, b, off, 0); err != nil {
					errs <- fmt.Errorf("writer %d at %d: %w", w, off, err)
					return
				}
			}
		}()
	}
	// Readers of the rest meanwhile.
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65536/c.Align*c.Align+c.Align)
		for off := region; off+int64(len(buf)) <= c.Size && off < region+(4<<20); off += int64(len(buf)) {
			if err := n.ReadAt(ctx, buf, off); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := n.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	m.check(t, n, 0, c.Size, "after concurrent writes")
}

func testBlockStatus(t *testing.T, c Config) {
	_, n := open(t, c)
	rng := rand.New(rand.NewPCG(7, 7))
	m := newModel(c.Size)
	for i := 0; i < 40; i++ {
		off, l := randRange(rng, c)
		if i%3 == 2 {
			if err := n.WriteZeroes(ctx, off, l, graph.ZeroMayUnmap); err != nil {
				t.Fatal(err)
			}
			m.zero(off, l)
			continue
		}
		b := bytes.Repeat([]byte{byte(i + 1)}, int(l))
		if err := n.WriteAt(ctx, b, off, 0); err != nil {
			t.Fatal(err)
		}
		m.write(off, b)
	}
	// The extents tile the image; a range reported zero reads as zeros.
	for off := int64(0); off < c.Size; {
		ext, err := n.BlockStatus(ctx, off, c.Size-off)
		if err != nil {
			t.Fatalf("block status at %d: %v", off, err)
		}
		if ext.Length <= 0 || ext.Length > c.Size-off {
			t.Fatalf("block status at %d: length %d", off, ext.Length)
		}
		if ext.Status&graph.StatusZero != 0 {
			for p := off; p < off+ext.Length; p++ {
				if m.data[p] != 0 {
					t.Fatalf("block status says [%d,+%d) reads as zeros, byte %d is %#x", off, ext.Length, p, m.data[p])
				}
			}
		}
		off += ext.Length
	}
	m.check(t, n, 0, c.Size, "after block status")
}

func testGrow(t *testing.T, c Config) {
	g, n := open(t, c)
	b := bytes.Repeat([]byte{0xab}, int(c.Align*8))
	last := c.Size - int64(len(b))
	if err := n.WriteAt(ctx, b, last, 0); err != nil {
		t.Fatal(err)
	}
	grown := c.Size + c.Size/2
	if err := resize(g, n, grown); err != nil {
		t.Fatalf("grow to %d: %v", grown, err)
	}
	if n.SizeNow() != grown {
		t.Fatalf("size after grow %d, want %d", n.SizeNow(), grown)
	}
	m := newModel(grown)
	m.write(last, b)
	m.check(t, n, last-c.Align*8, grown-(last-c.Align*8), "after grow")
}

func testReopen(t *testing.T, c Config) {
	g, n := open(t, c)
	rng := rand.New(rand.NewPCG(11, 11))
	m := newModel(c.Size)
	for i := 0; i < 30; i++ {
		off, l := randRange(rng, c)
		b := bytes.Repeat([]byte{byte(i + 1)}, int(l))
		if err := n.WriteAt(ctx, b, off, 0); err != nil {
			t.Fatal(err)
		}
		m.write(off, b)
	}
	if err := n.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	n = c.Reopen(t, g, n)
	m.check(t, n, 0, c.Size, "after reopen")
}

// resize grows n the way block_resize does: with a temporary user that
// holds the resize permission.
func resize(g *graph.Graph, n *graph.Node, size int64) error {
	return g.Resize(ctx, n, size)
}
