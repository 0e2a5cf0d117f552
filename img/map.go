package img

import (
	"bufio"
	"fmt"
)

func (t *Tool) mapCmd(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "f:hU", long: []string{"help", "format=", "output=", "object=", "image-opts", "force-share", "start-offset=", "max-length="}})
	if !ok {
		return 1
	}
	var format string
	jsonOut, share := false, false
	start, maxLen := int64(0), int64(-1)
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("map")
		case "f", "format":
			format = o.arg
		case "output":
			if jsonOut, ok = t.parseOutput(o.arg); !ok {
				return 1
			}
		case "U", "force-share":
			share = true
		case "start-offset":
			v, ok := parseSize(o.arg)
			if !ok {
				t.errorf("Invalid start offset specified. You may use k, M, G, T, P or E suffixes for")
				return t.errorf("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
			}
			start = v
		case "max-length":
			v, ok := parseSize(o.arg)
			if !ok {
				t.errorf("Invalid max length specified. You may use k, M, G, T, P or E suffixes for")
				return t.errorf("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
			}
			maxLen = v
		case "object", "image-opts":
			t.imageOpt(o)
		}
	}
	if len(ops) != 1 {
		return t.usageErr("Expecting one image file name")
	}
	im, err := t.open(ops[0], openFlags{format: format, forceShare: share})
	if err != nil {
		return t.errorf("%s", err)
	}
	defer im.close(t.Ctx)
	end := im.node.SizeNow()
	if maxLen >= 0 && start+maxLen < end {
		end = start + maxLen
	}
	// Streamed, as qemu-img does: what was printed stays when a run
	// cannot be shown.
	out := bufio.NewWriter(t.Stdout)
	defer out.Flush()
	if jsonOut {
		out.WriteString("[")
	} else {
		fmt.Fprintf(out, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	}
	zc := newZeroCache()
	var cur *extent
	if end <= start {
		// qemu-img reports an empty image as one empty, absent run.
		cur = &extent{start: start}
	}
	first := true
	flush := func() error {
		if cur == nil {
			return nil
		}
		if jsonOut {
			if !first {
				out.WriteString(",\n")
			}
			first = false
			fmt.Fprintf(out, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
				cur.start, cur.length, cur.depth, cur.present, cur.zero, cur.data)
			if cur.hasOffset {
				fmt.Fprintf(out, `, "offset": %d`, cur.offset)
			}
			out.WriteString("}")
			return nil
		}
		if cur.data && !cur.hasOffset {
			return fmt.Errorf("File contains external, encrypted or compressed clusters.")
		}
		if cur.data && !cur.zero {
			fmt.Fprintf(out, "%-16s%-16s%-16s%s\n", hexC(cur.start), hexC(cur.length), hexC(cur.offset), cur.file.Filename())
		}
		return nil
	}
	for off := start; off < end; {
		e, err := chainStatus(t.Ctx, im.node, off, min(end-off, 1<<30), zc)
		if err != nil {
			out.Flush()
			return t.errorf("%s", errnoText(err))
		}
		if cur != nil && mergeable(cur, &e) {
			cur.length += e.length
		} else {
			if err := flush(); err != nil {
				out.Flush()
				return t.errorf("%s", err)
			}
			cur = &e
		}
		off += e.length
	}
	if err := flush(); err != nil {
		out.Flush()
		return t.errorf("%s", err)
	}
	if jsonOut {
		out.WriteString("]\n")
	}
	return 0
}

// mergeable: qemu-img map joins a run to the previous one when they say
// the same thing and, when they have offsets, continue each other.
func mergeable(a, b *extent) bool {
	if a.depth != b.depth || a.present != b.present || a.zero != b.zero || a.data != b.data || a.hasOffset != b.hasOffset {
		return false
	}
	if a.hasOffset && (a.file != b.file || a.offset+a.length != b.offset) {
		return false
	}
	return true
}

// hexC is C's "%#x": 0 without the prefix.
func hexC(v int64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}
