package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"blockbackend/internal/zeros"
	"blockbackend/vhostuser/virtq"
)

// Device is the virtio device a Server serves: its feature bits, config
// space and request handling. The Server owns the transport (socket,
// memory, rings, notifications).
type Device interface {
	// Features returns the device-specific virtio feature bits (bits 0-23)
	// the device offers. The Server adds the ring and transport bits.
	Features() uint64
	// NumQueues is the most queues the device serves (GET_QUEUE_NUM).
	NumQueues() int
	// ReadConfig copies the current config space into dst and returns how
	// many bytes the config space has.
	ReadConfig(dst []byte) int
	// WriteConfig applies a SET_CONFIG write.
	WriteConfig(off uint32, data []byte) error
	// Handle serves one request and returns the number of bytes written
	// into the chain's device-writable buffers. It may run on the ring's
	// worker or on a helper goroutine (see worker.go): requests of one
	// queue may run concurrently, and those of different queues do. It
	// may block; the Server keeps serving the ring meanwhile.
	Handle(queue int, c *virtq.Chain) (written uint32)
}

// QuickHandler is an optional capability of a Device: requests it can
// serve at once, without I/O and without waiting (a read of zero
// clusters), the ring's worker serves in line whatever the recent service
// times, instead of handing them to a helper as it does once requests are
// slow.
type QuickHandler interface {
	// HandleQuick serves c if it can do so without blocking and returns
	// the bytes written and true; on false c is untouched and Handle
	// serves it.
	HandleQuick(queue int, c *virtq.Chain) (written uint32, ok bool)
}

// maxQueueSize is the largest ring the specification allows.
const maxQueueSize = 32768

// maxMemSlots is what we answer to GET_MAX_MEM_SLOTS: the same as
// qemu-storage-daemon, which QEMU's frontends are used to.
const maxMemSlots = 32

// transportFeatures are the ring and transport bits the Server itself
// implements, offered on top of the device's.
const transportFeatures = 1<<24 /* NOTIFY_ON_EMPTY */ | 1<<FLogAll | 1<<FRingIndirectDesc |
	1<<FRingEventIdx | 1<<FProtocolFeatures | 1<<FVersion1 | 1<<FRingPacked

// protocolFeatures are the protocol features we implement.
const protocolFeatures = 1<<ProtoMQ | 1<<ProtoLogShmfd | 1<<ProtoReplyAck | 1<<ProtoBackendReq |
	1<<ProtoConfig | 1<<ProtoInflightShmfd | 1<<ProtoResetDevice | 1<<ProtoConfigureMemSlots |
	1<<ProtoStatus

// ProtocolFeatures returns the protocol features the backend offers.
func ProtocolFeatures() uint64 { return protocolFeatures }

// Server serves a Device to one frontend at a time on a listening socket.
// Further connections wait in the listen backlog until the current one
// ends, which is what a reconnecting QEMU expects.
type Server struct {
	dev Device
	log *slog.Logger
	l   net.Listener

	mu     sync.Mutex
	sess   *session // guarded by mu
	closed bool     // guarded by mu
	done   chan struct{}
}

// Serve starts serving dev on l in the background.
func Serve(l net.Listener, dev Device, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{dev: dev, log: log, l: l, done: make(chan struct{})}
	go s.acceptLoop()
	return s
}

func (s *Server) acceptLoop() {
	defer close(s.done)
	for {
		c, err := s.l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if !closed {
				s.log.Error("vhost-user: accept failed; the export stops listening", "err", err)
			}
			return
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			continue
		}
		sess := newSession(s, NewConn(uc))
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			uc.Close()
			return
		}
		s.sess = sess
		s.mu.Unlock()
		sess.serve()
		s.mu.Lock()
		s.sess = nil
		s.mu.Unlock()
	}
}

// Connected reports whether a frontend is connected.
func (s *Server) Connected() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sess != nil
}

// Close stops listening and disconnects the frontend, then waits until no
// request is in flight.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	sess := s.sess
	s.mu.Unlock()
	err := s.l.Close()
	if sess != nil {
		sess.conn.Close()
	}
	<-s.done
	return err
}

// ConfigChanged tells the frontend that the config space changed (a
// resize), when it negotiated the backend channel. It reports whether
// the message was sent.
func (s *Server) ConfigChanged() bool {
	s.mu.Lock()
	sess := s.sess
	s.mu.Unlock()
	if sess == nil {
		return false
	}
	return sess.configChanged()
}

