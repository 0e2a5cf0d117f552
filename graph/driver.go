package graph

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"

	"blockbackend/permissions"
)

// Instance is an open node as its driver sees it: QEMU's BlockDriverState
// opaque plus the driver callbacks that every driver must have.
//
// The graph calls these methods only with requests it has already checked:
// the range lies within [0, Size()), and (for a node opened read-only) no
// write reaches the driver. Drivers therefore need not repeat those checks,
// but must stay safe on data read from files or from the network. Methods
// may be called concurrently from many goroutines; a driver guards only its
// own metadata.
type Instance interface {
	// ReadV fills the buffers of iov, in order, with the bytes starting at
	// off. A short read past the end of a growable file reads zeros.
	ReadV(ctx context.Context, off int64, iov [][]byte) error
	// WriteV writes the buffers of iov at off. With WriteFUA the data is on
	// stable storage when WriteV returns.
	WriteV(ctx context.Context, off int64, iov [][]byte, flags WriteFlags) error
	// Flush makes every completed write stable.
	Flush(ctx context.Context) error
	// Size is the current virtual size in bytes.
	Size() (int64, error)
	// Close releases every resource; the graph calls it once, after all I/O
	// has drained and the node's children are still open.
	Close() error
}

// WriteFlags modify a write.
type WriteFlags uint32

const (
	// WriteFUA asks for the data to be stable when the write completes.
	WriteFUA WriteFlags = 1 << iota
)

// ZeroFlags modify a write-zeroes request.
type ZeroFlags uint32

const (
	// ZeroMayUnmap allows the range to be deallocated, as long as it then
	// reads as zeros.
	ZeroMayUnmap ZeroFlags = 1 << iota
	// ZeroFUA asks for stability on completion, as WriteFUA.
	ZeroFUA
	// ZeroNoFallback asks the driver to fail with ErrNotSupported instead of
	// writing explicit zero buffers (NBD's FAST_ZERO).
	ZeroNoFallback
)

// Optional capabilities. The graph finds them by type assertion and supplies
// QEMU's fallbacks where a driver lacks them.

// Discarder frees a range (QEMU's pdiscard). Discard is advisory: a driver
// may ignore all or part of it. Without it, discard does nothing.
type Discarder interface {
	Discard(ctx context.Context, off, n int64) error
}

// ZeroWriter writes zeros efficiently (QEMU's pwrite_zeroes). It may return
// an error wrapping ErrNotSupported, and the graph then writes zero buffers
// unless ZeroNoFallback is set.
type ZeroWriter interface {
	WriteZeroes(ctx context.Context, off, n int64, flags ZeroFlags) error
}

// Status describes a run of bytes, as QEMU's block-status does.
type Status uint32

const (
	// StatusData: the range reads from this node's storage (or a child's).
	StatusData Status = 1 << iota
	// StatusZero: the range is known to read as zeros.
	StatusZero
	// StatusAllocated: this layer decides the contents (no fall-through to a backing node).
	StatusAllocated
	// StatusRecurse: ask the child in File for the status of the same range, mapped at Offset.
	StatusRecurse
)

// StatusExtent is one answer of BlockStatus.
type StatusExtent struct {
	Status Status
	Length int64 // > 0, at most the length asked for
	// Offset and File, when File is non-nil, say where the data lives
	// below (used by img map and for recursion).
	Offset int64
	File   *Node
}

// BlockStatuser answers which parts of the node hold data. Without it, every
// range is StatusData|StatusAllocated.
type BlockStatuser interface {
	BlockStatus(ctx context.Context, off, n int64) (StatusExtent, error)
}

// Truncater changes the size (QEMU's co_truncate). exact=false allows a
// larger result; prealloc is one of "off", "metadata", "falloc", "full".
type Truncater interface {
	Truncate(ctx context.Context, size int64, exact bool, prealloc string) error
}

// PermHandler is told when the node's combined permissions change, in two
// phases: CheckPerm may fail and must be undone by AbortPerm; SetPerm makes
// the checked state final. The file driver maps this onto image locks.
type PermHandler interface {
	CheckPerm(perm, shared permissions.Perm) error
	SetPerm(perm, shared permissions.Perm)
	AbortPerm()
}

// Reopener changes a node's options while it stays open (blockdev-reopen).
// PrepareReopen validates the new options (the driver's own struct, decoded
// like at open time) and readOnly, and returns commit and abort functions;
// exactly one of them is called, with I/O on the node drained.
type Reopener interface {
	PrepareReopen(ctx context.Context, opts any, readOnly bool) (commit, abort func(), err error)
}

// Infoer adds format-specific facts for query-named-block-nodes and img info.
type Infoer interface {
	Info() map[string]any
}

