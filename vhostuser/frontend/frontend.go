// Package frontend is a vhost-user frontend — the role QEMU plays — that
// drives a vhost-user-blk backend without a guest. It shares "guest
// memory" (memfds) with the backend, lays out split or packed virtqueues
// in it, submits virtio-blk requests and reaps their completions through
// the call eventfds.
//
// It exists for tests (protocol paths, the feature sets of older QEMU
// releases, hostile input through Raw) and for benchmarks at high queue
// depth (Bench). It is not a virtio driver for real guests, does no dirty
// logging, postcopy or IOMMU, and is not hardened against a hostile
// backend beyond never panicking: a backend that breaks the ring protocol
// makes the queue fail with an error.
//
// Specifications followed: QEMU's docs/interop/vhost-user.rst (message
// flow, REPLY_ACK, the backend channel, inflight I/O tracking,
// reconnection) and the virtio 1.2 specification (2.7 split and 2.8
// packed virtqueues, 2.7.10/2.8.10 event suppression, 5.2 the block
// device). The handshake follows the order QEMU 7.2's vhost-user-blk uses
// (see /work/shared/QEMU-FACTS.md), negotiating down to what both sides
// offer.
//
// Concurrency: control messages (Config, Stop, Raw messages) are
// serialised by one mutex. Each queue has its own lock, so goroutines may
// use different queues at once; a queue may also be shared, but Do on a
// queue that another goroutine Reaps from is only safe because Do keeps
// the others' completions for Reap.
package frontend

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	vu "blockbackend/vhostuser"

	"golang.org/x/sys/unix"
)

// Options configure Dial.
type Options struct {
	Path    string  // the backend's vhost-user socket
	Profile Profile // zero: QEMU72

	NumQueues int    // zero: 1
	QueueSize uint16 // a power of two; zero: 128 (QEMU's default)

	// Requested ring features, used only if negotiated.
	Packed, EventIdx, Indirect bool

	// MemSize is the size of guest memory (zero: enough for the rings and
	// 64 MiB of buffers). It is split into Regions regions (zero: 1), each
	// passed to the backend as its own region with its own guest address
	// and mmap offset.
	MemSize uint64
	Regions int

	// Inflight asks for GET/SET_INFLIGHT_FD when INFLIGHT_SHMFD is
	// negotiated, so that Reconnect can hand the buffer back.
	Inflight bool

	// Timeout bounds each control-message reply (zero: 10 s); IOTimeout
	// bounds Do (zero: 30 s; negative: none).
	Timeout, IOTimeout time.Duration
}

// Frontend is one connection to a vhost-user-blk backend with its guest
// memory and virtqueues.
type Frontend struct {
	opts Options
	mem  *guestMem

	queues []*queue

	// mu serialises control messages on conn and guards the fields below.
	mu       sync.Mutex
	conn     *vu.Conn
	features uint64 // negotiated virtio features (what SET_FEATURES sent)
	devFeat  uint64 // offered by the device
	protocol uint64 // negotiated protocol features
	devProto uint64
	maxQueue uint64
	maxSlots uint64
	stopped  bool
	closed   bool
	bases    []uint32

	inflightFD  int
	inflightMsg vu.Inflight

	backend   *vu.Conn // our end of the backend channel
	backendWG sync.WaitGroup

	configChanged chan struct{}
	bmu           sync.Mutex // guards backendErr
	backendErr    error
}

