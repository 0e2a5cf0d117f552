package vhostuser

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"blockbackend/vhostuser/virtq"
)

// How a running ring serves its requests.
//
// One goroutine at a time is the ring's worker: it waits for kicks and
// pops requests. While requests are fast (the moving average of their
// service time under inlineMax: data in the page cache, a zero cluster
// that a read fills with a memset) the worker serves them itself, one
// after the other, without waking any other goroutine, and announces
// their completions to the driver in batches: one notification test, and
// at most one call eventfd write, per pass over the ring, or sooner once
// batchMax completions or about batchTime of service wait unannounced.
// Quick requests (served without I/O, a fraction of a microsecond each)
// are announced one by one instead, as QEMU's export does: with event
// index the test costs a load unless the driver asked to be woken, and a
// driver that sleeps until its first completion then wakes while the
// worker serves the rest of the pass, rather than after all of it (with
// 32 zero-cluster reads in flight the Go frontend slept once per 32
// requests, in lockstep with the worker, and ran at 0.85x qsd; announced
// one by one, 1.7x).
//
// A request that outlasts inlineHandoff on the worker (a flush on a slow
// disk) must not hold up the ones behind it. A watchdog timer ticks every
// inlineHandoff while the worker serves requests (rather than being reset
// for each request, which would cost about a tenth of a fast one); a tick
// that finds the worker still on the request the previous tick saw makes
// its own goroutine the worker, which first announces what the old worker
// completed but had not announced. The old one finishes its request and
// stays on as a helper. So a slow request holds the ring for one to two
// ticks, and the requests after it count as slow (go to helpers) until
// their average says otherwise.
//
// While requests are slow (the average over inlineMax: a disk that takes
// its time) they are handed to helper goroutines, so that many are in
// flight at once: to a helper waiting for work if there is one, else to a
// new helper. Helpers announce each completion at once (with event index
// the driver decides how often that costs a call). Up to maxIdleHelpers
// helpers wait for work between bursts instead of exiting, so that their
// grown stacks are reused; the goroutines of a ring are thus bounded by
// the requests in flight, and at rest by maxIdleHelpers plus the worker.
//
// Before it sleeps, the worker polls the ring for a while with the
// driver's notifications still off, as QEMU's iothreads poll their event
// sources (poll-max-ns): a request that arrives meanwhile costs neither
// the driver a kick nor the worker a wake-up. How long it polls adapts
// as QEMU's does: it grows (from pollStart, doubling, up to pollMax)
// while the sleeps that follow turn out shorter than pollMax, and
// shrinks (halving, to nothing) when a sleep lasts longer, so that a
// ring with sparse requests (a guest under TCG) does not spin at all.
const (
	pollStart = 4 * time.Microsecond
	pollMax   = 32 * time.Microsecond

	inlineHandoff  = 100 * time.Microsecond
	inlineMax      = 20 * time.Microsecond
	batchMax       = 64
	quickBatchMax  = 1 // see above: quick completions are announced at once
	batchTime      = 50 * time.Microsecond
	maxIdleHelpers = 16
	// The worker times one request in sampleEvery (a clock read costs a
	// few percent of a fast request); helpers time every request.
	sampleEvery = 8
)

// States of the request the worker serves, in the low two bits of
// ring.inline (a sequence number in the others tells one request from
// the next).
const (
	inlineIdle    = 0
	inlineServing = 1
	inlineHanded  = 2
)

// ring is one run of a queue, from the start of its worker to stop.
type ring struct {
	q    *queue
	vq   *virtq.Queue
	kick int // the kick eventfd (non-blocking; the queue owns it)
	// stopFD is an eventfd that stop makes readable, to end the wait
	// for a kick.
	stopFD int

	stopping atomic.Bool
	worker   chan struct{}  // closed when the last worker exits
	reqs     sync.WaitGroup // requests popped and not yet completed
	gs       sync.WaitGroup // the ring's goroutines: worker(s) and helpers

	work   chan *virtq.Chain // to helpers waiting for work (unbuffered)
	idle   atomic.Int32      // helpers waiting on work
	active atomic.Int32      // requests handed to helpers and not done

	// svc is the moving average of the service time, in nanoseconds.
	svc atomic.Int64

	watchdog *time.Timer
	armed    atomic.Bool   // the watchdog is ticking
	inline   atomic.Uint64 // seq<<2 | state of the request on the worker
	seen     atomic.Uint64 // the inline value the last tick saw
	seq      uint64        // worker-owned
	unsent   int           // worker-owned: completions not yet announced
	poll     time.Duration // worker-owned: how long to poll before sleeping
	quick    QuickHandler  // the device's, or nil
}

func startRing(q *queue, vq *virtq.Queue, kick int) (*ring, error) {
	stopFD, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, err
	}
	r := &ring{q: q, vq: vq, kick: kick, stopFD: stopFD, worker: make(chan struct{}), work: make(chan *virtq.Chain)}
	r.quick, _ = q.s.dev.(QuickHandler)
	r.watchdog = time.AfterFunc(time.Hour, r.tick)
	r.watchdog.Stop()
	r.gs.Add(1)
	go func() {
		defer r.gs.Done()
		r.loop()
	}()
	return r, nil
}

