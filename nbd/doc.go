// Package nbd speaks the Network Block Device protocol: a wire codec for
// every message of the fixed-newstyle handshake and of the transmission
// phase, and a server that serves named exports to NBD clients (QEMU 7.2's
// nbd block driver — qemu-img, qemu-io, qemu-nbd --connect — and libnbd's
// nbdinfo, nbdcopy and nbdsh).
//
// It follows the protocol document of the reference implementation,
// NetworkBlockDevice/nbd doc/proto.md: "Fixed newstyle negotiation", "Option
// types" (EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
// LIST_META_CONTEXT, SET_META_CONTEXT), "Block size constraints", "Metadata
// querying" (the base:allocation context), "Structured reply chunk message"
// and "Request types" (READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES,
// BLOCK_STATUS).
//
// # Why a top-level package
//
// The protocol has two users in blockbackend: the NBD export (package
// nbd/nbdexport, which adapts graph nodes to [Backend] and owns the process's
// server) and, later, the nbd protocol driver under drivers/nbd, a client.
// Drivers must not import each other or the export layer, and the codec
// belongs to neither side, so it lives here, beside the server that uses it.
// A client built on the codec belongs in drivers/nbd, not here.
//
// # What it is not
//
// It does not speak oldstyle negotiation (removed from the reference
// server in 3.10; QEMU ≥ 2.6 clients use fixed newstyle), nor TLS
// (NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY: this server runs
// in the spec's NOTLS mode), nor extended headers (NBD_OPT_EXTENDED_HEADERS
// gets NBD_REP_ERR_UNSUP, so clients fall back to compact headers), nor
// NBD_CMD_RESIZE. It offers one metadata context, base:allocation; QEMU's
// qemu:dirty-bitmap and qemu:allocation-depth are not built. It knows
// nothing of the block graph: the export layer gives it a [Backend].
//
// # Server behaviour a client can observe
//
//   - Every length the client sends is bounded before anything is
//     allocated: option data to [MaxOptionLength] (longer options up to
//     1 MiB are read, thrown away and answered NBD_REP_ERR_TOO_BIG; longer
//     still end the connection), strings to [MaxStringLength], READ and
//     WRITE to the export's maximum block size (at most [MaxPayload],
//     32 MiB). A WRITE whose payload is longer than [MaxPayload] ends the
//     connection, as the spec allows for payloads "large enough to be
//     deemed a denial of service attack"; one longer than the export's
//     maximum block size but within [MaxPayload] is read and failed
//     with EINVAL.
//   - A request beyond the end of the export fails with EINVAL, or with
//     ENOSPC for WRITE and WRITE_ZEROES, as the spec's "Error values"
//     section asks; the connection stays up. An unknown command or command
//     flag fails with EINVAL. A request with a bad magic ends the
//     connection.
//   - Requests from one connection run concurrently, up to
//     [MaxInFlight] at once and [MaxInFlightBytes] of READ and WRITE
//     buffers; replies are written whole under a mutex, in completion
//     order.
//   - With structured replies, READ answers with one
//     NBD_REPLY_TYPE_OFFSET_DATA chunk (never fragmented, so
//     NBD_FLAG_SEND_DF is offered) and errors are NBD_REPLY_TYPE_ERROR
//     chunks with a message; other successful replies are simple replies,
//     which the spec allows for replies without payload.
//   - NBD_INFO_BLOCK_SIZE is always sent. A minimum block size above 1 is
//     enforced only for clients that asked for it; others get
//     NBD_REP_ERR_BLOCK_SIZE_REQD to NBD_OPT_GO and a hard disconnect on
//     NBD_OPT_EXPORT_NAME, as the "Block size constraints" section allows.
//   - The handshake must finish within ServerOptions.HandshakeTimeout
//     (10 s by default, like QEMU's server).
//
// # Concurrency and lock order
//
// Server.mu guards the export registry and the set of connections; a
// connection's own mu guards its export and draining state; its wmu
// serialises reply writes. Order: Server.mu, then conn.mu; wmu is never
// held while taking either. No lock is held across a backend call.
package nbd