// session is one frontend connection.
type session struct {
	srv  *Server
	dev  Device
	conn *Conn
	log  *slog.Logger

	features    uint64 // acked virtio features
	protocol    uint64 // acked protocol features
	status      uint8
	mem         *virtq.Memory
	queues      []*queue
	dirty       *virtq.DirtyLog
	logMap      []byte
	inflightMap []byte
	inflightQ   int // bytes per queue in inflightMap

	bmu     sync.Mutex
	backend *Conn // guarded by bmu
}

func newSession(s *Server, c *Conn) *session {
	n := s.dev.NumQueues()
	sess := &session{srv: s, dev: s.dev, conn: c, log: s.log, queues: make([]*queue, n)}
	for i := range sess.queues {
		sess.queues[i] = newQueue(sess, i)
	}
	return sess
}

func (s *session) serve() {
	s.log.Info("vhost-user: frontend connected")
	defer s.teardown()
	for {
		m, err := s.conn.Read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.log.Warn("vhost-user: closing the connection", "err", err)
			}
			return
		}
		replied, err := s.handle(&m)
		m.CloseFDs() // handlers take the fds they keep out of m.FDs
		if err != nil {
			s.log.Warn("vhost-user: request failed", "request", m.Request(), "err", err)
		}
		if m.NeedReply() && s.protocol&(1<<ProtoReplyAck) != 0 && !replied {
			var code uint64
			if err != nil {
				code = 1
			}
			if werr := s.conn.Reply(&m, U64(code)); werr != nil {
				return
			}
		}
		if errors.Is(err, errFatal) {
			return
		}
	}
}

// errFatal marks errors after which the connection cannot go on.
var errFatal = errors.New("fatal")

func (s *session) teardown() {
	for _, q := range s.queues {
		q.stop()
		q.closeFDs()
	}
	s.conn.Close()
	s.bmu.Lock()
	if s.backend != nil {
		s.backend.Close()
		s.backend = nil
	}
	s.bmu.Unlock()
	s.mem.Close()
	s.mem = nil
	unmap(&s.logMap)
	unmap(&s.inflightMap)
	s.log.Info("vhost-user: frontend disconnected")
}

func unmap(b *[]byte) {
	if *b != nil {
		_ = unix.Munmap(*b)
		*b = nil
	}
}

// takeFD removes the message's first fd from it (so serve does not close
// it) and returns it, or -1.
func takeFD(m *Message) int {
	if len(m.FDs) == 0 {
		return -1
	}
	fd := m.FDs[0]
	m.FDs = m.FDs[1:]
	return fd
}

func (s *session) queue(idx uint32) (*queue, error) {
	if int(idx) >= len(s.queues) {
		return nil, fmt.Errorf("queue index %d out of range (the device has %d queues)", idx, len(s.queues))
	}
	return s.queues[idx], nil
}

