package permissions

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tempImage makes a 1 MiB file and opens it twice: two open file
// descriptions, as two file nodes on one image would have.
func tempImage(t *testing.T) (string, int, int) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	return p, openFD(t, p), openFD(t, p)
}

func openFD(t *testing.T, p string) int {
	t.Helper()
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func newLocker(t *testing.T, fd int, p string, mode LockMode) *Locker {
	t.Helper()
	l, err := NewLocker(fd, p, mode, nil)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func needOFD(t *testing.T, fd int) {
	t.Helper()
	if !ProbeOFD(fd) {
		t.Skip("this kernel has no OFD locks (F_OFD_GETLK fails)")
	}
}

// procBytes is what /proc/locks says anyone holds in QEMU's lock area.
func procBytes(t *testing.T, p string) []int64 {
	t.Helper()
	b, err := HeldLockBytes(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func wantBytes(t *testing.T, what string, got []int64, want ...int64) {
	t.Helper()
	if want == nil {
		want = []int64{}
	}
	if got == nil {
		got = []int64{}
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: bytes %v, want %v", what, got, want)
	}
}

func wantLockError(t *testing.T, err error, text, path string) {
	t.Helper()
	var le *LockError
	if !errors.As(err, &le) || err.Error() != text {
		t.Fatalf("got error %v (%T), want %q", err, err, text)
	}
	if le.Hint() != "Is another process using the image ["+path+"]?" {
		t.Errorf("hint %q", le.Hint())
	}
	if le.Full() != text+"\nIs another process using the image ["+path+"]?" {
		t.Errorf("full text %q", le.Full())
	}
	if !errors.Is(err, unix.EAGAIN) {
		t.Error("lock conflict does not match EAGAIN")
	}
}

// Two open file descriptions conflict even in one process: that is what
// makes two nodes on one image see each other, as in QEMU.
func TestLocksBetweenDescriptions(t *testing.T) {
	p, fd1, fd2 := tempImage(t)
	needOFD(t, fd1)
	a, b := newLocker(t, fd1, p, LockAuto), newLocker(t, fd2, p, LockAuto)
	if !a.Enabled() || !a.OFD() {
		t.Fatal("auto with OFD available does not use OFD")
	}

	// A device without share-rw: needs read+write, shares read,
	// write-unchanged, resize. QEMU holds 100, 101 and 201 for it.
	if err := a.Set(ConsistentRead|Write, ConsistentRead|WriteUnchanged|Resize); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "Locker", a.HeldBytes(), 100, 101, 201)
	wantBytes(t, "/proc/locks", procBytes(t, p), 100, 101, 201)
	hs, err := Holders(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		if h.Kind != "OFDLCK" || h.Write {
			t.Errorf("holding %v, want OFD read locks only", h)
		}
	}
	if pm, sh := a.Held(); pm != ConsistentRead|Write || sh != ConsistentRead|WriteUnchanged|Resize {
		t.Errorf("Held() = %v / %v", pm, sh)
	}

	// A second writer: write is not shared.
	wantLockError(t, b.Prepare(ConsistentRead|Write, All), `Failed to get "write" lock`, p)
	wantBytes(t, "failed Prepare", b.HeldBytes())
	wantLockError(t, b.Check(ConsistentRead|Write, All), `Failed to get "write" lock`, p)
	// A reader that does not share write fails the other way round.
	wantLockError(t, b.Prepare(ConsistentRead, ConsistentRead|WriteUnchanged|Resize), `Failed to get shared "write" lock`, p)
	wantBytes(t, "failed Prepare", b.HeldBytes())
	wantBytes(t, "/proc/locks after failures", procBytes(t, p), 100, 101, 201)
	// When both loops would fail, the needed bit is named first.
	wantLockError(t, b.Check(Write, 0), `Failed to get "write" lock`, p)
	// Within a loop, the lowest bit is named first.
	wantLockError(t, b.Check(0, 0), `Failed to get shared "consistent read" lock`, p)
	// A force-share reader is fine, and Check changes nothing.
	if err := b.Check(ConsistentRead, All); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "after Check", b.HeldBytes())
	if err := b.Set(ConsistentRead, All); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "/proc/locks", procBytes(t, p), 100, 101, 201)
	// b reads now, so a can no longer stop sharing consistent read.
	if err := a.Check(All, 0); err == nil || err.Error() != `Failed to get shared "consistent read" lock` {
		t.Fatalf("a unsharing read under b's reader: %v", err)
	}
	// a's own bytes never conflict with a: its current state checks clean.
	if err := a.Check(ConsistentRead|Write, ConsistentRead|WriteUnchanged|Resize); err != nil {
		t.Fatal(err)
	}

	a.Close()
	b.Close()
	wantBytes(t, "after Close", procBytes(t, p))
}

func TestPrepareCommitAbort(t *testing.T) {
	p, fd1, fd2 := tempImage(t)
	needOFD(t, fd1)
	a, b := newLocker(t, fd1, p, LockAuto), newLocker(t, fd2, p, LockAuto)

	if err := a.Set(ConsistentRead|Write, ConsistentRead|WriteUnchanged|Resize); err != nil {
		t.Fatal(err)
	}
	// Prepare holds the union of old and new.
	if err := a.Prepare(ConsistentRead|Resize, All&^Resize); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "prepared", a.HeldBytes(), 100, 101, 103, 201, 203)
	wantBytes(t, "prepared, /proc/locks", procBytes(t, p), 100, 101, 103, 201, 203)
	// Abort restores the old set exactly.
	a.Abort()
	wantBytes(t, "aborted", procBytes(t, p), 100, 101, 201)
	a.Abort() // nothing pending: no-op
	wantBytes(t, "aborted twice", a.HeldBytes(), 100, 101, 201)

	// Commit drops what is no longer needed.
	if err := a.Prepare(ConsistentRead|Resize, All&^Resize); err != nil {
		t.Fatal(err)
	}
	a.Commit()
	wantBytes(t, "committed", procBytes(t, p), 100, 103, 203)
	if pm, sh := a.Held(); pm != ConsistentRead|Resize || sh != All&^Resize {
		t.Errorf("Held() = %v / %v", pm, sh)
	}

	// Two Prepares before Abort: Abort goes back to before the first.
	if err := a.Prepare(ConsistentRead|Write, All); err != nil {
		t.Fatal(err)
	}
	if err := a.Prepare(ConsistentRead|WriteUnchanged, All); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "prepared twice", a.HeldBytes(), 100, 101, 102, 103, 203)
	a.Abort()
	wantBytes(t, "aborted after two", procBytes(t, p), 100, 103, 203)
	// Two Prepares before Commit: Commit keeps the last one's bytes.
	if err := a.Prepare(ConsistentRead|Write, All); err != nil {
		t.Fatal(err)
	}
	if err := a.Prepare(ConsistentRead|WriteUnchanged, All); err != nil {
		t.Fatal(err)
	}
	a.Commit()
	wantBytes(t, "committed after two", procBytes(t, p), 100, 102)

	// A failed Prepare leaves everything as it was, on both sides: b holds
	// write unshared, a's change to need write fails and keeps 100, 102.
	if err := b.Set(ConsistentRead, All&^Write); err != nil {
		t.Fatal(err)
	}
	wantLockError(t, a.Prepare(ConsistentRead|Write|Resize, 0), `Failed to get "write" lock`, p)
	wantBytes(t, "a after failed Prepare", a.HeldBytes(), 100, 102)
	wantBytes(t, "/proc/locks after failed Prepare", procBytes(t, p), 100, 102, 201)
	// and Set is all or nothing too.
	wantLockError(t, a.Set(Write, All), `Failed to get "write" lock`, p)
	wantBytes(t, "a after failed Set", a.HeldBytes(), 100, 102)

	// Close releases everything, twice is fine, and the Locker can lock again.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "after Close", procBytes(t, p), 100, 201)
	if err := a.Set(ConsistentRead, All); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "after reuse", procBytes(t, p), 100, 201)
}