// Dial connects to the backend, negotiates and starts every queue.
func Dial(ctx context.Context, o Options) (*Frontend, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	mem, err := newGuestMem(o.MemSize, o.Regions)
	if err != nil {
		return nil, err
	}
	f := &Frontend{opts: o, mem: mem, inflightFD: -1, configChanged: make(chan struct{}, 1)}
	if err := f.connect(ctx, true); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func (o *Options) defaults() error {
	if o.Profile.Name == "" {
		o.Profile = QEMU72
	}
	if o.NumQueues <= 0 {
		o.NumQueues = 1
	}
	if o.QueueSize == 0 {
		o.QueueSize = 128
	}
	if o.QueueSize&(o.QueueSize-1) != 0 || o.QueueSize > 32768 {
		return fmt.Errorf("frontend: queue size %d is not a power of two up to 32768", o.QueueSize)
	}
	if o.Regions <= 0 {
		o.Regions = 1
	}
	if o.MemSize == 0 {
		o.MemSize = 64<<20 + uint64(o.NumQueues)*uint64(o.QueueSize)*(slotSize+64)
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	if o.IOTimeout == 0 {
		o.IOTimeout = 30 * time.Second
	}
	return nil
}

// connect dials and runs the whole handshake. first is false on
// Reconnect, when the queues, memory and inflight buffer already exist.
func (f *Frontend) connect(ctx context.Context, first bool) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", f.opts.Path)
	// A backend that has bound its socket but not yet listened on it
	// refuses: retry as QEMU's reconnecting chardev would, within ctx.
	for errors.Is(err, syscall.ECONNREFUSED) && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
		c, err = d.DialContext(ctx, "unix", f.opts.Path)
	}
	if err != nil {
		return fmt.Errorf("frontend: connect to %s: %w", f.opts.Path, err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return fmt.Errorf("frontend: %s is not a unix socket", f.opts.Path)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.conn = vu.NewConn(uc)
	f.stopped = false
	// A cancelled context aborts a handshake stuck on a silent backend.
	stop := context.AfterFunc(ctx, func() { uc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := f.handshake(first); err != nil {
		return fmt.Errorf("frontend: handshake with %s (%s): %w", f.opts.Path, f.opts.Profile.Name, err)
	}
	return nil
}

func has(v uint64, bit int) bool { return v&(1<<bit) != 0 }

func (f *Frontend) hasProto(bit int) bool { return has(f.protocol, bit) }

// handshake is QEMU 7.2's order: features, protocol features, queue
// number, memory slots, backend channel, owner, features again, call and
// err fds, config; then on start: features, inflight, memory, each vring
// (num, base, addr, kick, call) and enable. Called with f.mu held.
func (f *Frontend) handshake(first bool) error {
	o := &f.opts
	var err error
	if f.devFeat, err = f.getU64(vu.GetFeatures); err != nil {
		return err
	}
	f.protocol, f.devProto = 0, 0
	if has(f.devFeat, vu.FProtocolFeatures) {
		if f.devProto, err = f.getU64(vu.GetProtocolFeatures); err != nil {
			return err
		}
		f.protocol = f.devProto & o.Profile.ProtocolFeatures
		if err := f.send(vu.SetProtocolFeatures, vu.U64(f.protocol)); err != nil {
			return err
		}
	}
	if has(o.Profile.ProtocolFeatures, vu.ProtoConfig) && !f.hasProto(vu.ProtoConfig) {
		// Every QEMU vhost-user-blk frontend refuses such a backend.
		return errors.New("vhost-user device expecting VHOST_USER_PROTOCOL_F_CONFIG but the vhost-user backend does not support it")
	}
	if f.hasProto(vu.ProtoMQ) {
		if f.maxQueue, err = f.getU64(vu.GetQueueNum); err != nil {
			return err
		}
		if uint64(o.NumQueues) > f.maxQueue {
			return fmt.Errorf("the backend supports at most %d queues, %d requested", f.maxQueue, o.NumQueues)
		}
	}
	if f.hasProto(vu.ProtoConfigureMemSlots) {
		if f.maxSlots, err = f.getU64(vu.GetMaxMemSlots); err != nil {
			return err
		}
		if uint64(len(f.mem.regions)) > f.maxSlots {
			return fmt.Errorf("the backend takes at most %d memory slots, %d regions requested", f.maxSlots, len(f.mem.regions))
		}
	} else if len(f.mem.regions) > vu.MaxFDs {
		return fmt.Errorf("SET_MEM_TABLE carries at most %d regions, %d requested", vu.MaxFDs, len(f.mem.regions))
	}
	if f.hasProto(vu.ProtoBackendReq) {
		if err := f.setupBackendChannel(); err != nil {
			return err
		}
	}
	if err := f.send(vu.SetOwner, nil); err != nil {
		return err
	}
	if f.devFeat, err = f.getU64(vu.GetFeatures); err != nil {
		return err
	}
	f.features = f.devFeat & o.Profile.Features
	for bit, want := range map[int]bool{vu.FRingPacked: o.Packed, vu.FRingEventIdx: o.EventIdx, vu.FRingIndirectDesc: o.Indirect} {
		if !want {
			f.features &^= 1 << bit
		}
	}
	if o.NumQueues == 1 {
		f.features &^= 1 << BlkFMQ
	}
	if first {
		packed := has(f.features, vu.FRingPacked)
		for i := 0; i < o.NumQueues; i++ {
			q, err := newQueue(f, i, o.QueueSize, packed, has(f.features, vu.FRingEventIdx), has(f.features, vu.FRingIndirectDesc))
			if err != nil {
				return err
			}
			f.queues = append(f.queues, q)
		}
	} else if has(f.features, vu.FRingPacked) != f.queues[0].packed ||
		has(f.features, vu.FRingEventIdx) != f.queues[0].eventIdx ||
		has(f.features, vu.FRingIndirectDesc) != f.queues[0].indirect {
		return fmt.Errorf("the backend's features changed across the reconnection (now %#x)", f.devFeat)
	}
	for _, q := range f.queues {
		st := vu.VringState{Index: uint32(q.index)}.Marshal()
		if err := f.send(vu.SetVringCall, st, q.callFD); err != nil {
			return err
		}
		if err := f.send(vu.SetVringErr, st, q.errFD); err != nil {
			return err
		}
	}
	if f.hasProto(vu.ProtoConfig) {
		if _, err := f.getConfig(); err != nil {
			return err
		}
	}
	// Start.
	if f.opts.Inflight && f.hasProto(vu.ProtoInflightShmfd) {
		// The backend sizes the buffer by the ring layout, so it must
		// know the features first (QEMU sends them early for this).
		if err := f.send(vu.SetFeatures, vu.U64(f.features)); err != nil {
			return err
		}
		if err := f.setupInflight(); err != nil {
			return err
		}
	}
	if err := f.send(vu.SetFeatures, vu.U64(f.features)); err != nil {
		return err
	}
	if f.hasProto(vu.ProtoStatus) {
		if err := f.send(vu.SetStatus, vu.U64(statusAck|statusDriver|statusFeaturesOK)); err != nil {
			return err
		}
	}
	if err := f.sendMemory(); err != nil {
		return err
	}
	for _, q := range f.queues {
		if err := f.startQueue(q, first); err != nil {
			return err
		}
	}
	if has(f.features, vu.FProtocolFeatures) {
		for _, q := range f.queues {
			if err := f.send(vu.SetVringEnable, vu.VringState{Index: uint32(q.index), Num: 1}.Marshal()); err != nil {
				return err
			}
		}
	}
	if f.hasProto(vu.ProtoStatus) {
		if err := f.send(vu.SetStatus, vu.U64(statusAck|statusDriver|statusFeaturesOK|statusDriverOK)); err != nil {
			return err
		}
	}
	return nil
}

// Device status bits (virtio spec 2.1).
const (
	statusAck        = 1
	statusDriver     = 2
	statusDriverOK   = 4
	statusFeaturesOK = 8
)

func (f *Frontend) setupInflight() error {
	if f.inflightFD < 0 {
		req := vu.Inflight{NumQueues: uint16(len(f.queues)), QueueSize: f.opts.QueueSize}
		m, err := f.call(vu.GetInflightFD, req.Marshal(), 0)
		if err != nil {
			return err
		}
		in, err := vu.ParseInflight(m.Payload)
		if err != nil || len(m.FDs) != 1 {
			m.CloseFDs()
			return fmt.Errorf("GET_INFLIGHT_FD reply with %d fds: %v", len(m.FDs), err)
		}
		f.inflightFD, f.inflightMsg = m.FDs[0], in
	}
	return f.sendMaybeAck(vu.SetInflightFD, f.inflightMsg.Marshal(), f.inflightFD)
}

func (f *Frontend) sendMemory() error {
	if f.hasProto(vu.ProtoConfigureMemSlots) {
		for _, r := range f.mem.regions {
			if err := f.sendMaybeAck(vu.AddMemReg, vu.MemRegionMsg{Region: r}.Marshal(), f.mem.fd); err != nil {
				return err
			}
		}
		return nil
	}
	fds := make([]int, len(f.mem.regions))
	for i := range fds {
		fds[i] = f.mem.fd
	}
	return f.sendMaybeAck(vu.SetMemTable, vu.MemTable{Regions: f.mem.regions}.Marshal(), fds...)
}

// startQueue sends NUM, BASE, ADDR, KICK and CALL for q. On a reconnect
// the base is where the device left off: the used index, as QEMU does
// when GET_VRING_BASE was impossible; the backend then resubmits what
// its inflight buffer says is pending.
func (f *Frontend) startQueue(q *queue, first bool) error {
	idx := uint32(q.index)
	if err := f.send(vu.SetVringNum, vu.VringState{Index: idx, Num: uint32(q.size)}.Marshal()); err != nil {
		return err
	}
	q.mu.Lock()
	var base uint32
	if q.packed {
		pos, wrap := q.usedPosition()
		if first {
			pos, wrap = 0, true
		}
		v := uint32(pos)
		if wrap {
			v |= 1 << 15
		}
		// Bits 0-15: next available descriptor and wrap counter;
		// bits 16-31: the same for the used side.
		base = v | v<<16
	} else if !first {
		u, _ := q.usedPosition()
		base = uint32(u)
	}
	q.mu.Unlock()
	if err := f.send(vu.SetVringBase, vu.VringState{Index: idx, Num: base}.Marshal()); err != nil {
		return err
	}
	addr := vu.VringAddr{Index: idx, Desc: f.mem.userAddr(q.desc), Avail: f.mem.userAddr(q.avail), Used: f.mem.userAddr(q.used)}
	if err := f.send(vu.SetVringAddr, addr.Marshal()); err != nil {
		return err
	}
	st := vu.VringState{Index: idx}.Marshal()
	if err := f.send(vu.SetVringKick, st, q.kickFD); err != nil {
		return err
	}
	return f.send(vu.SetVringCall, st, q.callFD)
}

// Features returns the negotiated virtio and protocol features.
func (f *Frontend) Features() (virtio, protocol uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.features, f.protocol
}

// Offered returns what the backend offered (GET_FEATURES and
// GET_PROTOCOL_FEATURES) on the last handshake.
func (f *Frontend) Offered() (virtio, protocol uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.devFeat, f.devProto
}

// QueueNum and MaxMemSlots return GET_QUEUE_NUM and GET_MAX_MEM_SLOTS
// (0 if not negotiated).
func (f *Frontend) QueueNum() uint64 { f.mu.Lock(); defer f.mu.Unlock(); return f.maxQueue }

// MaxMemSlots returns GET_MAX_MEM_SLOTS (0 if not negotiated).
func (f *Frontend) MaxMemSlots() uint64 { f.mu.Lock(); defer f.mu.Unlock(); return f.maxSlots }

// NumQueues is the number of queues started.
func (f *Frontend) NumQueues() int { return len(f.queues) }

// Alloc returns an n-byte, zeroed buffer in guest memory, 4 KiB aligned,
// or nil when guest memory is exhausted. Buffers live until Close.
func (f *Frontend) Alloc(n int) []byte { return f.mem.alloc(n, pageSize) }

// Config reads the device config space (GET_CONFIG of Profile.ConfigSize
// bytes).
func (f *Frontend) Config() (BlkConfig, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.usable(); err != nil {
		return BlkConfig{}, err
	}
	if !f.hasProto(vu.ProtoConfig) {
		return BlkConfig{}, errors.New("frontend: CONFIG protocol feature not negotiated")
	}
	b, err := f.getConfig()
	if err != nil {
		return BlkConfig{}, err
	}
	return ParseBlkConfig(b), nil
}

func (f *Frontend) getConfig() ([]byte, error) {
	size := f.opts.Profile.ConfigSize
	if size == 0 || size > vu.MaxConfigSize {
		size = 60
	}
	m, err := f.call(vu.GetConfig, vu.Config{Size: size}.Marshal())
	if err != nil {
		return nil, err
	}
	return checkConfigReply(m.Payload, size)
}

// checkConfigReply validates a GET_CONFIG reply: the same offset and
// size as asked (a backend that cannot answer replies with size 0).
func checkConfigReply(p []byte, size uint32) ([]byte, error) {
	c, err := vu.ParseConfig(p)
	if err != nil {
		return nil, fmt.Errorf("GET_CONFIG reply: %w", err)
	}
	if c.Offset != 0 || c.Size != size {
		return nil, fmt.Errorf("GET_CONFIG reply for offset %d size %d, asked offset 0 size %d", c.Offset, c.Size, size)
	}
	return append([]byte(nil), c.Data...), nil
}

// SetWriteback writes the writeback field of the config space
// (SET_CONFIG; only meaningful with VIRTIO_BLK_F_CONFIG_WCE).
func (f *Frontend) SetWriteback(on bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.usable(); err != nil {
		return err
	}
	var b byte
	if on {
		b = 1
	}
	return f.sendMaybeAck(vu.SetConfig, vu.Config{Offset: 32, Size: 1, Data: []byte{b}}.Marshal())
}

// ConfigChanged is signalled when the backend sends CONFIG_CHANGE_MSG.
func (f *Frontend) ConfigChanged() <-chan struct{} { return f.configChanged }

// BackendError returns the first error on the backend channel, if any.
func (f *Frontend) BackendError() error {
	f.bmu.Lock()
	defer f.bmu.Unlock()
	return f.backendErr
}

func (f *Frontend) usable() error {
	if f.closed {
		return ErrClosed
	}
	if f.conn == nil {
		return errors.New("frontend: not connected")
	}
	return nil
}

// Stop stops every queue as QEMU does when the VM stops: SET_VRING_ENABLE 0
// and GET_VRING_BASE, whose replies Bases returns. The queues cannot be
// used afterwards (Reconnect starts them again).
func (f *Frontend) Stop() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.usable(); err != nil {
		return err
	}
	if f.stopped {
		return nil
	}
	f.bases = f.bases[:0]
	for _, q := range f.queues {
		if has(f.features, vu.FProtocolFeatures) {
			if err := f.send(vu.SetVringEnable, vu.VringState{Index: uint32(q.index)}.Marshal()); err != nil {
				return err
			}
		}
		m, err := f.call(vu.GetVringBase, vu.VringState{Index: uint32(q.index)}.Marshal())
		if err != nil {
			return err
		}
		s, err := vu.ParseVringState(m.Payload)
		if err != nil {
			return fmt.Errorf("frontend: GET_VRING_BASE reply: %w", err)
		}
		if s.Index != uint32(q.index) {
			return fmt.Errorf("frontend: GET_VRING_BASE for queue %d answered for queue %d", q.index, s.Index)
		}
		f.bases = append(f.bases, s.Num)
	}
	if f.hasProto(vu.ProtoStatus) {
		if err := f.send(vu.SetStatus, vu.U64(0)); err != nil {
			return err
		}
	}
	f.stopped = true
	return nil
}

// Bases returns what GET_VRING_BASE answered for each queue on Stop.
func (f *Frontend) Bases() []uint32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]uint32(nil), f.bases...)
}

