// Package vhostuser implements the backend side of the vhost-user protocol
// (QEMU's docs/interop/vhost-user.rst) and, on top of it, the virtio-blk
// device that serves a graph node to a QEMU guest.
//
// This file and conn.go are the wire codec: message numbers, feature bits,
// the 12-byte header and the fixed payload layouts, shared by the backend
// here and by the Go frontend in vhostuser/frontend. The data path (guest
// memory, rings, inflight tracking) lives in vhostuser/virtq.
//
// Everything on the socket is native-endian (little-endian on every host
// we build for), as the specification says.
package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Request is a frontend-to-backend message type.
type Request uint32

// Frontend message types, numbered as in vhost-user.rst.
const (
	GetFeatures         Request = 1
	SetFeatures         Request = 2
	SetOwner            Request = 3
	ResetOwner          Request = 4
	SetMemTable         Request = 5
	SetLogBase          Request = 6
	SetLogFD            Request = 7
	SetVringNum         Request = 8
	SetVringAddr        Request = 9
	SetVringBase        Request = 10
	GetVringBase        Request = 11
	SetVringKick        Request = 12
	SetVringCall        Request = 13
	SetVringErr         Request = 14
	GetProtocolFeatures Request = 15
	SetProtocolFeatures Request = 16
	GetQueueNum         Request = 17
	SetVringEnable      Request = 18
	SendRARP            Request = 19
	NetSetMTU           Request = 20
	SetBackendReqFD     Request = 21
	IOTLBMsg            Request = 22
	SetVringEndian      Request = 23
	GetConfig           Request = 24
	SetConfig           Request = 25
	CreateCryptoSession Request = 26
	CloseCryptoSession  Request = 27
	PostcopyAdvise      Request = 28
	PostcopyListen      Request = 29
	PostcopyEnd         Request = 30
	GetInflightFD       Request = 31
	SetInflightFD       Request = 32
	GPUSetSocket        Request = 33
	ResetDevice         Request = 34
	VringKick           Request = 35
	GetMaxMemSlots      Request = 36
	AddMemReg           Request = 37
	RemMemReg           Request = 38
	SetStatus           Request = 39
	GetStatus           Request = 40
)

var requestNames = [...]string{
	GetFeatures: "GET_FEATURES", SetFeatures: "SET_FEATURES", SetOwner: "SET_OWNER",
	ResetOwner: "RESET_OWNER", SetMemTable: "SET_MEM_TABLE", SetLogBase: "SET_LOG_BASE",
	SetLogFD: "SET_LOG_FD", SetVringNum: "SET_VRING_NUM", SetVringAddr: "SET_VRING_ADDR",
	SetVringBase: "SET_VRING_BASE", GetVringBase: "GET_VRING_BASE", SetVringKick: "SET_VRING_KICK",
	SetVringCall: "SET_VRING_CALL", SetVringErr: "SET_VRING_ERR",
	GetProtocolFeatures: "GET_PROTOCOL_FEATURES", SetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	GetQueueNum: "GET_QUEUE_NUM", SetVringEnable: "SET_VRING_ENABLE", SendRARP: "SEND_RARP",
	NetSetMTU: "NET_SET_MTU", SetBackendReqFD: "SET_BACKEND_REQ_FD", IOTLBMsg: "IOTLB_MSG",
	SetVringEndian: "SET_VRING_ENDIAN", GetConfig: "GET_CONFIG", SetConfig: "SET_CONFIG",
	CreateCryptoSession: "CREATE_CRYPTO_SESSION", CloseCryptoSession: "CLOSE_CRYPTO_SESSION",
	PostcopyAdvise: "POSTCOPY_ADVISE", PostcopyListen: "POSTCOPY_LISTEN", PostcopyEnd: "POSTCOPY_END",
	GetInflightFD: "GET_INFLIGHT_FD", SetInflightFD: "SET_INFLIGHT_FD", GPUSetSocket: "GPU_SET_SOCKET",
	ResetDevice: "RESET_DEVICE", VringKick: "VRING_KICK", GetMaxMemSlots: "GET_MAX_MEM_SLOTS",
	AddMemReg: "ADD_MEM_REG", RemMemReg: "REM_MEM_REG", SetStatus: "SET_STATUS", GetStatus: "GET_STATUS",
}

func (r Request) String() string {
	if int(r) < len(requestNames) && requestNames[r] != "" {
		return requestNames[r]
	}
	return fmt.Sprintf("request %d", uint32(r))
}

// BackendRequest is a backend-to-frontend message type (sent on the
// channel the frontend hands over with SET_BACKEND_REQ_FD).
type BackendRequest uint32

// Backend message types.
const (
	BackendIOTLBMsg             BackendRequest = 1
	BackendConfigChangeMsg      BackendRequest = 2
	BackendVringHostNotifierMsg BackendRequest = 3
	BackendVringCall            BackendRequest = 4
	BackendVringErr             BackendRequest = 5
)

