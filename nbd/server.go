package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"net"
	"slices"
	"sync"
	"time"
)

// Backend is what an export serves; blockbackend's graph node adapter
// (nbd/nbdexport) implements it.
//
// The server checks every request against the export's size and block size
// constraints before calling the backend, so a backend sees only in-range
// requests. Calls may run concurrently. A backend must neither keep nor
// modify the iov slices after returning (WriteV may be handed one shared
// zero buffer several times). Errors should keep their errno reachable with
// errors.Is; see [ErrnoOf] for what the client is told.
type Backend interface {
	// Size is the export size in bytes. It is read once per connection, when
	// the client picks the export: NBD cannot tell a client of a new size.
	Size() int64
	ReadV(ctx context.Context, off int64, iov [][]byte) error
	WriteV(ctx context.Context, off int64, iov [][]byte, fua bool) error
	Flush(ctx context.Context) error
}

// Discarder is an optional capability of a Backend: NBD_CMD_TRIM. Without
// it the server does not offer NBD_FLAG_SEND_TRIM. An error wrapping
// syscall.ENOTSUP counts as success (trim is a hint).
type Discarder interface {
	Discard(ctx context.Context, off, n int64) error
}

// ZeroWriter is an optional capability of a Backend: NBD_CMD_WRITE_ZEROES.
// mayUnmap is false when the client set NBD_CMD_FLAG_NO_HOLE. With fast set
// the backend must fail at once with an error wrapping syscall.ENOTSUP if
// zeroing would be no faster than writing zeroes. Without a ZeroWriter (or
// when it fails with ENOTSUP and fast is not set) the server writes zero
// buffers itself, and fails fast requests with NBD_ENOTSUP.
type ZeroWriter interface {
	WriteZeroes(ctx context.Context, off, n int64, mayUnmap bool, fast bool) error
}

// BlockStatuser is an optional capability of a Backend: base:allocation.
// It describes one extent starting at off: whether it reads as zeroes and
// whether it holds data (false reports a hole), and its length, which must
// be > 0 and ≤ n. Without it every range is reported allocated data.
type BlockStatuser interface {
	BlockStatus(ctx context.Context, off, n int64) (zero, data bool, length int64, err error)
}

// Export is one named export.
type Export struct {
	Name        string // may be "", the default export; at most MaxStringLength bytes
	Description string // shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION
	Backend     Backend
	Writable    bool
	// MultiConn offers NBD_FLAG_CAN_MULTI_CONN: set it only when a flush on
	// one connection makes every connection's completed writes durable
	// (nothing below caches per connection).
	MultiConn bool
	// Block size constraints; 0 means the defaults (1, 4096, 32 MiB). Min
	// and Pref must be powers of 2 (Min ≤ 64 KiB, Pref ≥ max(Min, 512)),
	// Max a multiple of Min, at least Pref and at most MaxPayload.
	MinBlock, PrefBlock, MaxBlock uint32
}

// Errors of the registry, for errors.Is.
var (
	ErrExportExists   = errors.New("nbd: an export with this name already exists")
	ErrExportNotFound = errors.New("nbd: no export with this name")
	ErrServerClosed   = fmt.Errorf("nbd: server closed: %w", net.ErrClosed)
)

// ServerOptions configures a Server.
type ServerOptions struct {
	Logger *slog.Logger // nil discards
	// MaxConnections bounds the connections served at once (0 = unlimited).
	// Like QEMU's max-connections, further clients wait in the listen
	// backlog until one leaves.
	MaxConnections int
	// HandshakeTimeout bounds the handshake of one connection
	// (0 = 10 s, as QEMU's server; < 0 = none).
	HandshakeTimeout time.Duration
	// DrainTimeout bounds how long a safe RemoveExport or Close waits for a
	// connection's in-flight requests before cutting it (0 = 10 s).
	DrainTimeout time.Duration
}

// Server serves exports over NBD. It does not own its exports' backends.
type Server struct {
	log              *slog.Logger
	maxConns         int
	handshakeTimeout time.Duration
	drainTimeout     time.Duration
	slots            chan struct{} // connection slots; nil when unlimited

	closing chan struct{} // closed by Close
	connWG  sync.WaitGroup

	mu        sync.Mutex
	exports   map[string]*exportState // guarded by mu
	conns     map[*conn]struct{}      // guarded by mu
	listeners map[net.Listener]struct{}
	closed    bool // guarded by mu
}

