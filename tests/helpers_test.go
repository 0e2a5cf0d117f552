// Package tests holds end-to-end tests that start the real blockbackend
// binary and talk to it with real peers: go-qemu's QMP client, qemu-img,
// qemu-io, qemu-storage-daemon and NBD clients.
package tests

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"blockbackend/internal/qemutest"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "blockbackend-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "blockbackend")
	build := exec.Command("go", "build", "-race", "-o", binary, "blockbackend/cmd/blockbackend")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building blockbackend:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// needTool skips the test when a peer tool is missing (CI installs them).
func needTool(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("%s is not installed (apt-get install qemu-utils qemu-system-x86 libnbd-bin); .ci/run installs it", n)
		}
	}
}

// shortDir is a temp dir with a short path (UNIX socket paths are limited
// to 107 bytes; t.TempDir can be longer).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", "bb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// makeImage creates a raw image of size bytes.
func makeImage(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

// proc is a running blockbackend.
type proc struct {
	cmd    *exec.Cmd
	stderr *syncBuf
	done   chan error
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs blockbackend with args and waits until waitFor (a socket
// path) accepts connections.
func start(t *testing.T, waitFor string, args ...string) *proc {
	t.Helper()
	return startReady(t, binary, func() bool { return dialable(waitFor) }, waitFor, args...)
}

func dialable(sock string) bool {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// startReady runs bin with args and waits until ready reports true (what
// names what it waits for, in the failure message). The process dies with
// the test binary, so a test killed by its -timeout leaves nothing behind.
func startReady(t *testing.T, bin string, ready func() bool, what string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(bin, args...), stderr: &syncBuf{}, done: make(chan error, 1)}
	p.cmd.Stderr = p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() { p.stop(t) })
	deadline := time.Now().Add(20 * time.Second)
	for !ready() {
		select {
		case err := <-p.done:
			p.done <- err
			t.Fatalf("%s exited early (%v): %s", filepath.Base(bin), err, p.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not open %s: %s", filepath.Base(bin), what, p.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return p
}

// stop sends SIGTERM and checks the exit status is 0, as qsd's.
func (p *proc) stop(t *testing.T) {
	if p.cmd.ProcessState != nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Errorf("blockbackend exited with %v after SIGTERM; stderr: %s", err, p.stderr.String())
		}
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		t.Errorf("blockbackend did not exit on SIGTERM; stderr: %s", p.stderr.String())
	}
	if s := p.stderr.String(); strings.Contains(s, "DATA RACE") || strings.Contains(s, "panic:") {
		t.Errorf("blockbackend stderr shows a race or panic:\n%s", s)
	}
}

// monitor connects go-qemu's client.
func monitor(t *testing.T, sock string) *goqmp.SocketMonitor {
	t.Helper()
	m, err := goqmp.NewSocketMonitor("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Connect(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Disconnect() })
	return m
}

// run executes a command and returns its "return" value decoded.
func run(t *testing.T, m *goqmp.SocketMonitor, cmd string, args any) any {
	t.Helper()
	out, err := runErr(m, cmd, args)
	if err != nil {
		t.Fatalf("%s %v: %v", cmd, args, err)
	}
	return out
}

func runErr(m *goqmp.SocketMonitor, cmd string, args any) (any, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	reply, err := m.Run(b)
	if err != nil {
		return nil, err
	}
	var r struct {
		Return any `json:"return"`
	}
	if err := json.Unmarshal(reply, &r); err != nil {
		return nil, err
	}
	return r.Return, nil
}

// rawQMP is a line-level QMP connection for wire-exact checks.
type rawQMP struct {
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, sock string) *rawQMP {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	q := &rawQMP{c: c, r: bufio.NewReader(c)}
	return q
}

func (q *rawQMP) send(t *testing.T, s string) {
	t.Helper()
	if _, err := io.WriteString(q.c, s); err != nil {
		t.Fatal(err)
	}
}

func (q *rawQMP) line(t *testing.T) string {
	t.Helper()
	_ = q.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	l, err := q.r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading QMP: %v (got %q)", err, l)
	}
	return strings.TrimRight(l, "\r\n")
}

// cmdOut runs an external command and returns combined output and error.
func cmdOut(name string, args ...string) (string, error) {
	out, err := qemutest.CombinedOutput(func() *exec.Cmd { return exec.Command(name, args...) })
	return string(out), err
}

// lockBytes lists the bytes of path covered by OFD locks (any holder),
// sorted, from /proc/locks (the kernel merges adjacent ranges, so ranges
// are expanded).
func lockBytes(t *testing.T, path string) []int {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Fatal(err)
	}
	suffix := fmt.Sprintf(":%d", st.Ino)
	held := map[int]bool{}
	for _, l := range strings.Split(string(data), "\n") {
		f := strings.Fields(l)
		// "1: OFDLCK ADVISORY READ -1 fe:00:9977941 100 101"
		if len(f) != 8 || f[1] != "OFDLCK" || !strings.HasSuffix(f[5], suffix) {
			continue
		}
		var lo, hi int
		if _, err := fmt.Sscan(f[6], &lo); err != nil {
			continue
		}
		if _, err := fmt.Sscan(f[7], &hi); err != nil {
			continue
		}
		for b := lo; b <= hi && b-lo < 1024; b++ {
			held[b] = true
		}
	}
	out := make([]int, 0, len(held))
	for b := range held {
		out = append(out, b)
	}
	sort.Ints(out)
	return out
}
