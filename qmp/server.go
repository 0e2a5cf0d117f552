package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"blockbackend/qmp/qapi"
)

// Handler runs one command. args is the "arguments" object (an empty map
// when absent) with numbers as json.Number, as qapi.Decode wants in JSON
// mode. The result is printed as the "return" value: any value that
// encoding/json accepts (its json tags name the members); nil prints as
// {}. An error becomes an "error" reply: class qapi.ClassOf(err),
// description err.Error() (a *qapi.Error's Desc).
//
// ctx is cancelled when the monitor connection closes or the server
// shuts down.
type Handler func(ctx context.Context, args map[string]any) (any, error)

// Command is an entry of the command table.
type Command struct {
	Name    string
	Handler Handler
	// ArgType is a struct type with qapi tags that describes the
	// arguments in query-qmp-schema; nil means the command takes none and
	// the server refuses any ("Parameter 'x' is unexpected"). Handlers
	// decode their arguments themselves (qapi.Decode).
	ArgType reflect.Type
	// RetType describes the return value in query-qmp-schema (nil: {}).
	RetType reflect.Type
	// AllowOOB lets the command run out of band (exec-oob) once the
	// client enabled the "oob" capability. Such a command runs on the
	// monitor's reader without the command lock: it must be quick and
	// must not touch the block graph.
	AllowOOB bool
}

// VersionInfo is what the greeting and query-version report.
type VersionInfo struct {
	Major, Minor, Micro int
	Package             string
}

// DefaultVersion is the QEMU version we are compatible with.
var DefaultVersion = VersionInfo{Major: 7, Minor: 2, Micro: 22, Package: "blockbackend"}

// ServerOptions configures a Server.
type ServerOptions struct {
	// Version to report; the zero value means DefaultVersion.
	Version VersionInfo
	// Logger for connection-level events; nil discards.
	Logger *slog.Logger
	// OutputQueue is the number of messages (replies and events) that may
	// wait for a slow client before it is disconnected; 0 means 1024.
	OutputQueue int
}

// Server is a QMP server: a command table shared by any number of
// monitors (connections).
//
// Command handlers run one at a time across all monitors, under one
// command lock, as QEMU runs monitor commands in its main loop: a handler
// may change the block graph without racing another handler. (Out-of-band
// commands are the exception; see Command.AllowOOB.) A handler must not
// call Close; a command that ends the process returns AfterReply.
//
// Lock order: cmdMu, then mu, then a monitor's outMu.
type Server struct {
	log     *slog.Logger
	version VersionInfo
	queue   int

	cmdMu sync.Mutex // held while a handler runs

	mu        sync.Mutex // guards everything below
	cmds      map[string]*Command
	order     []string // registration order
	events    []eventDef
	monitors  map[*monitor]struct{}
	listeners map[net.Listener]struct{}
	closed    bool
}

type eventDef struct {
	name string
	data reflect.Type
}

// NewServer returns a server with the built-in commands registered:
// qmp_capabilities, query-commands, query-version and query-qmp-schema.
func NewServer(opts ServerOptions) *Server {
	s := &Server{
		log:       opts.Logger,
		version:   opts.Version,
		queue:     opts.OutputQueue,
		cmds:      map[string]*Command{},
		monitors:  map[*monitor]struct{}{},
		listeners: map[net.Listener]struct{}{},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.version == (VersionInfo{}) {
		s.version = DefaultVersion
	}
	if s.queue <= 0 {
		s.queue = 1024
	}
	s.registerBuiltins()
	return s
}

// Register adds a command. A duplicate or empty name or a nil handler
// panics: it is a programming error, made at start-up.
func (s *Server) Register(c Command) {
	if c.Name == "" || c.Handler == nil {
		panic("qmp: Register needs a name and a handler")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.cmds[c.Name]; dup {
		panic("qmp: command " + c.Name + " registered twice")
	}
	s.cmds[c.Name] = &c
	s.order = append(s.order, c.Name)
}

// RegisterEvent declares an event and the type of its data (nil: no
// data) so that query-qmp-schema describes it. Emit does not require it.
func (s *Server) RegisterEvent(name string, data reflect.Type) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.events {
		if e.name == name {
			panic("qmp: event " + name + " registered twice")
		}
	}
	s.events = append(s.events, eventDef{name, data})
}

// Commands returns the registered command names, newest first (the order
// of QEMU's query-commands).
func (s *Server) Commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, len(s.order))
	for i, n := range s.order {
		out[len(out)-1-i] = n
	}
	return out
}