// handle processes one message; replied reports whether it sent a reply
// (so that REPLY_ACK is not sent twice).
func (s *session) handle(m *Message) (replied bool, err error) {
	reply := func(p []byte, fds ...int) (bool, error) {
		return true, s.conn.Reply(m, p, fds...)
	}
	switch m.Request() {
	case GetFeatures:
		return reply(U64(s.dev.Features() | transportFeatures))
	case SetFeatures:
		f, err := ParseU64(m.Payload)
		if err != nil {
			return false, err
		}
		offered := s.dev.Features() | transportFeatures
		if f&^offered != 0 {
			return false, fmt.Errorf("frontend acked features %#x that were not offered", f&^offered)
		}
		s.features = f
		s.setLogging()
		return false, nil
	case SetOwner, ResetOwner:
		// RESET_OWNER is deprecated and ignored, as the specification allows.
		return false, nil
	case GetProtocolFeatures:
		return reply(U64(protocolFeatures))
	case SetProtocolFeatures:
		f, err := ParseU64(m.Payload)
		if err != nil {
			return false, err
		}
		// Under bmu: configChanged reads it from other goroutines.
		s.bmu.Lock()
		s.protocol = f & protocolFeatures
		s.bmu.Unlock()
		return false, nil
	case GetQueueNum:
		return reply(U64(uint64(len(s.queues))))
	case GetMaxMemSlots:
		return reply(U64(maxMemSlots))
	case SetBackendReqFD:
		fd := takeFD(m)
		if fd < 0 {
			return false, errors.New("SET_BACKEND_REQ_FD without a file descriptor")
		}
		f := os.NewFile(uintptr(fd), "vhost-user-backend-channel")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return false, fmt.Errorf("backend channel: %w", err)
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			return false, errors.New("backend channel is not a unix socket")
		}
		s.bmu.Lock()
		if s.backend != nil {
			s.backend.Close()
		}
		s.backend = NewConn(uc)
		s.bmu.Unlock()
		return false, nil
	case SetMemTable:
		t, err := ParseMemTable(m.Payload)
		if err != nil {
			return false, err
		}
		if len(t.Regions) != len(m.FDs) {
			return false, fmt.Errorf("SET_MEM_TABLE: %d regions but %d file descriptors", len(t.Regions), len(m.FDs))
		}
		regs := make([]virtq.Region, len(t.Regions))
		for i, r := range t.Regions {
			regs[i] = virtq.Region{GuestAddr: r.GuestAddr, Size: r.Size, UserAddr: r.UserAddr, MmapOffset: r.MmapOffset, FD: m.FDs[i]}
		}
		m.FDs = nil // Map owns them now
		mem, err := virtq.Map(regs)
		if err != nil {
			return false, err
		}
		s.swapMemory(mem)
		return false, nil
	case AddMemReg, RemMemReg:
		r, err := ParseMemRegionMsg(m.Payload)
		if err != nil {
			return false, err
		}
		fd := takeFD(m)
		reg := virtq.Region{GuestAddr: r.Region.GuestAddr, Size: r.Region.Size, UserAddr: r.Region.UserAddr, MmapOffset: r.Region.MmapOffset, FD: fd}
		var mem *virtq.Memory
		switch {
		case m.Request() == RemMemReg:
			if s.mem == nil {
				if fd >= 0 {
					unix.Close(fd)
				}
				return false, errors.New("REM_MEM_REG without a memory table")
			}
			mem, err = s.mem.Remove(reg)
		case fd < 0:
			return false, errors.New("ADD_MEM_REG without a file descriptor")
		case s.mem == nil:
			mem, err = virtq.Map([]virtq.Region{reg})
		default:
			mem, err = s.mem.Add(reg)
		}
		if err != nil {
			return false, err
		}
		s.swapMemory(mem)
		return false, nil
	case SetLogBase:
		l, err := ParseLog(m.Payload)
		if err != nil {
			return false, err
		}
		fd := takeFD(m)
		if fd < 0 {
			return false, errors.New("SET_LOG_BASE without a file descriptor")
		}
		b, err := mmapFD(fd, l.MmapOffset, l.MmapSize)
		unix.Close(fd)
		if err != nil {
			return false, fmt.Errorf("SET_LOG_BASE: %w", err)
		}
		s.quiesce(func() {
			unmap(&s.logMap)
			s.logMap = b
			s.dirty = virtq.NewDirtyLog(b)
		})
		s.setLogging()
		// The frontend waits for this reply before it goes on.
		return reply(U64(0))
	case SetLogFD:
		// The log-sync eventfd: we never need to wait for the frontend.
		return false, nil
	case SetVringNum:
		st, q, err := s.vringState(m)
		if err != nil {
			return false, err
		}
		if st.Num == 0 || st.Num > maxQueueSize {
			return false, fmt.Errorf("queue %d: size %d out of range", st.Index, st.Num)
		}
		q.num = uint16(st.Num)
		q.numSet = true
		return false, nil
	case SetVringAddr:
		a, err := ParseVringAddr(m.Payload)
		if err != nil {
			return false, err
		}
		q, err := s.queue(a.Index)
		if err != nil {
			return false, err
		}
		q.addr = a
		q.addrSet = true
		return false, nil
	case SetVringBase:
		st, q, err := s.vringState(m)
		if err != nil {
			return false, err
		}
		q.base = st.Num
		return false, nil
	case GetVringBase:
		st, q, err := s.vringState(m)
		if err != nil {
			return false, err
		}
		q.stop()
		q.closeKick()
		q.enabled = false
		return reply(VringState{st.Index, q.base}.Marshal())
	case SetVringKick, SetVringCall, SetVringErr:
		v, err := ParseU64(m.Payload)
		if err != nil {
			return false, err
		}
		q, err := s.queue(uint32(v & 0xff))
		if err != nil {
			return false, err
		}
		fd := -1
		if v&(1<<8) == 0 {
			if fd = takeFD(m); fd < 0 {
				return false, fmt.Errorf("%v for queue %d without a file descriptor", m.Request(), q.idx)
			}
		}
		switch m.Request() {
		case SetVringKick:
			if fd < 0 {
				return false, fmt.Errorf("queue %d: polling mode (no kick fd) is not supported", q.idx)
			}
			q.stop()
			q.closeKick()
			if err := q.setKick(fd); err != nil {
				return false, err
			}
			q.started = true
			if s.features&(1<<FProtocolFeatures) == 0 {
				// Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
				q.enabled = true
			}
			return false, q.maybeStart()
		case SetVringCall:
			q.setCall(fd)
		default:
			q.setErr(fd)
		}
		return false, nil
	case SetVringEnable:
		st, q, err := s.vringState(m)
		if err != nil {
			return false, err
		}
		q.enabled = st.Num != 0
		if !q.enabled {
			q.stop()
			return false, nil
		}
		return false, q.maybeStart()
	case GetConfig:
		c, err := ParseConfig(m.Payload)
		if err != nil {
			return false, err
		}
		var space [MaxConfigSize]byte
		n := s.dev.ReadConfig(space[:])
		if int(c.Offset)+int(c.Size) > n {
			// QEMU treats a reply of a different size as failure.
			return reply(Config{Offset: c.Offset, Size: 0, Flags: c.Flags}.Marshal())
		}
		return reply(Config{Offset: c.Offset, Size: c.Size, Flags: c.Flags, Data: space[c.Offset : c.Offset+c.Size]}.Marshal())
	case SetConfig:
		c, err := ParseConfig(m.Payload)
		if err != nil {
			return false, err
		}
		return false, s.dev.WriteConfig(c.Offset, c.Data)
	case GetInflightFD:
		in, err := ParseInflight(m.Payload)
		if err != nil {
			return false, err
		}
		if in.NumQueues == 0 || int(in.NumQueues) > len(s.queues) || in.QueueSize == 0 || in.QueueSize > maxQueueSize-1 {
			return false, fmt.Errorf("GET_INFLIGHT_FD: %d queues of %d entries is out of range", in.NumQueues, in.QueueSize)
		}
		per := inflightPerQueue(in.QueueSize)
		size := per * int(in.NumQueues)
		fd, err := unix.MemfdCreate("vhost-user-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			return false, fmt.Errorf("GET_INFLIGHT_FD: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.Ftruncate(fd, int64(size)); err != nil {
			return false, fmt.Errorf("GET_INFLIGHT_FD: %w", err)
		}
		b, err := mmapFD(fd, 0, uint64(size))
		if err != nil {
			return false, fmt.Errorf("GET_INFLIGHT_FD: %w", err)
		}
		s.quiesce(func() {
			unmap(&s.inflightMap)
			s.inflightMap, s.inflightQ = b, per
		})
		return reply(Inflight{MmapSize: uint64(size), NumQueues: in.NumQueues, QueueSize: in.QueueSize}.Marshal(), fd)
	case SetInflightFD:
		in, err := ParseInflight(m.Payload)
		if err != nil {
			return false, err
		}
		fd := takeFD(m)
		if fd < 0 {
			return false, errors.New("SET_INFLIGHT_FD without a file descriptor")
		}
		defer unix.Close(fd)
		if in.NumQueues == 0 || in.QueueSize == 0 || in.QueueSize > maxQueueSize-1 {
			return false, fmt.Errorf("SET_INFLIGHT_FD: %d queues of %d entries is out of range", in.NumQueues, in.QueueSize)
		}
		per := inflightPerQueue(in.QueueSize)
		if in.MmapSize < uint64(per)*uint64(in.NumQueues) {
			return false, fmt.Errorf("SET_INFLIGHT_FD: %d bytes is too small for %d queues of %d entries", in.MmapSize, in.NumQueues, in.QueueSize)
		}
		b, err := mmapFD(fd, in.MmapOffset, in.MmapSize)
		if err != nil {
			return false, fmt.Errorf("SET_INFLIGHT_FD: %w", err)
		}
		s.quiesce(func() {
			unmap(&s.inflightMap)
			s.inflightMap, s.inflightQ = b, per
		})
		return false, nil
	case ResetDevice:
		for _, q := range s.queues {
			q.stop()
			q.closeFDs()
			q.reset()
		}
		s.features, s.status = 0, 0
		return false, nil
	case SetStatus:
		v, err := ParseU64(m.Payload)
		if err != nil {
			return false, err
		}
		s.status = uint8(v)
		return false, nil
	case GetStatus:
		return reply(U64(uint64(s.status)))
	}
	return false, fmt.Errorf("unsupported request %v", m.Request())
}

