package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Interop tests against QEMU 7.2's NBD client (qemu-img, qemu-io, qemu-nbd;
// Debian package qemu-utils) and libnbd's tools (nbdinfo, nbdcopy; Debian
// package libnbd-bin). Each skips, saying so, when its tool is missing.

func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (Debian package %s): skipping interop test", name, pkg)
	}
	return p
}

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func nbdURL(export, sock string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, sock)
}

// interopExport is a 4 MiB export with data in grains 0, 1 and 10 and holes
// elsewhere.
func interopExport(t *testing.T) (*memFull, []byte) {
	f := newFull(4 << 20)
	want := make([]byte, 4<<20)
	copy(want, pattern(2*memGrain, 11))
	copy(want[10*memGrain:], pattern(memGrain, 77))
	ctx := context.Background()
	if err := f.WriteV(ctx, 0, [][]byte{want[:2*memGrain]}, false); err != nil {
		t.Fatal(err)
	}
	if err := f.WriteV(ctx, 10*memGrain, [][]byte{want[10*memGrain : 11*memGrain]}, false); err != nil {
		t.Fatal(err)
	}
	return f, want
}

func TestIntegrationQemuImg(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	f, want := interopExport(t)
	_, sock := startServer(t, ServerOptions{}, &Export{Name: "disk", Backend: f, Writable: true})
	url := nbdURL("disk", sock)

	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal([]byte(runTool(t, qimg, "info", "--output=json", url)), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 4<<20 {
		t.Errorf("qemu-img info: virtual-size %d, want %d", info.VirtualSize, 4<<20)
	}
	if out := runTool(t, qimg, "info", url); !strings.Contains(out, "virtual size: 4 MiB (4194304 bytes)") {
		t.Errorf("qemu-img info:\n%s", out)
	}

	out := filepath.Join(t.TempDir(), "out.raw")
	runTool(t, qimg, "convert", "-O", "raw", url, out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("qemu-img convert: image differs from the export")
	}

	var m []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
		Zero   bool  `json:"zero"`
	}
	if err := json.Unmarshal([]byte(runTool(t, qimg, "map", "--output=json", url)), &m); err != nil {
		t.Fatal(err)
	}
	type span struct {
		start, length int64
		data, zero    bool
	}
	var spans []span
	for _, e := range m {
		spans = append(spans, span{e.Start, e.Length, e.Data, e.Zero})
	}
	wantSpans := []span{
		{0, 2 * memGrain, true, false},
		{2 * memGrain, 8 * memGrain, false, true},
		{10 * memGrain, memGrain, true, false},
		{11 * memGrain, 4<<20 - 11*memGrain, false, true},
	}
	if fmt.Sprint(spans) != fmt.Sprint(wantSpans) {
		t.Errorf("qemu-img map: %v, want %v", spans, wantSpans)
	}

	// Writing an image into the export: qemu-img zeroes the target first
	// (fast zero), then writes the data.
	src := filepath.Join(t.TempDir(), "src.raw")
	srcData := make([]byte, 4<<20)
	copy(srcData[1<<20:], pattern(300<<10, 5))
	if err := os.WriteFile(src, srcData, 0o644); err != nil {
		t.Fatal(err)
	}
	runTool(t, qimg, "convert", "-n", "-f", "raw", "-O", "raw", src, url)
	if !bytes.Equal(f.snapshot(), srcData) {
		t.Error("qemu-img convert -n into the export: contents differ")
	}
	runTool(t, qimg, "compare", "-f", "raw", "-F", "raw", src, url)
}

func TestIntegrationQemuIO(t *testing.T) {
	qio := needTool(t, "qemu-io", "qemu-utils")
	for _, full := range []bool{false, true} {
		var bk Backend = newMem(1 << 20)
		if full {
			bk = newFull(1 << 20)
		}
		_, sock := startServer(t, ServerOptions{}, &Export{Name: "e", Backend: bk, Writable: true})
		out := runTool(t, qio, "-f", "raw",
			"-c", "write -P 0xab 0 64k",
			"-c", "read -P 0xab 0 64k",
			"-c", "write -z 64k 64k",
			"-c", "read -P 0 64k 64k",
			"-c", "write -P 0xcd -f 128k 4k", // FUA
			"-c", "discard 512k 64k",
			"-c", "aio_write -P 0x11 256k 4k",
			"-c", "aio_write -P 0x22 260k 4k",
			"-c", "aio_flush",
			"-c", "read -P 0x11 256k 4k",
			"-c", "read -P 0x22 260k 4k",
			"-c", "flush",
			nbdURL("e", sock))
		if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
			t.Errorf("qemu-io (full=%v):\n%s", full, out)
		}
		var data []byte
		if full {
			data = bk.(*memFull).snapshot()
		} else {
			data = bk.(*memCore).snapshot()
		}
		if !bytes.Equal(data[:64<<10], bytes.Repeat([]byte{0xab}, 64<<10)) || data[128<<10] != 0xcd {
			t.Errorf("qemu-io writes did not reach the backend (full=%v)", full)
		}
	}
	// Read-only export: qemu-io opens it read-only and writes fail.
	_, sock := startServer(t, ServerOptions{}, &Export{Name: "ro", Backend: newMem(1 << 20)})
	out, _ := exec.Command(qio, "-r", "-f", "raw", "-c", "read 0 4k", "-c", "write 0 4k", nbdURL("ro", sock)).CombinedOutput()
	if !strings.Contains(string(out), "read 4096/4096") || strings.Contains(string(out), "wrote 4096/4096") {
		t.Errorf("qemu-io on a read-only export:\n%s", out)
	}
}

