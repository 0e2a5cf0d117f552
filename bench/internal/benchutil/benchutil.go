// Package benchutil is what the benchmark programs under bench/ (vhost,
// vhostguest, qcow2) share: running a backend process (ours or
// qemu-storage-daemon) on a socket and stopping it, reading a process's
// CPU time from /proc, building our binary without -race, writing the
// tmpfs images, the median of the runs, and the cells of the qsd/ours
// comparison tables (table.go). Each program keeps its own command
// lines, jobs and report columns.
package benchutil

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"blockbackend/vhostuser/frontend"
)

// ClockTick is the unit of utime and stime in /proc/PID/stat: sysconf
// (_SC_CLK_TCK), which is 100 on every Linux architecture Go supports
// (USER_HZ is part of the ABI), so it is not queried.
const ClockTick = 10 * time.Millisecond

// Options says which backend process to start and how to tell that it
// is ready.
type Options struct {
	Name string   // in error messages
	Bin  string   // the program
	Args []string // its command line
	Sock string   // the socket it creates; removed first

	// Listen waits until the socket accepts a connection rather than
	// until it exists: QEMU's chardev (without reconnect=) gives up at
	// once on a socket that does not. A connection that closes without a
	// message is what a frontend that goes away does; both backends go
	// back to listening.
	Listen bool
	// KillWithUs has the kernel kill the process if we die without
	// stopping it (Pdeathsig).
	KillWithUs bool
}

// Server is one backend process serving an image on a socket.
type Server struct {
	Name string
	Sock string
	cmd  *exec.Cmd

	mu     sync.Mutex // guards stderr (written by exec's copier)
	stderr bytes.Buffer

	exited  chan struct{}
	waitErr error // valid once exited is closed
}

func (s *Server) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stderr.Len() < 64<<10 {
		s.stderr.Write(p)
	}
	return len(p), nil
}

// Output is what the process wrote to stdout and stderr (the first
// 64 KiB), trimmed.
func (s *Server) Output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.TrimSpace(s.stderr.String())
}

// PID is the process's id.
func (s *Server) PID() int { return s.cmd.Process.Pid }

// FileExportArgs is bench/vhost's backend command line, which
// blockbackend takes verbatim like qemu-storage-daemon: the same options
// for both, so the block layer below the export is the same file node
// with the same cache mode and AIO engine.
func FileExportArgs(img, sock string, queues int) []string {
	return []string{
		"--blockdev", "driver=file,node-name=d,filename=" + img + ",cache.direct=off,aio=threads",
		"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=" + sock +
			",writable=on,num-queues=" + strconv.Itoa(queues),
	}
}

// Start starts o.Bin and returns once its socket is ready (see
// Options.Listen), or an error with what the process wrote if it exits
// first or is not ready within 10 s.
func Start(ctx context.Context, o Options) (*Server, error) {
	_ = os.Remove(o.Sock)
	s := &Server{Name: o.Name, Sock: o.Sock, exited: make(chan struct{})}
	s.cmd = exec.Command(o.Bin, o.Args...)
	s.cmd.Stdout = s
	s.cmd.Stderr = s
	if o.KillWithUs {
		s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", o.Bin, err)
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if o.Listen {
			if c, err := net.Dial("unix", o.Sock); err == nil {
				c.Close()
				return s, nil
			}
		} else if _, err := os.Stat(o.Sock); err == nil {
			return s, nil
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("%s exited during start-up (%v): %s", o.Bin, s.waitErr, s.Output())
		case <-ctx.Done():
			s.Stop()
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			if o.Listen {
				return nil, fmt.Errorf("%s did not listen on %s within 10 s: %s", o.Bin, o.Sock, s.Output())
			}
			return nil, fmt.Errorf("%s did not create %s within 10 s: %s", o.Bin, o.Sock, s.Output())
		}
	}
}

