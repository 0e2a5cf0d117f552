package luks

import (
	"context"
	"sync"
)

// rangeLock serialises writes that overlap a read-modify-write. A write
// that covers whole sectors holds its sectors shared: such writes run
// concurrently, even overlapping ones (their order is the caller's
// business, and each sector is written whole). A write that must read a
// partial sector, decrypt it, merge and re-encrypt it holds its sectors
// exclusively: no other write of those sectors may run between its read
// and its write, or that write would be lost (the RMW would write back the
// sector as it was before). The same is QEMU's "serialising" requests.
//
// Waiters are not queued fairly: an exclusive waiter can wait while
// overlapping shared writes keep coming. Guests rarely write one sector
// from two requests at once, and a partial-sector write is rare itself.
type rangeLock struct {
	mu   sync.Mutex
	held []*lockedRange // guarded by mu
}

// lockedRange is one holder: sectors [start, end).
type lockedRange struct {
	start, end int64
	excl       bool
	done       chan struct{} // made (under rangeLock.mu) by the first waiter; closed on unlock
}

func (r *lockedRange) conflicts(start, end int64, excl bool) bool {
	return start < r.end && r.start < end && (excl || r.excl)
}

// lock takes sectors [start, end), exclusively or shared, waiting for the
// holders it conflicts with; it gives up when ctx is done.
func (l *rangeLock) lock(ctx context.Context, start, end int64, excl bool) (*lockedRange, error) {
	l.mu.Lock()
	for {
		var block *lockedRange
		for _, h := range l.held {
			if h.conflicts(start, end, excl) {
				block = h
				break
			}
		}
		if block == nil {
			r := &lockedRange{start: start, end: end, excl: excl}
			l.held = append(l.held, r)
			l.mu.Unlock()
			return r, nil
		}
		if block.done == nil {
			block.done = make(chan struct{})
		}
		ch := block.done
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		l.mu.Lock()
	}
}

func (l *rangeLock) unlock(r *lockedRange) {
	l.mu.Lock()
	for i, h := range l.held {
		if h == r {
			last := len(l.held) - 1
			l.held[i] = l.held[last]
			l.held[last] = nil
			l.held = l.held[:last]
			break
		}
	}
	ch := r.done
	l.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}