// Filenamer reports the node's filename as QEMU shows it in "file" and
// "image.filename" (for a format node, usually its file child's).
type Filenamer interface {
	Filename() string
}

// Driver is a block driver as registered in the registry.
type Driver struct {
	// Name is QEMU's driver name ("file", "raw", "qcow2", "null-co", ...).
	Name string
	// Protocol drivers reach storage themselves; format drivers sit on a
	// "file" child.
	Protocol bool
	// Prefixes are the filename protocol prefixes the driver claims
	// ("nbd", "nbd+unix", "ssh", "fat"), matched before ':'.
	Prefixes []string
	// NewOptions returns a pointer to a fresh options struct with the
	// driver's defaults; the driver-specific members of the node's options
	// are decoded into it strictly (qapi tags).
	NewOptions func() any
	// Open opens a node. The options struct is the one NewOptions made,
	// filled and validated by the decoder.
	Open func(ctx context.Context, oc *OpenContext, opts any) (Instance, error)
	// NewCreateOptions and Create make a new image (blockdev-create, img create).
	NewCreateOptions func() any
	Create           func(ctx context.Context, cc *CreateContext, opts any) error
	// NewImageCreateOptions and ImageCreate, when set, are how img create
	// makes an image of this format instead of NewCreateOptions and
	// Create: for formats that QEMU creates through qemu-img only (raw),
	// which blockdev-create refuses. Their options follow the same rules.
	NewImageCreateOptions func() any
	ImageCreate           func(ctx context.Context, cc *CreateContext, opts any) error
	// NewAmendOptions returns the options struct Amender.Amend takes
	// (img amend -o); nil when the format has nothing to amend.
	NewAmendOptions func() any
	// NewQMPAmendOptions, when set, returns x-blockdev-amend's options
	// struct (BlockdevAmendOptions' variant) where it differs from
	// qemu-img amend's (qcow2: only encrypt); Amend takes both.
	NewQMPAmendOptions func() any
	// Measure computes img measure's answer for an image of this format
	// made with createOpts (the struct of NewImageCreateOptions when set,
	// else of NewCreateOptions; without a file)
	// holding size bytes, or holding src's data when src is not nil.
	Measure func(ctx context.Context, createOpts any, size int64, src *Node) (MeasureResult, error)
	// Probe scores the first bytes of an image (0: not this format;
	// 100: certain). Only format drivers probe.
	Probe func(hdr []byte, filename string) int
	// ChildPerm, when set, replaces DefaultChildPerm for this driver's
	// children: what the node needs from child c given its own combined
	// permissions and whether it is (about to be) read-only.
	ChildPerm func(c *Child, readOnly bool, perm, shared permissions.Perm) (permissions.Perm, permissions.Perm)
	// ParseFilename turns a filename with this driver's prefix into
	// options (for example "nbd://h:10809/e" into server.host etc.).
	ParseFilename func(filename string) (map[string]any, error)
	// StrongOptions, when set, returns those of a node's decoded options
	// (the NewOptions struct) that change what the node reads — QEMU's
	// strong runtime options, such as raw's offset and size — by the
	// dotted names QEMU prints in a json: filename ("encrypt.key-secret"),
	// with JSON-typed values. A node with any of them set shows a json:
	// filename (Node.QueryFilename). Options naming children are not
	// among them: the graph adds those.
	StrongOptions func(opts any) map[string]any
}

var registry = struct {
	sync.RWMutex
	drivers map[string]*Driver
}{drivers: map[string]*Driver{}}

// Register adds a driver. It panics on a duplicate name or prefix: drivers
// register from init functions, so that is a programming error.
func Register(d *Driver) {
	registry.Lock()
	defer registry.Unlock()
	if d.Name == "" || d.NewOptions == nil || d.Open == nil {
		panic("graph: incomplete driver registration")
	}
	if _, dup := registry.drivers[d.Name]; dup {
		panic("graph: driver " + d.Name + " registered twice")
	}
	for _, p := range d.Prefixes {
		for _, o := range registry.drivers {
			for _, q := range o.Prefixes {
				if p == q {
					panic(fmt.Sprintf("graph: prefix %q claimed by %s and %s", p, o.Name, d.Name))
				}
			}
		}
	}
	registry.drivers[d.Name] = d
}

// Lookup returns the driver registered under name, or nil.
func Lookup(name string) *Driver {
	registry.RLock()
	defer registry.RUnlock()
	return registry.drivers[name]
}

