package vhostuser_test

import (
	"context"
	"encoding/binary"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"blockbackend/vhostuser"
	"blockbackend/vhostuser/frontend"
	"blockbackend/vhostuser/virtq"
)

// gateDevice holds every request for sector 0 until gate is closed and
// completes the others at once.
type gateDevice struct{ gate, held chan struct{} }

func (gateDevice) Features() uint64                 { return 0 }
func (gateDevice) NumQueues() int                   { return 1 }
func (gateDevice) ReadConfig(dst []byte) int        { clear(dst); return 60 }
func (gateDevice) WriteConfig(uint32, []byte) error { return nil }
func (d gateDevice) Handle(_ int, c *virtq.Chain) uint32 {
	var hdr [16]byte
	copy(hdr[:], c.Out[0])
	if binary.LittleEndian.Uint64(hdr[8:]) == 0 {
		d.held <- struct{}{}
		<-d.gate
	}
	last := c.In[len(c.In)-1]
	last[len(last)-1] = 0
	return 1
}

// A lone request is served on the ring's worker (queue depth 1); if it
// blocks, the requests after it must still be served.
func TestLoneSlowRequestDoesNotBlockTheRing(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	dev := gateDevice{gate: make(chan struct{}), held: make(chan struct{}, 1)}
	srv := vhostuser.Serve(l, dev, nil)
	defer srv.Close()
	var once sync.Once
	release := func() { once.Do(func() { close(dev.gate) }) }
	defer release() // before srv.Close, or Close waits for the held request
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f, err := frontend.Dial(ctx, frontend.Options{Path: sock, Profile: frontend.QEMU72, EventIdx: true, IOTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	slow := &frontend.Request{Type: frontend.TypeOut, Sector: 0, Data: f.Alloc(512)}
	if err := f.Submit(0, slow); err != nil {
		t.Fatal(err)
	}
	<-dev.held
	for i := range 3 {
		fast := &frontend.Request{Type: frontend.TypeOut, Sector: 8, Data: f.Alloc(512)}
		if err := f.Do(0, fast); err != nil || fast.Err() != nil {
			t.Fatalf("request %d behind a blocked one: %v %v", i, err, fast.Err())
		}
	}
	release()
	if _, err := f.Reap(0, 1, 5*time.Second); err != nil {
		t.Fatalf("the slow request: %v", err)
	}
}

// barrierDevice completes no request until n requests are being served
// at once: a ring that served requests one at a time would never
// complete any.
type barrierDevice struct {
	n  int
	mu sync.Mutex
	in int
	ok chan struct{}
}

func (*barrierDevice) Features() uint64                 { return 0 }
func (*barrierDevice) NumQueues() int                   { return 1 }
func (*barrierDevice) ReadConfig(dst []byte) int        { clear(dst); return 60 }
func (*barrierDevice) WriteConfig(uint32, []byte) error { return nil }
func (d *barrierDevice) Handle(_ int, c *virtq.Chain) uint32 {
	d.mu.Lock()
	ok := d.ok
	d.in++
	if d.in == d.n {
		close(ok)
	}
	d.mu.Unlock()
	select {
	case <-ok:
	case <-time.After(10 * time.Second):
	}
	last := c.In[len(c.In)-1]
	last[len(last)-1] = 0
	return 1
}

// Requests that block (here: on each other) are served concurrently,
// whether the ring's worker serves them or hands them to helpers.
func TestBlockingRequestsRunConcurrently(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	const n = 8
	dev := &barrierDevice{n: n, ok: make(chan struct{})}
	srv := vhostuser.Serve(l, dev, nil)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f, err := frontend.Dial(ctx, frontend.Options{Path: sock, Profile: frontend.QEMU72, EventIdx: true, IOTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	for round := range 3 { // the second and third find helpers waiting
		var rs []*frontend.Request
		for i := range n {
			rs = append(rs, &frontend.Request{Type: frontend.TypeOut, Sector: uint64(8 * i), Data: f.Alloc(512)})
		}
		if err := f.SubmitBatch(0, rs); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < n; {
			done, err := f.Reap(0, 1, 5*time.Second)
			if err != nil {
				t.Fatalf("round %d: %d of %d requests: %v", round, got, n, err)
			}
			got += len(done)
		}
		dev.mu.Lock()
		dev.in, dev.ok = 0, make(chan struct{})
		dev.mu.Unlock()
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("%d blocking requests took %v", n, d)
	}
}
