package img

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// fakefmt is a small format driver for the tests: it has every
// capability the image tool uses (backing files, clusters, block status,
// check, snapshots, amend, backing changes, compressed writes), so that
// those paths are exercised before a real format such as qcow2 exists.
//
// On disk: a 4 KiB header (magic, virtual size, backing name and format,
// an allocation bitmap of 64 KiB clusters), then the clusters at
// 4096 + guest offset. Snapshots, check results and compressed-write
// counts live in memory, per file name, for the test's process.

const (
	fakeMagic   = "FAKEFMT\x00"
	fakeHdr     = 4096
	fakeCluster = 64 << 10
	fakeBitmap  = 1024 // bytes of bitmap at the end of the header
)

type fakeState struct {
	mu          sync.Mutex
	snaps       []graph.SnapshotInfo
	snapData    map[string][]byte
	check       graph.CheckResult
	checkErr    error
	compressed  int
	lazy        bool
	amendCalls  int
	changeCalls int
	dataFile    string // the data-file node's filename at creation
	key         string // the key the image was created with
	// failReadAt: reads of the cluster at this guest offset fail with
	// EIO (-1: none).
	failReadAt int64
	// compressedAt: clusters written compressed (block status then has
	// no offset, as for qcow2's compressed clusters).
	compressedAt map[int64]bool
}

var fakeStates = struct {
	sync.Mutex
	m map[string]*fakeState
}{m: map[string]*fakeState{}}

func fakeStateFor(name string) *fakeState {
	abs, _ := filepath.Abs(name)
	fakeStates.Lock()
	defer fakeStates.Unlock()
	s := fakeStates.m[abs]
	if s == nil {
		s = &fakeState{snapData: map[string][]byte{}}
		fakeStates.m[abs] = s
	}
	return s
}

type fakeOptions struct {
	File    graph.ChildRef  `qapi:"file"`
	Backing *graph.ChildRef `qapi:"backing,optional"`
	// Key must be the one the image was created with (like LUKS's
	// key-secret, an option of both create and open).
	Key string `qapi:"key,optional"`
}

type fakeCreateOptions struct {
	File          graph.ChildRef `qapi:"file"`
	Size          qapi.Size      `qapi:"size"`
	BackingFile   string         `qapi:"backing-file,optional"`
	BackingFmt    string         `qapi:"backing-fmt,optional"`
	ClusterSize   qapi.Size      `qapi:"cluster-size,optional"`
	LazyRefcounts bool           `qapi:"lazy-refcounts,optional"`
	DataFile      graph.ChildRef `qapi:"data-file,optional"`
	Key           string         `qapi:"key,optional"`
}

type fakeAmendOptions struct {
	Size          *qapi.Size `qapi:"size,optional"`
	LazyRefcounts *bool      `qapi:"lazy-refcounts,optional"`
}

func init() {
	graph.Register(&graph.Driver{
		Name:             "fakefmt",
		NewOptions:       func() any { return &fakeOptions{} },
		Open:             fakeOpen,
		NewCreateOptions: func() any { return &fakeCreateOptions{ClusterSize: fakeCluster} },
		Create:           fakeCreate,
		NewAmendOptions:  func() any { return &fakeAmendOptions{} },
		Measure: func(_ context.Context, _ any, size int64, src *graph.Node) (graph.MeasureResult, error) {
			req := int64(fakeHdr)
			if src != nil {
				size = src.SizeNow()
				for off := int64(0); off < size; off += fakeCluster {
					e, err := chainStatus(context.Background(), src, off, min(fakeCluster, size-off), nil)
					if err != nil {
						return graph.MeasureResult{}, err
					}
					if !e.zero {
						req += fakeCluster
					}
				}
			}
			return graph.MeasureResult{Required: req, FullyAllocated: fakeHdr + (size+fakeCluster-1)/fakeCluster*fakeCluster, Bitmaps: 0}, nil
		},
		Probe: func(hdr []byte, _ string) int {
			if bytes.HasPrefix(hdr, []byte(fakeMagic)) {
				return 100
			}
			return 0
		},
	})
}

type fakeHeader struct {
	size                int64
	backing, backingFmt string
	bitmap              []byte
}

func (h *fakeHeader) encode() []byte {
	b := make([]byte, fakeHdr)
	copy(b, fakeMagic)
	binary.BigEndian.PutUint64(b[8:], uint64(h.size))
	b[16] = byte(len(h.backing))
	copy(b[17:], h.backing)
	b[17+255] = byte(len(h.backingFmt))
	copy(b[18+255:], h.backingFmt)
	copy(b[fakeHdr-fakeBitmap:], h.bitmap)
	return b
}