// exportState is a registered export and the connections using it.
type exportState struct {
	*Export
	flags   TransmissionFlags // without the per-connection DF bit
	min     uint32
	pref    uint32
	max     uint32
	clients map[*conn]struct{} // guarded by Server.mu
	removed bool               // guarded by Server.mu
}

// NewServer returns a server with no exports that serves nothing until
// Serve is called.
func NewServer(opts ServerOptions) *Server {
	s := &Server{
		log:              opts.Logger,
		maxConns:         opts.MaxConnections,
		handshakeTimeout: opts.HandshakeTimeout,
		drainTimeout:     opts.DrainTimeout,
		closing:          make(chan struct{}),
		exports:          map[string]*exportState{},
		conns:            map[*conn]struct{}{},
		listeners:        map[net.Listener]struct{}{},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.handshakeTimeout == 0 {
		s.handshakeTimeout = 10 * time.Second
	}
	if s.drainTimeout <= 0 {
		s.drainTimeout = 10 * time.Second
	}
	if s.maxConns > 0 {
		s.slots = make(chan struct{}, s.maxConns)
	}
	return s
}

func isPow2(v uint32) bool { return v != 0 && bits.OnesCount32(v) == 1 }

// validate fills in the defaults and checks the export.
func newExportState(e *Export) (*exportState, error) {
	if e == nil || e.Backend == nil {
		return nil, errors.New("nbd: export without a backend")
	}
	if len(e.Name) > MaxStringLength || len(e.Description) > MaxStringLength {
		return nil, fmt.Errorf("nbd: export name or description longer than %d bytes", MaxStringLength)
	}
	for _, c := range []byte(e.Name + e.Description) {
		if c == 0 {
			return nil, errors.New("nbd: export name or description contains NUL")
		}
	}
	st := &exportState{Export: e, min: e.MinBlock, pref: e.PrefBlock, max: e.MaxBlock, clients: map[*conn]struct{}{}}
	if st.min == 0 {
		st.min = DefaultMinBlock
	}
	if st.pref == 0 {
		st.pref = max(DefaultPrefBlock, st.min)
	}
	if st.max == 0 {
		st.max = DefaultMaxBlock
	}
	switch {
	case !isPow2(st.min) || st.min > 64<<10:
		return nil, fmt.Errorf("nbd: export %q: minimum block size %d is not a power of 2 up to 64 KiB", e.Name, st.min)
	case !isPow2(st.pref) || st.pref < max(st.min, 512):
		return nil, fmt.Errorf("nbd: export %q: preferred block size %d is not a power of 2 of at least max(minimum, 512)", e.Name, st.pref)
	case st.max%st.min != 0 || st.max < st.pref || st.max > MaxPayload:
		return nil, fmt.Errorf("nbd: export %q: maximum block size %d is not a multiple of %d between %d and %d", e.Name, st.max, st.min, st.pref, MaxPayload)
	}
	f := FlagHasFlags | FlagSendFlush | FlagSendCache
	if e.Writable {
		f |= FlagSendFUA | FlagSendWriteZeroes | FlagSendFastZero
		if _, ok := e.Backend.(Discarder); ok {
			f |= FlagSendTrim
		}
	} else {
		f |= FlagReadOnly
	}
	if e.MultiConn {
		f |= FlagCanMultiConn
	}
	st.flags = f
	return st, nil
}

// AddExport registers e under e.Name. It fails with an error wrapping
// ErrExportExists when the name is taken (the export layer words its own
// QMP message), and when e's block sizes break the spec's rules.
func (s *Server) AddExport(e *Export) error {
	st, err := newExportState(e)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrServerClosed
	}
	if _, dup := s.exports[e.Name]; dup {
		return fmt.Errorf("%w: %q", ErrExportExists, e.Name)
	}
	s.exports[e.Name] = st
	return nil
}

