package img

import (
	"context"

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
func chainStatus(ctx context.Context, top *graph.Node, off, n int64) (extent, error) {
	cur, depth := top, 0
	for {
		ext, err := cur.BlockStatus(ctx, off, n)
		if err != nil {
			return extent{}, err
		}
		n = ext.Length
		if ext.Status&graph.StatusRecurse != 0 && ext.File != nil {
			// The format passes the range through to its file child at
			// ext.Offset: the child's status says what the bytes are.
			sub, err := ext.File.BlockStatus(ctx, ext.Offset, n)
			if err != nil {
				return extent{}, err
			}
			n = sub.Length
			ext.Status = ext.Status&graph.StatusAllocated | sub.Status&(graph.StatusData|graph.StatusZero)
			if sub.File != nil {
				ext.File, ext.Offset = sub.File, sub.Offset
			}
		}
		if ext.Status&graph.StatusRecurse == 0 && ext.Status&graph.StatusData != 0 && ext.Status&graph.StatusZero == 0 &&
			ext.File != nil && ext.File != cur {
			// Data stored at ext.Offset of a child that reads as zeros
			// there (a preallocated cluster in a hole) reads as zeros:
			// QEMU reports such runs as data and zero.
			// Past the child's end it reads as zeros too.
			if fsize := ext.File.SizeNow(); ext.Offset >= fsize {
				ext.Status |= graph.StatusZero
			} else {
				sub, err := ext.File.BlockStatus(ctx, ext.Offset, min(n, fsize-ext.Offset))
				if err != nil {
					return extent{}, err
				}
				n = sub.Length
				ext.Status |= sub.Status & graph.StatusZero
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
			if ext.File != nil && e.present {
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
