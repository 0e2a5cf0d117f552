package img

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"blockbackend/graph"
)

// clusterSizer is the part of graph.CompressedWriter that info reads;
// any format with clusters may offer it alone.
type clusterSizer interface{ ClusterSize() int64 }

// imageInfo gathers what qemu-img info shows for one node, as a tree
// with qemu-img's JSON member names.
func (t *Tool) imageInfo(n *graph.Node, filename string) (map[string]any, []graph.SnapshotInfo, error) {
	m := map[string]any{
		"virtual-size": n.SizeNow(),
		"filename":     filename,
		"format":       n.DriverName(),
		"dirty-flag":   false,
	}
	if sz, ok := actualSize(n); ok {
		m["actual-size"] = sz
	}
	inst := n.Instance()
	var snaps []graph.SnapshotInfo
	if cs, ok := inst.(clusterSizer); ok && cs.ClusterSize() > 0 {
		m["cluster-size"] = cs.ClusterSize()
	}
	if d, ok := inst.(graph.DirtyReporter); ok && d.Dirty() {
		m["dirty-flag"] = true
	}
	if e, ok := inst.(interface{ Encrypted() bool }); ok && e.Encrypted() {
		m["encrypted"] = true
	}
	if s, ok := inst.(graph.Snapshotter); ok {
		var err error
		snaps, err = s.Snapshots(t.Ctx)
		if err != nil {
			return nil, nil, err
		}
		if len(snaps) > 0 {
			list := make([]any, len(snaps))
			for i, sn := range snaps {
				list[i] = snapshotJSON(sn)
			}
			m["snapshots"] = list
		}
	}
	if i, ok := inst.(graph.Infoer); ok {
		if fs := i.Info(); len(fs) > 0 {
			if _, typed := fs["type"]; !typed {
				fs = map[string]any{"type": n.DriverName(), "data": fs}
			}
			m["format-specific"] = fs
		}
	}
	name, format, full := backingOf(n, filename)
	if name != "" {
		m["backing-filename"] = name
		m["full-backing-filename"] = full
		if format != "" {
			m["backing-filename-format"] = format
		}
	}
	return m, snaps, nil
}

// backingOf returns the recorded backing file name and format and the
// full path qemu-img shows (the name resolved against the image's
// directory).
func backingOf(n *graph.Node, filename string) (name, format, full string) {
	// The name recorded in the image; without graph.BackingFiler, the
	// backing node's filename and driver.
	if b, ok := n.Instance().(graph.BackingFiler); ok {
		name, format = b.BackingFile()
	}
	c := n.Child("backing")
	if name == "" && c != nil {
		name = c.Node().Filename()
		format = c.Node().DriverName()
	}
	if name == "" {
		return "", "", ""
	}
	full = name
	if strings.HasPrefix(name, "json:") {
		// A json: name is its own full name, chain opened or not.
	} else if c != nil {
		full = c.Node().Filename()
	} else if !strings.HasPrefix(name, "/") && !strings.HasPrefix(name, "json:") && !strings.Contains(name, ":") {
		if d := filepath.Dir(filename); d != "." {
			full = filepath.Join(d, name)
		}
	}
	return name, format, full
}

// actualSize is the space the image's files take on the host (st_blocks),
// summed over the node's non-backing subtree.
func actualSize(n *graph.Node) (int64, bool) {
	seen := map[*graph.Node]bool{}
	var total int64
	found := false
	var walk func(x *graph.Node)
	walk = func(x *graph.Node) {
		if seen[x] {
			return
		}
		seen[x] = true
		kids := x.Children()
		if len(kids) == 0 {
			fn := x.Filename()
			var st syscall.Stat_t
			if fn != "" && syscall.Stat(fn, &st) == nil {
				total += st.Blocks * 512
				found = true
			}
			return
		}
		for _, c := range kids {
			if c.Role()&graph.RoleCOW != 0 {
				continue
			}
			walk(c.Node())
		}
	}
	walk(n)
	return total, found
}

func snapshotJSON(s graph.SnapshotInfo) map[string]any {
	m := map[string]any{
		"id":            s.ID,
		"name":          s.Name,
		"vm-state-size": s.VMStateSize,
		"date-sec":      s.DateSec,
		"date-nsec":     s.DateNsec,
		"vm-clock-sec":  s.VMClockNsec / 1e9,
		"vm-clock-nsec": s.VMClockNsec % 1e9,
	}
	if s.ICount >= 0 {
		m["icount"] = s.ICount
	}
	return m
}

