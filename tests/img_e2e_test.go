package tests

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// runBoth runs qemu-img and `blockbackend img` with the same arguments
// in dir and returns both combined outputs and exit statuses.
func runBoth(t *testing.T, dir string, args ...string) (want, got string, wantCode, gotCode int) {
	t.Helper()
	one := func(name string, argv ...string) (string, int) {
		cmd := exec.Command(name, argv...)
		cmd.Dir = dir
		var b bytes.Buffer
		cmd.Stdout, cmd.Stderr = &b, &b
		err := cmd.Run()
		if ee, ok := err.(*exec.ExitError); ok {
			return b.String(), ee.ExitCode()
		} else if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return b.String(), 0
	}
	want, wantCode = one("qemu-img", args...)
	got, gotCode = one(binary, append([]string{"img"}, args...)...)
	return
}

// TestIntegrationImgTool runs the image tool as the binary's subcommand
// beside qemu-img, on images that blockbackend's daemon serves: what the
// daemon's locks allow and refuse is what qemu-img meets, in its words.
func TestIntegrationImgTool(t *testing.T) {
	needTool(t, "qemu-img")
	dir := shortDir(t)
	for _, args := range [][]string{
		{"create", "-f", "raw", "a.img", "8M"},
		{"info", "--output=json", "a.img"},
		{"convert", "-O", "raw", "a.img", "b.img"},
		{"compare", "a.img", "b.img"},
		{"map", "--output=json", "b.img"},
	} {
		want, got, wc, gc := runBoth(t, dir, args...)
		if want != got || wc != gc {
			t.Errorf("img %s: qemu-img (%d):\n%s\nours (%d):\n%s", strings.Join(args, " "), wc, want, gc, got)
		}
	}
	img := filepath.Join(dir, "a.img")
	start(t, filepath.Join(dir, "qmp.sock"), exportArgs(dir, img, "")...)
	waitLocks(t, img, []int{100, 101, 201, 203})
	for _, args := range [][]string{
		{"info", img},                                // allowed: info shares write
		{"convert", "-O", "raw", img, "c.img"},       // refused: convert's source does not
		{"convert", "-U", "-O", "raw", img, "c.img"}, // allowed with -U
		{"resize", "-f", "raw", img, "16M"},          // refused: resize is not shared
		{"convert", "-n", "-O", "raw", "b.img", img}, // refused: write is not shared
		{"snapshot", "-c", "s", "-q", img},           // refused: write is not shared
	} {
		want, got, wc, gc := runBoth(t, dir, args...)
		if want != got || wc != gc {
			t.Errorf("img %s while served: qemu-img (%d):\n%s\nours (%d):\n%s", strings.Join(args, " "), wc, want, gc, got)
		}
	}
}

// TestIntegrationImgMapPrealloc compares `img map` with qemu-img map on
// preallocated qcow2 images: QEMU asks the file whether allocated
// clusters read as zeros only for a metadata-preallocated image (refcounts
// claim more than the file holds), not for falloc/full, and it shows the
// host offset of preallocated subclusters that are not allocated.
func TestIntegrationImgMapPrealloc(t *testing.T) {
	needTool(t, "qemu-img")
	needTool(t, "qemu-io")
	dir := shortDir(t)
	for i, o := range []string{
		"preallocation=metadata", "preallocation=falloc", "preallocation=full",
		"extended_l2=on,preallocation=metadata", "extended_l2=on,preallocation=falloc",
		"compat=0.10,preallocation=metadata", "cluster_size=4k,preallocation=metadata",
	} {
		name := filepath.Join(dir, "p"+strings.Repeat("x", i)+".qcow2")
		for _, c := range [][]string{
			{"qemu-img", "create", "-q", "-f", "qcow2", "-o", o, name, "4M"},
			{"qemu-io", "-c", "write -z 0 64k", "-c", "write -P 1 1M 4k", "-c", "discard 2M 64k", name},
		} {
			if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
				t.Fatalf("%v: %v\n%s", c, err, out)
			}
		}
		for _, args := range [][]string{{"map", name}, {"map", "--output=json", name}} {
			want, got, wc, gc := runBoth(t, dir, args...)
			if want != got || wc != gc {
				t.Errorf("-o %s: img %s: qemu-img (%d):\n%s\nours (%d):\n%s", o, strings.Join(args, " "), wc, want, gc, got)
			}
		}
	}
}
