package frontend

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// BenchOptions describe a fio-like job.
type BenchOptions struct {
	Queues    []int // queues to drive, one goroutine each (nil: queue 0)
	Depth     int   // requests in flight per queue (zero: 1)
	BlockSize int   // bytes per request (zero: 4096), a multiple of 512
	Random    bool  // random offsets, else sequential
	Write     bool
	// Duration and Count stop the job, whichever comes first (both zero:
	// one second). Count is over all queues.
	Duration time.Duration
	Count    int64
	// Span is the byte range [0, Span) touched (zero: the capacity).
	Span int64
	Seed uint64
}

// BenchResult is what a job did.
type BenchResult struct {
	IOs      int64
	Bytes    int64
	Errors   int64
	Elapsed  time.Duration
	P50, P99 time.Duration // completion latency percentiles
	Max      time.Duration
	// Kicks and Sleeps are the frontend's kick-eventfd writes and waits
	// in poll(2) during the job, over all queues.
	Kicks, Sleeps int64
}

// IOPS is IOs per second.
func (r BenchResult) IOPS() float64 { return float64(r.IOs) / r.Elapsed.Seconds() }

// MBps is megabytes (1e6) per second.
func (r BenchResult) MBps() float64 { return float64(r.Bytes) / 1e6 / r.Elapsed.Seconds() }

func (r BenchResult) String() string {
	return fmt.Sprintf("%d IOs in %v: %.0f IOPS, %.1f MB/s, p50 %v p99 %v max %v, %d errors",
		r.IOs, r.Elapsed.Round(time.Millisecond), r.IOPS(), r.MBps(), r.P50, r.P99, r.Max, r.Errors)
}

// Bench runs the job against f. The data path does no allocation per
// request: Depth requests and buffers per queue are set up first and
// reused.
func Bench(ctx context.Context, f *Frontend, o BenchOptions) (BenchResult, error) {
	if len(o.Queues) == 0 {
		o.Queues = []int{0}
	}
	o.Depth = max(o.Depth, 1)
	if o.BlockSize == 0 {
		o.BlockSize = 4096
	}
	if o.BlockSize%SectorSize != 0 || o.BlockSize <= 0 {
		return BenchResult{}, fmt.Errorf("frontend: bench block size %d is not a multiple of 512", o.BlockSize)
	}
	if o.Duration == 0 && o.Count == 0 {
		o.Duration = time.Second
	}
	if o.Span == 0 {
		c, err := f.Config()
		if err != nil {
			return BenchResult{}, fmt.Errorf("frontend: bench needs the capacity: %w", err)
		}
		o.Span = int64(c.Capacity) * SectorSize
	}
	blocks := o.Span / int64(o.BlockSize)
	if blocks <= 0 {
		return BenchResult{}, fmt.Errorf("frontend: bench span %d is smaller than a block", o.Span)
	}
	for _, q := range o.Queues {
		if err := f.checkQueue(q); err != nil {
			return BenchResult{}, err
		}
	}
	typ := uint32(TypeIn)
	if o.Write {
		typ = TypeOut
	}
	type worker struct {
		reqs  []Request
		ptrs  []*Request
		start []time.Time
		lat   []time.Duration
		ios   int64
		errs  int64
		err   error
	}
	ws := make([]*worker, len(o.Queues))
	for i := range ws {
		w := &worker{reqs: make([]Request, o.Depth), ptrs: make([]*Request, 0, o.Depth), start: make([]time.Time, o.Depth)}
		for j := range w.reqs {
			buf := f.Alloc(o.BlockSize)
			if buf == nil {
				return BenchResult{}, errors.New("frontend: guest memory too small for the bench buffers")
			}
			for k := range buf {
				buf[k] = byte(k + j)
			}
			w.reqs[j] = Request{Type: typ, Data: buf, Tag: uint64(j)}
		}
		ws[i] = w
	}
	var issued atomic.Int64
	take := func() bool { return o.Count == 0 || issued.Add(1) <= o.Count }
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if o.Duration > 0 {
		ctx, cancel = context.WithTimeout(ctx, o.Duration)
		defer cancel()
	}
	stats := func() (k, s int64) {
		for _, q := range o.Queues {
			qk, qs := f.QueueStats(q)
			k, s = k+int64(qk), s+int64(qs)
		}
		return
	}
	k0, s0 := stats()
	begin := time.Now()
	var wg sync.WaitGroup
	for i, q := range o.Queues {
		w := ws[i]
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(o.Seed, uint64(q)+1))
			seq := int64(q) * (blocks / int64(len(o.Queues)+1))
			// next aims r at its next block; now is when it is submitted
			// (one clock read per batch, not per request).
			next := func(r *Request, now time.Time) {
				var b int64
				if o.Random {
					b = rng.Int64N(blocks)
				} else {
					b = seq % blocks
					seq++
				}
				r.Sector = uint64(b) * uint64(o.BlockSize) / SectorSize
				w.start[r.Tag] = now
			}
			inflight := 0
			stopping := false
			now := time.Now()
			for j := range w.reqs {
				if !take() {
					stopping = true
					break
				}
				next(&w.reqs[j], now)
				w.ptrs = append(w.ptrs, &w.reqs[j])
			}
			if err := f.SubmitBatch(q, w.ptrs); err != nil {
				w.err = err
				return
			}
			inflight = len(w.ptrs)
			for inflight > 0 {
				if !stopping && ctx.Err() != nil {
					stopping = true
				}
				done, err := f.Reap(q, 1, f.opts.IOTimeout)
				if err != nil {
					w.err = err
					return
				}
				now := time.Now()
				w.ptrs = w.ptrs[:0]
				for _, r := range done {
					inflight--
					w.ios++
					if r.Status != StatusOK {
						w.errs++
					}
					w.lat = append(w.lat, now.Sub(w.start[r.Tag]))
					if !stopping && ctx.Err() == nil && take() {
						next(r, now)
						w.ptrs = append(w.ptrs, r)
					} else {
						stopping = true
					}
				}
				if len(w.ptrs) > 0 {
					if err := f.SubmitBatch(q, w.ptrs); err != nil {
						w.err = err
						return
					}
					inflight += len(w.ptrs)
				}
			}
		}()
	}
	wg.Wait()
	res := BenchResult{Elapsed: time.Since(begin)}
	k1, s1 := stats()
	res.Kicks, res.Sleeps = k1-k0, s1-s0
	var lat []time.Duration
	var err error
	for _, w := range ws {
		res.IOs += w.ios
		res.Errors += w.errs
		lat = append(lat, w.lat...)
		if w.err != nil && err == nil {
			err = w.err
		}
	}
	res.Bytes = res.IOs * int64(o.BlockSize)
	if len(lat) > 0 {
		slices.Sort(lat)
		res.P50 = lat[len(lat)/2]
		res.P99 = lat[len(lat)*99/100]
		res.Max = lat[len(lat)-1]
	}
	return res, err
}