// disconnect closes the sockets but keeps memory, rings, eventfds and
// the inflight buffer. Called with f.mu held.
func (f *Frontend) disconnect() {
	if f.conn != nil {
		f.conn.Close()
		f.conn = nil
	}
	if f.backend != nil {
		f.backend.Close()
		f.backend = nil
	}
	f.backendWG.Wait()
}

// Reconnect drops the connection and connects again like QEMU with
// reconnect=: a new handshake, SET_INFLIGHT_FD with the kept inflight
// buffer, and each vring based at the device's used index. Requests in
// flight stay in flight; their completions arrive after the reconnection
// (the backend resubmits them from the inflight buffer, or, without one,
// fetches again from the used index).
func (f *Frontend) Reconnect(ctx context.Context) error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return ErrClosed
	}
	f.disconnect()
	f.mu.Unlock()
	return f.connect(ctx, false)
}

// Close disconnects and frees everything. Safe to call twice.
func (f *Frontend) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	f.disconnect()
	f.mu.Unlock()
	for _, q := range f.queues {
		q.shutdown()
	}
	if f.inflightFD >= 0 {
		unix.Close(f.inflightFD)
		f.inflightFD = -1
	}
	f.mem.close()
	return nil
}

// Control-message helpers; all called with f.mu held.