func decodeFakeHeader(b []byte) (*fakeHeader, error) {
	if len(b) < fakeHdr || !bytes.HasPrefix(b, []byte(fakeMagic)) {
		return nil, errors.New("Image is not in fakefmt format")
	}
	h := &fakeHeader{size: int64(binary.BigEndian.Uint64(b[8:]))}
	h.backing = string(b[17 : 17+int(b[16])])
	h.backingFmt = string(b[18+255 : 18+255+int(b[17+255])])
	h.bitmap = append([]byte(nil), b[fakeHdr-fakeBitmap:fakeHdr]...)
	return h, nil
}

func fakeCreate(ctx context.Context, cc *graph.CreateContext, o any) error {
	opts := o.(*fakeCreateOptions)
	n, err := cc.LookupNode(opts.File.Ref)
	if err != nil {
		return err
	}
	if int64(opts.Size) > fakeBitmap*8*fakeCluster {
		return fmt.Errorf("fakefmt: image too large")
	}
	h := &fakeHeader{size: int64(opts.Size), backing: opts.BackingFile, backingFmt: opts.BackingFmt, bitmap: make([]byte, fakeBitmap)}
	if err := n.Truncate(ctx, fakeHdr+int64(opts.Size), true, "off"); err != nil {
		return err
	}
	st := fakeStateFor(n.Filename())
	st.mu.Lock()
	st.snaps, st.snapData, st.lazy = nil, map[string][]byte{}, opts.LazyRefcounts
	st.check, st.checkErr, st.compressed, st.amendCalls, st.changeCalls = graph.CheckResult{}, nil, 0, 0, 0
	st.dataFile, st.compressedAt, st.failReadAt, st.key = "", map[int64]bool{}, -1, opts.Key
	if opts.DataFile.Ref != "" {
		dn, err := cc.LookupNode(opts.DataFile.Ref)
		if err != nil {
			st.mu.Unlock()
			return err
		}
		st.dataFile = dn.Filename()
	}
	st.mu.Unlock()
	return n.WriteAt(ctx, h.encode(), 0, 0)
}

type fakeNode struct {
	mu      sync.Mutex
	file    *graph.Node
	backing *graph.Node
	hdr     *fakeHeader
	st      *fakeState
}

func fakeOpen(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
	opts := o.(*fakeOptions)
	c, err := oc.OpenChild(ctx, "file", &opts.File, graph.RoleImage, false)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, fakeHdr)
	if c.Node().SizeNow() < fakeHdr {
		return nil, errors.New("Image is not in fakefmt format")
	}
	if err := c.Node().ReadAt(ctx, buf, 0); err != nil {
		return nil, err
	}
	h, err := decodeFakeHeader(buf)
	if err != nil {
		return nil, err
	}
	n := &fakeNode{file: c.Node(), hdr: h, st: fakeStateFor(c.Node().Filename())}
	n.st.mu.Lock()
	key := n.st.key
	n.st.mu.Unlock()
	if key != opts.Key {
		return nil, errors.New("fakefmt: wrong or missing key")
	}
	ref := opts.Backing
	if ref == nil && h.backing != "" {
		path := h.backing
		if !filepath.IsAbs(path) {
			path = filepath.Join(filepath.Dir(c.Node().Filename()), path)
		}
		m := map[string]any{"driver": "file", "filename": path}
		if h.backingFmt != "" {
			m = map[string]any{"driver": h.backingFmt, "file": m}
		}
		ref = &graph.ChildRef{Options: m, Mode: qapi.JSON}
	}
	if ref != nil {
		bc, err := oc.OpenChild(ctx, "backing", ref, graph.RoleBacking, true)
		if err != nil {
			return nil, err
		}
		if bc != nil {
			n.backing = bc.Node()
		}
	}
	return n, nil
}

func (n *fakeNode) allocated(c int64) bool { return n.hdr.bitmap[c/8]&(1<<(c%8)) != 0 }

func (n *fakeNode) Size() (int64, error) { return n.hdr.size, nil }
func (n *fakeNode) Close() error         { return nil }
func (n *fakeNode) Flush(ctx context.Context) error {
	return n.file.Flush(ctx)
}

