package img

import (
	"golang.org/x/sys/unix"

	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	_ "blockbackend/drivers/file"
	_ "blockbackend/drivers/raw"
)

// needQEMU fails (not skips) when a QEMU tool is missing: these tests are
// about matching it.
func needQEMU(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Fatalf("%s is not installed (apt-get install qemu-utils); the image tool is tested against it", n)
		}
	}
}

type result struct {
	stdout, stderr string
	code           int
}

// runOurs runs the image tool in-process in dir.
func runOurs(t *testing.T, dir string, args ...string) result {
	t.Helper()
	t.Chdir(dir)
	var out, errb bytes.Buffer
	code := Main(args, &out, &errb)
	return result{out.String(), errb.String(), code}
}

// runTool runs an external program in dir.
func runTool(t *testing.T, dir, name string, args ...string) result {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s %q: %v", name, args, err)
	}
	return result{out.String(), errb.String(), code}
}

// step is one command of a script: "img ..." is compared between
// qemu-img and ours; "io ..." (qemu-io) and "sh ..." prepare both
// directories alike.
type step []string

func s(args ...string) step { return args }

// runScript plays the same steps in two directories, one with qemu-img
// and one with ours, and wants the same stdout, stderr and exit status.
func runScript(t *testing.T, steps []step) {
	needQEMU(t, "qemu-img", "qemu-io")
	qdir, odir := t.TempDir(), t.TempDir()
	for _, st := range steps {
		switch st[0] {
		case "io":
			for _, d := range []string{qdir, odir} {
				if r := runTool(t, d, "qemu-io", st[1:]...); r.code != 0 || strings.Contains(r.stderr, "rror") {
					t.Fatalf("qemu-io %q: %+v", st[1:], r)
				}
			}
		case "sh":
			for _, d := range []string{qdir, odir} {
				if r := runTool(t, d, "sh", "-c", st[1]); r.code != 0 {
					t.Fatalf("sh %q: %+v", st[1], r)
				}
			}
		case "nbd":
			// A qemu-nbd serving st[1] writable holds its locks.
			needQEMU(t, "qemu-nbd")
			for _, d := range []string{qdir, odir} {
				startNBD(t, d, st[1])
			}
		case "img":
			want := runTool(t, qdir, "qemu-img", st[1:]...)
			got := runOurs(t, odir, st[1:]...)
			if got != want {
				t.Errorf("img %s:\n qemu-img: status %d\nstdout:\n%s\nstderr:\n%s\n ours: status %d\nstdout:\n%s\nstderr:\n%s",
					strings.Join(st[1:], " "), want.code, want.stdout, want.stderr, got.code, got.stdout, got.stderr)
			}
		default:
			t.Fatalf("bad step %q", st)
		}
	}
}

// startNBD runs qemu-nbd on file in dir until the test ends.
func startNBD(t *testing.T, dir, file string) {
	t.Helper()
	sock := filepath.Join(dir, "nbd.sock")
	cmd := exec.Command("qemu-nbd", "-f", "raw", "-t", "--socket="+sock, file)
	cmd.Dir = dir
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("qemu-nbd did not start")
}

