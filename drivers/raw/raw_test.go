package raw_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"syscall"
	"testing"

	_ "blockbackend/drivers/raw"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

type memOpts struct {
	Filename string `qapi:"filename"`
}

var (
	disksMu sync.Mutex
	disks   = map[string][]byte{}
)

type mem struct{ name string }

func (m *mem) ReadV(_ context.Context, off int64, iov [][]byte) error {
	disksMu.Lock()
	defer disksMu.Unlock()
	for _, b := range iov {
		off += int64(copy(b, disks[m.name][off:]))
	}
	return nil
}

func (m *mem) WriteV(_ context.Context, off int64, iov [][]byte, _ graph.WriteFlags) error {
	disksMu.Lock()
	defer disksMu.Unlock()
	for _, b := range iov {
		off += int64(copy(disks[m.name][off:], b))
	}
	return nil
}

func (m *mem) Flush(context.Context) error { return nil }
func (m *mem) Size() (int64, error) {
	disksMu.Lock()
	defer disksMu.Unlock()
	return int64(len(disks[m.name])), nil
}
func (m *mem) Close() error     { return nil }
func (m *mem) Filename() string { return m.name }

func init() {
	graph.Register(&graph.Driver{
		Name: "rawtest-mem", Protocol: true, Prefixes: []string{"rawtest"},
		NewOptions: func() any { return &memOpts{} },
		Open: func(_ context.Context, _ *graph.OpenContext, o any) (graph.Instance, error) {
			return &mem{name: o.(*memOpts).Filename}, nil
		},
	})
	// A format whose header is "FAKEFMT": probing must prefer it to raw.
	graph.Register(&graph.Driver{
		Name: "rawtest-fmt",
		NewOptions: func() any {
			return &struct {
				File graph.ChildRef `qapi:"file"`
			}{}
		},
		Open: func(context.Context, *graph.OpenContext, any) (graph.Instance, error) {
			return nil, errors.New("not openable")
		},
		Probe: func(hdr []byte, _ string) int {
			if bytes.HasPrefix(hdr, []byte("FAKEFMT")) {
				return 100
			}
			return 0
		},
	})
}

func newDisk(name string, size int) {
	disksMu.Lock()
	defer disksMu.Unlock()
	d := make([]byte, size)
	for i := range d {
		d[i] = byte(i / 512)
	}
	disks[name] = d
}

var ctx = context.Background()

func TestSlice(t *testing.T) {
	newDisk("rawtest:slice", 8192)
	g := graph.New(nil)
	defer g.Close()
	n, err := g.Add(ctx, map[string]any{"driver": "raw", "node-name": "r", "offset": 1024, "size": 2048,
		"file": map[string]any{"driver": "rawtest-mem", "filename": "rawtest:slice"}}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	if n.SizeNow() != 2048 {
		t.Fatalf("size %d", n.SizeNow())
	}
	buf := make([]byte, 512)
	if err := n.ReadAt(ctx, buf, 512); err != nil || buf[0] != 3 {
		t.Fatalf("read of the slice: %v %d", err, buf[0])
	}
	if err := n.ReadAt(ctx, buf, 2048); err == nil {
		t.Fatal("read past the slice succeeded")
	}
	if err := g.Resize(ctx, n, 4096); err == nil || !strings.Contains(err.Error(), "Cannot resize fixed-size raw disks") {
		t.Fatalf("resize of a slice: %v", err)
	}
	_, err = g.Add(ctx, map[string]any{"driver": "raw", "node-name": "r2", "offset": 4096, "size": 8192,
		"file": map[string]any{"driver": "rawtest-mem", "filename": "rawtest:slice"}}, qapi.JSON)
	if err == nil || !strings.Contains(err.Error(), "The sum of offset (4096) and size (8192) has to be smaller or equal to the  actual size of the containing file (8192)") {
		t.Fatalf("slice past the end: %v", err)
	}
}

func TestProbedRawGuardsSectorZero(t *testing.T) {
	newDisk("rawtest:probed", 4096)
	g := graph.New(nil)
	defer g.Close()
	var warned string
	n, err := g.OpenImage(ctx, "rawtest:probed", graph.ImageOptions{Warn: func(s string) { warned = s }})
	if err != nil {
		t.Fatal(err)
	}
	if n.DriverName() != "raw" || !strings.Contains(warned, "probing guessed raw") {
		t.Fatalf("driver %s, warning %q", n.DriverName(), warned)
	}
	hdr := append([]byte("FAKEFMT"), make([]byte, 505)...)
	err = n.WriteAt(ctx, hdr, 0, 0)
	if !errors.Is(err, syscall.EPERM) {
		t.Fatalf("write of a format header to a probed raw image: %v", err)
	}
	if err := n.WriteAt(ctx, make([]byte, 512), 0, 0); err != nil {
		t.Fatalf("harmless write to sector 0: %v", err)
	}
	if err := n.WriteAt(ctx, hdr, 512, 0); err != nil {
		t.Fatalf("write past sector 0: %v", err)
	}
	// Given explicitly, raw has no such restriction.
	n2, err := g.OpenImage(ctx, "rawtest:probed", graph.ImageOptions{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	if err := n2.WriteAt(ctx, hdr, 0, 0); err != nil {
		t.Fatalf("explicit raw: %v", err)
	}
	// And now the image probes as the other format.
	_, err = g.OpenImage(ctx, "rawtest:probed", graph.ImageOptions{})
	if err == nil || !strings.Contains(err.Error(), "not openable") {
		t.Fatalf("probe after the header was written: %v", err)
	}
}

func TestJSONFilename(t *testing.T) {
	newDisk("rawtest:json", 4096)
	g := graph.New(nil)
	defer g.Close()
	n, err := g.OpenImage(ctx, `json:{"driver": "raw", "offset": 512, "file": {"driver": "rawtest-mem", "filename": "rawtest:json"}}`, graph.ImageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.SizeNow() != 3584 {
		t.Fatalf("size %d", n.SizeNow())
	}
	if _, err := g.OpenImage(ctx, "nosuchproto:x", graph.ImageOptions{}); err == nil || err.Error() != "Unknown protocol 'nosuchproto'" {
		t.Fatalf("unknown protocol: %v", err)
	}
}