func (s *Server) command(name string) *Command {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmds[name]
}

// Serve accepts monitor connections on l until Close, serving each with
// ServeConn (with opts, at most one). It returns nil after Close, or the
// error that stopped accepting; l is closed either way.
func (s *Server) Serve(l net.Listener, opts ...MonitorOptions) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return nil
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				// Out of file descriptors and the like: back off and
				// keep serving the monitors we have.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("QMP accept failed; retrying", "err", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("qmp: accept: %w", err)
		}
		delay = 0
		go s.ServeConn(c, opts...)
	}
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close closes every listener and monitor connection and waits for a
// running handler to return; after it no handler starts. It is safe to
// call more than once, but not from a handler.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	ls := make([]net.Listener, 0, len(s.listeners))
	for l := range s.listeners {
		ls = append(ls, l)
	}
	ms := make([]*monitor, 0, len(s.monitors))
	for m := range s.monitors {
		ms = append(ms, m)
	}
	s.mu.Unlock()
	var first error
	for _, l := range ls {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) && first == nil {
			first = fmt.Errorf("qmp: closing listener: %w", err)
		}
	}
	for _, m := range ms {
		m.shutdown()
	}
	// Wait for a handler in flight.
	s.cmdMu.Lock()
	s.cmdMu.Unlock() //nolint:staticcheck // an empty critical section is the point
	return first
}

// Emit sends an event to every monitor that has completed capabilities
// negotiation. data is printed like a command's result; nil means no
// "data" member. Emit never blocks: a monitor whose output queue is full
// is disconnected. It may be called from handlers (the event then reaches
// the caller before the command's reply) and from any goroutine.
func (s *Server) Emit(event string, data any) {
	now := time.Now()
	ts := &object{}
	ts.set("seconds", json.Number(fmt.Sprint(now.Unix())))
	ts.set("microseconds", json.Number(fmt.Sprint(now.Nanosecond()/1000)))
	msg := &object{}
	msg.set("timestamp", ts)
	msg.set("event", event)
	if data != nil {
		t, err := toTree(data)
		if err != nil {
			s.log.Error("QMP event data cannot be encoded", "event", event, "err", err)
			return
		}
		msg.set("data", t)
	}
	var compact, pretty []byte
	s.mu.Lock()
	defer s.mu.Unlock()
	for m := range s.monitors {
		if !m.negotiated.Load() {
			continue
		}
		var b []byte
		if m.pretty {
			if pretty == nil {
				pretty = encode(msg, true)
			}
			b = pretty
		} else {
			if compact == nil {
				compact = encode(msg, false)
			}
			b = compact
		}
		m.send(outMsg{data: b})
	}
}

// AfterReply returns a handler result whose reply is {"return": {}} and
// which runs f once that reply has been written to the client (or could
// not be: f runs even if the connection is gone). quit uses it so that
// the client sees its reply before the process exits. f runs on its own
// goroutine, without the command lock.
func AfterReply(f func()) any { return afterReply{f: f} }

// AfterReplyWith is AfterReply with a return value.
func AfterReplyWith(ret any, f func()) any { return afterReply{ret: ret, f: f} }

// AfterReplier is implemented by handler results that want code run after
// their reply is written (AfterReply builds one). The reply is {} unless
// the value also implements interface{ QMPReturn() any }.
type AfterReplier interface {
	AfterReply()
}

type afterReply struct {
	ret any
	f   func()
}

func (a afterReply) AfterReply() {
	if a.f != nil {
		a.f()
	}
}

func (a afterReply) QMPReturn() any { return a.ret }

// ---- monitors ----

// MonitorOptions are a monitor's settings (--monitor).
type MonitorOptions struct {
	ID      string
	Chardev string
	// Mode is "control" (the only one supported) or empty.
	Mode string
	// Pretty prints replies and events indented over several lines.
	Pretty bool
}

type outMsg struct {
	data  []byte
	after func()
	// last closes the connection once written (the client hung up its
	// sending side and everything it asked for has been answered).
	last bool
}