// Drivers lists the registered driver names, sorted.
func Drivers() []string {
	registry.RLock()
	defer registry.RUnlock()
	var names []string
	for n := range registry.drivers {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// ProtocolFor returns the protocol driver that claims filename's prefix, or
// nil when filename has no protocol prefix (a plain path). An unclaimed
// prefix is an error in QEMU's words.
func ProtocolFor(filename string) (*Driver, error) {
	prefix, ok := protocolPrefix(filename)
	if !ok {
		return nil, nil
	}
	registry.RLock()
	defer registry.RUnlock()
	for _, d := range registry.drivers {
		for _, p := range d.Prefixes {
			if p == prefix {
				return d, nil
			}
		}
	}
	if d := registry.drivers[prefix]; d != nil && d.Protocol {
		return d, nil
	}
	return nil, fmt.Errorf("Unknown protocol '%s'", prefix)
}

// protocolPrefix reports the "proto" of "proto:rest", as QEMU decides it:
// a colon that comes before any slash.
func protocolPrefix(filename string) (string, bool) {
	colon := strings.IndexByte(filename, ':')
	if colon <= 0 {
		return "", false
	}
	if slash := strings.IndexByte(filename, '/'); slash >= 0 && slash < colon {
		return "", false
	}
	return filename[:colon], true
}

// ProbeFormat returns the format driver whose Probe scores hdr highest, and
// the score; nil when none claims it (the caller then falls back to raw,
// with QEMU's warning).
func ProbeFormat(hdr []byte, filename string) (*Driver, int) {
	registry.RLock()
	defer registry.RUnlock()
	var best *Driver
	score := 0
	names := make([]string, 0, len(registry.drivers))
	for n := range registry.drivers {
		names = append(names, n)
	}
	sort.Strings(names) // deterministic among equal scores
	for _, n := range names {
		d := registry.drivers[n]
		if d.Probe == nil {
			continue
		}
		if s := d.Probe(hdr, filename); s > score {
			best, score = d, s
		}
	}
	return best, score
}

// OpenContext is what a driver's Open gets besides its options.
type OpenContext struct {
	g    *Graph
	node *Node
	txn  *openTxn
}

// NodeName is the name of the node being opened.
func (oc *OpenContext) NodeName() string { return oc.node.name }

// ReadOnly reports whether the node is opened read-only.
func (oc *OpenContext) ReadOnly() bool { return oc.node.readOnly }

// AutoReadOnly reports the auto-read-only option: a protocol driver that
// cannot open its storage for writing may then open it read-only and call
// SetReadOnly.
func (oc *OpenContext) AutoReadOnly() bool { return oc.node.common.AutoReadOnly }

// SetReadOnly marks the node read-only (after auto-read-only fell back).
func (oc *OpenContext) SetReadOnly() { oc.node.readOnly = true }

// Common returns the options common to every node.
func (oc *OpenContext) Common() CommonOptions { return oc.node.common }

// Logger is the node's logger (with node-name and driver attributes).
func (oc *OpenContext) Logger() *slog.Logger { return oc.node.log }

// Secret returns the value of the secret object id.
func (oc *OpenContext) Secret(id string) ([]byte, error) { return oc.g.Objects.Secret(id) }

// Probed reports that the node's format was guessed by probing (raw
// then restricts writes to the first sector, as QEMU does).
func (oc *OpenContext) Probed() bool { return oc.node.probed }

// Node returns the node being opened (for status extents that point at it).
func (oc *OpenContext) Node() *Node { return oc.node }

// OpenChild opens or references the child called name (its option key:
// "file", "backing", "data-file") with the given role. ref comes from the
// driver's options. With optional set, an absent ref returns (nil, nil);
// otherwise QEMU's "A block device must be specified for "file"" error.
func (oc *OpenContext) OpenChild(ctx context.Context, name string, ref *ChildRef, role Role, optional bool) (*Child, error) {
	return oc.g.openChild(ctx, oc, name, ref, role, optional)
}

// CreateContext is what a driver's Create gets besides its options.
type CreateContext struct {
	g   *Graph
	log *slog.Logger

	// Warn, when set, receives warnings meant for a person, which QEMU
	// prints on stderr (the image tool prints them as qemu-img does);
	// otherwise they go to the log.
	Warn func(string)
}

// Logger for the create job.
func (cc *CreateContext) Logger() *slog.Logger { return cc.log }

// Warnf reports a warning meant for a person.
func (cc *CreateContext) Warnf(format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	if cc.Warn != nil {
		cc.Warn(msg)
		return
	}
	if cc.log != nil {
		cc.log.Warn(msg)
	}
}

// Secret returns the value of the secret object id.
func (cc *CreateContext) Secret(id string) ([]byte, error) { return cc.g.Objects.Secret(id) }

// LookupNode finds an existing node for drivers whose create options name
// one (qcow2's "file": the protocol node to format). Like QEMU it takes a
// device or a node name, and fails in QEMU's words for either.
func (cc *CreateContext) LookupNode(name string) (*Node, error) { return cc.g.FindDevice(name, name) }
