package img

import (
	"fmt"
	"strings"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

func (t *Tool) measure(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "hf:O:o:l:U", long: []string{"help", "output=", "size=", "object=", "image-opts", "force-share"}})
	if !ok {
		return 1
	}
	var format, outFmt string = "", "raw"
	var optStrs []string
	jsonOut, share := false, false
	size := int64(-1)
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("measure")
		case "f":
			format = o.arg
		case "O":
			outFmt = o.arg
		case "o":
			optStrs = append(optStrs, o.arg)
		case "output":
			if jsonOut, ok = t.parseOutput(o.arg); !ok {
				return 1
			}
		case "size":
			v, ok := parseSize(o.arg)
			if !ok {
				return t.invalidSize()
			}
			size = v
		case "U", "force-share":
			share = true
		case "object", "image-opts":
			t.imageOpt(o)
		case "l":
			return t.errorf("-%s is not supported by blockbackend img", o.name)
		}
	}
	if len(ops) > 1 {
		return t.usageErr("Expecting one image file name")
	}
	if size >= 0 && len(ops) == 1 {
		return t.errorf("--size N cannot be used together with a filename.")
	}
	if size < 0 && len(ops) == 0 {
		return t.errorf("Either --size N or one filename must be specified.")
	}
	drv := graph.Lookup(outFmt)
	if drv == nil {
		return t.errorf("Unknown file format '%s'", outFmt)
	}
	optStr := strings.Join(optStrs, ",")
	dc, ok := creatorOf(drv)
	if drv.Measure == nil || !ok {
		return t.errorf("Block driver '%s' does not support size measurement", outFmt)
	}
	var src *graph.Node
	if len(ops) == 1 {
		im, err := t.open(ops[0], openFlags{format: format, forceShare: share})
		if err != nil {
			return t.errorf("%s", err)
		}
		defer im.close(t.Ctx)
		src = im.node
		size = src.SizeNow()
	}
	target := newTarget(dc.newOpts())
	if err := route(parseOptList(optStr), target, nil); err != nil {
		// (measure has no -o help: "help" is an invalid parameter too)
		t.errorf("%s", err)
		return t.errorf("Invalid options for file format '%s'", outFmt)
	}
	if target.has("file") {
		target.set("file", "")
	}
	target.set("size", fmt.Sprint(size))
	if err := qapi.Decode(target.tree, target.opts, qapi.Keyval); err != nil {
		return t.errorf("%s", errText(err))
	}
	res, err := drv.Measure(t.Ctx, target.opts, size, src)
	if err != nil {
		return t.errorf("%s", errText(err))
	}
	if jsonOut {
		m := map[string]any{"required": res.Required, "fully-allocated": res.FullyAllocated}
		if res.Bitmaps >= 0 {
			m["bitmaps"] = res.Bitmaps
		}
		writeJSON(t.Stdout, m)
		return 0
	}
	fmt.Fprintf(t.Stdout, "required size: %d\nfully allocated size: %d\n", res.Required, res.FullyAllocated)
	if res.Bitmaps >= 0 {
		fmt.Fprintf(t.Stdout, "bitmaps size: %d\n", res.Bitmaps)
	}
	return 0
}
