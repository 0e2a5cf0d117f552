package graph

import (
	"context"
	"fmt"
	"os"
	"sort"
	"syscall"

	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// ImageInfo is QAPI's ImageInfo as query-named-block-nodes shows it.
type ImageInfo struct {
	Filename       string         `json:"filename"`
	Format         string         `json:"format"`
	DirtyFlag      bool           `json:"dirty-flag"`
	ActualSize     *int64         `json:"actual-size,omitempty"`
	VirtualSize    int64          `json:"virtual-size"`
	BackingFile    string         `json:"backing-filename,omitempty"`
	FormatSpecific map[string]any `json:"format-specific,omitempty"`
	BackingImage   *ImageInfo     `json:"backing-image,omitempty"`
}

// CacheInfo is BlockdevCacheInfo.
type CacheInfo struct {
	Writeback bool `json:"writeback"`
	Direct    bool `json:"direct"`
	NoFlush   bool `json:"no-flush"`
}

// NodeInfo is QAPI's BlockDeviceInfo.
type NodeInfo struct {
	File             string    `json:"file"`
	NodeName         string    `json:"node-name"`
	RO               bool      `json:"ro"`
	Drv              string    `json:"drv"`
	BackingFile      string    `json:"backing_file,omitempty"`
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
// are not nested in "image".
func (g *Graph) QueryNodes(flat bool) []NodeInfo {
	nodes := g.Nodes()
	out := make([]NodeInfo, 0, len(nodes))
	// QEMU lists the newest node first.
	for i := len(nodes) - 1; i >= 0; i-- {
		n := nodes[i]
		c := n.Common()
		info := NodeInfo{
			File:         n.Filename(),
			NodeName:     n.name,
			RO:           n.ReadOnly(),
			Drv:          n.driver.Name,
			DetectZeroes: string(c.DetectZeroes),
			Image:        n.imageInfo(!flat),
			Cache:        CacheInfo{Writeback: true, Direct: c.Cache.Direct, NoFlush: c.Cache.NoFlush},
			DirtyBitmaps: n.BitmapInfos(),
		}
		if b := n.Child("backing"); b != nil {
			info.BackingFile = b.node.Filename()
			for d := b.node; d != nil; {
				info.BackingFileDepth++
				bc := d.Child("backing")
				if bc == nil {
					break
				}
				d = bc.node
			}
		}
		if e, ok := n.Instance().(interface{ Encrypted() bool }); ok {
			info.Encrypted = e.Encrypted()
		}
		out = append(out, info)
	}
	return out
}

func (n *Node) imageInfo(nested bool) ImageInfo {
	fn := n.Filename()
	info := ImageInfo{Filename: fn, Format: n.driver.Name, VirtualSize: n.SizeNow()}
	if fn != "" {
		if st, err := os.Stat(fn); err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				sz := sys.Blocks * 512
				info.ActualSize = &sz
			}
		}
	}
	if i, ok := n.Instance().(Infoer); ok {
		info.FormatSpecific = i.Info()
	}
	if b := n.Child("backing"); b != nil {
		info.BackingFile = b.node.Filename()
		if nested {
			bi := b.node.imageInfo(true)
			info.BackingImage = &bi
		}
	}
	return info
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