func TestInteropCreateInfo(t *testing.T) {
	runScript(t, []step{
		s("img", "create", "-f", "raw", "a.raw", "1M"),
		s("img", "create", "-f", "raw", "-o", "help", "x"),
		s("img", "create", "-f", "raw", "-o", "?", "x"),
		s("img", "create", "-f", "raw", "-o", "bogus=1", "x", "1M"),
		s("img", "create", "-f", "raw", "-o", "nocow=on,preallocation=falloc,extent_size_hint=1M", "p.raw", "1M"),
		s("img", "create", "-f", "raw", "-o", "preallocation=full", "full.raw", "128k"),
		s("img", "create", "-f", "raw", "x"),
		s("img", "create", "-f", "raw", "-o", "preallocation=metadata", "x", "1M"),
		s("img", "create", "-f", "raw", "-o", "preallocation=bogus", "x", "1M"),
		s("img", "create", "-f", "raw", "-o", "nocow=maybe", "x", "1M"),
		s("img", "create", "-f", "raw", "-o", "size=abc", "x"),
		s("img", "create", "-f", "raw", "-o", "extent_size_hint=5G", "x", "1M"),
		s("img", "create", "-f", "raw", "x", "9E"),
		s("img", "create", "-q", "-f", "raw", "b.raw", "2M"),
		s("img", "create", "-f", "file", "f.raw", "64k"),
		s("img", "create", "-f", "raw", "-b", "a.raw", "-F", "raw", "n.raw"),
		// The hint after the error has no final newline in qemu-img 7.2.
		s("img", "create", "-f", "qcow2", "-b", "a.raw", "nofmt.qcow2"),
		s("img", "create", "-f", "nonexist", "x", "1M"),
		s("img", "create", "-f", "raw", "y", "1Q"),
		s("img", "create", "-f", "raw", "y", "--", "-1"),
		s("img", "create", "-f", "raw", "-o", "size=2M", "z.raw"),
		s("img", "create", "-f", "raw", "-o", "size=2M", "z.raw", "3M"),
		s("img", "create", "-f", "raw", "-o", "size=1M,size=2M", "z2.raw"),
		s("img", "create", "-f", "raw", "y.raw", "1.5k"),
		s("img", "create", "-f", "raw", "y.raw", "1b"),
		s("img", "create", "-f", "raw", "/nonexistent-dir/x", "1M"),
		s("io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 256k 64k", "a.raw"),
		s("img", "info", "a.raw"),
		s("img", "info", "--output=json", "a.raw"),
		s("img", "info", "-f", "raw", "--output", "json", "a.raw"),
		s("img", "info", "--outp=json", "full.raw"),
		s("img", "info", "--output=xml", "a.raw"),
		s("img", "info", "a.raw", "extra"),
		s("img", "info"),
		s("img", "info", "-z", "a.raw"),
		s("img", "info", "-f"),
		s("img", "info", "nonexist"),
		s("img", "info", "-U", "--backing-chain", "p.raw"),
		s("img", "info", "-f", "raw", "z.raw"),
		s("img", "info", "--image-opts", "driver=raw,file.filename=a.raw"),
		s("img", "info", "--image-opts", "-f", "raw", "driver=raw,file.filename=a.raw"),
		s("img", "info", "--image-opts", "file.filename=a.raw"),
		s("img", "info", "--image-opts", "driver=raw,file.filename=nonexist"),
		s("img", "info", "--image-opts", "driver=raw,file.filename=a.raw,file.locking=off"),
		s("img", "info", "--image-opts", "driver=raw,file.filename=a.raw,size=4096"),
		s("img", "info", "--image-opts", "driver=raw,file.driver=file,file.filename=a.raw,read-only=on"),
		s("img", "info", "--output=json", "--image-opts", "driver=raw,file.filename=a.raw,offset=512"),
		s("img", "map", "--image-opts", "driver=file,filename=a.raw"),
		s("img", "compare", "--image-opts", "driver=raw,file.filename=a.raw", "driver=raw,file.filename=b.raw"),
		s("img", "info", "--object", "secret,id=s0,data=x", "a.raw"),
		s("img", "info", "--object", "secret,data=x", "a.raw"),
		s("img", "bogus"),
		s("img"),
	})
}

