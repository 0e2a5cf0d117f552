package graph

import (
	"context"
	"fmt"
	"sort"
	"syscall"

	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// ImageInfo is QAPI's ImageInfo as query-named-block-nodes shows it.
type ImageInfo struct {
	Filename    string `json:"filename"`
	Format      string `json:"format"`
	DirtyFlag   bool   `json:"dirty-flag"`
	ActualSize  *int64 `json:"actual-size,omitempty"`
	VirtualSize int64  `json:"virtual-size"`
	ClusterSize int64  `json:"cluster-size,omitempty"`
	Encrypted   bool   `json:"encrypted,omitempty"`
	// BackingFile and BackingFormat are the names the image records;
	// FullBackingFile is BackingFile resolved against the image's
	// directory. All three show whether or not a backing child is open.
	BackingFile     string         `json:"backing-filename,omitempty"`
	BackingFormat   string         `json:"backing-filename-format,omitempty"`
	FullBackingFile string         `json:"full-backing-filename,omitempty"`
	Snapshots       []SnapshotJSON `json:"snapshots,omitempty"`
	FormatSpecific  map[string]any `json:"format-specific,omitempty"`
	BackingImage    *ImageInfo     `json:"backing-image,omitempty"`
}

// SnapshotJSON is QAPI's SnapshotInfo, as query output and
// blockdev-snapshot-delete-internal-sync print it.
type SnapshotJSON struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize uint64 `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
	VMClockSec  int64  `json:"vm-clock-sec"`
	VMClockNsec int64  `json:"vm-clock-nsec"`
	ICount      *int64 `json:"icount,omitempty"`
}

// NewSnapshotJSON converts the graph's description (icount is left out
// when not recorded, as QEMU does).
func NewSnapshotJSON(s SnapshotInfo) SnapshotJSON {
	out := SnapshotJSON{
		ID: s.ID, Name: s.Name, VMStateSize: s.VMStateSize, DateSec: s.DateSec, DateNsec: s.DateNsec,
		VMClockSec: s.VMClockNsec / 1e9, VMClockNsec: s.VMClockNsec % 1e9,
	}
	if s.ICount >= 0 {
		ic := s.ICount
		out.ICount = &ic
	}
	return out
}

// CacheInfo is BlockdevCacheInfo.
type CacheInfo struct {
	Writeback bool `json:"writeback"`
	Direct    bool `json:"direct"`
	NoFlush   bool `json:"no-flush"`
}

// NodeInfo is QAPI's BlockDeviceInfo.
type NodeInfo struct {
	File     string `json:"file"`
	NodeName string `json:"node-name"`
	RO       bool   `json:"ro"`
	Drv      string `json:"drv"`
	// BackingFile is the backing child's filename (absent without one).
	BackingFile string `json:"backing_file,omitempty"`
	// BackingFileDepth counts the nested backing images: 0 with flat.
	BackingFileDepth int       `json:"backing_file_depth"`
	Encrypted        bool      `json:"encrypted"`
	DetectZeroes     string    `json:"detect_zeroes"`
	Bps              int64     `json:"bps"`
	BpsRd            int64     `json:"bps_rd"`
	BpsWr            int64     `json:"bps_wr"`
	Iops             int64     `json:"iops"`
	IopsRd           int64     `json:"iops_rd"`
	IopsWr           int64     `json:"iops_wr"`
	Image            ImageInfo `json:"image"`
	Cache            CacheInfo `json:"cache"`
	WriteThreshold   int64     `json:"write_threshold"`
	// DirtyBitmaps: the node's bitmaps (bitmaps.go), absent when none.
	DirtyBitmaps []BitmapInfo `json:"dirty-bitmaps,omitempty"`
}

// QueryNodes answers query-named-block-nodes. With flat, backing images
// are not nested in "image". Checked side by side with
// qemu-storage-daemon 7.2 (tests/query_e2e_test.go).
func (g *Graph) QueryNodes(flat bool) []NodeInfo {
	nodes := g.Nodes()
	out := make([]NodeInfo, 0, len(nodes))
	// QEMU lists the newest node first.
	for i := len(nodes) - 1; i >= 0; i-- {
		n := nodes[i]
		c := n.Common()
		info := NodeInfo{
			File:         n.QueryFilename(),
			NodeName:     n.name,
			RO:           n.ReadOnly(),
			Drv:          n.driver.Name,
			DetectZeroes: string(c.DetectZeroes),
			Image:        n.imageInfo(!flat),
			Cache:        CacheInfo{Writeback: true, Direct: c.Cache.Direct, NoFlush: c.Cache.NoFlush},
			DirtyBitmaps: n.BitmapInfos(),
		}
		if b := n.Child("backing"); b != nil {
			info.BackingFile = b.node.QueryFilename()
		}
		for im := info.Image.BackingImage; im != nil; im = im.BackingImage {
			info.BackingFileDepth++
		}
		if e, ok := n.Instance().(interface{ Encrypted() bool }); ok {
			info.Encrypted = e.Encrypted()
		}
		out = append(out, info)
	}
	return out
}

func (n *Node) imageInfo(nested bool) ImageInfo {
	info := ImageInfo{
		Filename: n.QueryFilename(),
		Format:   n.driver.Name,
		// QEMU counts lengths in 512-byte sectors, rounding up.
		VirtualSize: (n.SizeNow() + 511) &^ 511,
	}
	if sz, ok := n.allocatedSize(); ok {
		info.ActualSize = &sz
	}
	inst := n.Instance()
	if cs, ok := inst.(interface{ ClusterSize() int64 }); ok && cs.ClusterSize() > 0 {
		info.ClusterSize = cs.ClusterSize()
	}
	if d, ok := inst.(DirtyReporter); ok {
		info.DirtyFlag = d.Dirty()
	}
	if e, ok := inst.(interface{ Encrypted() bool }); ok {
		info.Encrypted = e.Encrypted()
	}
	if i, ok := inst.(Infoer); ok {
		info.FormatSpecific = i.Info()
	}
	if sl, ok := inst.(SnapshotLister); ok {
		for _, s := range sl.SnapshotList() {
			info.Snapshots = append(info.Snapshots, NewSnapshotJSON(s))
		}
	}
	if bf, ok := inst.(BackingFiler); ok {
		info.BackingFile, info.BackingFormat = bf.BackingFile()
		if info.BackingFile != "" {
			info.FullBackingFile = info.BackingFile
			if fc := n.Child("file"); fc != nil {
				info.FullBackingFile = ResolveImageName(fc.node, info.BackingFile)
			}
		}
	}
	if b := n.Child("backing"); b != nil && nested {
		bi := b.node.imageInfo(true)
		info.BackingImage = &bi
	}
	return info
}

// allocatedSize is the space the node's files take on the host
// (st_blocks), summed over its children but not its backing chain: a
// qcow2 node with a data file counts both files, as QEMU does.
func (n *Node) allocatedSize() (int64, bool) {
	seen := map[*Node]bool{}
	var total int64
	found := false
	var walk func(x *Node)
	walk = func(x *Node) {
		if seen[x] {
			return
		}
		seen[x] = true
		if x.driver.Protocol {
			var st syscall.Stat_t
			if fn := x.Filename(); fn != "" && syscall.Stat(fn, &st) == nil {
				total += st.Blocks * 512
				found = true
			}
			return
		}
		for _, c := range x.Children() {
			if c.role&RoleCOW == 0 {
				walk(c.node)
			}
		}
	}
	walk(n)
	return total, found
}

// GraphDump is x-debug-query-block-graph's answer.
type GraphDump struct {
	Nodes []GraphDumpNode `json:"nodes"`
	Edges []GraphDumpEdge `json:"edges"`
}

// GraphDumpNode is XDbgBlockGraphNode.
type GraphDumpNode struct {
	ID   int    `json:"id"`
	Type string `json:"type"`
	Name string `json:"name"`
}

// GraphDumpEdge is XDbgBlockGraphEdge.
type GraphDumpEdge struct {
	Parent     int      `json:"parent"`
	Child      int      `json:"child"`
	Name       string   `json:"name"`
	Perm       []string `json:"perm"`
	SharedPerm []string `json:"shared-perm"`
}

// qapiPermNames lists a set of bits highest first, as QEMU prints them.
func qapiPermNames(p permissions.Perm) []string {
	names := p.QAPINames()
	out := make([]string, 0, len(names))
	for i := len(names) - 1; i >= 0; i-- {
		out = append(out, names[i])
	}
	return out
}

// DumpGraph answers x-debug-query-block-graph. Exports appear as
// "block-backend" nodes named by export id (QEMU's exports also sit on a
// BlockBackend).
func (g *Graph) DumpGraph() GraphDump {
	g.mu.Lock()
	defer g.mu.Unlock()
	d := GraphDump{Nodes: []GraphDumpNode{}, Edges: []GraphDumpEdge{}}
	ids := map[any]int{}
	next := 1
	id := func(k any, typ, name string) int {
		if v, ok := ids[k]; ok {
			return v
		}
		ids[k] = next
		d.Nodes = append(d.Nodes, GraphDumpNode{ID: next, Type: typ, Name: name})
		next++
		return next - 1
	}
	for _, n := range g.order {
		id(n, "block-driver", n.name)
	}
	var expIDs []string
	for k := range g.exports {
		expIDs = append(expIDs, k)
	}
	sort.Strings(expIDs)
	for _, k := range expIDs {
		id(g.exports[k].child.user, "block-backend", k)
	}
	for _, n := range g.order {
		for _, c := range n.parents {
			var p int
			if c.parent != nil {
				p = ids[c.parent]
			} else {
				v, ok := ids[c.user]
				if !ok {
					v = id(c.user, "block-backend", c.user.UserDesc())
				}
				p = v
			}
			d.Edges = append(d.Edges, GraphDumpEdge{
				Parent: p, Child: ids[n], Name: c.name,
				Perm: qapiPermNames(c.perm), SharedPerm: qapiPermNames(c.shared),
			})
		}
	}
	return d
}

// resizeUser is the temporary parent block_resize attaches, as QEMU's
// temporary BlockBackend does.
type resizeUser struct{}

func (resizeUser) UserDesc() string { return "an unnamed block device" }

// Resize changes a node's size (block_resize): it needs the resize
// permission while it runs, so that users that do not share
// resize stop it with QEMU's permission-conflict error.
func (g *Graph) Resize(ctx context.Context, n *Node, size int64) error {
	if size < 0 {
		return qapi.Errorf(qapi.GenericError, "Parameter 'size' expects a >0 size")
	}
	c, err := g.AttachUser(resizeUser{}, n, "root", pSize, pAll)
	if err != nil {
		return err
	}
	defer g.DetachUser(c)
	if err := n.Truncate(ctx, size, false, "off"); err != nil {
		return fmt.Errorf("Cannot resize node '%s': %w", n.name, err)
	}
	g.notifyResize(n)
	return nil
}

// notifyResize refreshes the cached sizes of the nodes above n (children
// first) and tells the exports above it that the size changed, so that
// they can tell their clients.
func (g *Graph) notifyResize(n *Node) {
	g.mu.Lock()
	var ancestors []*Node
	var targets []*Export
	seen := map[*Node]bool{n: true}
	queue := []*Node{n}
	for len(queue) > 0 {
		x := queue[0]
		queue = queue[1:]
		for _, c := range x.parents {
			switch {
			case c.parent != nil && !seen[c.parent]:
				seen[c.parent] = true
				ancestors = append(ancestors, c.parent)
				queue = append(queue, c.parent)
			case c.parent == nil:
				if e, ok := c.user.(*Export); ok {
					targets = append(targets, e)
				}
			}
		}
	}
	g.mu.Unlock()
	for _, a := range ancestors {
		if err := a.RefreshSize(); err != nil {
			g.log.Warn("refreshing size after resize", "node-name", a.name, "err", err)
		}
	}
	for _, e := range targets {
		if r, ok := e.inst.(interface{ Resized() }); ok {
			r.Resized()
		}
	}
}