// monitor is one QMP connection.
//
// Goroutines: the reader (ServeConn's caller) parses input and runs
// in-band commands itself until the client enables "oob"; from then on a
// dispatcher goroutine runs in-band commands so that the reader can run
// exec-oob commands at once. A writer goroutine owns writes to the
// connection, through one ordered queue: events emitted while a handler
// runs are queued before its reply.
type monitor struct {
	s      *Server
	conn   net.Conn
	pretty bool
	ctx    context.Context
	cancel context.CancelFunc

	negotiated atomic.Bool // set under s.mu (Emit reads it under s.mu)
	oob        atomic.Bool // "oob" capability enabled

	outMu      sync.Mutex // guards out sends against the writer's exit
	out        chan outMsg
	writerGone bool // guarded by outMu

	done     chan struct{} // closed by shutdown
	downOnce sync.Once

	inband     chan any // parsed requests for the dispatcher (oob mode)
	dispatched chan struct{}
}

// ServeConn serves one monitor on c until the client disconnects or the
// server closes (with opts, at most one). It closes c.
func (s *Server) ServeConn(c net.Conn, opts ...MonitorOptions) {
	var o MonitorOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &monitor{
		s: s, conn: c, pretty: o.Pretty, ctx: ctx, cancel: cancel,
		out:  make(chan outMsg, s.queue),
		done: make(chan struct{}),
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		cancel()
		c.Close()
		return
	}
	s.monitors[m] = struct{}{}
	s.mu.Unlock()

	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		m.writer()
	}()
	m.send(outMsg{data: m.encode(m.greeting())})

	m.reader()

	s.mu.Lock()
	delete(s.monitors, m)
	s.mu.Unlock()
	<-writerDone
	m.shutdown()
}

func (m *monitor) greeting() *object {
	v := m.s.version
	qemu := &object{}
	qemu.set("major", num(v.Major))
	qemu.set("minor", num(v.Minor))
	qemu.set("micro", num(v.Micro))
	ver := &object{}
	ver.set("qemu", qemu)
	ver.set("package", v.Package)
	inner := &object{}
	inner.set("version", ver)
	inner.set("capabilities", []any{"oob"})
	g := &object{}
	g.set("QMP", inner)
	return g
}

func num(i int) json.Number { return json.Number(fmt.Sprint(i)) }

func (m *monitor) encode(v any) []byte { return encode(v, m.pretty) }

// shutdown closes the connection and stops the monitor's goroutines.
func (m *monitor) shutdown() {
	m.downOnce.Do(func() {
		close(m.done)
		m.cancel()
		m.conn.Close()
	})
}

// send queues a message without blocking. A full queue means the client
// does not read: it is disconnected (QEMU would buffer without bound).
func (m *monitor) send(msg outMsg) {
	m.outMu.Lock()
	if m.writerGone {
		m.outMu.Unlock()
		runAfter(msg.after)
		return
	}
	select {
	case m.out <- msg:
		m.outMu.Unlock()
	default:
		m.outMu.Unlock()
		m.s.log.Warn("QMP client does not read its output; disconnecting", "queued", cap(m.out))
		m.shutdown()
		runAfter(msg.after)
	}
}

func runAfter(f func()) {
	if f != nil {
		go f()
	}
}

func (m *monitor) writer() {
	defer func() {
		m.outMu.Lock()
		m.writerGone = true
		m.outMu.Unlock()
		for {
			select {
			case msg := <-m.out:
				runAfter(msg.after)
			default:
				return
			}
		}
	}()
	for {
		select {
		case msg := <-m.out:
			if msg.data != nil {
				if _, err := m.conn.Write(msg.data); err != nil {
					runAfter(msg.after)
					m.shutdown()
					return
				}
			}
			runAfter(msg.after)
			if msg.last {
				m.shutdown()
				return
			}
		case <-m.done:
			return
		}
	}
}

// reader reads and parses input until EOF or shutdown, then lets the
// queued work finish.
func (m *monitor) reader() {
	var st streamer
	buf := make([]byte, 32<<10)
	for {
		n, err := m.conn.Read(buf)
		if n > 0 {
			st.feed(buf[:n], m.received)
		}
		if err != nil {
			break
		}
		select {
		case <-m.done:
			m.stopDispatcher()
			return
		default:
		}
	}
	m.stopDispatcher()
	// Answer everything, then hang up.
	m.send(outMsg{last: true})
}

func (m *monitor) stopDispatcher() {
	if m.inband != nil {
		close(m.inband)
		<-m.dispatched
		m.inband = nil
	}
}

// received handles one parsed value (or parse error) on the reader.
func (m *monitor) received(v any, err error) {
	select {
	case <-m.done:
		return
	default:
	}
	if !m.oob.Load() {
		m.process(v, err)
		return
	}
	if o, ok := v.(*object); ok && err == nil && o.has("exec-oob") && !o.has("execute") {
		m.process(v, nil)
		return
	}
	if m.inband == nil {
		m.inband = make(chan any, 8)
		m.dispatched = make(chan struct{})
		go m.dispatcher()
	}
	var item any = v
	if err != nil {
		item = err
	}
	select {
	case m.inband <- item:
	case <-m.done:
	}
}

