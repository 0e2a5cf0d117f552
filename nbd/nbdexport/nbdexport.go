// Package nbdexport joins the NBD server (package nbd) to the block graph:
// it registers the "nbd" export type, owns the process's one NBD server
// (nbd-server-start/stop, --nbd-server) and adapts graph nodes to
// nbd.Backend. It holds no protocol code.
package nbdexport

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"sync"

	"blockbackend/graph"
	"blockbackend/nbd"
	"blockbackend/qmp/qapi"
	"blockbackend/qmp/sockaddr"
)

// Options is BlockExportOptionsNbd.
type Options struct {
	Name            *string  `qapi:"name,optional"`
	Description     string   `qapi:"description,optional"`
	Bitmaps         []string `qapi:"bitmaps,optional"`
	AllocationDepth bool     `qapi:"allocation-depth,optional"`
}

// Manager owns the NBD server of the process.
type Manager struct {
	log *slog.Logger

	mu     sync.Mutex
	srv    *nbd.Server // nil while not running; guarded by mu
	unlink string      // socket path to remove on stop; guarded by mu
	names  map[string]*export
}

var (
	defaultMu sync.Mutex
	defaultM  *Manager
)

// Default is the process's manager; the "nbd" export type uses it.
func Default() *Manager {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	if defaultM == nil {
		defaultM = &Manager{log: slog.New(slog.DiscardHandler), names: map[string]*export{}}
	}
	return defaultM
}

// SetLogger sets the logger of the default manager.
func SetLogger(l *slog.Logger) { Default().log = l }

func init() {
	graph.RegisterExportType(&graph.ExportType{
		Name:       "nbd",
		Resizable:  false, // NBD cannot tell a client that the size changed
		NewOptions: func() any { return &Options{} },
		Start: func(ctx context.Context, e *graph.Export, o any) (graph.ExportInstance, error) {
			return Default().start(e, o.(*Options))
		},
	})
}

// ServerOptions is NbdServerOptions (--nbd-server).
type ServerOptions struct {
	Addr           sockaddr.Address `qapi:"addr"`
	TLSCreds       string           `qapi:"tls-creds,optional"`
	TLSAuthz       string           `qapi:"tls-authz,optional"`
	MaxConnections uint32           `qapi:"max-connections,optional"`
}

// LegacyServerOptions is nbd-server-start's arguments, whose addr is the
// legacy {"type": ..., "data": {...}} form.
type LegacyServerOptions struct {
	Addr           map[string]any `qapi:"addr"`
	TLSCreds       string         `qapi:"tls-creds,optional"`
	TLSAuthz       string         `qapi:"tls-authz,optional"`
	MaxConnections uint32         `qapi:"max-connections,optional"`
}

// Flat converts nbd-server-start's arguments into ServerOptions.
func (l LegacyServerOptions) Flat() (ServerOptions, error) {
	t, _ := l.Addr["type"].(string)
	data, _ := l.Addr["data"].(map[string]any)
	if t == "" || data == nil {
		return ServerOptions{}, qapi.Errorf(qapi.GenericError, "Parameter 'addr.data' is missing")
	}
	flat := qapi.Clone(data)
	flat["type"] = t
	var a sockaddr.Address
	if err := qapi.DecodeValue(flat, &a, qapi.JSON, "addr.data"); err != nil {
		return ServerOptions{}, err
	}
	return ServerOptions{Addr: a, TLSCreds: l.TLSCreds, TLSAuthz: l.TLSAuthz, MaxConnections: l.MaxConnections}, nil
}

// Start starts the NBD server (nbd-server-start, --nbd-server).
func (m *Manager) Start(o ServerOptions) error {
	if o.TLSCreds != "" || o.TLSAuthz != "" {
		return qapi.Errorf(qapi.GenericError, "NBD over TLS is not built into blockbackend yet (see the feature table in README.md)")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.srv != nil {
		return qapi.Errorf(qapi.GenericError, "NBD server already running")
	}
	if err := o.Addr.Check(); err != nil {
		return err
	}
	l, err := o.Addr.Listen()
	if err != nil {
		return err
	}
	unlink := ""
	if o.Addr.Type == "unix" && !o.Addr.Abstract {
		unlink = o.Addr.Path
	}
	srv := nbd.NewServer(nbd.ServerOptions{Logger: m.log, MaxConnections: int(o.MaxConnections)})
	m.srv, m.unlink = srv, unlink
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, net.ErrClosed) {
			m.log.Error("NBD server stopped", "err", err)
		}
	}()
	return nil
}

// Running reports whether the server runs.
func (m *Manager) Running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.srv != nil
}

