package blk

import (
	"context"
	"fmt"
	"net"
	"os"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
	"blockbackend/qmp/sockaddr"
	"blockbackend/vhostuser"
)

// ExportOptions is BlockExportOptionsVhostUserBlk.
type ExportOptions struct {
	Addr             sockaddr.Address `qapi:"addr"`
	LogicalBlockSize *qapi.Size       `qapi:"logical-block-size,optional"`
	NumQueues        *uint16          `qapi:"num-queues,optional"`
}

func init() {
	graph.RegisterExportType(&graph.ExportType{
		Name: "vhost-user-blk",
		// The device tells the guest about a new size, so the export shares
		// resize, as qemu-storage-daemon's does.
		Resizable:  true,
		NewOptions: func() any { return &ExportOptions{} },
		Start: func(ctx context.Context, e *graph.Export, o any) (graph.ExportInstance, error) {
			return start(e, o.(*ExportOptions))
		},
	})
}

// export is a running vhost-user-blk export.
type export struct {
	srv    *vhostuser.Server
	dev    *Device
	cancel context.CancelFunc
	unlink string
}

func start(e *graph.Export, o *ExportOptions) (*export, error) {
	lbs := uint64(512)
	if o.LogicalBlockSize != nil {
		lbs = uint64(*o.LogicalBlockSize)
		// qemu-storage-daemon's wording, from its block-size property.
		if lbs&(lbs-1) != 0 || lbs == 0 {
			return nil, qapi.Errorf(qapi.GenericError, "Property %s.logical-block-size doesn't take value '%d', it's not a power of 2", e.ID(), lbs)
		}
		if lbs < 512 || lbs > 2<<20 {
			return nil, qapi.Errorf(qapi.GenericError, "Property %s.logical-block-size doesn't take value %d (minimum: 512, maximum: 2097152)", e.ID(), lbs)
		}
	}
	nq := 1
	if o.NumQueues != nil {
		if *o.NumQueues == 0 {
			return nil, qapi.Errorf(qapi.GenericError, "num-queues must be greater than 0")
		}
		nq = int(*o.NumQueues)
	}
	if o.Addr.Type != "unix" && o.Addr.Type != "fd" {
		return nil, qapi.Errorf(qapi.GenericError, "Only socket address types 'unix' and 'fd' are supported")
	}
	if err := o.Addr.Check(); err != nil {
		return nil, err
	}
	n := e.Node()
	l, err := o.Addr.Listen()
	if err != nil {
		return nil, err
	}
	if _, ok := l.(*net.UnixListener); !ok {
		l.Close()
		return nil, qapi.Errorf(qapi.GenericError, "The socket of a vhost-user-blk export must be a unix socket")
	}
	ctx, cancel := context.WithCancel(context.Background())
	opts := e.Options()
	dev := NewDevice(ctx, n, Options{
		NumQueues:        nq,
		LogicalBlockSize: uint32(lbs),
		Writable:         opts.Writable,
		Writethrough:     opts.Writethrough,
	}, e.Logger())
	x := &export{srv: vhostuser.Serve(l, dev, e.Logger()), dev: dev, cancel: cancel}
	if o.Addr.Type == "unix" && !o.Addr.Abstract {
		x.unlink = o.Addr.Path
	}
	return x, nil
}

// InUse implements graph.ExportInstance: a frontend is connected.
func (x *export) InUse() bool { return x.srv.Connected() }

// Close implements graph.ExportInstance. Requests in flight finish (or,
// with hard, are cancelled) before it returns.
func (x *export) Close(hard bool) error {
	if hard {
		x.cancel()
	}
	err := x.srv.Close()
	x.cancel()
	if x.unlink != "" {
		if rerr := os.Remove(x.unlink); rerr != nil && !os.IsNotExist(rerr) && err == nil {
			err = fmt.Errorf("removing %s: %w", x.unlink, rerr)
		}
	}
	return err
}

// Resized is called by the graph after block_resize: the guest hears of
// the new capacity through a config-change notification.
func (x *export) Resized() {
	x.dev.Resized()
	x.srv.ConfigChanged()
}
