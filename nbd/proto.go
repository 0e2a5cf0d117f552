package nbd

import "fmt"

// Magic numbers ("Handshake", "Request message", "Simple reply message",
// "Structured reply chunk message" in proto.md). All integers on the wire
// are big-endian.
const (
	MagicNBD             uint64 = 0x4e42444d41474943 // "NBDMAGIC", the INIT_PASSWD
	MagicIHaveOpt        uint64 = 0x49484156454F5054 // "IHAVEOPT": newstyle greeting and option requests
	MagicOptReply        uint64 = 0x3e889045565a9    // option replies
	MagicRequest         uint32 = 0x25609513
	MagicSimpleReply     uint32 = 0x67446698
	MagicStructuredReply uint32 = 0x668e33ef
	MagicExtendedRequest uint32 = 0x21e41c71 // extended headers: not built; seen only to reject it
)

// Handshake flags (server, 16 bits).
const (
	FlagFixedNewstyle uint16 = 1 << 0
	FlagNoZeroes      uint16 = 1 << 1
)

// Client flags (32 bits).
const (
	FlagCFixedNewstyle uint32 = 1 << 0
	FlagCNoZeroes      uint32 = 1 << 1
)

// TransmissionFlags are the 16 transmission flags sent with the export size.
type TransmissionFlags uint16

// Transmission flags.
const (
	FlagHasFlags        TransmissionFlags = 1 << 0
	FlagReadOnly        TransmissionFlags = 1 << 1
	FlagSendFlush       TransmissionFlags = 1 << 2
	FlagSendFUA         TransmissionFlags = 1 << 3
	FlagRotational      TransmissionFlags = 1 << 4
	FlagSendTrim        TransmissionFlags = 1 << 5
	FlagSendWriteZeroes TransmissionFlags = 1 << 6
	FlagSendDF          TransmissionFlags = 1 << 7
	FlagCanMultiConn    TransmissionFlags = 1 << 8
	FlagSendResize      TransmissionFlags = 1 << 9
	FlagSendCache       TransmissionFlags = 1 << 10
	FlagSendFastZero    TransmissionFlags = 1 << 11
)

// Opt is an option type of the handshake.
type Opt uint32

// Option types.
const (
	OptExportName      Opt = 1
	OptAbort           Opt = 2
	OptList            Opt = 3
	OptPeekExport      Opt = 4 // withdrawn
	OptStartTLS        Opt = 5
	OptInfo            Opt = 6
	OptGo              Opt = 7
	OptStructuredReply Opt = 8
	OptListMetaContext Opt = 9
	OptSetMetaContext  Opt = 10
	OptExtendedHeaders Opt = 11
)

var optNames = map[Opt]string{
	OptExportName: "NBD_OPT_EXPORT_NAME", OptAbort: "NBD_OPT_ABORT", OptList: "NBD_OPT_LIST",
	OptPeekExport: "NBD_OPT_PEEK_EXPORT", OptStartTLS: "NBD_OPT_STARTTLS", OptInfo: "NBD_OPT_INFO",
	OptGo: "NBD_OPT_GO", OptStructuredReply: "NBD_OPT_STRUCTURED_REPLY",
	OptListMetaContext: "NBD_OPT_LIST_META_CONTEXT", OptSetMetaContext: "NBD_OPT_SET_META_CONTEXT",
	OptExtendedHeaders: "NBD_OPT_EXTENDED_HEADERS",
}

func (o Opt) String() string {
	if s, ok := optNames[o]; ok {
		return s
	}
	return fmt.Sprintf("NBD_OPT(%d)", uint32(o))
}

// Rep is an option reply type. Error replies have bit 31 set.
type Rep uint32

// Option reply types.
const (
	RepAck              Rep = 1
	RepServer           Rep = 2
	RepInfo             Rep = 3
	RepMetaContext      Rep = 4
	RepErrUnsup         Rep = 1<<31 + 1
	RepErrPolicy        Rep = 1<<31 + 2
	RepErrInvalid       Rep = 1<<31 + 3
	RepErrPlatform      Rep = 1<<31 + 4
	RepErrTLSReqd       Rep = 1<<31 + 5
	RepErrUnknown       Rep = 1<<31 + 6
	RepErrShutdown      Rep = 1<<31 + 7
	RepErrBlockSizeReqd Rep = 1<<31 + 8
	RepErrTooBig        Rep = 1<<31 + 9
	RepErrExtHeaderReqd Rep = 1<<31 + 10
)

// IsError reports whether r is an error reply (bit 31 set).
func (r Rep) IsError() bool { return r&(1<<31) != 0 }

