package qcow

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// TestDaemonRefusesAES: outside the image tool an AES image neither
// opens (with or without its key) nor is created; plain images do.
func TestDaemonRefusesAES(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	g.ImageTool = false // the daemon's graph
	for _, enc := range []bool{true, false} {
		opts := map[string]any{"driver": "qcow", "node-name": nextName(),
			"file": map[string]any{"driver": "file", "filename": filepath.Join("testdata", "aes.qcow")}, "read-only": true}
		if enc {
			opts["encrypt"] = map[string]any{"key-secret": "s0"}
		}
		_, err := g.Add(ctx, opts, qapi.JSON)
		if err == nil || !strings.Contains(err.Error(), "Use of AES-CBC encrypted qcow images is refused in node '") ||
			!strings.Contains(err.Error(), "predictable IVs") || !strings.Contains(err.Error(), "blockbackend img convert") {
			t.Fatalf("AES image opened in the daemon: %v", err)
		}
	}
	n, err := g.Add(ctx, map[string]any{"driver": "qcow", "node-name": nextName(), "read-only": true,
		"file": map[string]any{"driver": "file", "filename": filepath.Join("testdata", "written.qcow")}}, qapi.JSON)
	if err != nil || n == nil {
		t.Fatalf("plain image: %v", err)
	}
	p := filepath.Join(t.TempDir(), "new.qcow")
	os.WriteFile(p, nil, 0o644)
	fn, err := g.Add(ctx, map[string]any{"driver": "file", "filename": p, "node-name": "newfile"}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	run, err := g.PrepareCreate(map[string]any{"driver": "qcow", "file": fn.Name(), "size": 1 << 20,
		"encrypt": map[string]any{"format": "qcow", "key-secret": "s0"}}, qapi.JSON, "options")
	if err == nil {
		err = run(ctx)
	}
	if err == nil || !strings.Contains(err.Error(), "is refused") {
		t.Fatalf("AES image created in the daemon: %v", err)
	}
}

// TestKeyErrors: an open without the key fails with QEMU's message; an
// open for metadata only (img info) needs none, and its data I/O fails.
func TestKeyErrors(t *testing.T) {
	ctx := context.Background()
	g := newGraph(t)
	img := filepath.Join(t.TempDir(), "aes.qcow")
	b, _ := os.ReadFile(filepath.Join("testdata", "aes.qcow"))
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, ro := range []bool{false, true} {
		_, err := g.Add(ctx, map[string]any{"driver": "qcow", "node-name": nextName(),
			"file": map[string]any{"driver": "file", "filename": img}, "read-only": ro}, qapi.JSON)
		if err == nil || !strings.Contains(err.Error(), "Parameter 'encrypt.key-secret' is required for cipher") {
			t.Fatalf("open (read-only %v) without key: %v", ro, err)
		}
	}
	n, err := g.OpenImage(ctx, img, graph.ImageOptions{Format: "qcow", ReadOnly: true, NoIO: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, graph.ErrNoIO) {
		t.Fatalf("read without key: %v", err)
	}
	for _, tc := range []struct {
		img string
		enc map[string]any
		msg string
	}{
		{img, map[string]any{"key-secret": "nosuch"}, "No secret with id 'nosuch'"},
		{img, map[string]any{"key-secret": "s0", "format": "luks"}, "Header reported 'aes' encryption format but options specify 'luks'"},
		{filepath.Join("testdata", "written.qcow"), map[string]any{"format": "aes"}, "No encryption in image header, but options specified format 'aes'"},
	} {
		_, err = g.Add(ctx, map[string]any{"driver": "qcow", "node-name": nextName(), "read-only": true,
			"file": map[string]any{"driver": "file", "filename": tc.img}, "encrypt": tc.enc}, qapi.JSON)
		if err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Fatalf("%v: got %v, want %q", tc.enc, err, tc.msg)
		}
	}
	// A key for a plain image is ignored, as in QEMU.
	if _, err := g.Add(ctx, map[string]any{"driver": "qcow", "node-name": nextName(), "read-only": true,
		"file":    map[string]any{"driver": "file", "filename": filepath.Join("testdata", "written.qcow")},
		"encrypt": map[string]any{"key-secret": "s0"}}, qapi.JSON); err != nil {
		t.Fatal(err)
	}
}

// TestReopen: read-only and back (blockdev-reopen), keeping the key
// given at open; an AES image opened for info without its key cannot
// become writable.
func TestReopen(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "r.qcow")
	b, _ := os.ReadFile(filepath.Join("testdata", "aes.qcow"))
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	g := newGraph(t)
	open := func(name string, key bool) *graph.Node {
		o := map[string]any{"driver": "qcow", "node-name": name, "read-only": true,
			"file": map[string]any{"driver": "file", "filename": p, "node-name": name + "f", "read-only": false}}
		if key {
			o["encrypt"] = map[string]any{"key-secret": "s0"}
		}
		n, err := g.Add(ctx, o, qapi.JSON)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	reopen := func(name string, ro bool) error {
		return g.Reopen(ctx, []map[string]any{{"driver": "qcow", "node-name": name, "read-only": ro, "file": name + "f"}}, qapi.JSON)
	}
	// Opened for metadata only, without the key: it stays read-only.
	g2 := newGraph(t)
	nk, err := g2.OpenImage(ctx, p, graph.ImageOptions{Format: "qcow", ReadOnly: true, NoIO: true})
	if err != nil {
		t.Fatal(err)
	}
	err = g2.Reopen(ctx, []map[string]any{{"driver": "qcow", "node-name": nk.Name(), "read-only": false,
		"file": nk.Child("file").Node().Name()}}, qapi.JSON)
	if err == nil || !strings.Contains(err.Error(), "encrypt.key-secret") {
		t.Fatalf("read-write without the key: %v", err)
	}
	g2.Close()
	n := open("q", true)
	if err := reopen("q", false); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte("after reopen"), 70000, 0); err != nil {
		t.Fatal(err)
	}
	if err := reopen("q", true); err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(ctx, []byte("x"), 0, 0); err == nil {
		t.Fatal("write on a node reopened read-only")
	}
	buf := make([]byte, 12)
	if err := n.ReadAt(ctx, buf, 70000); err != nil || string(buf) != "after reopen" {
		t.Fatalf("read back %q: %v", buf, err)
	}
	if err := g.Delete(ctx, "q"); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "r.raw")
	qemu(t, "qemu-img", "convert", "--object", testSecret, "--image-opts",
		"driver=qcow,file.filename="+p+",encrypt.key-secret=s0", "-O", "raw", out)
	raw, _ := os.ReadFile(out)
	if string(raw[70000:70012]) != "after reopen" || raw[0] != 0x5a {
		t.Fatalf("qemu-img reads %q, %#x", raw[70000:70012], raw[0])
	}
}