func TestIntegrationQemuNbdList(t *testing.T) {
	qnbd := needTool(t, "qemu-nbd", "qemu-utils")
	_, sock := startServer(t, ServerOptions{},
		&Export{Name: "one", Description: "first disk", Backend: newFull(1 << 20), Writable: true, MultiConn: true},
		&Export{Name: "two", Backend: newMem(2 << 20)})
	out := runTool(t, qnbd, "--list", "-k", sock)
	for _, s := range []string{"exports available: 2", "export: 'one'", "description: first disk",
		"size:  1048576", "export: 'two'", "size:  2097152", "base:allocation", "multi"} {
		if !strings.Contains(out, s) {
			t.Errorf("qemu-nbd --list lacks %q:\n%s", s, out)
		}
	}
}

func TestIntegrationQemuImgTCP(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ServerOptions{})
	f, want := interopExport(t)
	if err := s.AddExport(&Export{Name: "tcp", Backend: f}); err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	url := fmt.Sprintf("nbd://%s/tcp", l.Addr())
	if out := runTool(t, qimg, "info", url); !strings.Contains(out, "(4194304 bytes)") {
		t.Errorf("qemu-img info over TCP:\n%s", out)
	}
	out := filepath.Join(t.TempDir(), "out.raw")
	runTool(t, qimg, "convert", "-O", "raw", url, out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
		t.Error("qemu-img convert over TCP: image differs")
	}
}

func TestIntegrationLibnbd(t *testing.T) {
	nbdinfo := needTool(t, "nbdinfo", "libnbd-bin")
	f, want := interopExport(t)
	_, sock := startServer(t, ServerOptions{},
		&Export{Name: "disk", Description: "the disk", Backend: f, Writable: true},
		&Export{Name: "other", Backend: newMem(8192)})

	out := runTool(t, nbdinfo, "--list", fmt.Sprintf("nbd+unix:///?socket=%s", sock))
	for _, s := range []string{"export=\"disk\"", "description: the disk", "export=\"other\"", "export-size: 4194304", "export-size: 8192"} {
		if !strings.Contains(out, s) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", s, out)
		}
	}
	out = runTool(t, nbdinfo, nbdURL("disk", sock))
	for _, s := range []string{"export-size: 4194304", "is_read_only: false", "can_flush: true", "can_fua: true",
		"can_trim: true", "can_zero: true", "can_fast_zero: true", "can_df: true", "can_cache: true",
		"block_size_maximum: 33554432", "base:allocation"} {
		if !strings.Contains(out, s) {
			t.Errorf("nbdinfo lacks %q:\n%s", s, out)
		}
	}
	out = runTool(t, nbdinfo, "--map", nbdURL("disk", sock))
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		lines = append(lines, strings.Join(strings.Fields(l), " "))
	}
	wantMap := []string{"0 131072 0 data", "131072 524288 3 hole,zero", "655360 65536 0 data", "720896 3473408 3 hole,zero"}
	if strings.Join(lines, "|") != strings.Join(wantMap, "|") {
		t.Errorf("nbdinfo --map:\n%s\nwant %q", out, wantMap)
	}

	if nbdcopy, err := exec.LookPath("nbdcopy"); err == nil {
		dst := filepath.Join(t.TempDir(), "copy.raw")
		if err := os.WriteFile(dst, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		runTool(t, nbdcopy, nbdURL("disk", sock), dst)
		if got, _ := os.ReadFile(dst); !bytes.Equal(got, want) {
			t.Error("nbdcopy: copy differs from the export")
		}
		// And back into the other export, which has no optional capability.
		small := filepath.Join(t.TempDir(), "small.raw")
		if err := os.WriteFile(small, pattern(8192, 9), 0o644); err != nil {
			t.Fatal(err)
		}
		_, sock2 := startServer(t, ServerOptions{}, &Export{Name: "w", Backend: newMem(8192), Writable: true})
		runTool(t, nbdcopy, small, nbdURL("w", sock2))
	}
}