// vringState parses a vring state payload and finds its queue.
func (s *session) vringState(m *Message) (VringState, *queue, error) {
	st, err := ParseVringState(m.Payload)
	if err != nil {
		return st, nil, err
	}
	q, err := s.queue(st.Index)
	return st, q, err
}

// inflightPerQueue sizes one queue's inflight region so that either ring
// layout fits: GET_INFLIGHT_FD may come before the features say which.
func inflightPerQueue(size uint16) int {
	return max(virtq.InflightQueueSize(size, false), virtq.InflightQueueSize(size, true))
}

func mmapFD(fd int, off, size uint64) ([]byte, error) {
	if size == 0 || size > 1<<40 || off > 1<<40 {
		return nil, fmt.Errorf("mapping of %d bytes at %d is out of range", size, off)
	}
	// mmap needs a page-aligned offset.
	page := uint64(os.Getpagesize())
	aligned := off &^ (page - 1)
	b, err := unix.Mmap(fd, int64(aligned), int(size+off-aligned), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, err
	}
	if aligned != off {
		// munmap needs the start of the mapping, so a slice into it would
		// leak; no frontend sends an unaligned offset.
		_ = unix.Munmap(b)
		return nil, fmt.Errorf("offset %d is not page-aligned", off)
	}
	return b, nil
}