// stop halts the worker, waits for every request to complete and for the
// ring's goroutines to exit.
func (r *ring) stop() {
	r.stopping.Store(true)
	// Wake the worker if it waits for a kick; it sees stopping and exits.
	_, _ = unix.Write(r.stopFD, one[:])
	<-r.worker
	r.reqs.Wait()
	close(r.work)
	r.gs.Wait()
	r.watchdog.Stop()
	unix.Close(r.stopFD)
}

// loop is the worker: it drains the ring and waits for kicks until the
// ring stops or another goroutine takes over.
func (r *ring) loop() {
	// Completions an earlier worker left unannounced (after a handoff).
	r.flush()
	for !r.stopping.Load() {
		switch r.drain() {
		case drainBroken:
			r.flush()
			close(r.worker)
			return
		case drainHandedOff:
			// Another goroutine is the worker now; this one helps.
			r.helper(nil)
			return
		}
		t0 := time.Now()
		if !r.waitKick() {
			break
		}
		r.adaptPoll(time.Since(t0))
	}
	r.flush()
	close(r.worker)
}

// waitKick waits for the driver's kick and consumes it. It returns false
// when the ring stops or the kick fd fails.
//
// The wait is poll(2) on this goroutine's thread rather than Go's network
// poller: the kick then wakes the thread that serves the ring directly,
// which at queue depth 1 saves a handoff through the poller's thread (a
// waiting ring thus holds a thread, as each queue of qemu-storage-daemon
// does).
func (r *ring) waitKick() bool {
	pfd := [2]unix.PollFd{{Fd: int32(r.kick), Events: unix.POLLIN}, {Fd: int32(r.stopFD), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(pfd[:], -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pfd[1].Revents != 0 || pfd[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
			return false
		}
		if pfd[0].Revents&unix.POLLIN != 0 {
			var buf [8]byte
			n, err := unix.Read(r.kick, buf[:])
			if err == unix.EAGAIN || err == unix.EINTR {
				continue
			}
			// An eventfd reads 8 bytes; anything else (a regular file
			// at its end) would wake us forever.
			return err == nil && n == 8
		}
	}
}

const (
	drainIdle = iota
	drainBroken
	drainHandedOff
)

// pop takes the next request: first those a previous backend left in
// flight, then the available ones.
func (r *ring) pop(c *virtq.Chain) (bool, error) {
	if ok, err := r.vq.Resubmit(c); ok || err != nil {
		return ok, err
	}
	return r.vq.Pop(c)
}

// drain pops every available request and serves it or hands it to a
// helper.
func (r *ring) drain() int {
	var c *virtq.Chain // a free chain
	defer func() {
		if c != nil {
			r.q.chains.Put(c)
		}
	}()
	for {
		r.vq.DisableNotify()
		// With slow requests, each request but the last one popped goes
		// to a helper at once; the last one waits until the ring is seen
		// empty, so that a lone request is served right here.
		var last *virtq.Chain
		for !r.stopping.Load() {
			if c == nil {
				c = r.q.chains.Get().(*virtq.Chain)
			}
			ok, err := r.pop(c)
			if err != nil {
				if last != nil {
					r.dispatch(last)
				}
				r.q.broken(err)
				return drainBroken
			}
			if !ok {
				break
			}
			r.reqs.Add(1)
			if r.serveQuick(c) {
				continue // c is free again
			}
			if last != nil {
				r.dispatch(last)
				last = nil
			}
			if time.Duration(r.svc.Load()) < inlineMax {
				if !r.serveInline(c) {
					return drainHandedOff
				}
				continue // c is free again
			}
			last, c = c, nil
		}
		if last != nil {
			if r.active.Load() != 0 {
				r.dispatch(last)
			} else {
				c = last
				if !r.serveInline(c) {
					return drainHandedOff
				}
			}
		}
		r.flush()
		if r.stopping.Load() {
			return drainIdle
		}
		if r.pollAvail() {
			continue
		}
		if !r.vq.EnableNotify() {
			return drainIdle
		}
	}
}

// pollAvail busy-waits up to r.poll for requests, notifications off, and
// reports whether some arrived.
func (r *ring) pollAvail() bool {
	if r.poll == 0 {
		return false
	}
	deadline := time.Now().Add(r.poll)
	for i := 1; ; i++ {
		if r.vq.Pending() {
			return true
		}
		if i%128 == 0 && (r.stopping.Load() || time.Now().After(deadline)) {
			return false
		}
	}
}

// adaptPoll sets the next polling time from how long the worker slept.
func (r *ring) adaptPoll(slept time.Duration) {
	switch {
	case slept > pollMax:
		// Polling longer would not have caught the request: poll less.
		if r.poll /= 2; r.poll < pollStart {
			r.poll = 0
		}
	case slept > r.poll:
		// A little more polling would have caught it.
		r.poll = min(max(2*r.poll, pollStart), pollMax)
	}
}

// serveQuick serves c on the worker if the device can do so at once
// (QuickHandler), and reports whether it did.
func (r *ring) serveQuick(c *virtq.Chain) bool {
	if r.quick == nil {
		return false
	}
	written, ok := r.quick.HandleQuick(r.q.idx, c)
	if !ok {
		return false
	}
	r.vq.Complete(c, written)
	r.reqs.Done()
	if r.unsent++; r.unsent >= quickBatchMax {
		r.flush()
	}
	return true
}

// serveInline serves c on the worker. It returns false if the watchdog
// made another goroutine the worker meanwhile: the caller then no longer
// is. Either way c is free again when it returns.
func (r *ring) serveInline(c *virtq.Chain) bool {
	// Once tok is stored another goroutine may become the worker: from
	// then on only local variables, not seq or unsent.
	r.seq += 4
	tok := r.seq | inlineServing
	timed := r.seq/4%sampleEvery == 0
	r.inline.Store(tok)
	if r.armed.CompareAndSwap(false, true) {
		r.watchdog.Reset(inlineHandoff)
	}
	var t0 time.Time
	if timed {
		t0 = time.Now()
	}
	written := r.q.s.dev.Handle(r.q.idx, c)
	if timed {
		r.observe(time.Since(t0))
	}
	r.vq.Complete(c, written)
	if !r.inline.CompareAndSwap(tok, tok&^3|inlineIdle) {
		// Another goroutine is the worker now (and owns seq and
		// unsent); it may have announced before this completion.
		r.notify()
		r.reqs.Done()
		return false
	}
	r.reqs.Done()
	r.unsent++
	if r.unsent >= batchMax || time.Duration(r.unsent)*time.Duration(r.svc.Load()) >= batchTime {
		r.flush()
	}
	return true
}

// tick is the watchdog. If the worker is on the request the previous tick
// saw, this goroutine becomes the worker; else the watchdog ticks again
// while the worker serves requests.
func (r *ring) tick() {
	v := r.inline.Load()
	if v&3 == inlineServing && v == r.seen.Load() {
		if !r.inline.CompareAndSwap(v, v&^3|inlineHanded) {
			r.tick() // the request just completed
			return
		}
		r.armed.Store(false)
		// Requests are slow now, as far as we know: the next ones go to
		// helpers until the average says otherwise (a slow disk then
		// gets its queue depth at once, not one request per tick).
		if r.svc.Load() < int64(inlineHandoff) {
			r.svc.Store(int64(inlineHandoff))
		}
		// The old worker, still counted in gs, is serving a request:
		// gs is not zero, so this Add may race with stop's Wait.
		r.gs.Add(1)
		defer r.gs.Done()
		r.loop()
		return
	}
	r.seen.Store(v)
	if v&3 == inlineServing {
		r.watchdog.Reset(inlineHandoff)
		return
	}
	// Idle: stop ticking, unless the worker started a request meanwhile
	// and saw the watchdog still armed.
	r.armed.Store(false)
	if r.inline.Load()&3 == inlineServing && r.armed.CompareAndSwap(false, true) {
		r.watchdog.Reset(inlineHandoff)
	}
}

// dispatch hands c to a helper.
func (r *ring) dispatch(c *virtq.Chain) {
	r.active.Add(1)
	select {
	case r.work <- c:
	default:
		r.gs.Add(1)
		go func() {
			defer r.gs.Done()
			r.helper(c)
		}()
	}
}

// helper serves c (if not nil), then whatever it is handed, until the
// ring stops or enough other helpers wait.
func (r *ring) helper(c *virtq.Chain) {
	for {
		if c != nil {
			t0 := time.Now()
			written := r.q.s.dev.Handle(r.q.idx, c)
			r.observe(time.Since(t0))
			r.vq.Complete(c, written)
			r.notify()
			r.q.chains.Put(c)
			r.active.Add(-1)
			r.reqs.Done()
		}
		if r.idle.Add(1) > maxIdleHelpers {
			r.idle.Add(-1)
			return
		}
		var ok bool
		c, ok = <-r.work
		r.idle.Add(-1)
		if !ok {
			return
		}
	}
}

// flush announces the worker's completions; only the worker calls it.
func (r *ring) flush() {
	r.unsent = 0
	r.notify()
}

// notify announces the completions since the last announcement, if the
// driver wants to hear of them.
func (r *ring) notify() {
	if r.vq.Notify() {
		r.q.signal()
	}
}

// observe adds a service time to the moving average (weight 1/8). Racing
// updates may lose a sample, which an average can afford.
func (r *ring) observe(d time.Duration) {
	old := r.svc.Load()
	r.svc.Store(old + (int64(d)-old)/8)
}
