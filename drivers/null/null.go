// Package null is QEMU's null-co and null-aio drivers: a protocol driver
// with no storage. Writes are dropped, reads return zeros when
// read-zeroes=on and leave the buffers untouched otherwise, and every
// request may be delayed by latency-ns. It exists for benchmarks and tests
// of everything above the driver. It is not a RAM disk.
package null

import (
	"context"
	"time"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// Options is BlockdevOptionsNull.
type Options struct {
	Size       int64  `qapi:"size,optional"`
	LatencyNS  uint64 `qapi:"latency-ns,optional"`
	ReadZeroes bool   `qapi:"read-zeroes,optional"`
}

func init() {
	for _, name := range []string{"null-co", "null-aio"} {
		graph.Register(&graph.Driver{
			Name:       name,
			Protocol:   true,
			Prefixes:   []string{name},
			NewOptions: func() any { return &Options{Size: 1 << 30} },
			Open:       open,
			ParseFilename: func(string) (map[string]any, error) {
				// "null-co://" carries nothing: QEMU accepts it as a name only.
				return map[string]any{}, nil
			},
		})
	}
}

type node struct {
	size       int64
	latency    time.Duration
	readZeroes bool
}

func open(_ context.Context, _ *graph.OpenContext, o any) (graph.Instance, error) {
	opts := o.(*Options)
	if opts.Size < 0 {
		return nil, qapi.Errorf(qapi.GenericError, "Parameter 'size' expects a non-negative value")
	}
	return &node{size: opts.Size, latency: time.Duration(opts.LatencyNS), readZeroes: opts.ReadZeroes}, nil
}

func (n *node) wait(ctx context.Context) error {
	if n.latency <= 0 {
		return nil
	}
	t := time.NewTimer(n.latency)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (n *node) ReadV(ctx context.Context, _ int64, iov [][]byte) error {
	if n.readZeroes {
		for _, b := range iov {
			clear(b)
		}
	}
	return n.wait(ctx)
}

func (n *node) WriteV(ctx context.Context, _ int64, _ [][]byte, _ graph.WriteFlags) error {
	return n.wait(ctx)
}

func (n *node) WriteZeroes(ctx context.Context, _, _ int64, _ graph.ZeroFlags) error {
	return n.wait(ctx)
}

func (n *node) Flush(ctx context.Context) error { return n.wait(ctx) }
func (n *node) Size() (int64, error)            { return n.size, nil }
func (n *node) Close() error                    { return nil }

// BlockStatus: the whole device is one allocated extent, known to be zero
// only with read-zeroes (otherwise the contents are undefined).
func (n *node) BlockStatus(_ context.Context, off, length int64) (graph.StatusExtent, error) {
	st := graph.StatusAllocated
	if n.readZeroes {
		st |= graph.StatusZero
	}
	return graph.StatusExtent{Status: st, Length: length, Offset: off}, nil
}

// PrepareReopen accepts any new option values.
func (n *node) PrepareReopen(_ context.Context, o any, _ bool) (func(), func(), error) {
	opts := o.(*Options)
	if opts.Size < 0 {
		return nil, nil, qapi.Errorf(qapi.GenericError, "Parameter 'size' expects a non-negative value")
	}
	commit := func() {
		n.size, n.latency, n.readZeroes = opts.Size, time.Duration(opts.LatencyNS), opts.ReadZeroes
	}
	return commit, func() {}, nil
}