func TestInteropMapCheckMeasureCompare(t *testing.T) {
	runScript(t, []step{
		s("img", "create", "-q", "-f", "raw", "a.raw", "1M"),
		s("img", "create", "-q", "-f", "raw", "b.raw", "1M"),
		s("img", "create", "-q", "-f", "raw", "c.raw", "2M"),
		s("io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 256k 64k", "a.raw"),
		s("io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 256k 64k", "-c", "write -P 3 307207 1", "b.raw"),
		s("io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 256k 64k", "-c", "write -P 9 1500000 1", "c.raw"),
		s("img", "map", "a.raw"),
		s("img", "map", "--output=json", "a.raw"),
		s("img", "map", "-f", "raw", "--start-offset=70000", "--max-length=300000", "--output=json", "a.raw"),
		s("img", "map", "--start-offset=bogus", "a.raw"),
		s("img", "check", "a.raw"),
		s("img", "check", "-q", "-f", "raw", "--output=json", "a.raw"),
		s("img", "check", "-r", "bogus", "a.raw"),
		s("img", "measure", "-O", "raw", "a.raw"),
		s("img", "measure", "--size", "1000", "-O", "raw"),
		s("img", "measure", "--size", "1G", "--output=json"),
		s("img", "measure"),
		s("img", "measure", "--size", "1M", "a.raw"),
		s("img", "measure", "-O", "bogus", "--size", "1M"),
		s("img", "measure", "-O", "raw", "--size", "1M", "-o", "help"),
		s("img", "measure", "-O", "raw", "--size", "1M", "-o", "bogus=1"),
		s("img", "compare", "a.raw", "a.raw"),
		s("img", "compare", "a.raw", "b.raw"),
		s("img", "compare", "-q", "a.raw", "b.raw"),
		s("img", "compare", "-f", "raw", "-F", "raw", "a.raw", "c.raw"),
		s("img", "compare", "c.raw", "a.raw"),
		s("img", "compare", "-s", "a.raw", "c.raw"),
		s("img", "compare", "-p", "-f", "raw", "a.raw", "c.raw"),
		s("img", "compare", "a.raw", "nonexist"),
		// Strict mode compares block status too: a sparse copy differs.
		s("sh", "cp --sparse=always a.raw sparse.raw"),
		s("img", "compare", "-s", "a.raw", "sparse.raw"),
		s("sh", "cp --sparse=always a.raw sparse2.raw"),
		s("io", "-f", "raw", "-c", "write -P 3 8k 4k", "sparse2.raw"),
		s("img", "compare", "-s", "sparse.raw", "sparse2.raw"),
		s("img", "compare", "-s", "a.raw", "a.raw"),
		s("img", "compare", "a.raw"),
	})
}

func TestInteropConvertResize(t *testing.T) {
	runScript(t, []step{
		s("img", "create", "-q", "-f", "raw", "s.raw", "8M"),
		s("img", "create", "-q", "-f", "raw", "small.raw", "1M"),
		s("io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 4k", "-c", "write -P 0 2M 64k",
			"-c", "write -P 5 3M 100", "-c", "write -P 7 7M 1M", "-c", "write -P 0 7424k 8k", "s.raw"),
		s("img", "convert", "-O", "raw", "s.raw", "o1.raw"),
		s("img", "map", "--output=json", "o1.raw"),
		s("img", "compare", "s.raw", "o1.raw"),
		s("img", "convert", "-S", "0", "-f", "raw", "-O", "raw", "s.raw", "o2.raw"),
		s("img", "map", "--output=json", "o2.raw"),
		s("img", "info", "o2.raw"),
		s("img", "convert", "-S", "64k", "-O", "raw", "s.raw", "o3.raw"),
		s("img", "map", "--output=json", "o3.raw"),
		s("img", "convert", "-S", "4k", "-m", "1", "-O", "raw", "s.raw", "o4.raw"),
		s("img", "map", "--output=json", "o4.raw"),
		s("img", "convert", "-W", "-m", "16", "-O", "raw", "s.raw", "small.raw", "o5.raw"),
		s("img", "compare", "s.raw", "o5.raw"),
		s("img", "info", "o5.raw"),
		s("img", "convert", "-n", "-O", "raw", "s.raw", "small.raw"),
		s("img", "convert", "-n", "-O", "raw", "small.raw", "o1.raw"),
		s("img", "compare", "o1.raw", "s.raw"),
		s("img", "convert", "-c", "-O", "raw", "s.raw", "o6.raw"),
		s("img", "info", "o6.raw"),
		s("img", "convert", "-m", "40", "-O", "raw", "s.raw", "o7.raw"),
		s("img", "convert", "-S", "100", "-O", "raw", "s.raw", "o7.raw"),
		s("img", "convert", "-O", "raw", "-o", "bogus=1", "s.raw", "o7.raw"),
		s("img", "convert", "-t", "bogus", "-O", "raw", "s.raw", "o7.raw"),
		s("img", "convert", "-O", "bogus", "s.raw", "o7.raw"),
		s("img", "convert", "-O", "raw", "s.raw"),
		s("img", "convert", "-O", "raw", "nonexist", "o7.raw"),
		s("img", "convert", "-O", "raw", "s.raw", "/nonexistent-dir/o"),
		s("img", "resize", "-f", "raw", "small.raw", "2M"),
		s("img", "resize", "small.raw", "+1M"),
		s("img", "resize", "-f", "raw", "small.raw", "-1M"),
		s("img", "resize", "-f", "raw", "small.raw", "--", "-1M"),
		s("img", "resize", "-f", "raw", "--shrink", "small.raw", "-1M"),
		s("img", "resize", "-f", "raw", "--shrink", "small.raw", "-10M"),
		s("img", "resize", "-f", "raw", "--preallocation=full", "small.raw", "4M"),
		s("img", "info", "small.raw"),
		s("img", "resize", "-f", "raw", "--preallocation=metadata", "small.raw", "5M"),
		s("img", "resize", "-f", "raw", "--preallocation=bogus", "small.raw", "5M"),
		s("img", "resize", "-q", "-f", "raw", "small.raw", "5M"),
		s("img", "resize", "-f", "raw", "small.raw", "1x"),
		s("img", "resize", "small.raw"),
	})
}

