package graph

import "context"

// Capabilities used by the image tools (img check, snapshot, amend,
// rebase) and by the QMP commands that share them. Like the I/O
// capabilities in driver.go they are optional and found by type assertion
// on a node's Instance; a format without one gives QEMU's "not supported"
// answer for that tool.

// CheckFix says what Check may repair (qemu-img check -r).
type CheckFix uint32

const (
	// CheckFixLeaks frees clusters that nothing references.
	CheckFixLeaks CheckFix = 1 << iota
	// CheckFixErrors repairs corruptions (wrong refcounts, bad tables).
	CheckFixErrors
)

// CheckResult is what a consistency check found, with qemu-img check's
// numbers (its --output=json member names are in the field comments).
type CheckResult struct {
	Corruptions      int // "corruptions"
	Leaks            int // "leaks"
	CheckErrors      int // "check-errors": the check itself could not read something
	CorruptionsFixed int // "corruptions-fixed"
	LeaksFixed       int // "leaks-fixed"
	// ImageEndOffset is the end of the last used host cluster
	// ("image-end-offset"); zero when the format has no such notion.
	ImageEndOffset     int64
	TotalClusters      int64 // "total-clusters"
	AllocatedClusters  int64 // "allocated-clusters"
	FragmentedClusters int64 // "fragmented-clusters"
	CompressedClusters int64 // "compressed-clusters"
	// Messages are the lines qemu-img prints for each problem
	// ("Leaked cluster 5 refcount=1 reference=0",
	// "ERROR cluster 7 refcount=1 reference=2", "Repairing ...").
	Messages []string
}

// Checker verifies (and with fix, repairs) an image's metadata. It runs
// on a node opened with nothing else attached to it, writable when fix is
// non-zero.
type Checker interface {
	Check(ctx context.Context, fix CheckFix) (CheckResult, error)
}

// SnapshotInfo describes an internal snapshot, with the members of QEMU's
// SnapshotInfo (query-named-block-nodes, img snapshot -l, img info).
type SnapshotInfo struct {
	ID          string // "id": assigned by the format when created with ""
	Name        string // "name"
	VMStateSize uint64 // "vm-state-size"
	DateSec     int64  // "date-sec"
	DateNsec    int64  // "date-nsec"
	VMClockNsec int64  // "vm-clock-sec"*1e9 + "vm-clock-nsec"
	ICount      int64  // "icount"; -1 when not recorded
}

// Snapshotter manages internal snapshots (qcow2's). Lookups take an ID,
// a name, or both as QEMU's commands do: an empty string matches any.
type Snapshotter interface {
	Snapshots(ctx context.Context) ([]SnapshotInfo, error)
	// CreateSnapshot records the current state; an empty ID gets the next
	// free one. It returns the snapshot as recorded.
	CreateSnapshot(ctx context.Context, s SnapshotInfo) (SnapshotInfo, error)
	// ApplySnapshot makes the image's current state the snapshot's.
	ApplySnapshot(ctx context.Context, id, name string) error
	// DeleteSnapshot removes a snapshot and returns what it was.
	DeleteSnapshot(ctx context.Context, id, name string) (SnapshotInfo, error)
}

// Amender changes format options of an open image (img amend, QMP
// x-blockdev-amend). opts is the driver's amend options struct, made by
// Driver.NewAmendOptions and decoded strictly like create options; force
// allows changes that may lose data (qemu-img amend --force).
type Amender interface {
	Amend(ctx context.Context, opts any, force bool) error
}

// BackingChanger rewrites the backing file name and format recorded in
// the image (img rebase; an empty name removes the backing file). It
// changes only metadata: the caller copies data first for a safe rebase.
type BackingChanger interface {
	ChangeBackingFile(ctx context.Context, filename, format string) error
}

// MeasureResult is img measure's answer, in bytes.
type MeasureResult struct {
	Required       int64 // "required": for the data the source holds
	FullyAllocated int64 // "fully-allocated": for every cluster allocated
	// Bitmaps is the space for persistent dirty bitmaps ("bitmaps"), or -1
	// when the format cannot store them (the member is then omitted).
	Bitmaps int64
}