// swapMemory installs a new memory table, pausing the rings so that no
// request still uses the old mappings when they go away.
func (s *session) swapMemory(mem *virtq.Memory) {
	s.quiesce(func() {
		old := s.mem
		s.mem = mem
		old.Close()
	})
}

// quiesce stops every running ring, waits for their requests, runs f, and
// starts the rings again from where they stopped.
func (s *session) quiesce(f func()) {
	var running []*queue
	for _, q := range s.queues {
		if q.running() {
			q.stop()
			running = append(running, q)
		}
	}
	f()
	for _, q := range running {
		if err := q.maybeStart(); err != nil {
			s.log.Error("vhost-user: cannot restart the ring", "queue", q.idx, "err", err)
		}
	}
}

// setLogging turns dirty logging on the running rings on or off.
func (s *session) setLogging() {
	var l *virtq.DirtyLog
	if s.features&(1<<FLogAll) != 0 {
		l = s.dirty
	}
	for _, q := range s.queues {
		q.log.Store(l)
		if vq := q.vq; vq != nil {
			vq.SetLog(l)
		}
	}
}

func (s *session) configChanged() bool {
	s.bmu.Lock()
	defer s.bmu.Unlock()
	if s.protocol&(1<<ProtoBackendReq) == 0 || s.protocol&(1<<ProtoConfig) == 0 || s.backend == nil {
		return false
	}
	if err := s.backend.Write(uint32(BackendConfigChangeMsg), 0, nil); err != nil {
		s.log.Warn("vhost-user: cannot send the config change", "err", err)
		return false
	}
	return true
}

// queue is one virtqueue of a session. Its fields are owned by the
// session's message goroutine except where noted.
type queue struct {
	s   *session
	idx int

	num     uint16
	numSet  bool
	addr    VringAddr
	addrSet bool
	base    uint32
	started bool // a kick fd arrived
	enabled bool

	kick int // the kick eventfd, or -1

	// callMu guards call and errFD against being closed while a request
	// goroutine signals them.
	callMu sync.RWMutex
	call   int
	errFD  int

	log atomic.Pointer[virtq.DirtyLog]

	vq     *virtq.Queue // non-nil while running
	ring   *ring        // the running ring's worker state; non-nil while running
	chains sync.Pool
}

func newQueue(s *session, idx int) *queue {
	q := &queue{s: s, idx: idx, kick: -1, call: -1, errFD: -1}
	q.chains.New = func() any { return new(virtq.Chain) }
	return q
}

