package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"
)

// conn is one client connection: the handshake, then the transmission
// phase. Its goroutine (serve) reads; request workers write replies.
type conn struct {
	s      *Server
	nc     net.Conn
	br     *bufio.Reader
	log    *slog.Logger
	ctx    context.Context // cancelled on a hard end: backend calls stop
	cancel context.CancelFunc
	done   chan struct{} // closed when serve has returned and nc is closed

	mu       sync.Mutex
	exp      *exportState // set by Server.attach under Server.mu and mu
	draining bool         // guarded by mu: stop reading, finish what is in flight

	// Negotiated state, touched only by the serve goroutine before
	// transmission starts, read-only afterwards.
	noZeroes   bool
	structured bool
	metaName   string // export the last NBD_OPT_SET_META_CONTEXT named
	metaAlloc  bool   // ... and whether it selected base:allocation
	bsAgreed   bool   // the client asked for NBD_INFO_BLOCK_SIZE in NBD_OPT_GO
	useMeta    bool   // base:allocation active in transmission
	size       int64
	flags      TransmissionFlags

	wmu      sync.Mutex // serialises writes of replies: each reply whole
	inflight sync.WaitGroup
	slots    chan struct{} // MaxInFlight request slots
	budget   budget        // MaxInFlightBytes of READ/WRITE buffers
}

// metaContextID is the id of base:allocation in NBD_REP_META_CONTEXT and
// block status chunks; any value works, clients must treat it as opaque.
const metaContextID = 1

func newConn(s *Server, nc net.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	c := &conn{
		s: s, nc: nc,
		br:     bufio.NewReaderSize(nc, 64<<10),
		log:    s.log.With("remote", nc.RemoteAddr().String()),
		ctx:    ctx,
		cancel: cancel,
		done:   make(chan struct{}),
		slots:  make(chan struct{}, MaxInFlight),
	}
	c.budget.init(MaxInFlightBytes)
	return c
}

func (c *conn) isDraining() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.draining
}

// drain ends the connection safely: no new request is read, the ones in
// flight finish and send their replies, then the connection closes. After
// timeout it is cut regardless.
func (c *conn) drain(timeout time.Duration) {
	c.mu.Lock()
	c.draining = true
	c.mu.Unlock()
	// Set after the flag: the reader clears its handshake deadline and then
	// checks the flag, so one of the two always stops it.
	_ = c.nc.SetReadDeadline(time.Now())
	_ = c.nc.SetWriteDeadline(time.Now().Add(timeout))
	go func() {
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case <-c.done:
		case <-t.C:
			c.abort()
		}
	}()
}

// abort ends the connection at once; backend calls see ctx cancelled.
func (c *conn) abort() {
	// Close first: a request that sees the cancellation must find the
	// socket gone rather than slip an error reply out.
	_ = c.nc.Close()
	c.cancel()
}

func (c *conn) serve() {
	defer close(c.done)
	defer c.nc.Close()
	defer c.cancel()
	defer func() {
		// A bug of ours must not take the process down with one client;
		// client input never gets here (every parse is checked).
		if r := recover(); r != nil {
			c.log.Error("nbd: connection handler panicked", "panic", r)
		}
	}()
	if err := c.handshake(); err != nil {
		if !errors.Is(err, errAbort) && !errors.Is(err, io.EOF) {
			c.log.Debug("nbd: handshake ended", "err", err)
		}
		return
	}
	c.transmit()
}

// errAbort: the client sent NBD_OPT_ABORT.
var errAbort = errors.New("nbd: client aborted the handshake")

func (c *conn) readFull(b []byte) error {
	_, err := io.ReadFull(c.br, b)
	return err
}

// optReply writes one option reply.
func (c *conn) optReply(opt Opt, rep Rep, data []byte) error {
	b := make([]byte, 0, OptionReplyHeaderSize+len(data))
	b = OptionReplyHeader{Option: opt, Type: rep, Length: uint32(len(data))}.Append(b)
	b = append(b, data...)
	_, err := c.nc.Write(b)
	return err
}

func (c *conn) optError(opt Opt, rep Rep, format string, a ...any) error {
	msg := fmt.Sprintf(format, a...)
	if len(msg) > MaxStringLength {
		msg = msg[:MaxStringLength]
	}
	return c.optReply(opt, rep, []byte(msg))
}

