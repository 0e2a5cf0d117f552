package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf8"
)

// The codec: every message of the handshake and the transmission phase as
// a Go value with an Append method (encode onto a byte slice) and a Parse
// function (decode a byte slice, checking every length against the bytes
// actually present before using it). Both the server here and a client
// (drivers/nbd) use it. Parse functions never allocate more than the input
// they are given.

// ErrProtocol is wrapped by every parse error: the peer broke the protocol.
var ErrProtocol = errors.New("nbd: protocol error")

func protoErr(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, a...)...)
}

var be = binary.BigEndian

// Fixed sizes of headers on the wire.
const (
	GreetingSize          = 18 // NBDMAGIC, IHAVEOPT, handshake flags
	OptionHeaderSize      = 16 // IHAVEOPT, option, length
	OptionReplyHeaderSize = 20 // reply magic, option, type, length
	RequestSize           = 28
	SimpleReplySize       = 16
	ChunkHeaderSize       = 20
	ExportNameReplySize   = 10 // size, flags; 124 zero bytes may follow
	exportNameZeroes      = 124
)

// checkString checks a string the spec bounds and forbids NULs in. Invalid
// UTF-8 is let through: the spec asks for UTF-8, but refusing a name byte
// sequence a client chose helps nobody, and we never interpret it.
func checkString(what string, b []byte) error {
	if len(b) > MaxStringLength {
		return protoErr("%s of %d bytes exceeds %d", what, len(b), MaxStringLength)
	}
	for _, c := range b {
		if c == 0 {
			return protoErr("%s contains NUL", what)
		}
	}
	return nil
}

// AppendGreeting appends the server's first message of newstyle negotiation.
func AppendGreeting(b []byte, handshakeFlags uint16) []byte {
	b = be.AppendUint64(b, MagicNBD)
	b = be.AppendUint64(b, MagicIHaveOpt)
	return be.AppendUint16(b, handshakeFlags)
}

// ParseGreeting checks a newstyle greeting and returns its handshake flags.
func ParseGreeting(b []byte) (uint16, error) {
	if len(b) != GreetingSize {
		return 0, protoErr("greeting of %d bytes", len(b))
	}
	if m := be.Uint64(b); m != MagicNBD {
		return 0, protoErr("bad greeting magic %#x", m)
	}
	if m := be.Uint64(b[8:]); m != MagicIHaveOpt {
		return 0, protoErr("not a newstyle server (magic %#x)", m)
	}
	return be.Uint16(b[16:]), nil
}

// OptionHeader is the fixed part of an option request; Length bytes of
// data follow it.
type OptionHeader struct {
	Option Opt
	Length uint32
}

// Append encodes h.
func (h OptionHeader) Append(b []byte) []byte {
	b = be.AppendUint64(b, MagicIHaveOpt)
	b = be.AppendUint32(b, uint32(h.Option))
	return be.AppendUint32(b, h.Length)
}

// ParseOptionHeader decodes an option header of OptionHeaderSize bytes.
func ParseOptionHeader(b []byte) (OptionHeader, error) {
	if len(b) != OptionHeaderSize {
		return OptionHeader{}, protoErr("option header of %d bytes", len(b))
	}
	if m := be.Uint64(b); m != MagicIHaveOpt {
		return OptionHeader{}, protoErr("bad option magic %#x", m)
	}
	return OptionHeader{Option: Opt(be.Uint32(b[8:])), Length: be.Uint32(b[12:])}, nil
}

// OptionReplyHeader is the fixed part of an option reply; Length bytes of
// data follow it.
type OptionReplyHeader struct {
	Option Opt
	Type   Rep
	Length uint32
}

// Append encodes h.
func (h OptionReplyHeader) Append(b []byte) []byte {
	b = be.AppendUint64(b, MagicOptReply)
	b = be.AppendUint32(b, uint32(h.Option))
	b = be.AppendUint32(b, uint32(h.Type))
	return be.AppendUint32(b, h.Length)
}

