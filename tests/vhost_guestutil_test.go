package tests

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"blockbackend/tests/guest"
)

// Helpers for the real-guest tests (vhost_guest_test.go): one guest kit per
// test binary, the two backends under test started with the same
// qemu-storage-daemon command line, and guests booted against them.

var (
	guestOnce sync.Once
	guestKit  *guest.Kit
	guestErr  error
)

// needGuest skips in -short mode and when the guest cannot be built here
// (no QEMU, no apt-get download); it builds the kit once per test binary.
func needGuest(t *testing.T) *guest.Kit {
	t.Helper()
	if testing.Short() {
		t.Skip("boots QEMU guests (TCG); skipped with -short")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86); .ci/run installs it")
	}
	guestOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		t0 := time.Now()
		guestKit, guestErr = guest.Build(ctx, guest.DefaultCacheDir())
		if guestErr == nil {
			fmt.Fprintf(os.Stderr, "guest kit (kernel %s) ready in %v\n", guestKit.Release, time.Since(t0).Round(time.Millisecond))
		}
	})
	if errors.Is(guestErr, guest.ErrUnavailable) {
		t.Skipf("cannot build the test guest (needs apt-get download with Debian's package lists, dpkg-deb, go): %v", guestErr)
	}
	if guestErr != nil {
		t.Fatal(guestErr)
	}
	return guestKit
}

// backendKind is a vhost-user-blk backend program under test.
type backendKind struct {
	name string
	bin  string
	qsd  bool
}

// forBackends runs f as a subtest against qemu-storage-daemon (which proves
// the test) and against blockbackend.
func forBackends(t *testing.T, f func(t *testing.T, kind backendKind)) {
	for _, k := range []backendKind{
		{name: "qsd", bin: "qemu-storage-daemon", qsd: true},
		{name: "blockbackend", bin: binary},
	} {
		t.Run(k.name, func(t *testing.T) {
			if k.qsd {
				if _, err := exec.LookPath(k.bin); err != nil {
					t.Skip("qemu-storage-daemon is not installed (apt-get install qemu-system-x86 or qemu-utils); .ci/run installs it")
				}
			}
			f(t, k)
		})
	}
}

