package vhostuser_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"blockbackend/vhostuser"
	"blockbackend/vhostuser/frontend"
	"blockbackend/vhostuser/virtq"
)

// holdDevice never completes a request before gate closes, like a
// backend that died with requests in flight.
type holdDevice struct {
	gate chan struct{}
	in   atomic.Int32
}

func (*holdDevice) Features() uint64                 { return 0 }
func (*holdDevice) NumQueues() int                   { return 1 }
func (*holdDevice) ReadConfig(dst []byte) int        { clear(dst); dst[0] = 1; return 60 }
func (*holdDevice) WriteConfig(uint32, []byte) error { return nil }
func (d *holdDevice) Handle(_ int, c *virtq.Chain) uint32 {
	d.in.Add(1)
	<-d.gate
	return 0 // the frontend is gone by then: nothing to report
}

// A backend that takes over a ring from one that never completed its
// requests resubmits them from the inflight region (vhost-user.rst,
// "Inflight I/O tracking"), then serves the ring from where it was.
func TestResubmitAfterBackendLoss(t *testing.T) {
	for _, packed := range []bool{false, true} {
		t.Run(map[bool]string{false: "split", true: "packed"}[packed], func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "s")
			la, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			hold := &holdDevice{gate: make(chan struct{})}
			a := vhostuser.Serve(la, hold, nil)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			f, err := frontend.Dial(ctx, frontend.Options{Path: sock, Profile: frontend.QEMU72, EventIdx: true,
				Indirect: true, Packed: packed, Inflight: true, QueueSize: 16, IOTimeout: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			// Cleanup order: the frontend, the new backend, then the
			// held requests of the old one, and the old one.
			defer func() {
				close(hold.gate)
				a.Close()
			}()
			defer f.Close()
			if _, proto := f.Features(); proto&(1<<vhostuser.ProtoInflightShmfd) == 0 {
				t.Fatal("INFLIGHT_SHMFD not negotiated")
			}
			const n = 6
			var rs []*frontend.Request
			for i := range n {
				rs = append(rs, &frontend.Request{Type: frontend.TypeIn, Sector: uint64(8 * i), Data: f.Alloc(4096)})
			}
			if err := f.SubmitBatch(0, rs); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(5 * time.Second); hold.in.Load() < n; {
				if time.Now().After(deadline) {
					t.Fatalf("the old backend took %d of %d requests", hold.in.Load(), n)
				}
				time.Sleep(time.Millisecond)
			}

			// A new backend on the same path; the old one keeps its
			// requests (its listener goes, its socket file too).
			la.Close()
			os.Remove(sock)
			lb, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			b := vhostuser.Serve(lb, zeroDevice{queues: 1}, nil)
			defer b.Close()
			if err := f.Reconnect(ctx); err != nil {
				t.Fatal(err)
			}
			for got := 0; got < n; {
				done, err := f.Reap(0, 1, 5*time.Second)
				if err != nil {
					t.Fatalf("%d of %d resubmitted requests: %v", got, n, err)
				}
				for _, r := range done {
					if r.Err() != nil {
						t.Fatalf("resubmitted request: %v", r.Err())
					}
				}
				got += len(done)
			}
			// The ring goes on past the resubmitted requests, wrapping
			// the 16-entry ring a few times.
			for i := range 40 {
				r := &frontend.Request{Type: frontend.TypeIn, Sector: uint64(i), Data: rs[i%n].Data}
				if err := f.Do(0, r); err != nil || r.Err() != nil {
					t.Fatalf("request %d after the takeover: %v %v", i, err, r.Err())
				}
			}
		})
	}
}