// Stop stops the server (nbd-server-stop). The graph's NBD exports must be
// deleted first (the caller does, so that BLOCK_EXPORT_DELETED is emitted).
func (m *Manager) Stop() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.srv == nil {
		return qapi.Errorf(qapi.GenericError, "NBD server not running")
	}
	err := m.srv.Close()
	m.srv = nil
	if m.unlink != "" {
		_ = os.Remove(m.unlink)
		m.unlink = ""
	}
	return err
}

type export struct {
	m    *Manager
	e    *graph.Export
	name string
	srv  *nbd.Server
}

func (m *Manager) start(e *graph.Export, o *Options) (graph.ExportInstance, error) {
	if len(o.Bitmaps) > 0 {
		return nil, qapi.Errorf(qapi.GenericError, "Bitmap '%s' is not found", o.Bitmaps[0])
	}
	if o.AllocationDepth {
		return nil, qapi.Errorf(qapi.GenericError, "allocation-depth (the qemu:allocation-depth context) is not built into blockbackend yet")
	}
	name := e.Node().Name()
	if o.Name != nil {
		name = *o.Name
	}
	if len(name) > 4096 {
		return nil, qapi.Errorf(qapi.GenericError, "export name '%s...' too long", name[:64])
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.srv == nil {
		return nil, qapi.Errorf(qapi.GenericError, "NBD server not running")
	}
	if _, dup := m.names[name]; dup {
		return nil, qapi.Errorf(qapi.GenericError, "NBD server already has export named '%s'", name)
	}
	opts := e.Options()
	be := &backend{n: e.Node(), writethrough: opts.Writethrough}
	ne := &nbd.Export{
		Name:        name,
		Description: o.Description,
		Backend:     be,
		Writable:    opts.Writable,
		// Several connections see each other's writes at once only when
		// nothing caches below us per connection, which holds for our graph.
		MultiConn: true,
	}
	if err := m.srv.AddExport(ne); err != nil {
		return nil, qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	x := &export{m: m, e: e, name: name, srv: m.srv}
	m.names[name] = x
	return x, nil
}

func (x *export) InUse() bool { return x.srv.Clients(x.name) > 0 }

func (x *export) Close(hard bool) error {
	err := x.srv.RemoveExport(x.name, hard)
	x.m.mu.Lock()
	delete(x.m.names, x.name)
	x.m.mu.Unlock()
	return err
}

// backend adapts a graph node to nbd.Backend and its optional interfaces.
type backend struct {
	n            *graph.Node
	writethrough bool
}

var (
	_ nbd.Backend       = (*backend)(nil)
	_ nbd.Discarder     = (*backend)(nil)
	_ nbd.ZeroWriter    = (*backend)(nil)
	_ nbd.BlockStatuser = (*backend)(nil)
)

func (b *backend) Size() int64 { return b.n.SizeNow() }

func (b *backend) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	return b.n.ReadV(ctx, off, iov)
}

func (b *backend) WriteV(ctx context.Context, off int64, iov [][]byte, fua bool) error {
	var f graph.WriteFlags
	if fua || b.writethrough {
		f |= graph.WriteFUA
	}
	return b.n.WriteV(ctx, off, iov, f)
}

func (b *backend) Flush(ctx context.Context) error { return b.n.Flush(ctx) }

func (b *backend) Discard(ctx context.Context, off, n int64) error {
	return b.n.Discard(ctx, off, n)
}

func (b *backend) WriteZeroes(ctx context.Context, off, n int64, mayUnmap, fast bool) error {
	var f graph.ZeroFlags
	if mayUnmap {
		f |= graph.ZeroMayUnmap
	}
	if fast {
		f |= graph.ZeroNoFallback
	}
	if b.writethrough {
		f |= graph.ZeroFUA
	}
	return b.n.WriteZeroes(ctx, off, n, f)
}

func (b *backend) BlockStatus(ctx context.Context, off, n int64) (zero, data bool, length int64, err error) {
	ext, err := b.n.BlockStatus(ctx, off, n)
	if err != nil {
		return false, false, 0, err
	}
	if ext.Status&graph.StatusRecurse != 0 && ext.Status&graph.StatusZero == 0 && ext.File != nil {
		// The format asks its file whether the data there reads as
		// zeros (a metadata-preallocated qcow2), as QEMU's server does.
		if sub, err := ext.File.BlockStatus(ctx, ext.Offset, ext.Length); err == nil {
			ext.Length = sub.Length
			if sub.Status&graph.StatusZero != 0 {
				ext.Status |= graph.StatusZero
			}
		}
	}
	return ext.Status&graph.StatusZero != 0, ext.Status&graph.StatusData != 0, ext.Length, nil
}