// handshake runs fixed newstyle negotiation; nil means the connection is
// in transmission on c.exp.
func (c *conn) handshake() error {
	if d := c.s.handshakeTimeout; d > 0 {
		_ = c.nc.SetDeadline(time.Now().Add(d))
	}
	if _, err := c.nc.Write(AppendGreeting(nil, FlagFixedNewstyle|FlagNoZeroes)); err != nil {
		return err
	}
	var cf [4]byte
	if err := c.readFull(cf[:]); err != nil {
		return err
	}
	flags := be.Uint32(cf[:])
	if flags&^(FlagCFixedNewstyle|FlagCNoZeroes) != 0 {
		// "the server MUST drop the TCP connection if the client sets an
		// unknown flag"
		return protoErr("unknown client flags %#x", flags)
	}
	// A client without NBD_FLAG_C_FIXED_NEWSTYLE still gets fixed-newstyle
	// replies: the spec lets servers honour it, and such a client only
	// sends NBD_OPT_EXPORT_NAME anyway.
	c.noZeroes = flags&FlagCNoZeroes != 0

	hdr := make([]byte, OptionHeaderSize)
	for {
		if c.isDraining() {
			return errors.New("nbd: server shutting down")
		}
		if err := c.readFull(hdr); err != nil {
			return err
		}
		h, err := ParseOptionHeader(hdr)
		if err != nil {
			return err
		}
		if h.Length > MaxOptionLength {
			if h.Option == OptExportName || h.Length > maxDiscardOption {
				return protoErr("%v with %d bytes of data", h.Option, h.Length)
			}
			if _, err := io.CopyN(io.Discard, c.br, int64(h.Length)); err != nil {
				return err
			}
			if err := c.optError(h.Option, RepErrTooBig, "option data of %d bytes exceeds %d", h.Length, MaxOptionLength); err != nil {
				return err
			}
			continue
		}
		data := make([]byte, h.Length)
		if err := c.readFull(data); err != nil {
			return err
		}
		done, err := c.option(h.Option, data)
		if err != nil || done {
			return err
		}
	}
}