// readCluster reads part of cluster c (guest offset off, len(p)).
func (n *fakeNode) readRange(ctx context.Context, off int64, p []byte) error {
	for len(p) > 0 {
		c := off / fakeCluster
		k := min(int64(len(p)), (c+1)*fakeCluster-off)
		n.mu.Lock()
		alloc := n.allocated(c)
		n.mu.Unlock()
		switch {
		case alloc:
			if err := n.file.ReadAt(ctx, p[:k], fakeHdr+off); err != nil {
				return err
			}
		case n.backing != nil && off < n.backing.SizeNow():
			m := min(k, n.backing.SizeNow()-off)
			if err := n.backing.ReadAt(ctx, p[:m], off); err != nil {
				return err
			}
			clear(p[m:k])
		default:
			clear(p[:k])
		}
		p, off = p[k:], off+k
	}
	return nil
}

func (n *fakeNode) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	n.st.mu.Lock()
	fail := n.st.failReadAt
	n.st.mu.Unlock()
	if l := iovLen(iov); fail >= 0 && off <= fail && fail < off+l {
		return fmt.Errorf("fakefmt: reading cluster at %d: %w", fail, syscall.EIO)
	}
	for _, b := range iov {
		if err := n.readRange(ctx, off, b); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

func (n *fakeNode) WriteV(ctx context.Context, off int64, iov [][]byte, _ graph.WriteFlags) error {
	var data []byte
	for _, b := range iov {
		data = append(data, b...)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	for len(data) > 0 {
		c := off / fakeCluster
		k := min(int64(len(data)), (c+1)*fakeCluster-off)
		if !n.allocated(c) {
			// Copy on write: the whole cluster, from below.
			full := make([]byte, min(fakeCluster, n.hdr.size-c*fakeCluster))
			n.mu.Unlock()
			err := n.readRange(ctx, c*fakeCluster, full)
			n.mu.Lock()
			if err != nil {
				return err
			}
			copy(full[off-c*fakeCluster:], data[:k])
			if err := n.file.WriteAt(ctx, full, fakeHdr+c*fakeCluster, 0); err != nil {
				return err
			}
			n.hdr.bitmap[c/8] |= 1 << (c % 8)
			if err := n.file.WriteAt(ctx, n.hdr.encode(), 0, 0); err != nil {
				return err
			}
		} else if err := n.file.WriteAt(ctx, data[:k], fakeHdr+off, 0); err != nil {
			return err
		}
		data, off = data[k:], off+k
	}
	return nil
}

func (n *fakeNode) BlockStatus(_ context.Context, off, length int64) (graph.StatusExtent, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := off / fakeCluster
	alloc := n.allocated(c)
	end := off + length
	l := min(end, (c+1)*fakeCluster) - off
	for next := c + 1; next*fakeCluster < end && n.allocated(next) == alloc; next++ {
		l = min(end, (next+1)*fakeCluster) - off
	}
	n.st.mu.Lock()
	comp := n.st.compressedAt[c]
	n.st.mu.Unlock()
	if comp {
		return graph.StatusExtent{Status: graph.StatusData | graph.StatusAllocated, Length: min(end, (c+1)*fakeCluster) - off}, nil
	}
	if alloc {
		return graph.StatusExtent{Status: graph.StatusData | graph.StatusAllocated, Length: l, Offset: fakeHdr + off, File: n.file}, nil
	}
	return graph.StatusExtent{Length: l}, nil
}

func (n *fakeNode) Truncate(ctx context.Context, size int64, _ bool, _ string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.hdr.size = size
	if err := n.file.Truncate(ctx, fakeHdr+size, true, "off"); err != nil {
		return err
	}
	return n.file.WriteAt(ctx, n.hdr.encode(), 0, 0)
}

func iovLen(iov [][]byte) int64 {
	var l int64
	for _, b := range iov {
		l += int64(len(b))
	}
	return l
}

func (n *fakeNode) Info() map[string]any {
	n.st.mu.Lock()
	defer n.st.mu.Unlock()
	return map[string]any{"type": "fakefmt", "data": map[string]any{"compat": "1.1", "lazy-refcounts": n.st.lazy}}
}

func (n *fakeNode) BackingFile() (string, string) { return n.hdr.backing, n.hdr.backingFmt }

// Dirty: a lazy-refcounts image counts as not cleanly shut down.
func (n *fakeNode) Dirty() bool {
	n.st.mu.Lock()
	defer n.st.mu.Unlock()
	return n.st.lazy
}

func (n *fakeNode) ClusterSize() int64 { return fakeCluster }

func (n *fakeNode) WriteCompressed(ctx context.Context, off int64, data []byte) error {
	n.st.mu.Lock()
	n.st.compressed++
	n.st.compressedAt[off/fakeCluster] = true
	n.st.mu.Unlock()
	return n.WriteV(ctx, off, [][]byte{data}, 0)
}

func (n *fakeNode) Check(_ context.Context, fix graph.CheckFix) (graph.CheckResult, error) {
	n.st.mu.Lock()
	defer n.st.mu.Unlock()
	if n.st.checkErr != nil {
		return graph.CheckResult{}, n.st.checkErr
	}
	r := n.st.check
	if fix&graph.CheckFixLeaks != 0 && r.Leaks > 0 {
		r.LeaksFixed, n.st.check.Leaks = r.Leaks, 0
		r.Messages = append(r.Messages, fmt.Sprintf("Repairing %d leaked clusters", r.Leaks))
	}
	if fix&graph.CheckFixErrors != 0 && r.Corruptions > 0 {
		r.CorruptionsFixed, n.st.check.Corruptions = r.Corruptions, 0
	}
	return r, nil
}

func (n *fakeNode) Snapshots(context.Context) ([]graph.SnapshotInfo, error) {
	n.st.mu.Lock()
	defer n.st.mu.Unlock()
	return append([]graph.SnapshotInfo(nil), n.st.snaps...), nil
}

func (n *fakeNode) CreateSnapshot(ctx context.Context, s graph.SnapshotInfo) (graph.SnapshotInfo, error) {
	data := make([]byte, n.hdr.size)
	if err := n.readRange(ctx, 0, data); err != nil {
		return s, err
	}
	n.st.mu.Lock()
	defer n.st.mu.Unlock()
	if s.ID == "" {
		s.ID = fmt.Sprint(len(n.st.snaps) + 1)
	}
	n.st.snaps = append(n.st.snaps, s)
	n.st.snapData[s.ID] = data
	return s, nil
}

func (n *fakeNode) find(id, name string) int {
	for i, s := range n.st.snaps {
		if (id == "" || s.ID == id) && (name == "" || s.Name == name) {
			return i
		}
	}
	return -1
}

func (n *fakeNode) ApplySnapshot(ctx context.Context, id, name string) error {
	n.st.mu.Lock()
	i := n.find(id, name)
	if i < 0 {
		n.st.mu.Unlock()
		return syscall.ENOENT
	}
	data := n.st.snapData[n.st.snaps[i].ID]
	n.st.mu.Unlock()
	return n.WriteV(ctx, 0, [][]byte{data}, 0)
}

func (n *fakeNode) DeleteSnapshot(_ context.Context, id, name string) (graph.SnapshotInfo, error) {
	n.st.mu.Lock()
	defer n.st.mu.Unlock()
	i := n.find(id, name)
	if i < 0 {
		return graph.SnapshotInfo{}, syscall.ENOENT
	}
	s := n.st.snaps[i]
	n.st.snaps = append(n.st.snaps[:i], n.st.snaps[i+1:]...)
	return s, nil
}

func (n *fakeNode) Amend(ctx context.Context, o any, force bool) error {
	opts := o.(*fakeAmendOptions)
	n.st.mu.Lock()
	n.st.amendCalls++
	if opts.LazyRefcounts != nil {
		n.st.lazy = *opts.LazyRefcounts
	}
	n.st.mu.Unlock()
	if opts.Size != nil {
		if int64(*opts.Size) < n.hdr.size && !force {
			return errors.New("Cannot shrink without --force")
		}
		return n.Truncate(ctx, int64(*opts.Size), true, "off")
	}
	return nil
}

func (n *fakeNode) ChangeBackingFile(ctx context.Context, filename, format string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.st.mu.Lock()
	n.st.changeCalls++
	n.st.mu.Unlock()
	if strings.Contains(filename, "\x00") {
		return syscall.EINVAL
	}
	n.hdr.backing, n.hdr.backingFmt = filename, format
	return n.file.WriteAt(ctx, n.hdr.encode(), 0, 0)
}

var (
	_ graph.Checker          = (*fakeNode)(nil)
	_ graph.Snapshotter      = (*fakeNode)(nil)
	_ graph.Amender          = (*fakeNode)(nil)
	_ graph.BackingChanger   = (*fakeNode)(nil)
	_ graph.CompressedWriter = (*fakeNode)(nil)
	_ graph.BlockStatuser    = (*fakeNode)(nil)
	_ graph.Infoer           = (*fakeNode)(nil)
	_ graph.BackingFiler     = (*fakeNode)(nil)
	_ graph.DirtyReporter    = (*fakeNode)(nil)
)
