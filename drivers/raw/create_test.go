package raw_test

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	_ "blockbackend/drivers/file"
	"blockbackend/graph"
	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// TestCreate formats a file node as raw: the node takes the size, with
// the first 4 KiB written (as qemu-img create leaves it) unless
// preallocated.
func TestCreate(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		prealloc  string
		size      int64
		minBlocks int64 // 512-byte blocks allocated, at least
		maxBlocks int64
	}{
		{"off", 1 << 20, 8, 8},
		{"off", 1000, 1, 8},
		{"full", 1 << 20, 2048, 4096},
	} {
		dir := t.TempDir()
		path := filepath.Join(dir, "x.raw")
		g := graph.New(nil)
		file := graph.Lookup("file")
		fo := file.NewCreateOptions()
		if err := qapi.Decode(map[string]any{"filename": path, "size": "0"}, fo, qapi.Keyval); err != nil {
			t.Fatal(err)
		}
		cc := g.NewCreateContext(nil)
		if err := file.Create(ctx, cc, fo); err != nil {
			t.Fatal(err)
		}
		n, err := g.OpenImage(ctx, path, graph.ImageOptions{Format: "file"})
		if err != nil {
			t.Fatal(err)
		}
		u, err := g.AttachUser(user{}, n, "root", permissions.Write|permissions.Resize, permissions.All)
		if err != nil {
			t.Fatal(err)
		}
		raw := graph.Lookup("raw")
		ro := raw.NewImageCreateOptions()
		if err := qapi.Decode(map[string]any{"file": n.Name(), "size": c.size, "preallocation": c.prealloc}, ro, qapi.Keyval); err != nil {
			t.Fatal(err)
		}
		if err := raw.ImageCreate(ctx, cc, ro); err != nil {
			t.Fatal(err)
		}
		g.DetachUser(u)
		g.Close()
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		if st.Size != c.size || st.Blocks < c.minBlocks || st.Blocks > c.maxBlocks {
			t.Errorf("%+v: size %d, %d blocks", c, st.Size, st.Blocks)
		}
		os.Remove(path)
	}
}

type user struct{}

func (user) UserDesc() string { return "test" }

func TestCreateRefusesMetadata(t *testing.T) {
	ro := graph.Lookup("raw").NewImageCreateOptions()
	err := qapi.Decode(map[string]any{"file": "n", "size": "1", "preallocation": "metadata"}, ro, qapi.Keyval)
	if err == nil {
		t.Fatal("preallocation=metadata accepted for raw")
	}
}

func TestNoBlockdevCreate(t *testing.T) {
	if d := graph.Lookup("raw"); d.Create != nil || d.NewCreateOptions != nil {
		t.Error("raw offers blockdev-create, which QEMU 7.2 refuses")
	}
}

func TestMeasure(t *testing.T) {
	m := graph.Lookup("raw").Measure
	res, err := m(context.Background(), graph.Lookup("raw").NewImageCreateOptions(), 1000, nil)
	if err != nil || res.Required != 1024 || res.FullyAllocated != 1024 || res.Bitmaps != -1 {
		t.Errorf("measure 1000: %+v %v", res, err)
	}
}