// Protocol feature bit numbers (GET/SET_PROTOCOL_FEATURES).
const (
	ProtoMQ                  = 0
	ProtoLogShmfd            = 1
	ProtoRARP                = 2
	ProtoReplyAck            = 3
	ProtoMTU                 = 4
	ProtoBackendReq          = 5
	ProtoCrossEndian         = 6
	ProtoCryptoSession       = 7
	ProtoPagefault           = 8
	ProtoConfig              = 9
	ProtoBackendSendFD       = 10
	ProtoHostNotifier        = 11
	ProtoInflightShmfd       = 12
	ProtoResetDevice         = 13
	ProtoInbandNotifications = 14
	ProtoConfigureMemSlots   = 15
	ProtoStatus              = 16
)

// Virtio and vhost feature bit numbers (GET/SET_FEATURES).
const (
	FLogAll           = 26 // VHOST_F_LOG_ALL: dirty logging for migration
	FRingIndirectDesc = 28
	FRingEventIdx     = 29
	FProtocolFeatures = 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FVersion1         = 32
	FAccessPlatform   = 33
	FRingPacked       = 34
	FInOrder          = 35
)

// Header flags.
const (
	FlagVersion   = 0x1 // the protocol version, in bits 0-1
	FlagReply     = 0x4
	FlagNeedReply = 0x8
	versionMask   = 0x3
)

// HeaderSize is the size of the message header on the wire.
const HeaderSize = 12

// MaxPayload bounds the payload we accept. The largest fixed layout is
// SET_MEM_TABLE's (8 + 8*32 bytes) and GET/SET_CONFIG's (12 + 256); the
// bound leaves room for newer, larger messages we only skip.
const MaxPayload = 4096

// MaxFDs is the most file descriptors one message carries (the eight
// regions of SET_MEM_TABLE).
const MaxFDs = 8

// MaxConfigSize is the largest device config space GET/SET_CONFIG moves.
const MaxConfigSize = 256

// Header is the fixed part of every message.
type Header struct {
	Request uint32
	Flags   uint32
	Size    uint32
}

// ErrShortPayload reports a payload smaller than its message's layout.
var ErrShortPayload = errors.New("vhost-user payload too short")

var le = binary.LittleEndian

func need(p []byte, n int, what string) error {
	if len(p) < n {
		return fmt.Errorf("%s: %w (%d bytes, need %d)", what, ErrShortPayload, len(p), n)
	}
	return nil
}

// U64 encodes a u64 payload.
func U64(v uint64) []byte { return le.AppendUint64(nil, v) }

// ParseU64 decodes a u64 payload.
func ParseU64(p []byte) (uint64, error) {
	if err := need(p, 8, "u64"); err != nil {
		return 0, err
	}
	return le.Uint64(p), nil
}

// VringState is the payload of SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE.
type VringState struct{ Index, Num uint32 }

// Marshal encodes s.
func (s VringState) Marshal() []byte {
	return le.AppendUint32(le.AppendUint32(nil, s.Index), s.Num)
}

// ParseVringState decodes a vring state payload.
func ParseVringState(p []byte) (VringState, error) {
	if err := need(p, 8, "vring state"); err != nil {
		return VringState{}, err
	}
	return VringState{le.Uint32(p), le.Uint32(p[4:])}, nil
}

// VringAddrFlagLog asks for used-ring dirty logging (VHOST_VRING_F_LOG).
const VringAddrFlagLog = 1

// VringAddr is the payload of SET_VRING_ADDR. The addresses are the
// frontend's user addresses, except Log, a guest physical address.
type VringAddr struct {
	Index, Flags           uint32
	Desc, Used, Avail, Log uint64
}

// Marshal encodes a.
func (a VringAddr) Marshal() []byte {
	b := le.AppendUint32(le.AppendUint32(nil, a.Index), a.Flags)
	for _, v := range [...]uint64{a.Desc, a.Used, a.Avail, a.Log} {
		b = le.AppendUint64(b, v)
	}
	return b
}

// ParseVringAddr decodes a vring address payload.
func ParseVringAddr(p []byte) (VringAddr, error) {
	if err := need(p, 40, "vring address"); err != nil {
		return VringAddr{}, err
	}
	return VringAddr{Index: le.Uint32(p), Flags: le.Uint32(p[4:]),
		Desc: le.Uint64(p[8:]), Used: le.Uint64(p[16:]), Avail: le.Uint64(p[24:]), Log: le.Uint64(p[32:])}, nil
}

// MemRegion describes one region of guest memory.
type MemRegion struct {
	GuestAddr, Size, UserAddr, MmapOffset uint64
}

const memRegionSize = 32