func TestInteropEmptyImage(t *testing.T) {
	runScript(t, []step{
		s("img", "create", "-f", "raw", "z0", "0"),
		s("img", "info", "z0"),
		s("img", "map", "z0"),
		s("img", "map", "--output=json", "z0"),
		s("img", "convert", "-p", "-O", "raw", "z0", "z1"),
		s("img", "compare", "z0", "z1"),
		s("img", "measure", "-O", "raw", "z0"),
		s("img", "resize", "-f", "raw", "z0", "1k"),
		// (qemu's file driver then allocates the first block, ours does
		// not: info's actual-size differs, a file driver matter.)
	})
}

func TestInteropNoCapability(t *testing.T) {
	// raw has no snapshots, checks, amendment or backing files: the
	// messages are qemu-img's for each missing capability.
	runScript(t, []step{
		s("img", "create", "-q", "-f", "raw", "a.raw", "1M"),
		s("img", "create", "-q", "-f", "raw", "b.raw", "1M"),
		s("img", "snapshot", "-l", "a.raw"),
		s("img", "snapshot", "a.raw"),
		s("img", "snapshot", "-c", "x", "a.raw"),
		s("img", "snapshot", "-d", "x", "a.raw"),
		s("img", "snapshot", "-l", "-c", "x", "a.raw"),
		s("img", "amend", "-o", "size=1M", "-f", "raw", "a.raw"),
		s("img", "amend", "-f", "raw", "a.raw"),
		s("img", "amend", "-o", "help", "-f", "raw", "a.raw"),
		s("img", "amend", "-o", "help"),
		s("img", "amend", "-o", "help", "-f", "raw"),
		s("img", "rebase", "a.raw"),
		s("img", "rebase", "-f", "raw", "-b", "b.raw", "-F", "raw", "a.raw"),
		s("img", "rebase", "-u", "-f", "raw", "-b", "b.raw", "-F", "raw", "a.raw"),
		s("img", "check", "-f", "raw", "a.raw"),
	})
}

// TestInteropLocks runs the commands against an image that qemu-nbd is
// serving writable: which of them its locks stop, and with which words.
func TestInteropLocks(t *testing.T) {
	runScript(t, []step{
		s("img", "create", "-q", "-f", "raw", "lk.raw", "1M"),
		s("img", "create", "-q", "-f", "raw", "src.raw", "1M"),
		s("nbd", "lk.raw"),
		s("img", "info", "lk.raw"),
		s("img", "map", "lk.raw"),
		s("img", "measure", "-O", "raw", "lk.raw"),
		s("img", "compare", "lk.raw", "src.raw"),
		s("img", "snapshot", "-l", "lk.raw"),
		s("img", "snapshot", "-c", "x", "lk.raw"),
		s("img", "amend", "-f", "raw", "-o", "size=1M", "lk.raw"),
		s("img", "resize", "-f", "raw", "lk.raw", "2M"),
		s("img", "convert", "-O", "raw", "lk.raw", "out.raw"),
		s("img", "convert", "-U", "-O", "raw", "lk.raw", "out.raw"),
		s("img", "convert", "-n", "-O", "raw", "src.raw", "lk.raw"),
		s("img", "convert", "-O", "raw", "src.raw", "lk.raw"),
		s("img", "create", "-f", "raw", "lk.raw", "1M"),
	})
}