// ParseOptionReplyHeader decodes an option reply header.
func ParseOptionReplyHeader(b []byte) (OptionReplyHeader, error) {
	if len(b) != OptionReplyHeaderSize {
		return OptionReplyHeader{}, protoErr("option reply header of %d bytes", len(b))
	}
	if m := be.Uint64(b); m != MagicOptReply {
		return OptionReplyHeader{}, protoErr("bad option reply magic %#x", m)
	}
	return OptionReplyHeader{Option: Opt(be.Uint32(b[8:])), Type: Rep(be.Uint32(b[12:])), Length: be.Uint32(b[16:])}, nil
}

// ExportInfo is what NBD_OPT_EXPORT_NAME's reply and NBD_INFO_EXPORT carry.
type ExportInfo struct {
	Size  uint64
	Flags TransmissionFlags
}

// AppendExportNameReply encodes the reply to NBD_OPT_EXPORT_NAME, with the
// 124 zero bytes unless the client negotiated NBD_FLAG_C_NO_ZEROES.
func AppendExportNameReply(b []byte, e ExportInfo, noZeroes bool) []byte {
	b = be.AppendUint64(b, e.Size)
	b = be.AppendUint16(b, uint16(e.Flags))
	if !noZeroes {
		b = append(b, make([]byte, exportNameZeroes)...)
	}
	return b
}

// ParseExportNameReply decodes the first ExportNameReplySize bytes of the
// reply to NBD_OPT_EXPORT_NAME (the caller skips any zeroes).
func ParseExportNameReply(b []byte) (ExportInfo, error) {
	if len(b) != ExportNameReplySize {
		return ExportInfo{}, protoErr("export reply of %d bytes", len(b))
	}
	return ExportInfo{Size: be.Uint64(b), Flags: TransmissionFlags(be.Uint16(b[8:]))}, nil
}

// InfoRequest is the data of NBD_OPT_INFO and NBD_OPT_GO.
type InfoRequest struct {
	Name  string
	Infos []uint16 // NBD_INFO_* the client asks for
}

// Append encodes r.
func (r InfoRequest) Append(b []byte) []byte {
	b = be.AppendUint32(b, uint32(len(r.Name)))
	b = append(b, r.Name...)
	b = be.AppendUint16(b, uint16(len(r.Infos)))
	for _, i := range r.Infos {
		b = be.AppendUint16(b, i)
	}
	return b
}

// ParseInfoRequest decodes the data of NBD_OPT_INFO or NBD_OPT_GO. The data
// must be exactly as long as its counts say.
func ParseInfoRequest(b []byte) (InfoRequest, error) {
	if len(b) < 6 {
		return InfoRequest{}, protoErr("info request of %d bytes", len(b))
	}
	n := be.Uint32(b)
	if uint64(n) > uint64(len(b))-6 {
		return InfoRequest{}, protoErr("info request: name length %d exceeds option length %d - 6", n, len(b))
	}
	name := b[4 : 4+n]
	if err := checkString("export name", name); err != nil {
		return InfoRequest{}, err
	}
	rest := b[4+n:]
	count := int(be.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return InfoRequest{}, protoErr("info request: %d info requests need %d bytes, have %d", count, 2*count, len(rest))
	}
	r := InfoRequest{Name: string(name), Infos: make([]uint16, count)}
	for i := range count {
		r.Infos[i] = be.Uint16(rest[2*i:])
	}
	return r, nil
}

// MetaContextRequest is the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type MetaContextRequest struct {
	Name    string
	Queries []string
}

