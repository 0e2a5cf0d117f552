package file

import (
	"context"

	"blockbackend/qmp/qapi"
)

// PrepareReopen checks the new options and, when the read-only state
// changes, opens a new I/O descriptor in the new mode (O_DIRECT as before).
// Commit swaps it in and closes the old one; abort closes the new one. The
// lock descriptor and its locks stay as they are throughout: the graph
// moves the locks with CheckPerm/SetPerm in the same transaction.
//
// Like QEMU, filename, locking, aio and aio-max-batch cannot change.
func (n *node) PrepareReopen(ctx context.Context, o any, readOnly bool) (commit, abort func(), err error) {
	opts := o.(*Options)
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	switch {
	case opts.Filename != n.opts.Filename:
		return nil, nil, cannotChange("filename")
	case opts.Locking != n.opts.Locking:
		return nil, nil, cannotChange("locking")
	case opts.AIO != n.opts.AIO:
		return nil, nil, cannotChange("aio")
	case opts.AIOMaxBatch != n.opts.AIOMaxBatch:
		return nil, nil, cannotChange("aio-max-batch")
	case opts.PRManager != n.opts.PRManager:
		return nil, nil, cannotChange("pr-manager")
	}
	if err := validateOptions(opts, n.direct); err != nil {
		return nil, nil, err
	}
	newOpts := *opts
	if readOnly == n.readOnly {
		return func() { n.opts = newOpts }, func() {}, nil
	}
	f, err := openIO(n.path, readOnly, n.direct)
	if err != nil {
		return nil, nil, err
	}
	commit = func() {
		old := n.ioFiles()
		n.setIO(f)
		n.opts = newOpts
		old.close()
	}
	abort = func() { f.close() }
	return commit, abort, nil
}

func cannotChange(opt string) error {
	return qapi.Errorf(qapi.GenericError, "Cannot change the option '%s'", opt)
}
