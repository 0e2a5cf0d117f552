package frontend

import vu "blockbackend/vhostuser"

// Virtio-blk feature bits (virtio spec 1.2, 5.2.3) and the transport-generic
// ones a block frontend deals with.
const (
	BlkFSizeMax     = 1
	BlkFSegMax      = 2
	BlkFGeometry    = 4
	BlkFRO          = 5
	BlkFBlkSize     = 6
	BlkFFlush       = 9
	BlkFTopology    = 10
	BlkFConfigWCE   = 11
	BlkFMQ          = 12
	BlkFDiscard     = 13
	BlkFWriteZeroes = 14
	BlkFLifetime    = 15
	BlkFSecureErase = 16
	FNotifyOnEmpty  = 24
)

// Profile is what one frontend offers: the virtio features it accepts (the
// backend's offer is ANDed with Features) and the protocol features it
// knows (ANDed with GET_PROTOCOL_FEATURES). ConfigSize is how many bytes of
// virtio_blk_config it reads with GET_CONFIG.
type Profile struct {
	Name             string
	Features         uint64
	ProtocolFeatures uint64
	ConfigSize       uint32
}

func bits(b ...int) uint64 {
	var v uint64
	for _, n := range b {
		v |= 1 << n
	}
	return v
}

// The block features every QEMU vhost-user-blk frontend has asked for since
// the device appeared in 2.12: size_max, seg_max, geometry, blk_size,
// topology, mq, ro, flush, config-wce, plus VERSION_1, the two ring
// features and NOTIFY_ON_EMPTY. VHOST_USER_F_PROTOCOL_FEATURES is
// vhost-user's own bit and always accepted.
var blkBase = bits(BlkFSizeMax, BlkFSegMax, BlkFGeometry, BlkFBlkSize, BlkFTopology, BlkFMQ, BlkFRO,
	BlkFFlush, BlkFConfigWCE, vu.FVersion1, vu.FRingIndirectDesc, vu.FRingEventIdx, FNotifyOnEmpty,
	vu.FProtocolFeatures)

// Protocol feature sets: QEMU's frontend acks every protocol bit it has a
// number for (its mask is "all bits below the highest known"), so each
// release knows the bits defined up to then in vhost-user.rst.
var (
	// QEMU212 is QEMU 2.12, where vhost-user-blk appeared. Protocol bits
	// 0-9 (MQ .. CONFIG; CONFIG was added for this device and is
	// required by it). Block features: the base set (no discard or
	// write-zeroes: those came with 4.0). GET_CONFIG reads the 36 bytes
	// the virtio_blk_config of that time had (through num_queues).
	QEMU212 = Profile{
		Name:             "qemu-2.12",
		Features:         blkBase,
		ProtocolFeatures: bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
		ConfigSize:       36,
	}
	// QEMU40 is QEMU 4.0: adds SLAVE_SEND_FD and HOST_NOTIFIER (3.0),
	// INFLIGHT_SHMFD (4.0, with reconnect) and the discard/write-zeroes
	// block features; the config grew to 60 bytes.
	QEMU40 = Profile{
		Name:             "qemu-4.0",
		Features:         blkBase | bits(BlkFDiscard, BlkFWriteZeroes),
		ProtocolFeatures: bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12),
		ConfigSize:       60,
	}
	// QEMU52 is QEMU 5.2 (also what qemu-e2k is built on): adds
	// RESET_DEVICE (5.0), INBAND_NOTIFICATIONS and CONFIGURE_MEM_SLOTS
	// (5.1), and packed rings for vhost-user-blk.
	QEMU52 = Profile{
		Name:             "qemu-5.2",
		Features:         blkBase | bits(BlkFDiscard, BlkFWriteZeroes, vu.FRingPacked),
		ProtocolFeatures: bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
		ConfigSize:       60,
	}
	// QEMU72 is Debian's QEMU 7.2 (7.2.22). Against qsd 7.2 it negotiates
	// 0x8f2b, as seen in QEMU-FACTS, and INFLIGHT_SHMFD when offered.
	// STATUS (bit 16) went into 7.2.0 and was reverted in 7.2.1, so it is
	// not in this set. GET_CONFIG reads 57 bytes (through
	// write_zeroes_may_unmap), as observed.
	QEMU72 = Profile{
		Name:             "qemu-7.2",
		Features:         blkBase | bits(BlkFDiscard, BlkFWriteZeroes, vu.FRingPacked),
		ProtocolFeatures: bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
		ConfigSize:       57,
	}
	// Modern is everything this frontend implements, including STATUS
	// (SET_STATUS around start and stop) and the full 60-byte config. It
	// drops the features a guest-less frontend cannot honour: LOG_SHMFD
	// (no migration), PAGEFAULT (no postcopy), INBAND_NOTIFICATIONS.
	Modern = Profile{
		Name:     "modern",
		Features: blkBase | bits(BlkFDiscard, BlkFWriteZeroes, vu.FRingPacked),
		ProtocolFeatures: bits(vu.ProtoMQ, vu.ProtoReplyAck, vu.ProtoBackendReq, vu.ProtoConfig,
			vu.ProtoBackendSendFD, vu.ProtoHostNotifier, vu.ProtoInflightShmfd, vu.ProtoResetDevice,
			vu.ProtoConfigureMemSlots, vu.ProtoStatus),
		ConfigSize: 60,
	}
)

// Profiles lists the named profiles, oldest first.
var Profiles = []Profile{QEMU212, QEMU40, QEMU52, QEMU72, Modern}