func (f *Frontend) write(req vu.Request, flags uint32, payload []byte, fds ...int) error {
	if f.conn == nil {
		return errors.New("not connected")
	}
	if err := f.conn.Write(uint32(req), flags, payload, fds...); err != nil {
		return fmt.Errorf("send %v: %w", req, err)
	}
	return nil
}

func (f *Frontend) send(req vu.Request, payload []byte, fds ...int) error {
	return f.write(req, 0, payload, fds...)
}

// readReply reads the reply to req.
func (f *Frontend) readReply(req vu.Request) (vu.Message, error) {
	f.conn.UnixConn().SetReadDeadline(time.Now().Add(f.opts.Timeout))
	m, err := f.conn.Read()
	f.conn.UnixConn().SetReadDeadline(time.Time{})
	if err != nil {
		return m, fmt.Errorf("reply to %v: %w", req, err)
	}
	if m.Request() != req || m.Flags&vu.FlagReply == 0 {
		m.CloseFDs()
		return m, fmt.Errorf("reply to %v: got %v with flags %#x", req, m.Request(), m.Flags)
	}
	return m, nil
}

// call sends req and returns its reply (whose fds the caller owns).
func (f *Frontend) call(req vu.Request, payload []byte, fds ...int) (vu.Message, error) {
	if err := f.write(req, 0, payload, fds...); err != nil {
		return vu.Message{}, err
	}
	return f.readReply(req)
}

