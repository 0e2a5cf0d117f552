// Package drivertest holds what every block driver's tests share: the
// conformance suite (Run) that checks a driver's read, write, flush,
// discard, write-zeroes, block-status and resize semantics against a flat
// model, and "drivertest-mem", an in-memory protocol driver whose files
// can crash: Crash drops, sector by sector, any write not yet made stable
// by a flush or FUA, as a power cut may. Format drivers open over it to
// test that their metadata ordering survives a crash at any point.
//
// It is a test helper package: production code never imports it.
package drivertest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"

	"blockbackend/graph"
)

// DriverName is the memory protocol driver's name in the registry.
const DriverName = "drivertest-mem"

// sector is the unit a crash keeps or drops: disks write 512-byte
// sectors atomically, and formats (qcow2's header) rely on that.
const sector = 512

// MemFile is an in-memory image. Its state is the bytes a reader sees now
// and the bytes that would survive a crash; they differ by the writes
// since the last flush.
type MemFile struct {
	mu       sync.Mutex // guards everything below
	data     []byte     // what reads see
	durable  []byte     // what a crash keeps for certain
	pending  []pendingWrite
	flushes  int
	failNext error // the next write or flush fails with it (fault injection)
}

type pendingWrite struct {
	off  int64
	data []byte
}

var files = struct {
	sync.Mutex
	m map[string]*MemFile
}{m: map[string]*MemFile{}}

// NewFile makes (or replaces) the memory file name, size bytes of zeros.
func NewFile(name string, size int64) *MemFile {
	f := &MemFile{data: make([]byte, size), durable: make([]byte, size)}
	files.Lock()
	files.m[name] = f
	files.Unlock()
	return f
}

// File returns the memory file name, or nil.
func File(name string) *MemFile {
	files.Lock()
	defer files.Unlock()
	return files.m[name]
}

// RemoveFile forgets the memory file name.
func RemoveFile(name string) {
	files.Lock()
	delete(files.m, name)
	files.Unlock()
}

// Bytes returns a copy of what a reader sees now.
func (f *MemFile) Bytes() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]byte(nil), f.data...)
}

// Flushes counts the flushes the file has had.
func (f *MemFile) Flushes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.flushes
}

// FailNext makes the next write, write-zeroes, discard or flush fail with
// err (for example syscall.EIO), once.
func (f *MemFile) FailNext(err error) {
	f.mu.Lock()
	f.failNext = err
	f.mu.Unlock()
}

// Crash simulates a power cut: of every write since the last flush, each
// sector independently survives or not (rng decides), and later writes
// win over earlier ones where both survive. The file then holds only what
// survived, as a disk would after the reboot.
func (f *MemFile) Crash(rng *rand.Rand) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, w := range f.pending {
		for s := int64(0); s < int64(len(w.data)); {
			// A sector of the disk, not of the write: writes need not be
			// aligned.
			end := min((w.off+s)/sector*sector+sector-w.off, int64(len(w.data)))
			if rng.IntN(2) == 0 && w.off+s < int64(len(f.durable)) {
				copy(f.durable[w.off+s:], w.data[s:end])
			}
			s = end
		}
	}
	f.pending = nil
	f.data = append(f.data[:0:0], f.durable...)
}

func (f *MemFile) fault() error {
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	return nil
}

// write applies b at off; the caller holds mu. durable makes it stable at
// once (FUA).
func (f *MemFile) write(off int64, b []byte, durable bool) {
	if end := off + int64(len(b)); end > int64(len(f.data)) {
		f.resize(end)
	}
	copy(f.data[off:], b)
	if durable {
		copy(f.durable[off:], b)
		return
	}
	f.pending = append(f.pending, pendingWrite{off, append([]byte(nil), b...)})
}

// resize changes the size of both views. A size change is taken to be
// stable at once (file systems journal it).
func (f *MemFile) resize(size int64) {
	grow := func(b []byte) []byte {
		if size <= int64(len(b)) {
			return b[:size]
		}
		return append(b, make([]byte, size-int64(len(b)))...)
	}
	f.data = grow(f.data)
	f.durable = grow(f.durable)
}

type memOptions struct {
	Filename string `qapi:"filename"`
}

type memCreateOptions struct {
	Filename string `qapi:"filename"`
	Size     int64  `qapi:"size"`
}

type memNode struct {
	name string
	f    *MemFile
}

func (n *memNode) ReadV(_ context.Context, off int64, iov [][]byte) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	for _, b := range iov {
		c := 0
		if off < int64(len(n.f.data)) {
			c = copy(b, n.f.data[off:])
		}
		clear(b[c:])
		off += int64(len(b))
	}
	return nil
}

func (n *memNode) WriteV(_ context.Context, off int64, iov [][]byte, flags graph.WriteFlags) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	if err := n.f.fault(); err != nil {
		return err
	}
	for _, b := range iov {
		n.f.write(off, b, flags&graph.WriteFUA != 0)
		off += int64(len(b))
	}
	return nil
}

func (n *memNode) WriteZeroes(_ context.Context, off, length int64, flags graph.ZeroFlags) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	if err := n.f.fault(); err != nil {
		return err
	}
	n.f.write(off, make([]byte, length), flags&graph.ZeroFUA != 0)
	return nil
}

func (n *memNode) Discard(_ context.Context, off, length int64) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	if err := n.f.fault(); err != nil {
		return err
	}
	// Like punching a hole: the range reads as zeros.
	n.f.write(off, make([]byte, min(length, max(int64(len(n.f.data))-off, 0))), false)
	return nil
}

func (n *memNode) Flush(context.Context) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	if err := n.f.fault(); err != nil {
		return err
	}
	copy(n.f.durable, n.f.data)
	n.f.pending = nil
	n.f.flushes++
	return nil
}

func (n *memNode) Size() (int64, error) {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	return int64(len(n.f.data)), nil
}

func (n *memNode) Truncate(_ context.Context, size int64, _ bool, _ string) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	n.f.resize(size)
	return nil
}

func (n *memNode) Filename() string { return n.name }
func (n *memNode) Close() error     { return nil }

func init() {
	graph.Register(&graph.Driver{
		Name:       DriverName,
		Protocol:   true,
		Prefixes:   []string{"drivertest-mem"},
		NewOptions: func() any { return &memOptions{} },
		Open: func(_ context.Context, _ *graph.OpenContext, o any) (graph.Instance, error) {
			name := o.(*memOptions).Filename
			f := File(name)
			if f == nil {
				return nil, fmt.Errorf("Could not open '%s': %w", name, syscall.ENOENT)
			}
			return &memNode{name: name, f: f}, nil
		},
		NewCreateOptions: func() any { return &memCreateOptions{} },
		Create: func(_ context.Context, _ *graph.CreateContext, o any) error {
			co := o.(*memCreateOptions)
			NewFile(co.Filename, co.Size)
			return nil
		},
		ParseFilename: func(filename string) (map[string]any, error) {
			return map[string]any{"filename": filename}, nil
		},
	})
}
