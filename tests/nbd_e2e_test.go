package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestIntegrationNBDExport: qemu-io and qemu-img do I/O through our NBD
// export, and the bytes land in the image file.
func TestIntegrationNBDExport(t *testing.T) {
	needTool(t, "qemu-io", "qemu-img")
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 8<<20)
	start(t, filepath.Join(dir, "qmp.sock"), exportArgs(dir, img, ",share-rw=on")...)
	url := "nbd+unix:///r?socket=" + filepath.Join(dir, "nbd.sock")

	out, err := cmdOut("qemu-io", "-f", "raw",
		"-c", "write -P 0xab 4096 64k",
		"-c", "write -z 1M 64k",
		"-c", "flush",
		"-c", "read -P 0xab 4096 64k",
		url)
	if err != nil || strings.Contains(out, "error") || strings.Contains(out, "fail") {
		t.Fatalf("qemu-io over NBD: %v\n%s", err, out)
	}
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data[4096:4096+65536], bytes.Repeat([]byte{0xab}, 65536)) {
		t.Error("pattern written over NBD is not in the image file")
	}
	out, err = cmdOut("qemu-img", "info", url)
	if err != nil || !strings.Contains(out, "virtual size: 8 MiB") {
		t.Errorf("qemu-img info over NBD: %v\n%s", err, out)
	}
	raw := filepath.Join(dir, "copy.raw")
	if out, err := cmdOut("qemu-img", "convert", "-f", "raw", "-O", "raw", url, raw); err != nil {
		t.Fatalf("qemu-img convert from NBD: %v\n%s", err, out)
	}
	if out, err := cmdOut("qemu-img", "compare", "-f", "raw", "-F", "raw", img, raw); err != nil {
		t.Errorf("qemu-img compare: %v\n%s", err, out)
	}
}
