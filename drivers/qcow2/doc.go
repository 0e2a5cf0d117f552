// Package qcow2 is QEMU's qcow2 format driver, written from QEMU's
// docs/interop/qcow2.txt (section names are quoted where code follows
// them) and QEMU 7.2's QAPI schema (BlockdevOptionsQcow2,
// BlockdevCreateOptionsQcow2, ImageInfoSpecificQCow2).
//
// layout.go is the pure on-disk format (header, extensions, table entries,
// refcount entries, snapshot table), shared with the offline metadata
// operations (check/repair, snapshots, amend, measure). The rest is the
// driver: versions 2 and 3, cluster sizes 512 B – 2 MiB, refcount widths
// 1–64 bits, zero clusters, compressed clusters (deflate and zstd), extended
// L2 entries with subclusters, external data files (raw or not), backing
// chains, lazy refcounts with the dirty bit, the corrupt bit, persistent
// dirty bitmaps (bitmaps.go: loaded into the graph's bitmaps, stored back
// on close), and encryption (LUKS, and legacy AES for the image tool
// only: crypt.go).
//
// # Requests and locks
//
// Guest requests run concurrently. The metadata of an open image (the L1
// table, the refcount table, the L2 and refcount block caches, the
// allocator, the header) is guarded by one mutex, image.meta, which is held
// for table look-ups and updates, including the metadata I/O they need,
// and never across guest data I/O:
//
//   - a read looks up one extent under meta, drops it and reads the data
//     (from the file or data-file child, the backing node, or zeros); a
//     read of a range that no L2 table maps, without a backing node, is
//     decided on the L1 table alone with meta held shared (an RWMutex,
//     taken shared nowhere else), and reads of zeros need no place in
//     the free quarantine, as they read no host cluster;
//   - a write to clusters that are allocated and owned (COPIED) looks them
//     up under meta and writes in place;
//   - a write that needs allocation (unallocated, zero, compressed or
//     shared clusters, unallocated subclusters) first allocates (or
//     copies, if shared) the L2 table if it must, then registers the guest
//     clusters as in flight, allocates host clusters, drops meta, copies
//     what it must keep from the old contents (copy on write, from the old
//     cluster or the backing node), writes, then takes meta again to point
//     the L2 entries at the new clusters. Another request that needs one of
//     those guest clusters in a way that changes its mapping (allocation,
//     discard, write-zeroes) waits for it; two writes allocating the same
//     cluster therefore never lose each other's data.
//
// Lock order: image.resize (shared by every request, exclusive for
// truncate and for the offline operations) → image.meta → image.dcMu
// (the small cache of inflated compressed clusters, also taken alone);
// the graph's bitmap locks come after image.meta.
// Nothing is locked while waiting for an in-flight allocation. Requests
// on children (file, data-file, backing) take those nodes' own locks
// below ours.
//
// # Allocation
//
// The order follows QEMU 7.2's, so that the same writes give the same
// host layout (qemu-img convert and ours give byte-identical images, and
// the same fragmentation in check). Host clusters come from the first
// free cluster on (a hint remembers where that is); a write takes the
// longest free run there, up to what it needs, after its L2 table if that
// table is new (the table is in the L1 table under meta at once, so
// concurrent writes into it never allocate it twice). A cluster whose
// range has no refcount block yet counts as free; when a run takes it,
// the block is created at the first free cluster after the run (it counts
// itself when it lies in its own range), which is where QEMU puts it. A
// longer contiguous run (an L1 table) goes to the end of the file with the
// blocks it needs after it; the refcount table grows at the end of what it
// describes, before a run may reach past it. The file child is grown
// before anything is written past its end: for a data cluster only to the
// end of what the write covers (with subclusters, QEMU's file may end
// inside the last cluster too), for a new L1 table right after its
// entries, mid-cluster, as qemu-img leaves it (a file's size need not be a
// multiple of the cluster size; the next allocation still starts on a
// cluster boundary, since free clusters are found by their refcounts).
//
// # Created images
//
// create lays out what qemu-img 7.2 writes, byte for byte (img's
// TestInteropQcow2CreateBytes cmp's them): header and extensions in
// cluster 0, refcount table in 1, its block in 2, the L1 table in 3 on,
// then for preallocation=metadata (which data-file-raw implies, as in
// qemu-img) each L2 table before its data clusters. For falloc and full
// (create and resize alike) qemu-img writes, from the first cluster past
// the file's end, the refcount blocks the whole area needs and a new
// refcount table, frees the old table, puts all data clusters in one run
// after it and then the L2 tables where they fit; so do we.
//
// Known differences, each image still clean and reading the same: a
// falloc/full resize from a size inside an allocated cluster keeps that
// cluster where it is, where QEMU copies it into the new area and frees
// it; and where the refcount table goes when it grows (images whose
// metadata outgrows one cluster of table, e.g. 8 MiB preallocated or an
// L1 table for 64 GiB, both with 512-byte clusters): QEMU interleaves the
// new table with the blocks that follow, we put it after every cluster
// the old table describes.
//
// # Crash safety
//
// Metadata is written back from the caches in an order that keeps every
// refcount at least as large as the references to it on disk (qcow2.txt
// "Host cluster management"), so that a process killed at any instant
// leaves at worst leaked clusters:
//
//   - refcount increments for new clusters reach the disk (and a flush)
//     before any L2 or L1 entry pointing at them; guest data is written
//     before the L2 entry that maps it, and the same flush orders it;
//   - an L2 table is written (and flushed) before the L1 entry pointing at
//     it; the header's table pointers change only after the new tables are
//     stable;
//   - refcount decrements are queued and applied only after the L2/L1
//     entries that dropped the references are stable, and only once every
//     request that might still read the freed clusters has finished (so a
//     freed cluster is never reused under a reader).
//
// With lazy refcounts the dirty bit is set before the first allocating
// write and the refcount flush before L2 write-back is skipped; a clean
// close writes everything and clears the bit.
package qcow2