func (q *queue) reset() {
	q.num, q.numSet, q.addr, q.addrSet, q.base, q.started, q.enabled = 0, false, VringAddr{}, false, 0, false, false
}

func (q *queue) running() bool { return q.vq != nil }

func (q *queue) setKick(fd int) error {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return fmt.Errorf("queue %d: kick fd: %w", q.idx, err)
	}
	// Non-blocking, as the frontend has it: the file description is
	// shared with it. The worker waits for it with poll(2).
	q.kick = fd
	return nil
}

func (q *queue) closeKick() {
	if q.kick >= 0 {
		unix.Close(q.kick)
		q.kick = -1
	}
	q.started = false
}

func (q *queue) setCall(fd int) {
	q.callMu.Lock()
	if q.call >= 0 {
		unix.Close(q.call)
	}
	q.call = fd
	q.callMu.Unlock()
}

func (q *queue) setErr(fd int) {
	q.callMu.Lock()
	if q.errFD >= 0 {
		unix.Close(q.errFD)
	}
	q.errFD = fd
	q.callMu.Unlock()
}

func (q *queue) closeFDs() {
	q.closeKick()
	q.setCall(-1)
	q.setErr(-1)
}

var one = [8]byte{1}

func (q *queue) signal() {
	q.callMu.RLock()
	if q.call >= 0 {
		_, _ = unix.Write(q.call, one[:])
	}
	q.callMu.RUnlock()
}

func (q *queue) signalErr() {
	q.callMu.RLock()
	if q.errFD >= 0 {
		_, _ = unix.Write(q.errFD, one[:])
	}
	q.callMu.RUnlock()
}

// maybeStart starts the ring once it has everything it needs.
func (q *queue) maybeStart() error {
	s := q.s
	if q.vq != nil || !q.started || !q.enabled || !q.addrSet || s.mem == nil {
		return nil
	}
	size := uint32(q.num)
	if !q.numSet {
		return fmt.Errorf("queue %d: started before SET_VRING_NUM", q.idx)
	}
	packed := s.features&(1<<FRingPacked) != 0
	cfg := virtq.Config{
		Size:     uint16(size),
		Desc:     q.addr.Desc,
		Avail:    q.addr.Avail,
		Used:     q.addr.Used,
		Packed:   packed,
		EventIdx: s.features&(1<<FRingEventIdx) != 0,
		Indirect: s.features&(1<<FRingIndirectDesc) != 0,
		// VIRTIO_F_NOTIFY_ON_EMPTY (24)
		NotifyOnEmpty: s.features&(1<<24) != 0,
		Base:          q.base,
		MaxChain:      maxChain,
	}
	if s.inflightMap != nil && s.protocol&(1<<ProtoInflightShmfd) != 0 {
		off := q.idx * s.inflightQ
		if off+s.inflightQ <= len(s.inflightMap) {
			region := s.inflightMap[off : off+virtq.InflightQueueSize(uint16(size), packed)]
			if zeros.Is(region) {
				virtq.InitInflight(region, uint16(size), packed)
			}
			cfg.Inflight = region
		}
	}
	vq, err := virtq.New(s.mem, cfg)
	if err != nil {
		return fmt.Errorf("queue %d: %w", q.idx, err)
	}
	vq.SetLog(q.log.Load())
	r, err := startRing(q, vq, q.kick)
	if err != nil {
		return fmt.Errorf("queue %d: %w", q.idx, err)
	}
	q.vq, q.ring = vq, r
	return nil
}

// maxChain bounds the descriptors of one request: the data segments the
// config space allows plus header and status, with room for frontends
// that ignore seg_max.
const maxChain = 1024

// stop halts the ring's worker, waits for its requests to complete and
// records the ring's base for GET_VRING_BASE.
func (q *queue) stop() {
	if q.vq == nil {
		return
	}
	q.ring.stop()
	q.base = q.vq.Base()
	q.vq, q.ring = nil, nil
}

// broken stops serving a ring whose driver broke the ring's rules. The
// other rings, exports and guests go on; the frontend hears of it through
// the ring's error eventfd.
func (q *queue) broken(err error) {
	q.s.log.Error("vhost-user: the guest broke the virtqueue's rules; the queue stops until the device is reset",
		"queue", q.idx, "err", err)
	q.signalErr()
}
