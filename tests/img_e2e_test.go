package tests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/internal/qemutest"
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

// TestIntegrationImgRebaseQcow2 rebases qcow2 images with both tools:
// -u leaves byte-identical files, a safe rebase the same guest data, a
// name readers would refuse gets qemu-img's error and changes nothing.
func TestIntegrationImgRebaseQcow2(t *testing.T) {
	needTool(t, "qemu-img")
	needTool(t, "qemu-io")
	dir := shortDir(t)
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	p := func(n string) string { return filepath.Join(dir, n) }
	sh("qemu-img", "create", "-q", "-f", "qcow2", p("b1.qcow2"), "4M")
	sh("qemu-io", "-c", "write -P 1 0 1M", p("b1.qcow2"))
	sh("qemu-img", "create", "-q", "-f", "qcow2", p("b2.qcow2"), "4M")
	sh("qemu-io", "-c", "write -P 2 512k 1M", p("b2.qcow2"))
	for _, n := range []string{"q.qcow2", "o.qcow2"} {
		sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", p(n))
		sh("qemu-io", "-c", "write -P 3 3M 64k", p(n))
	}
	long := strings.Repeat("x", 1024)
	run := func(name string, argv ...string) (string, int) { return runIn(t, dir, name, argv...) }
	for _, args := range [][]string{
		{"rebase", "-u", "-b", "b2.qcow2", "-F", "qcow2"},
		{"rebase", "-u", "-b", long, "-F", "raw"},
		{"rebase", "-b", "b1.qcow2", "-F", "qcow2"},
		{"rebase", "-b", ""},
	} {
		what := strings.Join(args, " ")[:min(40, len(strings.Join(args, " ")))]
		want, wc := run("qemu-img", append(args, "q.qcow2")...)
		got, gc := run(binary, append(append([]string{"img"}, args...), "o.qcow2")...)
		if want != strings.ReplaceAll(got, "o.qcow2", "q.qcow2") || wc != gc {
			t.Errorf("img %s: qemu-img (%d):\n%.300s\nours (%d):\n%.300s", what, wc, want, gc, got)
		}
		if args[1] == "-u" {
			q, _ := os.ReadFile(p("q.qcow2"))
			o, _ := os.ReadFile(p("o.qcow2"))
			if !bytes.Equal(q, o) {
				t.Errorf("img %s: the images differ", what)
			}
		}
		if out, _ := run("qemu-img", "compare", "q.qcow2", "o.qcow2"); !strings.Contains(out, "Images are identical") {
			t.Errorf("after img %s: %s", what, out)
		}
	}
	want, got, _, _ := runBoth(t, dir, "check", "o.qcow2")
	if want != got || !strings.Contains(want, "No errors") {
		t.Errorf("check: qemu-img:\n%s\nours:\n%s", want, got)
	}
}

// TestIntegrationImgCreateMessages compares img create's "Formatting"
// line and its option errors with qemu-img's for luks and qcow2: QAPI's
// "Parameter 'x' does not accept value" for a format's enums, the
// format's own message where it parses the value itself.
func TestIntegrationImgCreateMessages(t *testing.T) {
	needTool(t, "qemu-img")
	dir := shortDir(t)
	for _, f := range []string{"raw", "luks", "qcow2"} {
		for _, o := range []string{
			"preallocation=foo", "cipher-alg=foo", "compression_type=foo",
			"encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-mode=foo", "encrypt.format=foo",
			"preallocation=off,iter-time=10,hash-alg=sha1,ivgen-hash-alg=sha1,ivgen-alg=essiv,cipher-mode=cbc,cipher-alg=aes-128",
			"nocow=on,preallocation=falloc,iter-time=10",
			"cipher-alg=des", "cipher-alg=sm4", "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=3des",
		} {
			args := []string{"create", "-f", f, "--object", "secret,id=s,data=pw", "-o", "key-secret=s," + o, "z.img", "1M"}
			want, wc := runIn(t, dir, "qemu-img", args...)
			os.Remove(filepath.Join(dir, "z.img"))
			got, gc := runIn(t, dir, binary, append([]string{"img"}, args...)...)
			os.Remove(filepath.Join(dir, "z.img"))
			if want != got || wc != gc {
				t.Errorf("-f %s -o %s: qemu-img (%d):\n%s\nours (%d):\n%s", f, o, wc, want, gc, got)
			}
		}
	}
}

// runIn runs name in dir and returns its combined output and status.
func runIn(t *testing.T, dir, name string, argv ...string) (string, int) {
	t.Helper()
	out, err := qemutest.CombinedOutput(func() *exec.Cmd {
		cmd := exec.Command(name, argv...)
		cmd.Dir = dir
		return cmd
	})
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return string(out), 0
}
