package graph

// Optional capabilities that img info reads; see also Infoer.

// BackingFiler is an optional capability of formats with backing files:
// the backing file name and format as recorded in the image (qcow2's
// header), which is what img info shows as "backing-filename" and
// "backing-filename-format" even when the image was opened without its
// backing chain (qemu-img info does that). The name is as stored, not
// resolved against the image's directory; both are "" when there is no
// backing file.
type BackingFiler interface {
	BackingFile() (name, format string)
}

// SnapshotLister is an optional capability of formats with internal
// snapshots: the list as the open image knows it, without I/O (what
// query-named-block-nodes shows as "snapshots").
type SnapshotLister interface {
	SnapshotList() []SnapshotInfo
}

// DirtyReporter is an optional capability of formats that record whether
// the image was closed cleanly (qcow2's dirty bit with lazy refcounts):
// img info's "dirty-flag" and "cleanly shut down: no".
type DirtyReporter interface {
	Dirty() bool
}