// Append encodes r.
func (r MetaContextRequest) Append(b []byte) []byte {
	b = be.AppendUint32(b, uint32(len(r.Name)))
	b = append(b, r.Name...)
	b = be.AppendUint32(b, uint32(len(r.Queries)))
	for _, q := range r.Queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// ParseMetaContextRequest decodes a meta-context option's data.
func ParseMetaContextRequest(b []byte) (MetaContextRequest, error) {
	if len(b) < 8 {
		return MetaContextRequest{}, protoErr("meta context request of %d bytes", len(b))
	}
	n := be.Uint32(b)
	if uint64(n) > uint64(len(b))-8 {
		return MetaContextRequest{}, protoErr("meta context request: name length %d exceeds option length %d - 8", n, len(b))
	}
	name := b[4 : 4+n]
	if err := checkString("export name", name); err != nil {
		return MetaContextRequest{}, err
	}
	rest := b[4+n:]
	count := be.Uint32(rest)
	rest = rest[4:]
	// Each query takes at least 4 bytes: bound the count by the data before
	// allocating for it.
	if uint64(count) > uint64(len(rest))/4 {
		return MetaContextRequest{}, protoErr("meta context request: %d queries in %d bytes", count, len(rest))
	}
	r := MetaContextRequest{Name: string(name), Queries: make([]string, 0, count)}
	for i := range count {
		if len(rest) < 4 {
			return MetaContextRequest{}, protoErr("meta context request: query %d truncated", i)
		}
		ql := be.Uint32(rest)
		rest = rest[4:]
		if uint64(ql) > uint64(len(rest)) {
			return MetaContextRequest{}, protoErr("meta context request: query %d length %d exceeds the %d bytes left", i, ql, len(rest))
		}
		q := rest[:ql]
		if err := checkString("meta context query", q); err != nil {
			return MetaContextRequest{}, err
		}
		r.Queries = append(r.Queries, string(q))
		rest = rest[ql:]
	}
	if len(rest) != 0 {
		return MetaContextRequest{}, protoErr("meta context request: %d bytes after the last query", len(rest))
	}
	return r, nil
}

// ServerReply is the data of NBD_REP_SERVER (one export of NBD_OPT_LIST).
type ServerReply struct {
	Name        string
	Description string
}

// Append encodes r.
func (r ServerReply) Append(b []byte) []byte {
	b = be.AppendUint32(b, uint32(len(r.Name)))
	b = append(b, r.Name...)
	return append(b, r.Description...)
}

// ParseServerReply decodes NBD_REP_SERVER data.
func ParseServerReply(b []byte) (ServerReply, error) {
	if len(b) < 4 {
		return ServerReply{}, protoErr("server reply of %d bytes", len(b))
	}
	n := be.Uint32(b)
	if uint64(n) > uint64(len(b))-4 {
		return ServerReply{}, protoErr("server reply: name length %d exceeds reply length %d - 4", n, len(b))
	}
	return ServerReply{Name: string(b[4 : 4+n]), Description: string(b[4+n:])}, nil
}

// Info is one NBD_REP_INFO; which fields mean something depends on Type.
type Info struct {
	Type uint16
	// InfoExport
	Export ExportInfo
	// InfoName, InfoDescription
	Text string
	// InfoBlockSize
	MinBlock, PrefBlock, MaxBlock uint32
}

// Append encodes i.
func (i Info) Append(b []byte) []byte {
	b = be.AppendUint16(b, i.Type)
	switch i.Type {
	case InfoExport:
		b = be.AppendUint64(b, i.Export.Size)
		b = be.AppendUint16(b, uint16(i.Export.Flags))
	case InfoName, InfoDescription:
		b = append(b, i.Text...)
	case InfoBlockSize:
		b = be.AppendUint32(b, i.MinBlock)
		b = be.AppendUint32(b, i.PrefBlock)
		b = be.AppendUint32(b, i.MaxBlock)
	}
	return b
}

// ParseInfo decodes NBD_REP_INFO data. An unknown type is returned with
// only Type set: clients must ignore what they do not understand.
func ParseInfo(b []byte) (Info, error) {
	if len(b) < 2 {
		return Info{}, protoErr("info reply of %d bytes", len(b))
	}
	i := Info{Type: be.Uint16(b)}
	p := b[2:]
	switch i.Type {
	case InfoExport:
		if len(p) != 10 {
			return Info{}, protoErr("NBD_INFO_EXPORT of %d bytes", len(b))
		}
		i.Export = ExportInfo{Size: be.Uint64(p), Flags: TransmissionFlags(be.Uint16(p[8:]))}
	case InfoName, InfoDescription:
		if err := checkString("info string", p); err != nil {
			return Info{}, err
		}
		i.Text = string(p)
	case InfoBlockSize:
		if len(p) != 12 {
			return Info{}, protoErr("NBD_INFO_BLOCK_SIZE of %d bytes", len(b))
		}
		i.MinBlock, i.PrefBlock, i.MaxBlock = be.Uint32(p), be.Uint32(p[4:]), be.Uint32(p[8:])
	}
	return i, nil
}

// MetaContextReply is the data of NBD_REP_META_CONTEXT.
type MetaContextReply struct {
	ID   uint32
	Name string
}

// Append encodes r.
func (r MetaContextReply) Append(b []byte) []byte {
	b = be.AppendUint32(b, r.ID)
	return append(b, r.Name...)
}

// ParseMetaContextReply decodes NBD_REP_META_CONTEXT data.
func ParseMetaContextReply(b []byte) (MetaContextReply, error) {
	if len(b) < 4 {
		return MetaContextReply{}, protoErr("meta context reply of %d bytes", len(b))
	}
	name := b[4:]
	if err := checkString("meta context name", name); err != nil {
		return MetaContextReply{}, err
	}
	if !utf8.Valid(name) {
		return MetaContextReply{}, protoErr("meta context name is not UTF-8")
	}
	return MetaContextReply{ID: be.Uint32(b), Name: string(name)}, nil
}

// Request is a transmission request header (compact form); a WRITE's
// Length bytes of payload follow it.
type Request struct {
	Flags  CmdFlags
	Type   Cmd
	Handle uint64
	Offset uint64
	Length uint32
}

// Append encodes r.
func (r Request) Append(b []byte) []byte {
	b = be.AppendUint32(b, MagicRequest)
	b = be.AppendUint16(b, uint16(r.Flags))
	b = be.AppendUint16(b, uint16(r.Type))
	b = be.AppendUint64(b, r.Handle)
	b = be.AppendUint64(b, r.Offset)
	return be.AppendUint32(b, r.Length)
}

// ParseRequest decodes a request header of RequestSize bytes.
func ParseRequest(b []byte) (Request, error) {
	if len(b) != RequestSize {
		return Request{}, protoErr("request header of %d bytes", len(b))
	}
	if m := be.Uint32(b); m != MagicRequest {
		return Request{}, protoErr("bad request magic %#x", m)
	}
	return Request{
		Flags:  CmdFlags(be.Uint16(b[4:])),
		Type:   Cmd(be.Uint16(b[6:])),
		Handle: be.Uint64(b[8:]),
		Offset: be.Uint64(b[16:]),
		Length: be.Uint32(b[24:]),
	}, nil
}

// SimpleReply is a simple reply header; a successful READ's data follows it.
type SimpleReply struct {
	Error  Errno
	Handle uint64
}

// Append encodes r.
func (r SimpleReply) Append(b []byte) []byte {
	b = be.AppendUint32(b, MagicSimpleReply)
	b = be.AppendUint32(b, uint32(r.Error))
	return be.AppendUint64(b, r.Handle)
}

// ParseSimpleReply decodes a simple reply header.
func ParseSimpleReply(b []byte) (SimpleReply, error) {
	if len(b) != SimpleReplySize {
		return SimpleReply{}, protoErr("simple reply of %d bytes", len(b))
	}
	if m := be.Uint32(b); m != MagicSimpleReply {
		return SimpleReply{}, protoErr("bad simple reply magic %#x", m)
	}
	return SimpleReply{Error: Errno(be.Uint32(b[4:])), Handle: be.Uint64(b[8:])}, nil
}

// ChunkHeader is a structured reply chunk header; Length bytes of payload
// follow it.
type ChunkHeader struct {
	Flags  uint16
	Type   ReplyType
	Handle uint64
	Length uint32
}

// Append encodes h.
func (h ChunkHeader) Append(b []byte) []byte {
	b = be.AppendUint32(b, MagicStructuredReply)
	b = be.AppendUint16(b, h.Flags)
	b = be.AppendUint16(b, uint16(h.Type))
	b = be.AppendUint64(b, h.Handle)
	return be.AppendUint32(b, h.Length)
}

// ParseChunkHeader decodes a chunk header.
func ParseChunkHeader(b []byte) (ChunkHeader, error) {
	if len(b) != ChunkHeaderSize {
		return ChunkHeader{}, protoErr("chunk header of %d bytes", len(b))
	}
	if m := be.Uint32(b); m != MagicStructuredReply {
		return ChunkHeader{}, protoErr("bad structured reply magic %#x", m)
	}
	return ChunkHeader{Flags: be.Uint16(b[4:]), Type: ReplyType(be.Uint16(b[6:])), Handle: be.Uint64(b[8:]), Length: be.Uint32(b[16:])}, nil
}

// ReplyMagic reads the magic at the start of a transmission reply, to tell
// a simple reply (16 bytes) from a chunk (20 bytes + payload).
func ReplyMagic(b []byte) uint32 {
	if len(b) < 4 {
		return 0
	}
	return be.Uint32(b)
}

// ErrorChunk is the payload of NBD_REPLY_TYPE_ERROR and _ERROR_OFFSET.
type ErrorChunk struct {
	Error   Errno
	Message string
	Offset  uint64 // NBD_REPLY_TYPE_ERROR_OFFSET only
}

// Append encodes c for the given chunk type; the message is cut to the
// spec's string limit.
func (c ErrorChunk) Append(b []byte, t ReplyType) []byte {
	msg := c.Message
	if len(msg) > MaxStringLength {
		msg = msg[:MaxStringLength]
	}
	b = be.AppendUint32(b, uint32(c.Error))
	b = be.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if t == ReplyTypeErrorOffset {
		b = be.AppendUint64(b, c.Offset)
	}
	return b
}

// ParseErrorChunk decodes an error chunk payload of type t (any type with
// bit 15 set; those other than ERROR_OFFSET are read as ERROR).
func ParseErrorChunk(t ReplyType, b []byte) (ErrorChunk, error) {
	if len(b) < 6 {
		return ErrorChunk{}, protoErr("error chunk of %d bytes", len(b))
	}
	c := ErrorChunk{Error: Errno(be.Uint32(b))}
	if c.Error == 0 {
		return ErrorChunk{}, protoErr("error chunk with error 0")
	}
	ml := int(be.Uint16(b[4:]))
	rest := b[6:]
	if ml > len(rest) {
		return ErrorChunk{}, protoErr("error chunk: message length %d exceeds the %d bytes left", ml, len(rest))
	}
	c.Message = string(rest[:ml])
	rest = rest[ml:]
	if t == ReplyTypeErrorOffset {
		if len(rest) != 8 {
			return ErrorChunk{}, protoErr("error offset chunk: %d bytes after the message", len(rest))
		}
		c.Offset = be.Uint64(rest)
	}
	return c, nil
}

// Extent is one block status descriptor.
type Extent struct {
	Length uint32
	Flags  uint32
}

// AppendBlockStatus encodes an NBD_REPLY_TYPE_BLOCK_STATUS payload.
func AppendBlockStatus(b []byte, id uint32, extents []Extent) []byte {
	b = be.AppendUint32(b, id)
	for _, e := range extents {
		b = be.AppendUint32(b, e.Length)
		b = be.AppendUint32(b, e.Flags)
	}
	return b
}

// ParseBlockStatus decodes an NBD_REPLY_TYPE_BLOCK_STATUS payload.
func ParseBlockStatus(b []byte) (id uint32, extents []Extent, err error) {
	if len(b) < 12 || (len(b)-4)%8 != 0 {
		return 0, nil, protoErr("block status chunk of %d bytes", len(b))
	}
	id = be.Uint32(b)
	extents = make([]Extent, 0, (len(b)-4)/8)
	for p := b[4:]; len(p) > 0; p = p[8:] {
		e := Extent{Length: be.Uint32(p), Flags: be.Uint32(p[4:])}
		if e.Length == 0 {
			return 0, nil, protoErr("block status extent of length 0")
		}
		extents = append(extents, e)
	}
	return id, extents, nil
}

// OffsetHole is the payload of NBD_REPLY_TYPE_OFFSET_HOLE.
type OffsetHole struct {
	Offset uint64
	Length uint32
}

// Append encodes h.
func (h OffsetHole) Append(b []byte) []byte {
	b = be.AppendUint64(b, h.Offset)
	return be.AppendUint32(b, h.Length)
}

// ParseOffsetHole decodes an NBD_REPLY_TYPE_OFFSET_HOLE payload.
func ParseOffsetHole(b []byte) (OffsetHole, error) {
	if len(b) != 12 {
		return OffsetHole{}, protoErr("offset hole chunk of %d bytes", len(b))
	}
	h := OffsetHole{Offset: be.Uint64(b), Length: be.Uint32(b[8:])}
	if h.Length == 0 {
		return OffsetHole{}, protoErr("offset hole of length 0")
	}
	return h, nil
}