// TestConvertProgress checks the shape of -p's output: qemu-img's
// "    (NN.NN/100%)\r" steps from 0 to 100, the last one twice, then a
// newline.
func TestConvertProgress(t *testing.T) {
	needQEMU(t, "qemu-io")
	dir := t.TempDir()
	if r := runOurs(t, dir, "create", "-q", "-f", "raw", "s.raw", "16M"); r.code != 0 {
		t.Fatal(r)
	}
	runTool(t, dir, "qemu-io", "-f", "raw", "-c", "write -P 1 0 6M", "-c", "write -P 2 12M 1M", "s.raw")
	for _, args := range [][]string{
		{"convert", "-p", "-O", "raw", "s.raw", "d.raw"},
		{"convert", "-p", "-S", "0", "-m", "1", "-O", "raw", "s.raw", "e.raw"},
		{"compare", "-p", "s.raw", "d.raw"},
	} {
		r := runOurs(t, dir, args...)
		if r.code != 0 {
			t.Fatalf("%q: %+v", args, r)
		}
		out := strings.TrimSuffix(r.stdout, "Images are identical.\n")
		if !regexp.MustCompile(`^(    \(\d{1,3}\.\d\d/100%\)\r)+\n$`).MatchString(out) {
			t.Fatalf("%q: progress output %q", args, out)
		}
		if !strings.HasPrefix(out, "    (0.00/100%)\r") || !strings.HasSuffix(out, "    (100.00/100%)\r    (100.00/100%)\r\n") {
			t.Errorf("%q: progress output %q", args, out)
		}
	}
	a, _ := os.ReadFile(filepath.Join(dir, "s.raw"))
	b, _ := os.ReadFile(filepath.Join(dir, "e.raw"))
	if !bytes.Equal(a, b) {
		t.Errorf("convert -S 0 changed the data")
	}
}

func TestHelpAndVersion(t *testing.T) {
	dir := t.TempDir()
	r := runOurs(t, dir, "--help")
	if r.code != 0 || !strings.Contains(r.stdout, "Command syntax:") || !strings.Contains(r.stdout, "Supported formats:") {
		t.Errorf("--help: %+v", r)
	}
	for _, c := range commands {
		r := runOurs(t, dir, c.name, "--help")
		if r.code != 0 || !strings.Contains(r.stdout, "usage: qemu-img "+c.name+" ") {
			t.Errorf("%s --help: %+v", c.name, r)
		}
		r = runOurs(t, dir, c.name, "-h")
		if r.code != 0 || !strings.Contains(r.stdout, "usage: qemu-img "+c.name+" ") {
			t.Errorf("%s -h: %+v", c.name, r)
		}
	}
	r = runOurs(t, dir, "--version")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "qemu-img version 7.2") {
		t.Errorf("--version: %+v", r)
	}
}

// TestInteropTmpfs runs steps on tmpfs, where the file driver copies
// through a mapping and the extent size hint cannot be set (qemu-img
// warns when it was asked for).
func TestInteropTmpfs(t *testing.T) {
	var fs unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &fs); err != nil || fs.Type != 0x01021994 {
		t.Skip("no tmpfs at /dev/shm")
	}
	t.Setenv("TMPDIR", "/dev/shm")
	runScript(t, []step{
		s("img", "create", "-f", "raw", "-o", "extent_size_hint=1M", "a.raw", "4M"),
		s("img", "create", "-f", "qcow2", "-o", "extent_size_hint=64k", "a.qcow2", "4M"),
		s("img", "create", "-q", "-f", "raw", "b.raw", "4M"),
		s("io", "-f", "raw", "-c", "write -P 5 1M 1M", "-c", "write -P 6 3M 4k", "b.raw"),
		s("img", "convert", "-O", "qcow2", "b.raw", "b.qcow2"),
		s("img", "convert", "-O", "raw", "b.qcow2", "c.raw"),
		s("img", "map", "--output=json", "-f", "raw", "c.raw"),
		s("img", "compare", "b.raw", "c.raw"),
		s("img", "compare", "b.raw", "b.qcow2"),
	})
}
