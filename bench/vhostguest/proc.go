package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The backend process handling below is bench/vhost's (proc.go), less
// the Go frontend: the guest's QEMU connects instead.

// clockTick is the unit of utime and stime in /proc/PID/stat: USER_HZ,
// 100 on every Linux architecture Go supports (part of the ABI).
const clockTick = 10 * time.Millisecond

// server is one backend process serving the image over vhost-user-blk.
type server struct {
	name string
	cmd  *exec.Cmd
	sock string

	mu     sync.Mutex // guards stderr (written by exec's copier)
	stderr bytes.Buffer

	exited  chan struct{}
	waitErr error // valid once exited is closed
}

func (s *server) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stderr.Len() < 64<<10 {
		s.stderr.Write(p)
	}
	return len(p), nil
}

func (s *server) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.TrimSpace(s.stderr.String())
}

// backendArgs is bench/vhost's command line, the same for qsd and ours:
// a file node with cache.direct=off and aio=threads under the export.
func backendArgs(img, sock string, queues int) []string {
	return []string{
		"--blockdev", "driver=file,node-name=d,filename=" + img + ",cache.direct=off,aio=threads",
		"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=" + sock +
			",writable=on,num-queues=" + strconv.Itoa(queues),
	}
}

// startServer starts bin and returns once its socket accepts a
// connection: QEMU's chardev (without reconnect=) gives up at once on a
// socket that does not.
func startServer(ctx context.Context, name, bin, img, sock string, queues int) (*server, error) {
	_ = os.Remove(sock)
	s := &server{name: name, sock: sock, exited: make(chan struct{})}
	s.cmd = exec.Command(bin, backendArgs(img, sock, queues)...)
	s.cmd.Stdout = s
	s.cmd.Stderr = s
	// Killed with us if we die without stopping it.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		// A connection that closes without a message is what a frontend
		// that goes away does; both backends go back to listening.
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return s, nil
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("%s exited during start-up (%v): %s", bin, s.waitErr, s.output())
		case <-ctx.Done():
			s.stop()
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("%s did not listen on %s within 10 s: %s", bin, sock, s.output())
		}
	}
}

// stop asks the server to exit (SIGTERM) and kills it if it has not
// within 5 s. It reports an unclean exit.
func (s *server) stop() error {
	select {
	case <-s.exited:
		return fmt.Errorf("%s had already exited (%v): %s", s.name, s.waitErr, s.output())
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		if s.waitErr != nil {
			return fmt.Errorf("%s exited with %v on SIGTERM: %s", s.name, s.waitErr, s.output())
		}
		return nil
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
		return fmt.Errorf("%s did not exit within 5 s of SIGTERM; killed", s.name)
	}
}

// cpuTicks returns utime+stime of process pid (all its threads), in
// clock ticks, from /proc/PID/stat.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	_, _, ticks, err := parseStat(b)
	return ticks, err
}

// parseStat extracts the command name (field 2), the parent's pid (field
// 4) and utime (field 14) + stime (field 15) from the contents of
// /proc/PID/stat. The name is in parentheses and may hold spaces or
// parentheses, so fields are counted from the last ')'.
func parseStat(b []byte) (comm string, ppid int, ticks int64, err error) {
	i, j := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if i < 0 || j < i {
		return "", 0, 0, errors.New("malformed /proc/PID/stat: no (name)")
	}
	f := strings.Fields(string(b[j+1:]))
	// f[0] is field 3 (state), so field n is f[n-3].
	if len(f) < 13 {
		return "", 0, 0, fmt.Errorf("malformed /proc/PID/stat: %d fields after the name", len(f))
	}
	pp, err0 := strconv.Atoi(f[1])
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	k, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err0, err1, err2); err != nil {
		return "", 0, 0, fmt.Errorf("malformed /proc/PID/stat: %w", err)
	}
	return string(b[i+1 : j]), pp, u + k, nil
}

// guestPID finds the guest's QEMU among our children (package guest does
// not export its process): the child whose name starts with
// "qemu-system" and is not in known (already seen before this boot).
func guestPID(known map[int]bool) (int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	me := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || known[pid] {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		if comm, ppid, _, err := parseStat(b); err == nil && ppid == me && strings.HasPrefix(comm, "qemu-system") {
			return pid, nil
		}
	}
	return 0, errors.New("the guest's QEMU is not among this process's children")
}

// qemuChildren lists our children named qemu-system* (guests of earlier
// boots that are still exiting), so that guestPID does not pick them.
func qemuChildren() map[int]bool {
	m := map[int]bool{}
	for {
		pid, err := guestPID(m)
		if err != nil {
			return m
		}
		m[pid] = true
	}
}

func buildOurs(out string) error {
	root, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(root))
	if mod == "" || mod == os.DevNull {
		return fmt.Errorf("run from inside the blockbackend module (or pass -backend)")
	}
	// Not -race: the race detector would measure itself.
	cmd := exec.Command("go", "build", "-o", out, "./cmd/blockbackend")
	cmd.Dir = filepath.Dir(mod)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/blockbackend: %w\n%s", err, b)
	}
	return nil
}

// makeImages writes identical raw images full of non-zero data, a MiB at
// a time in turn, as bench/vhost does (see there for why).
func makeImages(paths []string, size int64) (err error) {
	if size <= 0 || size%(1<<20) != 0 {
		return fmt.Errorf("image size %d is not a positive multiple of 1 MiB", size)
	}
	var fs []*os.File
	defer func() {
		for _, f := range fs {
			if cerr := f.Close(); cerr != nil && err == nil {
				err = fmt.Errorf("write image: %w", cerr)
			}
		}
	}()
	for _, p := range paths {
		f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return fmt.Errorf("create image: %w", err)
		}
		fs = append(fs, f)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		for i := 0; i < len(buf); i += 8 {
			v := uint64(off+int64(i))*0x9e3779b97f4a7c15 | 1
			for k := 0; k < 8; k++ {
				buf[i+k] = byte(v >> (8 * k))
			}
		}
		for _, f := range fs {
			if _, err := f.Write(buf); err != nil {
				return fmt.Errorf("write image: %w", err)
			}
		}
	}
	return nil
}