func (f *Frontend) getU64(req vu.Request) (uint64, error) {
	m, err := f.call(req, nil)
	if err != nil {
		return 0, err
	}
	m.CloseFDs()
	v, err := vu.ParseU64(m.Payload)
	if err != nil {
		return 0, fmt.Errorf("reply to %v: %w", req, err)
	}
	return v, nil
}

// sendMaybeAck sends req with NEED_REPLY when REPLY_ACK is negotiated and
// checks the ack (zero is success).
func (f *Frontend) sendMaybeAck(req vu.Request, payload []byte, fds ...int) error {
	if !f.hasProto(vu.ProtoReplyAck) {
		return f.send(req, payload, fds...)
	}
	if err := f.write(req, vu.FlagNeedReply, payload, fds...); err != nil {
		return err
	}
	m, err := f.readReply(req)
	if err != nil {
		return err
	}
	m.CloseFDs()
	v, err := vu.ParseU64(m.Payload)
	if err != nil {
		return fmt.Errorf("ack of %v: %w", req, err)
	}
	if v != 0 {
		return fmt.Errorf("%v failed in the backend (ack %d)", req, v)
	}
	return nil
}

// setupBackendChannel creates the socketpair and hands one end over.
func (f *Frontend) setupBackendChannel() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socketpair: %w", err)
	}
	file := os.NewFile(uintptr(fds[0]), "vhost-user-backend-channel")
	nc, err := net.FileConn(file)
	file.Close()
	if err != nil {
		unix.Close(fds[1])
		return fmt.Errorf("backend channel: %w", err)
	}
	err = f.sendMaybeAck(vu.SetBackendReqFD, nil, fds[1])
	unix.Close(fds[1])
	if err != nil {
		nc.Close()
		return err
	}
	bc := vu.NewConn(nc.(*net.UnixConn))
	f.backend = bc
	f.backendWG.Add(1)
	go f.serveBackend(bc)
	return nil
}