// A write lock on a byte (which QEMU never takes, but other programs may)
// makes taking our read lock fail with QEMU's "Failed to lock byte N".
func TestForeignWriteLock(t *testing.T) {
	p, fd1, _ := tempImage(t)
	needOFD(t, fd1)
	wfd, err := unix.Open(p, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(wfd)
	lk := unix.Flock_t{Type: unix.F_WRLCK, Start: 101, Len: 1}
	if err := unix.FcntlFlock(uintptr(wfd), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	a := newLocker(t, fd1, p, LockAuto)
	err = a.Set(ConsistentRead|Write, All)
	var be *ByteError
	if !errors.As(err, &be) || err.Error() != "Failed to lock byte 101" || !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("got %v (%T)", err, err)
	}
	wantBytes(t, "after failed lock", a.HeldBytes())
	hs, err := Holders(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 1 || !hs[0].Write || hs[0].Start != 101 || hs[0].End != 101 || hs[0].Kind != "OFDLCK" {
		t.Fatalf("holders %v, want only the foreign write lock", hs)
	}
}

// A descriptor closed under the Locker: errors keep the errno.
func TestBadDescriptor(t *testing.T) {
	p, fd1, _ := tempImage(t)
	needOFD(t, fd1)
	fd, err := unix.Dup(fd1)
	if err != nil {
		t.Fatal(err)
	}
	a := newLocker(t, fd, p, LockAuto)
	unix.Close(fd)
	if err := a.Check(ConsistentRead, All); !errors.Is(err, unix.EBADF) {
		t.Fatalf("Check on closed fd: %v", err)
	}
	if err := a.Set(ConsistentRead, All); !errors.Is(err, unix.EBADF) {
		t.Fatalf("Set on closed fd: %v", err)
	}
}

func TestLockingOff(t *testing.T) {
	p, fd1, fd2 := tempImage(t)
	a := newLocker(t, fd1, p, LockOff)
	if a.Enabled() {
		t.Fatal("locking=off is enabled")
	}
	if err := a.Set(All, 0); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "locking=off", procBytes(t, p))
	if pm, sh := a.Held(); pm != 0 || sh != All {
		t.Errorf("Held() = %v / %v, want nothing", pm, sh)
	}
	if ProbeOFD(fd2) {
		b := newLocker(t, fd2, p, LockAuto)
		if err := b.Set(All, 0); err != nil {
			t.Fatalf("locking=off still locked: %v", err)
		}
		// and off never sees others' locks either.
		if err := a.Set(All, 0); err != nil {
			t.Fatal(err)
		}
		if err := a.Check(All, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Prepare(Write, 0); err != nil {
		t.Fatal(err)
	}
	a.Abort()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := NewLocker(fd1, p, LockMode(9), nil); err == nil {
		t.Error("NewLocker accepted lock mode 9")
	}
}

// withoutOFD acts out a kernel without OFD locks.
func withoutOFD(t *testing.T) {
	old := probeOFD
	probeOFD = func(int) bool { return false }
	t.Cleanup(func() { probeOFD = old })
}

func TestNoOFD(t *testing.T) {
	p, fd1, fd2 := tempImage(t)
	withoutOFD(t)

	var logBuf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logBuf, nil))

	// auto: no locks at all, silently.
	a, err := NewLocker(fd1, p, LockAuto, log)
	if err != nil {
		t.Fatal(err)
	}
	if a.Enabled() {
		t.Fatal("auto without OFD locks")
	}
	if logBuf.Len() != 0 {
		t.Errorf("auto logged %q", logBuf.String())
	}

	// on: POSIX locks and QEMU's two warnings.
	b, err := NewLocker(fd2, p, LockOn, log)
	if err != nil {
		t.Fatal(err)
	}
	if !b.Enabled() || b.OFD() {
		t.Fatal("on without OFD does not fall back to POSIX locks")
	}
	for _, w := range []string{
		"File lock requested but OFD locking syscall is unavailable, falling back to POSIX file locks",
		"Due to the implementation, locks can be lost unexpectedly.",
	} {
		if !strings.Contains(logBuf.String(), w) {
			t.Errorf("log %q lacks %q", logBuf.String(), w)
		}
	}
	if err := b.Set(ConsistentRead|Write, ConsistentRead|WriteUnchanged|Resize); err != nil {
		t.Fatal(err)
	}
	hs, err := Holders(p)
	if err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "POSIX locks", LockAreaBytes(hs), 100, 101, 201)
	for _, h := range hs {
		if h.Kind != "POSIX" || h.PID != os.Getpid() {
			t.Errorf("holding %v, want POSIX locks of pid %d", h, os.Getpid())
		}
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	wantBytes(t, "POSIX locks after Close", procBytes(t, p))
}

const sampleProcLocks = `1: OFDLCK ADVISORY  READ -1 fe:00:9978714 203 203
2: OFDLCK ADVISORY  READ -1 fe:00:9978714 201 201
3: OFDLCK ADVISORY  READ -1 fe:00:9978714 103 103
4: OFDLCK ADVISORY  READ -1 fe:00:9978714 100 101
5: POSIX  ADVISORY  WRITE 1234 fe:00:9978714 0 EOF
5: -> POSIX  ADVISORY  WRITE 1235 fe:00:9978714 0 EOF
6: FLOCK  ADVISORY  WRITE 77 fe:00:12 0 EOF
7: OFDLCK ADVISORY  READ -1 fe:01:9978714 100 100
8: OFDLCK ADVISORY  READ -1 103:02:9978714 100 100
9: DELEG  ACTIVE    READ 88 fe:00:9978714 0 EOF
garbage
10: OFDLCK ADVISORY READ -1 fe:00:9978714 105 100
`

func TestParseProcLocks(t *testing.T) {
	hs, err := parseProcLocks(strings.NewReader(sampleProcLocks), 0xfe, 0, 9978714)
	if err != nil {
		t.Fatal(err)
	}
	want := []Holding{
		{"OFDLCK", false, -1, 203, 203},
		{"OFDLCK", false, -1, 201, 201},
		{"OFDLCK", false, -1, 103, 103},
		{"OFDLCK", false, -1, 100, 101},
		{"POSIX", true, 1234, 0, math.MaxInt64},
		{"DELEG", false, 88, 0, math.MaxInt64},
	}
	if !reflect.DeepEqual(hs, want) {
		t.Fatalf("got %v\nwant %v", hs, want)
	}
	// The whole-file POSIX lock covers the whole lock area.
	if got := LockAreaBytes(hs[:4]); !reflect.DeepEqual(got, []int64{100, 101, 103, 201, 203}) {
		t.Errorf("LockAreaBytes = %v", got)
	}
	if got := len(LockAreaBytes(hs)); got != 200 {
		t.Errorf("LockAreaBytes with an EOF lock: %d bytes, want 200", got)
	}
	if hs[4].String() != "POSIX WRITE pid 1234 0-EOF" || hs[0].String() != "OFDLCK READ pid -1 203-203" {
		t.Errorf("String: %q, %q", hs[4], hs[0])
	}
	// Device numbers are hex: 103:02 is major 0x103.
	hs, _ = parseProcLocks(strings.NewReader(sampleProcLocks), 0x103, 2, 9978714)
	if len(hs) != 1 {
		t.Errorf("major 0x103: %v", hs)
	}
	// An overlong line is an error, not a hang or a panic.
	if _, err := parseProcLocks(strings.NewReader(strings.Repeat("x", 2*maxProcLocksLine)), 0, 0, 0); err == nil {
		t.Error("overlong line accepted")
	}
	if _, err := Holders(filepath.Join(t.TempDir(), "nonexistent")); !errors.Is(err, unix.ENOENT) {
		t.Errorf("Holders(nonexistent): %v", err)
	}
}

func FuzzParseProcLocks(f *testing.F) {
	seed, err := os.ReadFile(filepath.Join("testdata", "proclocks.txt"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(string(seed), uint32(0xfe), uint32(0), uint64(9978714))
	f.Add(sampleProcLocks, uint32(0x103), uint32(2), uint64(9978714))
	f.Fuzz(func(t *testing.T, s string, major, minor uint32, ino uint64) {
		hs, _ := parseProcLocks(strings.NewReader(s), major, minor, ino)
		for _, h := range hs {
			if h.Start < 0 || h.End < h.Start {
				t.Fatalf("bad range %v", h)
			}
		}
		if b := LockAreaBytes(hs); len(b) > 200 {
			t.Fatalf("%d bytes in a 200-byte area", len(b))
		}
	})
}

// ---- Interop with QEMU's own tools ----

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (apt-get install qemu-utils): skipping interop test", name)
	}
	return p
}

// waitBytes polls /proc/locks until the lock area shows want, or fails.
func waitBytes(t *testing.T, p string, done <-chan struct{}, want ...int64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var got []int64
	for time.Now().Before(deadline) {
		got = procBytes(t, p)
		if reflect.DeepEqual(got, want) {
			return
		}
		select {
		case <-done:
			t.Fatalf("QEMU process exited; lock bytes %v, want %v", got, want)
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("lock bytes %v, want %v", got, want)
}

// runBG starts a QEMU tool that keeps running (stdin is a pipe we keep
// open) and stops it at cleanup: with SIGTERM if term (qemu-storage-daemon
// exits 0 on it), else by EOF on stdin (qemu-io), SIGTERM as a fallback.
func runBG(t *testing.T, term bool, name string, args ...string) (done <-chan struct{}, output func() string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := make(chan struct{})
	go func() { cmd.Wait(); close(ch) }()
	t.Cleanup(func() {
		stdin.Close()
		if term {
			cmd.Process.Signal(syscall.SIGTERM)
		}
		select {
		case <-ch:
		case <-time.After(3 * time.Second):
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-ch:
			case <-time.After(5 * time.Second):
				cmd.Process.Kill()
				<-ch
			}
		}
	})
	return ch, func() string {
		select {
		case <-ch:
			return out.String()
		default:
			return "(still running)"
		}
	}
}

func runTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// Our locks stop qemu-io and let qemu-img -U through.
func TestIntegrationQEMUSeesOurLocks(t *testing.T) {
	qemuIO := needTool(t, "qemu-io")
	qemuImg := needTool(t, "qemu-img")
	p, fd1, _ := tempImage(t)
	needOFD(t, fd1)
	a := newLocker(t, fd1, p, LockAuto)
	if err := a.Set(ConsistentRead|Write, ConsistentRead|WriteUnchanged|Resize); err != nil {
		t.Fatal(err)
	}
	out, err := runTool(t, qemuIO, "-f", "raw", "-c", "write 0 512", p)
	if err == nil || !strings.Contains(out, `Failed to get "write" lock`) ||
		!strings.Contains(out, "Is another process using the image ["+p+"]?") {
		t.Fatalf("qemu-io write while we hold write unshared: err %v, output %q", err, out)
	}
	if out, err := runTool(t, qemuImg, "info", "-U", "-f", "raw", p); err != nil {
		t.Fatalf("qemu-img info -U: %v: %s", err, out)
	}
	// A POSIX-mode Locker (locking=on without OFD) is seen by QEMU too:
	// QEMU's OFD locks and POSIX locks conflict across processes.
	a.Close()
	withoutOFD(t)
	b := newLocker(t, fd1, p, LockOn)
	if err := b.Set(ConsistentRead|Write, ConsistentRead|WriteUnchanged|Resize); err != nil {
		t.Fatal(err)
	}
	out, err = runTool(t, qemuIO, "-f", "raw", "-c", "write 0 512", p)
	if err == nil || !strings.Contains(out, `Failed to get "write" lock`) {
		t.Fatalf("qemu-io write while we hold POSIX locks: err %v, output %q", err, out)
	}
	b.Close()
	if out, err := runTool(t, qemuIO, "-f", "raw", "-c", "write 0 512", p); err != nil {
		t.Fatalf("qemu-io write after Close: %v: %s", err, out)
	}
}

// qemu-io on a raw image holds 100 and 101 and shares everything (QEMU
// 7.2's qemu-io opens without BDRV_O_NO_SHARE), so only a user that does
// not share write conflicts with it.
func TestIntegrationQemuIORaw(t *testing.T) {
	qemuIO := needTool(t, "qemu-io")
	p, fd1, _ := tempImage(t)
	needOFD(t, fd1)
	done, _ := runBG(t, false, qemuIO, "-f", "raw", p)
	waitBytes(t, p, done, 100, 101)

	a := newLocker(t, fd1, p, LockAuto)
	wantLockError(t, a.Prepare(ConsistentRead|Write, ConsistentRead|WriteUnchanged|Resize), `Failed to get shared "write" lock`, p)
	wantBytes(t, "after failed Prepare", procBytes(t, p), 100, 101)
	if err := a.Prepare(ConsistentRead, All); err != nil {
		t.Fatalf("force-share reader: %v", err)
	}
	a.Commit()
	// qemu-io shares write, so a writer that shares write too is fine.
	if err := a.Prepare(ConsistentRead|Write, All); err != nil {
		t.Fatalf("share-rw writer next to qemu-io: %v", err)
	}
	a.Abort()
}

// qemu-io on qcow2 holds write (and resize) on the file without sharing
// them: 100, 101, 103, 201, 203. A writer fails, a force-share reader
// does not.
func TestIntegrationQemuIOQcow2(t *testing.T) {
	qemuIO := needTool(t, "qemu-io")
	qemuImg := needTool(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "img.qcow2")
	if out, err := runTool(t, qemuImg, "create", "-q", "-f", "qcow2", p, "1M"); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	fd := openFD(t, p)
	needOFD(t, fd)
	done, _ := runBG(t, false, qemuIO, "-f", "qcow2", p)
	waitBytes(t, p, done, 100, 101, 103, 201, 203)

	a := newLocker(t, fd, p, LockAuto)
	wantLockError(t, a.Prepare(ConsistentRead|Write, All), `Failed to get "write" lock`, p)
	wantLockError(t, a.Prepare(ConsistentRead, ConsistentRead|WriteUnchanged|Resize), `Failed to get shared "write" lock`, p)
	wantBytes(t, "after failed Prepares", a.HeldBytes())
	if err := a.Prepare(ConsistentRead, All); err != nil {
		t.Fatalf("force-share reader: %v", err)
	}
	a.Commit()
	wantBytes(t, "/proc/locks with our reader", procBytes(t, p), 100, 101, 103, 201, 203)
}

// A qemu-storage-daemon vhost-user-blk export holds 100 and 101 only: it
// shares everything, so our writer gets in.
func TestIntegrationStorageDaemonExport(t *testing.T) {
	qsd := needTool(t, "qemu-storage-daemon")
	p, fd1, _ := tempImage(t)
	needOFD(t, fd1)
	sock := filepath.Join(t.TempDir(), "vhost.sock")
	done, output := runBG(t, true, qsd,
		"--blockdev", "driver=file,node-name=f,filename="+p,
		"--blockdev", "driver=raw,file=f,node-name=r",
		"--export", "type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path="+sock+",writable=on")
	select {
	case <-done:
		t.Fatalf("qemu-storage-daemon exited: %s", output())
	case <-time.After(0):
	}
	waitBytes(t, p, done, 100, 101)

	a := newLocker(t, fd1, p, LockAuto)
	if err := a.Prepare(ConsistentRead|Write, All); err != nil {
		t.Fatalf("writer next to a qsd export: %v", err)
	}
	a.Commit()
	// One that does not share write fails: qsd writes.
	b := newLocker(t, openFD(t, p), p, LockAuto)
	wantLockError(t, b.Prepare(ConsistentRead, ConsistentRead|WriteUnchanged|Resize), `Failed to get shared "write" lock`, p)
}