var repNames = map[Rep]string{
	RepAck: "NBD_REP_ACK", RepServer: "NBD_REP_SERVER", RepInfo: "NBD_REP_INFO",
	RepMetaContext: "NBD_REP_META_CONTEXT", RepErrUnsup: "NBD_REP_ERR_UNSUP",
	RepErrPolicy: "NBD_REP_ERR_POLICY", RepErrInvalid: "NBD_REP_ERR_INVALID",
	RepErrPlatform: "NBD_REP_ERR_PLATFORM", RepErrTLSReqd: "NBD_REP_ERR_TLS_REQD",
	RepErrUnknown: "NBD_REP_ERR_UNKNOWN", RepErrShutdown: "NBD_REP_ERR_SHUTDOWN",
	RepErrBlockSizeReqd: "NBD_REP_ERR_BLOCK_SIZE_REQD", RepErrTooBig: "NBD_REP_ERR_TOO_BIG",
	RepErrExtHeaderReqd: "NBD_REP_ERR_EXT_HEADER_REQD",
}

func (r Rep) String() string {
	if s, ok := repNames[r]; ok {
		return s
	}
	return fmt.Sprintf("NBD_REP(%#x)", uint32(r))
}

// Info types of NBD_REP_INFO (and of the requests in NBD_OPT_INFO/GO).
const (
	InfoExport      uint16 = 0
	InfoName        uint16 = 1
	InfoDescription uint16 = 2
	InfoBlockSize   uint16 = 3
)

// Cmd is a transmission request type.
type Cmd uint16

// Request types.
const (
	CmdRead        Cmd = 0
	CmdWrite       Cmd = 1
	CmdDisc        Cmd = 2
	CmdFlush       Cmd = 3
	CmdTrim        Cmd = 4
	CmdCache       Cmd = 5
	CmdWriteZeroes Cmd = 6
	CmdBlockStatus Cmd = 7
	CmdResize      Cmd = 8 // experimental; not built
)

var cmdNames = map[Cmd]string{
	CmdRead: "NBD_CMD_READ", CmdWrite: "NBD_CMD_WRITE", CmdDisc: "NBD_CMD_DISC",
	CmdFlush: "NBD_CMD_FLUSH", CmdTrim: "NBD_CMD_TRIM", CmdCache: "NBD_CMD_CACHE",
	CmdWriteZeroes: "NBD_CMD_WRITE_ZEROES", CmdBlockStatus: "NBD_CMD_BLOCK_STATUS",
	CmdResize: "NBD_CMD_RESIZE",
}

func (c Cmd) String() string {
	if s, ok := cmdNames[c]; ok {
		return s
	}
	return fmt.Sprintf("NBD_CMD(%d)", uint16(c))
}

// CmdFlags are a request's command flags.
type CmdFlags uint16

// Command flags.
const (
	CmdFlagFUA        CmdFlags = 1 << 0
	CmdFlagNoHole     CmdFlags = 1 << 1
	CmdFlagDF         CmdFlags = 1 << 2
	CmdFlagReqOne     CmdFlags = 1 << 3
	CmdFlagFastZero   CmdFlags = 1 << 4
	CmdFlagPayloadLen CmdFlags = 1 << 5 // extended headers only
)

// ReplyType is a structured reply chunk type; error chunks have bit 15 set.
type ReplyType uint16

// Structured reply chunk types.
const (
	ReplyTypeNone        ReplyType = 0
	ReplyTypeOffsetData  ReplyType = 1
	ReplyTypeOffsetHole  ReplyType = 2
	ReplyTypeBlockStatus ReplyType = 5
	ReplyTypeError       ReplyType = 1<<15 + 1
	ReplyTypeErrorOffset ReplyType = 1<<15 + 2
)

// IsError reports whether t is an error chunk type.
func (t ReplyType) IsError() bool { return t&(1<<15) != 0 }

// ReplyFlagDone marks the final chunk of a structured reply.
const ReplyFlagDone uint16 = 1 << 0

// base:allocation status flags.
const (
	StateHole uint32 = 1 << 0
	StateZero uint32 = 1 << 1
)

// MetaContextBaseAllocation is the one metadata context this package offers.
const MetaContextBaseAllocation = "base:allocation"

// Limits.
const (
	// MaxStringLength is the spec's bound on every string (export names,
	// descriptions, queries, error messages).
	MaxStringLength = 4096
	// MaxOptionLength bounds the data of one option: the largest option we
	// understand is a meta-context request naming a 4096-byte export with
	// a couple of queries, or NBD_OPT_GO with its info list.
	MaxOptionLength = 16 << 10
	// maxDiscardOption: longer options (up to this) are read and thrown
	// away, then answered NBD_REP_ERR_TOO_BIG; beyond it the client is
	// treated as hostile and disconnected.
	maxDiscardOption = 1 << 20
	// MaxPayload is NBD_MAX_BUFFER_SIZE: the largest READ or WRITE payload
	// (2^25); the spec says a shorter one "SHOULD NOT be considered a denial
	// of service attack", and QEMU's server uses the same bound.
	MaxPayload = 32 << 20
	// MaxInFlight bounds the requests of one connection being served at once.
	MaxInFlight = 32
	// MaxInFlightBytes bounds the READ/WRITE buffers one connection holds.
	MaxInFlightBytes = 64 << 20
)

// Default block size constraints (proto.md "Block size constraints"),
// used when an Export leaves them 0.
const (
	DefaultMinBlock  = 1
	DefaultPrefBlock = 4096
	DefaultMaxBlock  = MaxPayload
)