// option handles one option; done means transmission starts.
func (c *conn) option(opt Opt, data []byte) (done bool, err error) {
	switch opt {
	case OptExportName:
		return true, c.exportName(data)
	case OptAbort:
		// "The server MUST reply with NBD_REP_ACK"; the client may already
		// have gone, so a write error does not matter.
		_ = c.optReply(opt, RepAck, nil)
		return false, errAbort
	case OptList:
		if len(data) != 0 {
			return false, c.optError(opt, RepErrInvalid, "NBD_OPT_LIST with data")
		}
		for _, e := range c.s.list() {
			if err := c.optReply(opt, RepServer, e.Append(nil)); err != nil {
				return false, err
			}
		}
		return false, c.optReply(opt, RepAck, nil)
	case OptStartTLS:
		if len(data) != 0 {
			return false, c.optError(opt, RepErrInvalid, "NBD_OPT_STARTTLS with data")
		}
		// NOTLS mode: TLS is not built into this server.
		return false, c.optError(opt, RepErrPolicy, "TLS is not supported by this server")
	case OptStructuredReply:
		if len(data) != 0 {
			return false, c.optError(opt, RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY with data")
		}
		c.structured = true
		return false, c.optReply(opt, RepAck, nil)
	case OptInfo, OptGo:
		return c.infoGo(opt, data)
	case OptListMetaContext, OptSetMetaContext:
		return false, c.metaContext(opt, data)
	}
	return false, c.optError(opt, RepErrUnsup, "option %v is not supported", opt)
}

// transmissionFlags are the flags this connection sees for st.
func (c *conn) transmissionFlags(st *exportState) TransmissionFlags {
	f := st.flags
	if c.structured {
		// We never fragment a READ reply, so DF is always honoured; the
		// flag must stay clear without structured replies.
		f |= FlagSendDF
	}
	return f
}

func exportSize(st *exportState) int64 {
	return max(st.Backend.Size(), 0)
}

// enter prepares transmission on st (already attached).
func (c *conn) enter(st *exportState, name string, size int64) error {
	c.size = size
	c.flags = c.transmissionFlags(st)
	c.useMeta = c.structured && c.metaAlloc && c.metaName == name
	_ = c.nc.SetDeadline(time.Time{})
	if c.isDraining() {
		return errors.New("nbd: export removed during handshake")
	}
	c.log = c.log.With("export", name)
	c.log.Debug("nbd: client in transmission", "size", size, "flags", fmt.Sprintf("%#x", uint16(c.flags)), "structured", c.structured)
	return nil
}

func (c *conn) exportName(data []byte) error {
	name := string(data)
	st := c.s.lookup(name)
	if st == nil {
		// "If the chosen export does not exist ... the server MUST
		// terminate the session."
		return fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME: no export %q", name)
	}
	if st.min > 1 {
		// The client cannot learn our minimum block size this way.
		return fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME on export %q, which needs a minimum block size of %d", name, st.min)
	}
	if st = c.s.attach(c, name); st == nil {
		return fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME: export %q removed", name)
	}
	size := exportSize(st)
	b := AppendExportNameReply(nil, ExportInfo{Size: uint64(size), Flags: c.transmissionFlags(st)}, c.noZeroes)
	if _, err := c.nc.Write(b); err != nil {
		return err
	}
	return c.enter(st, name, size)
}

func (c *conn) infoGo(opt Opt, data []byte) (bool, error) {
	req, err := ParseInfoRequest(data)
	if err != nil {
		return false, c.optError(opt, RepErrInvalid, "%v", err)
	}
	st := c.s.lookup(req.Name)
	if st == nil {
		return false, c.optError(opt, RepErrUnknown, "export '%s' not present", req.Name)
	}
	wantBS := slices.Contains(req.Infos, InfoBlockSize)
	if opt == OptGo {
		if st.min > 1 && !wantBS {
			// Send the sizes first, as the spec suggests, to save a round trip.
			if err := c.optReply(opt, RepInfo, Info{Type: InfoBlockSize, MinBlock: st.min, PrefBlock: st.pref, MaxBlock: st.max}.Append(nil)); err != nil {
				return false, err
			}
			return false, c.optError(opt, RepErrBlockSizeReqd, "export '%s' needs block size negotiation (minimum %d)", req.Name, st.min)
		}
		if st = c.s.attach(c, req.Name); st == nil {
			return false, c.optError(opt, RepErrUnknown, "export '%s' not present", req.Name)
		}
	}
	size := exportSize(st)
	infos := []Info{
		{Type: InfoExport, Export: ExportInfo{Size: uint64(size), Flags: c.transmissionFlags(st)}},
		// Sent unasked too (the spec allows it), so that every client sees
		// our maximum; it binds only clients that asked.
		{Type: InfoBlockSize, MinBlock: st.min, PrefBlock: st.pref, MaxBlock: st.max},
	}
	if slices.Contains(req.Infos, InfoName) {
		infos = append(infos, Info{Type: InfoName, Text: st.Name})
	}
	if slices.Contains(req.Infos, InfoDescription) && st.Description != "" {
		infos = append(infos, Info{Type: InfoDescription, Text: st.Description})
	}
	var b []byte
	for _, in := range infos {
		p := in.Append(nil)
		b = OptionReplyHeader{Option: opt, Type: RepInfo, Length: uint32(len(p))}.Append(b)
		b = append(b, p...)
	}
	b = OptionReplyHeader{Option: opt, Type: RepAck}.Append(b)
	if _, err := c.nc.Write(b); err != nil {
		return false, err
	}
	if opt == OptInfo {
		return false, nil
	}
	c.bsAgreed = wantBS
	return true, c.enter(st, req.Name, size)
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and _SET_. Query syntax
// (proto.md "The base: metadata namespace"): "base:" lists every base
// context and selects nothing; "base:allocation" lists or selects it;
// queries in other namespaces (qemu:dirty-bitmap:..., qemu:allocation-depth)
// match nothing here.
func (c *conn) metaContext(opt Opt, data []byte) error {
	set := opt == OptSetMetaContext
	if set {
		// "Issuing this command replaces all previously-set metadata
		// contexts (including when this command fails)".
		c.metaAlloc, c.metaName = false, ""
		if !c.structured {
			return c.optError(opt, RepErrInvalid, "structured replies must be negotiated first")
		}
	}
	req, err := ParseMetaContextRequest(data)
	if err != nil {
		return c.optError(opt, RepErrInvalid, "%v", err)
	}
	if c.s.lookup(req.Name) == nil {
		return c.optError(opt, RepErrUnknown, "export '%s' not present", req.Name)
	}
	match := len(req.Queries) == 0 && !set
	for _, q := range req.Queries {
		if q == MetaContextBaseAllocation || (!set && q == "base:") {
			match = true
		}
	}
	if match {
		id := uint32(0) // "SHOULD be set to zero" when listing
		if set {
			id = metaContextID
			c.metaAlloc, c.metaName = true, req.Name
		}
		if err := c.optReply(opt, RepMetaContext, MetaContextReply{ID: id, Name: MetaContextBaseAllocation}.Append(nil)); err != nil {
			return err
		}
	}
	return c.optReply(opt, RepAck, nil)
}