func (m *monitor) dispatcher() {
	defer close(m.dispatched)
	for item := range m.inband {
		select {
		case <-m.done:
			continue // drain
		default:
		}
		if err, ok := item.(error); ok {
			m.process(nil, err)
		} else {
			m.process(item, nil)
		}
	}
}

// process answers one request.
func (m *monitor) process(v any, perr error) {
	if perr != nil {
		m.reply(nil, nil, perr, nil)
		return
	}
	req, ok := v.(*object)
	if !ok {
		m.reply(nil, nil, qapi.Errorf(qapi.GenericError, "QMP input must be a JSON object"), nil)
		return
	}
	id, hasID := req.get("id")
	if !hasID {
		id = nil
	}
	idp := &id
	if !hasID {
		idp = nil
	}
	name, oob, args, err := m.checkRequest(req)
	if err != nil {
		m.reply(idp, nil, err, nil)
		return
	}
	if !m.negotiated.Load() {
		if name == "qmp_capabilities" {
			m.negotiate(idp, args)
			return
		}
		m.reply(idp, nil, qapi.Errorf(qapi.CommandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'"), nil)
		return
	}
	ret, err := m.s.execute(m.ctx, name, oob, args)
	if err != nil {
		m.reply(idp, nil, err, nil)
		return
	}
	var after func()
	if a, ok := ret.(AfterReplier); ok {
		after = a.AfterReply
		if r, ok := ret.(interface{ QMPReturn() any }); ok {
			ret = r.QMPReturn()
		} else {
			ret = nil
		}
	}
	m.reply(idp, ret, nil, after)
}

// checkRequest validates the members of a request object (QEMU's order
// of checks: members in its dictionary order, then a missing execute).
func (m *monitor) checkRequest(req *object) (name string, oob bool, args *object, err error) {
	execKey := ""
	for _, i := range req.order() {
		key, val := req.keys[i], req.vals[i]
		switch {
		case key == "execute" || key == "exec-oob" && m.oob.Load():
			s, ok := val.(string)
			if !ok {
				return "", false, nil, qapi.Errorf(qapi.GenericError, "QMP input member '%s' must be a string", key)
			}
			if execKey != "" {
				return "", false, nil, qapi.Errorf(qapi.GenericError, "QMP input member '%s' clashes with '%s'", key, execKey)
			}
			execKey, name = key, s
		case key == "arguments":
			a, ok := val.(*object)
			if !ok {
				return "", false, nil, qapi.Errorf(qapi.GenericError, "QMP input member 'arguments' must be an object")
			}
			args = a
		case key == "id":
		default:
			return "", false, nil, qapi.Errorf(qapi.GenericError, "QMP input member '%s' is unexpected", key)
		}
	}
	if execKey == "" {
		return "", false, nil, qapi.Errorf(qapi.GenericError, "QMP input lacks member 'execute'")
	}
	if args == nil {
		args = &object{}
	}
	return name, execKey == "exec-oob", args, nil
}

// negotiate runs qmp_capabilities in capabilities-negotiation mode.
func (m *monitor) negotiate(id *any, args *object) {
	oob, err := decodeCapabilities(args)
	if err != nil {
		m.reply(id, nil, err, nil)
		return
	}
	// Flip to command mode under s.mu, right after queueing the reply,
	// so that no event overtakes it.
	m.s.mu.Lock()
	m.reply(id, nil, nil, nil)
	if oob {
		m.oob.Store(true)
	}
	m.negotiated.Store(true)
	m.s.mu.Unlock()
}

// execute runs a command in command mode.
func (s *Server) execute(ctx context.Context, name string, oob bool, args *object) (ret any, err error) {
	c := s.command(name)
	if c == nil {
		return nil, qapi.Errorf(qapi.CommandNotFound, "The command %s has not been found", name)
	}
	if oob && !c.AllowOOB {
		return nil, qapi.Errorf(qapi.GenericError, "The command %s does not support OOB", name)
	}
	if c.ArgType == nil && len(args.keys) > 0 {
		return nil, qapi.Errorf(qapi.GenericError, "Parameter '%s' is unexpected", args.keys[args.order()[0]])
	}
	plain := toPlain(args).(map[string]any)
	if !oob {
		s.cmdMu.Lock()
		defer s.cmdMu.Unlock()
		if s.isClosed() {
			return nil, qapi.Errorf(qapi.GenericError, "QMP server is shutting down")
		}
	}
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("QMP command panicked", "command", name, "panic", p, "stack", string(debug.Stack()))
			ret, err = nil, qapi.Errorf(qapi.GenericError, "internal error in command %s: %v", name, p)
		}
	}()
	return c.Handler(ctx, plain)
}

