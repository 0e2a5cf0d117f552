// Package nbdexport joins the NBD server (package nbd) to the block graph:
// it registers the "nbd" export type, owns the process's one NBD server
// (nbd-server-start/stop, --nbd-server) and adapts graph nodes to
// nbd.Backend. It holds no protocol code.
package nbdexport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"

	"github.com/mdlayher/vsock"

	"blockbackend/graph"
	"blockbackend/nbd"
	"blockbackend/qmp/qapi"
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
	srv    *nbd.Server  // nil while not running; guarded by mu
	ln     net.Listener // guarded by mu
	unlink string       // socket path to remove on stop; guarded by mu
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

// SocketAddress is QAPI's flat SocketAddress (as --nbd-server's addr.*).
type SocketAddress struct {
	Type string `qapi:"type"`
	// unix
	Path     string `qapi:"path,optional"`
	Abstract bool   `qapi:"abstract,optional"`
	Tight    *bool  `qapi:"tight,optional"`
	// inet
	Host      string `qapi:"host,optional"`
	Port      string `qapi:"port,optional"`
	Numeric   bool   `qapi:"numeric,optional"`
	To        *int   `qapi:"to,optional"`
	IPv4      *bool  `qapi:"ipv4,optional"`
	IPv6      *bool  `qapi:"ipv6,optional"`
	KeepAlive bool   `qapi:"keep-alive,optional"`
	MPTCP     bool   `qapi:"mptcp,optional"`
	// vsock
	CID string `qapi:"cid,optional"`
	// fd
	Str string `qapi:"str,optional"`
}

// ServerOptions is NbdServerOptions (--nbd-server).
type ServerOptions struct {
	Addr           SocketAddress `qapi:"addr"`
	TLSCreds       string        `qapi:"tls-creds,optional"`
	TLSAuthz       string        `qapi:"tls-authz,optional"`
	MaxConnections uint32        `qapi:"max-connections,optional"`
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
	var a SocketAddress
	if err := qapi.DecodeValue(flat, &a, qapi.JSON, "addr.data"); err != nil {
		return ServerOptions{}, err
	}
	return ServerOptions{Addr: a, TLSCreds: l.TLSCreds, TLSAuthz: l.TLSAuthz, MaxConnections: l.MaxConnections}, nil
}

func listen(a SocketAddress) (net.Listener, string, error) {
	switch a.Type {
	case "unix":
		if a.Path == "" {
			return nil, "", qapi.Errorf(qapi.GenericError, "Parameter 'addr.path' is missing")
		}
		path := a.Path
		if a.Abstract {
			path = "@" + path
		} else {
			_ = os.Remove(path) // QEMU unlinks a stale socket before binding
		}
		l, err := net.Listen("unix", path)
		if err != nil {
			return nil, "", qapi.Errorf(qapi.GenericError, "Failed to bind socket to %s: %v", a.Path, errors.Unwrap(err))
		}
		if a.Abstract {
			return l, "", nil
		}
		return l, path, nil
	case "inet":
		port := a.Port
		if port == "" {
			port = "10809"
		}
		network := "tcp"
		if a.IPv4 != nil && *a.IPv4 {
			network = "tcp4"
		} else if a.IPv6 != nil && *a.IPv6 {
			network = "tcp6"
		}
		l, err := net.Listen(network, net.JoinHostPort(a.Host, port))
		if err != nil {
			return nil, "", qapi.Errorf(qapi.GenericError, "Failed to bind socket: %v", err)
		}
		return l, "", nil
	case "vsock":
		cid, err := strconv.ParseUint(a.CID, 10, 32)
		if err != nil {
			return nil, "", qapi.Errorf(qapi.GenericError, "Parameter 'addr.cid' expects a number")
		}
		port, err := strconv.ParseUint(a.Port, 10, 32)
		if err != nil {
			return nil, "", qapi.Errorf(qapi.GenericError, "Parameter 'addr.port' expects a number")
		}
		l, err := vsock.ListenContextID(uint32(cid), uint32(port), nil)
		if err != nil {
			return nil, "", qapi.Errorf(qapi.GenericError, "Failed to bind vsock socket: %v", err)
		}
		return l, "", nil
	case "fd":
		fd, err := strconv.Atoi(a.Str)
		if err != nil {
			return nil, "", qapi.Errorf(qapi.GenericError, "File descriptor named '%s' has not been found", a.Str)
		}
		l, err := net.FileListener(os.NewFile(uintptr(fd), "nbd-listener"))
		if err != nil {
			return nil, "", qapi.Errorf(qapi.GenericError, "File descriptor %d is not a listening socket: %v", fd, err)
		}
		return l, "", nil
	}
	return nil, "", qapi.Errorf(qapi.GenericError, "Parameter 'addr.type' does not accept value '%s'", a.Type)
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
	l, unlink, err := listen(o.Addr)
	if err != nil {
		return err
	}
	srv := nbd.NewServer(nbd.ServerOptions{Logger: m.log, MaxConnections: int(o.MaxConnections)})
	m.srv, m.ln, m.unlink = srv, l, unlink
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
	m.srv, m.ln = nil, nil
	if m.unlink != "" {
		_ = os.Remove(m.unlink)
		m.unlink = ""
	}
	return err
}

// Exports lists the ids of the graph exports this manager serves.
func (m *Manager) Exports() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ids []string
	for _, e := range m.names {
		ids = append(ids, e.e.ID())
	}
	return ids
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
	return ext.Status&graph.StatusZero != 0, ext.Status&graph.StatusData != 0, ext.Length, nil
}

// String describes the manager for logs.
func (m *Manager) String() string { return fmt.Sprintf("nbd manager (running=%v)", m.Running()) }
