package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"blockbackend/vhostuser/frontend"
)

// server is one backend process serving a qcow2 image over vhost-user-blk.
type server struct {
	bin  string
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

// serverArgs is qemu-storage-daemon's command line, which blockbackend
// takes verbatim: a file node (page cache, thread pool AIO, as bench/vhost)
// under a qcow2 node, exported writable on one queue.
func serverArgs(img, sock string) []string {
	return []string{
		"--blockdev", "driver=file,node-name=f,filename=" + img + ",cache.direct=off,aio=threads",
		"--blockdev", "driver=qcow2,node-name=d,file=f",
		"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=" + sock + ",writable=on,num-queues=1",
	}
}

// startServer starts bin and returns once its socket exists.
func startServer(ctx context.Context, bin, img, sock string) (*server, error) {
	_ = os.Remove(sock)
	s := &server{bin: bin, sock: sock, exited: make(chan struct{})}
	s.cmd = exec.Command(bin, serverArgs(img, sock)...)
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

// stop sends SIGTERM (as a management layer would) and kills the server
// if it has not exited within 5 s; it reports an unclean exit.
func (s *server) stop() error {
	select {
	case <-s.exited:
		return fmt.Errorf("%s had already exited (%v): %s", s.bin, s.waitErr, s.output())
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		if s.waitErr != nil {
			return fmt.Errorf("%s exited with %v on SIGTERM: %s", s.bin, s.waitErr, s.output())
		}
		return nil
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
		return fmt.Errorf("%s did not exit within 5 s of SIGTERM; killed", s.bin)
	}
}