// qsdVersion is qemu-storage-daemon's major and minor version.
func qsdVersion(t *testing.T) (int, int) {
	t.Helper()
	out, err := exec.Command("qemu-storage-daemon", "-V").Output()
	if err != nil {
		t.Fatalf("qemu-storage-daemon -V: %v", err)
	}
	m := regexp.MustCompile(`version (\d+)\.(\d+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("qemu-storage-daemon -V: no version in %q", out)
	}
	major, _ := strconv.Atoi(string(m[1]))
	minor, _ := strconv.Atoi(string(m[2]))
	return major, minor
}

// exportOpts shape one backend's export.
type exportOpts struct {
	numQueues int
	readOnly  bool // writable=off
	shareRW   bool // share-rw=on (blockbackend only)
	name      string
	// format, when set, puts a format node (qcow2) over the file node;
	// its backing file, if any, opens from the image's header.
	format string
	// formatOpts are more options of the format node ("encrypt.format=
	// luks,encrypt.key-secret=sec0"); objects are --object definitions.
	formatOpts string
	objects    []string
}

// backend is one running backend process serving img on sock.
type backend struct {
	kind           backendKind
	img, sock, qmp string
	args           []string
	p              *proc
}

func backendArgs(kind backendKind, img, sock, qmpSock string, o exportOpts) []string {
	if o.numQueues == 0 {
		o.numQueues = 1
	}
	exp := fmt.Sprintf("type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=%s,writable=%s,num-queues=%d",
		sock, map[bool]string{false: "on", true: "off"}[o.readOnly], o.numQueues)
	if o.shareRW {
		exp += ",share-rw=on"
	}
	node := "driver=file,node-name=d,filename=" + img
	if o.format != "" {
		node = "driver=" + o.format + ",node-name=d,file.driver=file,file.filename=" + img
		if o.formatOpts != "" {
			node += "," + o.formatOpts
		}
	}
	var objs []string
	for _, ob := range o.objects {
		objs = append(objs, "--object", ob)
	}
	return append(objs,
		"--blockdev", node,
		"--export", exp,
		"--chardev", "socket,id=m,path="+qmpSock+",server=on,wait=off",
		"--monitor", "chardev=m",
	)
}

// startBackend starts kind on img with its vhost-user socket and QMP
// monitor in dir (names suffixed with o.name).
func startBackend(t *testing.T, kind backendKind, dir, img string, o exportOpts) *backend {
	t.Helper()
	b := &backend{
		kind: kind, img: img,
		sock: filepath.Join(dir, "vhost"+o.name+".sock"),
		qmp:  filepath.Join(dir, "qmp"+o.name+".sock"),
	}
	b.args = backendArgs(kind, img, b.sock, b.qmp, o)
	b.p = startProgram(t, kind.bin, b.qmp, b.sock, b.args...)
	return b
}

// restart starts the same command line again (after kill).
func (b *backend) restart(t *testing.T) {
	t.Helper()
	b.p = startProgram(t, b.kind.bin, b.qmp, b.sock, b.args...)
}

// kill ends the backend with SIGKILL, as a crash would.
func (b *backend) kill(t *testing.T) {
	t.Helper()
	_ = b.p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case err := <-b.p.done:
		b.p.done <- err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not die on SIGKILL", b.kind.name)
	}
}

// startProgram is start (helpers_test.go) for any program: it runs bin and
// waits until the QMP socket accepts connections and the vhost-user socket
// exists. The exports come before the monitor on the command line, and
// both programs set them up in order.
func startProgram(t *testing.T, bin, qmpSock, vhostSock string, args ...string) *proc {
	t.Helper()
	ready := func() bool {
		_, err := os.Stat(vhostSock)
		return dialable(qmpSock) && err == nil
	}
	return startReady(t, bin, ready, qmpSock+" and "+vhostSock, args...)
}

// guestTimeout bounds one guest's run on the host side; the agent's own
// watchdog fires a little earlier so that its report comes through.
const guestTimeout = 150 * time.Second

// bootGuest boots a guest and arranges for its console to be logged if
// the test fails.
func bootGuest(t *testing.T, kit *guest.Kit, o guest.BootOptions) *guest.VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
	if o.Timeout == 0 {
		o.Timeout = guestTimeout - 20*time.Second
	}
	vm, err := guest.Boot(ctx, kit, o)
	if err != nil {
		cancel()
		if errors.Is(err, guest.ErrUnavailable) {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vm.Kill()
		cancel()
		if t.Failed() {
			t.Logf("guest console:\n%s\nQEMU stderr:\n%s", vm.Console(), vm.Stderr())
		}
	})
	return vm
}

// finish waits for the guest and fails the test for a missing "done" or
// any failed command.
func finish(t *testing.T, vm *guest.VM) []guest.Result {
	t.Helper()
	res, err := vm.Wait()
	t.Logf("guest ready %v after QEMU started", vm.BootTime().Round(time.Millisecond))
	if err != nil {
		t.Fatalf("%v\nreports: %+v", err, res)
	}
	for _, r := range guest.Failed(res) {
		t.Errorf("guest %s (script line %d) failed: %s", r.Op, r.Line, r.Err)
	}
	return res
}

// runGuest boots a guest, runs the script to its end and returns the reports.
func runGuest(t *testing.T, kit *guest.Kit, o guest.BootOptions) []guest.Result {
	t.Helper()
	return finish(t, bootGuest(t, kit, o))
}

// result returns the report of script line (1-based).
func result(t *testing.T, res []guest.Result, line int) guest.Result {
	t.Helper()
	r, ok := guest.Find(res, line)
	if !ok {
		t.Fatalf("no report for script line %d in %+v", line, res)
	}
	return r
}

// span is a range of the image written with a pattern seed.
type span struct {
	off, n int64
	seed   uint64
}

// checkImage verifies the image's bytes on the host.
func checkImage(t *testing.T, img string, spans []span, zeros [][2]int64) {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, s := range spans {
		if err := guest.CheckPattern(f, s.seed, s.off, s.n); err != nil {
			t.Errorf("image, %d bytes at %d (seed %d): %v", s.n, s.off, s.seed, err)
		}
	}
	for _, z := range zeros {
		if err := guest.CheckZero(f, z[0], z[1]); err != nil {
			t.Errorf("image, %d bytes at %d should be zero: %v", z[1], z[0], err)
		}
	}
}

// fillImage writes a pattern into the image from the host.
func fillImage(t *testing.T, img string, s span) {
	t.Helper()
	b := make([]byte, s.n)
	guest.Pattern(s.seed, s.off, b)
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, s.off); err != nil {
		t.Fatal(err)
	}
}

// runFor runs a program that is expected to fail quickly and returns its
// combined output; it is killed after d (a backend that starts instead of
// failing would run forever).
func runFor(d time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}