// RemoveExport unregisters an export so no new client can pick it, then
// ends the connections using it and returns once they are gone. Safe mode
// (hard=false) stops reading new requests, lets the ones in flight finish
// and send their replies (bounded by ServerOptions.DrainTimeout), then
// closes; hard mode cancels the requests in flight and closes at once, and
// still waits for the backend calls to return, so that the caller may close
// the backend afterwards.
func (s *Server) RemoveExport(name string, hard bool) error {
	s.mu.Lock()
	st, ok := s.exports[name]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrExportNotFound, name)
	}
	delete(s.exports, name)
	st.removed = true
	clients := make([]*conn, 0, len(st.clients))
	for c := range st.clients {
		clients = append(clients, c)
	}
	s.mu.Unlock()
	s.endConns(clients, hard)
	return nil
}

func (s *Server) endConns(cs []*conn, hard bool) {
	for _, c := range cs {
		if hard {
			c.abort()
		} else {
			c.drain(s.drainTimeout)
		}
	}
	for _, c := range cs {
		<-c.done
	}
}

// Exports lists the export names, sorted.
func (s *Server) Exports() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.exports))
	for n := range s.exports {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Clients counts the connections in transmission on the named export.
func (s *Server) Clients(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.exports[name]; ok {
		return len(st.clients)
	}
	return 0
}

// lookup finds an export for a handshake option.
func (s *Server) lookup(name string) *exportState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exports[name]
}

// list snapshots the exports for NBD_OPT_LIST, sorted by name.
func (s *Server) list() []ServerReply {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ServerReply, 0, len(s.exports))
	for _, st := range s.exports {
		out = append(out, ServerReply{Name: st.Name, Description: st.Description})
	}
	slices.SortFunc(out, func(a, b ServerReply) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return out
}

// attach binds c to the named export for transmission; it fails when the
// export is gone (removed between lookup and GO) or the server is closing.
func (s *Server) attach(c *conn, name string) *exportState {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.exports[name]
	if !ok || st.removed || s.closed {
		return nil
	}
	st.clients[c] = struct{}{}
	c.mu.Lock()
	c.exp = st
	c.mu.Unlock()
	return st
}

// Serve accepts connections on l until Close, and returns an error wrapping
// net.ErrClosed then. Serve may run on several listeners at once; Close
// closes them all.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var backoff time.Duration
	for {
		if s.slots != nil {
			select {
			case s.slots <- struct{}{}:
			case <-s.closing:
				return ErrServerClosed
			}
		}
		nc, err := l.Accept()
		if err != nil {
			if s.slots != nil {
				<-s.slots
			}
			select {
			case <-s.closing:
				return ErrServerClosed
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Transient (EMFILE and the like surface as errors too, but
				// only timeouts say they may pass): retry with backoff, as
				// net/http does.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		backoff = 0
		go func() {
			_ = s.ServeConn(nc)
			if s.slots != nil {
				<-s.slots
			}
		}()
	}
}

// ServeConn serves one connection that is already established (a socket
// passed in, a vsock or a test pipe) and returns when it ends. It does not
// count against MaxConnections. After Close it closes nc and returns an
// error wrapping net.ErrClosed.
func (s *Server) ServeConn(nc net.Conn) error {
	c := newConn(s, nc)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		nc.Close()
		return ErrServerClosed
	}
	s.conns[c] = struct{}{}
	s.connWG.Add(1)
	s.mu.Unlock()
	defer s.connWG.Done()
	c.serve()
	s.mu.Lock()
	delete(s.conns, c)
	if c.exp != nil {
		delete(c.exp.clients, c)
	}
	s.mu.Unlock()
	return nil
}

// Close stops the listeners, ends every connection (safely: requests in
// flight finish first, within DrainTimeout) and returns when all are gone.
// Exports stay registered but cannot be reached. Close is safe to call more
// than once.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.connWG.Wait()
		return nil
	}
	s.closed = true
	close(s.closing)
	var err error
	for l := range s.listeners {
		if e := l.Close(); e != nil && !errors.Is(e, net.ErrClosed) && err == nil {
			err = fmt.Errorf("nbd: close listener: %w", e)
		}
	}
	cs := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	s.endConns(cs, false)
	s.connWG.Wait()
	return err
}