// Dial connects a frontend, retrying while the socket exists but is not
// yet listening.
func (s *Server) Dial(ctx context.Context, o frontend.Options) (*frontend.Frontend, error) {
	o.Path = s.Sock
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := frontend.Dial(ctx, o)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Stop asks the server to exit (SIGTERM, as a management layer would)
// and kills it if it has not within 5 s. It reports an unclean exit.
func (s *Server) Stop() error {
	select {
	case <-s.exited:
		return fmt.Errorf("%s had already exited (%v): %s", s.Name, s.waitErr, s.Output())
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		if s.waitErr != nil {
			return fmt.Errorf("%s exited with %v on SIGTERM: %s", s.Name, s.waitErr, s.Output())
		}
		return nil
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
		return fmt.Errorf("%s did not exit within 5 s of SIGTERM; killed", s.Name)
	}
}

// CPUTicks returns utime+stime of the server process (all its threads),
// in ClockTicks.
func (s *Server) CPUTicks() (int64, error) {
	t, err := CPUTicks(s.PID())
	if err != nil {
		return 0, fmt.Errorf("cpu time of %s: %w", s.Name, err)
	}
	return t, nil
}

// CPUTicks returns utime+stime of process pid (all its threads), in
// ClockTicks, from /proc/PID/stat.
func CPUTicks(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	_, _, ticks, err := ParseStat(b)
	return ticks, err
}

// ParseStat extracts the command name (field 2), the parent's pid (field
// 4) and utime (field 14) + stime (field 15) from the contents of
// /proc/PID/stat. The name is in parentheses and may hold spaces or
// parentheses, so fields are counted from the last ')'.
func ParseStat(b []byte) (comm string, ppid int, ticks int64, err error) {
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

// Ours is the binary to measure as "ours": the -backend flag's value
// (backend) looked up in PATH or, when it is empty, cmd/blockbackend
// built into dir.
func Ours(backend, dir string) (string, error) {
	if backend == "" {
		out := filepath.Join(dir, "blockbackend")
		return out, buildOurs(out)
	}
	p, err := exec.LookPath(backend)
	if err != nil {
		return "", fmt.Errorf("-backend: %w", err)
	}
	return p, nil
}

// buildOurs builds cmd/blockbackend into out, from the module the current
// directory is in.
func buildOurs(out string) error {
	root, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(root))
	if mod == "" || mod == os.DevNull {
		return fmt.Errorf("run from inside the blockbackend module (or pass -backend)")
	}
	// Not -race: the race detector multiplies the cost of every memory
	// access and would measure itself.
	cmd := exec.Command("go", "build", "-o", out, "./cmd/blockbackend")
	cmd.Dir = filepath.Dir(mod)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/blockbackend: %w\n%s", err, b)
	}
	return nil
}

// TmpfsBase is the directory to make the benchmark's temporary directory
// in: /dev/shm, so that images are in memory, or else os.TempDir(), in
// which case ok is false (and the caller says so).
func TmpfsBase() (dir string, ok bool) {
	if st, err := os.Stat("/dev/shm"); err != nil || !st.IsDir() {
		return os.TempDir(), false
	}
	return "/dev/shm", true
}

// Workdir makes the run's scratch directory (prefix*) under TmpfsBase,
// saying through logf when that is not tmpfs, and finds our binary in it
// (Ours). On error nothing is left behind; otherwise the caller removes
// dir.
func Workdir(prefix, backend string, logf func(string, ...any)) (dir, ours string, err error) {
	base, tmpfs := TmpfsBase()
	if !tmpfs {
		logf("no /dev/shm: images in %s (may not be tmpfs)", base)
	}
	if dir, err = os.MkdirTemp(base, prefix); err != nil {
		return "", "", err
	}
	if ours, err = Ours(backend, dir); err != nil {
		os.RemoveAll(dir)
		return "", "", err
	}
	return dir, ours, nil
}

// MakeImages writes identical raw images full of non-zero data, so that
// every page exists in tmpfs and reads copy real data rather than the
// zero page. The files are written a MiB at a time in turn, so that their
// pages come from the allocator alike: an image written entirely after
// another read back ~15% faster in 1 MiB sequential reads here, in
// qsd-vs-qsd runs, whichever backend had it.
func MakeImages(paths []string, size int64) (err error) {
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

// Median is the median of v (the mean of the middle two for an even
// count), 0 for none. v is not changed.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

// MedianOf is the median of f over ss.
func MedianOf[T any](ss []T, f func(T) float64) float64 {
	v := make([]float64, len(ss))
	for i, s := range ss {
		v[i] = f(s)
	}
	return Median(v)
}