// reply queues a reply. id is nil when the request had none.
func (m *monitor) reply(id *any, ret any, err error, after func()) {
	r := &object{}
	if err != nil {
		e := &object{}
		e.set("class", string(qapi.ClassOf(err)))
		e.set("desc", errDesc(err))
		r.set("error", e)
	} else {
		t, terr := toTree(ret)
		if terr != nil {
			m.s.log.Error("QMP command result cannot be encoded", "err", terr)
			e := &object{}
			e.set("class", string(qapi.GenericError))
			e.set("desc", "internal error: result cannot be encoded: "+terr.Error())
			r.set("error", e)
		} else {
			if t == nil {
				t = &object{}
			}
			r.set("return", t)
		}
	}
	if id != nil {
		r.set("id", *id)
	}
	m.send(outMsg{data: m.encode(r), after: after})
}

// errDesc is the description of err: a *qapi.Error's Desc, or the text.
func errDesc(err error) string {
	var qe *qapi.Error
	if errors.As(err, &qe) && qe.Desc != "" {
		if qe == err {
			return qe.Desc
		}
		// Context wrapped around a QMP error (fmt.Errorf("...: %w")) is
		// part of the message.
		return err.Error()
	}
	var pe parseError
	if errors.As(err, &pe) {
		return string(pe)
	}
	return err.Error()
}

// ---- built-in commands ----

// QMPCapability is a capability a client may enable (QEMU's
// QMPCapability enum).
type QMPCapability string

// EnumValues lists the capabilities.
func (QMPCapability) EnumValues() []string { return []string{"oob"} }

type capabilitiesArgs struct {
	Enable []QMPCapability `qapi:"enable,optional"`
}

// decodeCapabilities decodes qmp_capabilities' arguments. The enum check
// is ours because QEMU 7.2 words it with the list element's name "null".
func decodeCapabilities(args *object) (oob bool, err error) {
	raw := struct {
		Enable []string `qapi:"enable,optional"`
	}{}
	if err := qapi.Decode(toPlain(args).(map[string]any), &raw, qapi.JSON); err != nil {
		return false, err
	}
	for _, c := range raw.Enable {
		if c != "oob" {
			return false, qapi.Errorf(qapi.GenericError, "Parameter 'null' does not accept value '%s'", c)
		}
		oob = true
	}
	return oob, nil
}

type commandInfo struct {
	Name string `json:"name"`
}

type versionTriple struct {
	Major int `json:"major"`
	Minor int `json:"minor"`
	Micro int `json:"micro"`
}

type versionReply struct {
	QEMU    versionTriple `json:"qemu"`
	Package string        `json:"package"`
}

func (s *Server) registerBuiltins() {
	s.Register(Command{
		Name:    "qmp_capabilities",
		ArgType: reflect.TypeOf(capabilitiesArgs{}),
		Handler: func(ctx context.Context, args map[string]any) (any, error) {
			o, _ := toTree(args)
			if _, err := decodeCapabilities(o.(*object)); err != nil {
				return nil, err
			}
			return nil, qapi.Errorf(qapi.CommandNotFound, "Capabilities negotiation is already complete, command ignored")
		},
	})
	s.Register(Command{
		Name:    "query-commands",
		RetType: reflect.TypeOf([]commandInfo{}),
		Handler: func(ctx context.Context, args map[string]any) (any, error) {
			names := s.Commands()
			out := make([]commandInfo, len(names))
			for i, n := range names {
				out[i] = commandInfo{n}
			}
			return out, nil
		},
	})
	s.Register(Command{
		Name:    "query-version",
		RetType: reflect.TypeOf(versionReply{}),
		Handler: func(ctx context.Context, args map[string]any) (any, error) {
			v := s.version
			return versionReply{versionTriple{v.Major, v.Minor, v.Micro}, v.Package}, nil
		},
	})
	s.Register(Command{
		Name:    "query-qmp-schema",
		RetType: reflect.TypeOf([]SchemaInfo{}),
		Handler: func(ctx context.Context, args map[string]any) (any, error) {
			return s.Schema(), nil
		},
	})
}