// writeSnapshotTable prints qemu-img's snapshot list.
func writeSnapshotTable(w io.Writer, snaps []graph.SnapshotInfo) {
	fmt.Fprintf(w, "%-9s %-17s %7s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
	for _, s := range snaps {
		date := time.Unix(s.DateSec, 0).Local().Format("2006-01-02 15:04:05")
		secs := s.VMClockNsec / 1e9
		clock := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, (secs/60)%60, secs%60, (s.VMClockNsec/1e6)%1000)
		icount := ""
		if s.ICount >= 0 {
			icount = fmt.Sprint(s.ICount)
		}
		fmt.Fprintf(w, "%-9s %-17s %7s%20s%13s%11s\n", s.ID, s.Name, sizeToStr(int64(s.VMStateSize)), date, clock, icount)
	}
}

func (t *Tool) info(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "f:hU", long: []string{"help", "format=", "output=", "backing-chain", "force-share", "object=", "image-opts"}})
	if !ok {
		return 1
	}
	var format string
	jsonOut, chain, share := false, false, false
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("info")
		case "f", "format":
			format = o.arg
		case "output":
			if jsonOut, ok = t.parseOutput(o.arg); !ok {
				return 1
			}
		case "backing-chain":
			chain = true
		case "U", "force-share":
			share = true
		case "object", "image-opts":
			t.imageOpt(o)
		}
	}
	if len(ops) != 1 {
		return t.usageErr("Expecting one image file name")
	}
	filename := ops[0]
	im, err := t.open(filename, openFlags{format: format, forceShare: share, noBacking: !chain, noIO: true})
	if err != nil {
		return t.errorf("%s", err)
	}
	defer im.close(t.Ctx)
	var infos []map[string]any
	var snapLists [][]graph.SnapshotInfo
	n, fn := im.node, im.fname
	for n != nil {
		m, snaps, err := t.imageInfo(n, fn)
		if err != nil {
			return t.errorf("%s", err)
		}
		infos = append(infos, m)
		snapLists = append(snapLists, snaps)
		if !chain {
			break
		}
		c := n.Child("backing")
		if c == nil {
			break
		}
		n = c.Node()
		fn, _ = m["full-backing-filename"].(string)
		// qemu-img names a backing image opened from a json: name by
		// the node's own filename.
		if fn == "" || strings.HasPrefix(fn, "json:") {
			fn = n.Filename()
		}
	}
	if jsonOut {
		if chain {
			list := make([]any, len(infos))
			for i := range infos {
				list[i] = infos[i]
			}
			writeJSON(t.Stdout, list)
		} else {
			writeJSON(t.Stdout, infos[0])
		}
		return 0
	}
	for i, m := range infos {
		if i > 0 {
			fmt.Fprintln(t.Stdout)
		}
		t.writeInfoHuman(m, snapLists[i])
	}
	return 0
}

func (t *Tool) writeInfoHuman(m map[string]any, snaps []graph.SnapshotInfo) {
	w := t.Stdout
	vs := m["virtual-size"].(int64)
	fmt.Fprintf(w, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\n", m["filename"], m["format"], sizeToStr(vs), vs)
	if as, ok := m["actual-size"].(int64); ok {
		fmt.Fprintf(w, "disk size: %s\n", sizeToStr(as))
	} else {
		fmt.Fprintf(w, "disk size: unavailable\n")
	}
	// qemu-img 7.2 prints "encrypted" before "cluster_size".
	if e, _ := m["encrypted"].(bool); e {
		fmt.Fprintf(w, "encrypted: yes\n")
	}
	if cs, ok := m["cluster-size"].(int64); ok {
		fmt.Fprintf(w, "cluster_size: %d\n", cs)
	}
	if d, _ := m["dirty-flag"].(bool); d {
		fmt.Fprintf(w, "cleanly shut down: no\n")
	}
	if b, ok := m["backing-filename"].(string); ok {
		full, _ := m["full-backing-filename"].(string)
		if full != "" && full != b {
			fmt.Fprintf(w, "backing file: %s (actual path: %s)\n", b, full)
		} else {
			fmt.Fprintf(w, "backing file: %s\n", b)
		}
		if f, ok := m["backing-filename-format"].(string); ok {
			fmt.Fprintf(w, "backing file format: %s\n", f)
		}
	}
	if len(snaps) > 0 {
		fmt.Fprintln(w, "Snapshot list:")
		writeSnapshotTable(w, snaps)
	}
	if fs, ok := m["format-specific"].(map[string]any); ok {
		if data, ok := fs["data"]; ok {
			fmt.Fprintln(w, "Format specific information:")
			dumpHuman(w, data, 1)
		}
	}
}
