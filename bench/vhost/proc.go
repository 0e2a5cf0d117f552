package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"blockbackend/vhostuser/frontend"
)

// clockTick is the unit of utime and stime in /proc/PID/stat: sysconf
// (_SC_CLK_TCK), which is 100 on every Linux architecture Go supports
// (USER_HZ is part of the ABI), so it is not queried.
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

// backendArgs is qsd's command line, which blockbackend takes verbatim:
// the same options for both, so the block layer below the export is the
// same file node with the same cache mode and AIO engine.
func backendArgs(img, sock string, queues int) []string {
	return []string{
		"--blockdev", "driver=file,node-name=d,filename=" + img + ",cache.direct=off,aio=threads",
		"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=" + sock +
			",writable=on,num-queues=" + strconv.Itoa(queues),
	}
}

// startServer starts bin and returns once its socket accepts connections.
func startServer(ctx context.Context, name, bin, img, sock string, queues int) (*server, error) {
	_ = os.Remove(sock)
	s := &server{name: name, sock: sock, exited: make(chan struct{})}
	s.cmd = exec.Command(bin, backendArgs(img, sock, queues)...)
	s.cmd.Stdout = s
	s.cmd.Stderr = s
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
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
			return nil, fmt.Errorf("%s did not create %s within 10 s: %s", bin, sock, s.output())
		}
	}
}

// dial connects a frontend, retrying while the socket exists but is not
// yet listening.
func (s *server) dial(ctx context.Context, o frontend.Options) (*frontend.Frontend, error) {
	o.Path = s.sock
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

// stop asks the server to exit (SIGTERM, as a management layer would) and
// kills it if it has not within 5 s. It reports an unclean exit.
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

// cpuTicks returns utime+stime of the process (all its threads), in clock
// ticks, from /proc/PID/stat.
func (s *server) cpuTicks() (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(s.cmd.Process.Pid) + "/stat")
	if err != nil {
		return 0, fmt.Errorf("cpu time of %s: %w", s.name, err)
	}
	return parseStatTicks(b)
}

// parseStatTicks extracts utime (field 14) + stime (field 15) from the
// contents of /proc/PID/stat. The command name (field 2) is in
// parentheses and may hold spaces or parentheses, so fields are counted
// from the last ')'.
func parseStatTicks(b []byte) (int64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc/PID/stat: no ')'")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), so field n is f[n-3].
	if len(f) < 13 {
		return 0, fmt.Errorf("malformed /proc/PID/stat: %d fields after the name", len(f))
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	k, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("malformed /proc/PID/stat: %w", err)
	}
	return u + k, nil
}