func (r MemRegion) append(b []byte) []byte {
	for _, v := range [...]uint64{r.GuestAddr, r.Size, r.UserAddr, r.MmapOffset} {
		b = le.AppendUint64(b, v)
	}
	return b
}

func parseMemRegion(p []byte) MemRegion {
	return MemRegion{le.Uint64(p), le.Uint64(p[8:]), le.Uint64(p[16:]), le.Uint64(p[24:])}
}

// MemTable is the payload of SET_MEM_TABLE; each region comes with one fd.
type MemTable struct{ Regions []MemRegion }

// Marshal encodes t with exactly its regions, as QEMU does.
func (t MemTable) Marshal() []byte {
	b := le.AppendUint32(le.AppendUint32(nil, uint32(len(t.Regions))), 0)
	for _, r := range t.Regions {
		b = r.append(b)
	}
	return b
}

// ParseMemTable decodes a memory table payload.
func ParseMemTable(p []byte) (MemTable, error) {
	if err := need(p, 8, "memory table"); err != nil {
		return MemTable{}, err
	}
	n := le.Uint32(p)
	if n > MaxFDs {
		return MemTable{}, fmt.Errorf("memory table: %d regions, at most %d allowed", n, MaxFDs)
	}
	if err := need(p, 8+int(n)*memRegionSize, "memory table"); err != nil {
		return MemTable{}, err
	}
	t := MemTable{Regions: make([]MemRegion, n)}
	for i := range t.Regions {
		t.Regions[i] = parseMemRegion(p[8+i*memRegionSize:])
	}
	return t, nil
}

// MemRegionMsg is the payload of ADD_MEM_REG and REM_MEM_REG.
type MemRegionMsg struct{ Region MemRegion }

// Marshal encodes m.
func (m MemRegionMsg) Marshal() []byte { return m.Region.append(le.AppendUint64(nil, 0)) }

// ParseMemRegionMsg decodes a single-region payload.
func ParseMemRegionMsg(p []byte) (MemRegionMsg, error) {
	if err := need(p, 8+memRegionSize, "memory region"); err != nil {
		return MemRegionMsg{}, err
	}
	return MemRegionMsg{parseMemRegion(p[8:])}, nil
}

// ConfigFlagLiveMigration marks a SET_CONFIG sent during migration.
const ConfigFlagLiveMigration = 1

// Config is the payload of GET_CONFIG and SET_CONFIG.
type Config struct {
	Offset, Size, Flags uint32
	Data                []byte
}

// Marshal encodes c; Data is padded or cut to Size.
func (c Config) Marshal() []byte {
	b := le.AppendUint32(le.AppendUint32(le.AppendUint32(nil, c.Offset), c.Size), c.Flags)
	d := make([]byte, c.Size)
	copy(d, c.Data)
	return append(b, d...)
}

// ParseConfig decodes a config payload. Data aliases p.
func ParseConfig(p []byte) (Config, error) {
	if err := need(p, 12, "config"); err != nil {
		return Config{}, err
	}
	c := Config{Offset: le.Uint32(p), Size: le.Uint32(p[4:]), Flags: le.Uint32(p[8:])}
	if c.Size > MaxConfigSize {
		return Config{}, fmt.Errorf("config: size %d exceeds %d", c.Size, MaxConfigSize)
	}
	if err := need(p, 12+int(c.Size), "config"); err != nil {
		return Config{}, err
	}
	c.Data = p[12 : 12+c.Size]
	return c, nil
}

// Inflight is the payload of GET_INFLIGHT_FD and SET_INFLIGHT_FD.
type Inflight struct {
	MmapSize, MmapOffset uint64
	NumQueues, QueueSize uint16
}

// Marshal encodes i, padded to 24 bytes as the C layout is.
func (i Inflight) Marshal() []byte {
	b := le.AppendUint64(le.AppendUint64(nil, i.MmapSize), i.MmapOffset)
	b = le.AppendUint16(le.AppendUint16(b, i.NumQueues), i.QueueSize)
	return append(b, 0, 0, 0, 0)
}

// ParseInflight decodes an inflight payload.
func ParseInflight(p []byte) (Inflight, error) {
	if err := need(p, 20, "inflight"); err != nil {
		return Inflight{}, err
	}
	return Inflight{le.Uint64(p), le.Uint64(p[8:]), le.Uint16(p[16:]), le.Uint16(p[18:])}, nil
}

// Log is the payload of SET_LOG_BASE.
type Log struct{ MmapSize, MmapOffset uint64 }

// Marshal encodes l.
func (l Log) Marshal() []byte { return le.AppendUint64(le.AppendUint64(nil, l.MmapSize), l.MmapOffset) }

// ParseLog decodes a log payload.
func ParseLog(p []byte) (Log, error) {
	if err := need(p, 16, "log"); err != nil {
		return Log{}, err
	}
	return Log{le.Uint64(p), le.Uint64(p[8:])}, nil
}
