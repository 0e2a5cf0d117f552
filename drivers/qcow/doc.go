// Package qcow is QEMU's "qcow" format driver: the original QEMU copy-on-
// write image (version 1), kept for old images and for data liberation.
//
// The format has no specification in QEMU's docs/interop. This driver
// follows the public descriptions of it (Mark McLoughlin's "The QCOW
// Image Format", libqcow's format notes) and every fact was checked
// against images made by qemu-img 7.2 and written by qemu-io:
//
//   - a 48-byte big-endian header (layout.go), the backing file name
//     right after it, the L1 table after that (8-byte aligned, its size
//     rounded up to 512 bytes in the file);
//   - two-level tables: L1 entries point at L2 tables of 1<<l2_bits
//     entries, L2 entries at clusters of 1<<cluster_bits bytes; 0 is
//     unallocated (backing file or zeros);
//   - a compressed cluster has the top bit of its L2 entry set, its
//     compressed byte count in the next cluster_bits bits and its byte
//     offset below; the data is raw deflate that QEMU inflates with a
//     4 KiB window; qemu-img packs compressed clusters at 512-byte
//     boundaries;
//   - qemu-img makes 4 KiB clusters with 512-entry L2 tables, or, with a
//     backing file, 512-byte clusters with 4096-entry L2 tables; a write
//     to an unmapped cluster puts its L2 table (when new) and then the
//     cluster at the end of the file, each rounded up to a cluster, and
//     the same writes leave the same bytes as qemu-io's, copy on write
//     and AES included;
//   - crypt_method 1 is AES-128-CBC on each 512-byte sector, the key the
//     passphrase's bytes padded with zeros to 16 bytes, the IV the guest
//     sector number (plain64). That is weak (a predictable IV, no key
//     derivation): images open in the image tool for conversion only and
//     the daemon refuses them (refuse.go).
//
// The format has no refcounts and no way to free a cluster: discard is
// ignored and write-zeroes writes zeros, as in QEMU; it cannot be
// resized (QEMU's "Image format driver does not support resize").
//
// # Locks
//
// meta guards the L1 table and the L2 cache; it is held for look-ups and
// table updates, never across guest data I/O. alloc serialises every
// write that changes the mapping (a cluster or L2 table allocated, a
// compressed cluster rewritten) and, on encrypted images, every write
// (partial sectors are read, decrypted, merged and encrypted again).
// Once a cluster is mapped to an uncompressed host cluster it never
// moves, so reads and in-place writes of it need no lock beyond the
// look-up. Lock order: alloc → meta → dcMu.
package qcow
