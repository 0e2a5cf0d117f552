package img

import (
	"context"
	"sync"

	"blockbackend/graph"
)

// extent is one run of an image's map, as qemu-img map reports it.
type extent struct {
	start, length int64
	depth         int
	present       bool // allocated in some layer of the chain
	zero, data    bool
	hasOffset     bool
	offset        int64
	file          *graph.Node // where offset points
}

// chainStatus returns the status of the run starting at off (at most n
// bytes) through the backing chain: the first layer that allocates it
// decides, and its depth is counted. A run no layer allocates reads as
// zeros.
//
// cache, when not nil, remembers what the children where data lives said
// about long runs (see zeroCache); pass nil when the image is written
// meanwhile.
func chainStatus(ctx context.Context, top *graph.Node, off, n int64, cache *zeroCache) (extent, error) {
	cur, depth := top, 0
	for {
		ext, err := cur.BlockStatus(ctx, off, n)
		if err != nil {
			return extent{}, err
		}
		n = ext.Length
		if ext.Status&graph.StatusRecurse != 0 && ext.File != nil && ext.Status&graph.StatusZero == 0 {
			// The format keeps its data at ext.Offset of a child and
			// asks that child whether it reads as zeros there (a
			// metadata-preallocated cluster in a hole of its file):
			// QEMU then reports the run as data and zero.
			zero, length, err := cache.zeroAt(ctx, ext.File, ext.Offset, n)
			if err != nil {
				return extent{}, err
			}
			n = length
			if zero {
				ext.Status |= graph.StatusZero
			}
		}
		backing := cur.Child("backing")
		if ext.Status&graph.StatusAllocated != 0 || backing == nil {
			e := extent{
				start: off, length: n, depth: depth,
				present: ext.Status&graph.StatusAllocated != 0,
				zero:    ext.Status&graph.StatusZero != 0,
				data:    ext.Status&graph.StatusData != 0,
			}
			if !e.present {
				// Nothing below: unallocated reads as zeros.
				e.zero, e.data = true, false
			}
			if ext.File != nil {
				// Also for a range no layer allocates but the format
				// has a host cluster behind (a preallocated subcluster):
				// qemu-img map shows where it lies.
				e.hasOffset, e.offset, e.file = true, ext.Offset, ext.File
			}
			return e, nil
		}
		cur = backing.Node()
		depth++
		if off >= cur.SizeNow() {
			// Past the end of a shorter backing image: zeros.
			return extent{start: off, length: n, depth: depth, zero: true}, nil
		}
		n = min(n, cur.SizeNow()-off)
	}
}

// zeroCache remembers, per child node, the last run its block status
// described, asked over the whole rest of the node: the data of a format
// image usually lies in one long allocated run of its file, and asking
// the file about each cluster separately would cost a SEEK_HOLE scan to
// the end of that run each time (QEMU's file driver keeps such a cache
// for the same reason). A nil *zeroCache asks every time.
type zeroCache struct {
	mu   sync.Mutex
	runs map[*graph.Node]zeroRun
}

type zeroRun struct {
	start, end int64
	zero       bool
}

func newZeroCache() *zeroCache { return &zeroCache{runs: map[*graph.Node]zeroRun{}} }

// zeroAt reports whether the run of node at off (at most n bytes) reads
// as zeros, and its length. Past the node's end it reads as zeros.
func (c *zeroCache) zeroAt(ctx context.Context, node *graph.Node, off, n int64) (bool, int64, error) {
	size := node.SizeNow()
	if off >= size {
		return true, n, nil
	}
	if c == nil {
		sub, err := node.BlockStatus(ctx, off, min(n, size-off))
		if err != nil {
			return false, 0, err
		}
		return sub.Status&graph.StatusZero != 0, sub.Length, nil
	}
	c.mu.Lock()
	r, ok := c.runs[node]
	c.mu.Unlock()
	if !ok || off < r.start || off >= r.end {
		sub, err := node.BlockStatus(ctx, off, size-off)
		if err != nil {
			return false, 0, err
		}
		r = zeroRun{off, off + sub.Length, sub.Status&graph.StatusZero != 0}
		c.mu.Lock()
		c.runs[node] = r
		c.mu.Unlock()
	}
	return r.zero, min(n, r.end-off), nil
}
