package img

import (
	"errors"
	"fmt"
	"strings"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

func (t *Tool) amend(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "ho:f:t:pq", long: []string{"help", "object=", "image-opts", "force"}})
	if !ok {
		return 1
	}
	var format string
	var optStrs []string
	force := false
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("amend")
		case "o":
			optStrs = append(optStrs, o.arg)
		case "f":
			format = o.arg
		case "q": // amend prints nothing anyway
		case "force":
			force = true
		case "t", "p":
		case "object", "image-opts":
			t.imageOpt(o)
		}
	}
	optStr := strings.Join(optStrs, ",")
	if optStr == "" {
		return t.usageErr("Must specify options (-o)")
	}
	if isHelpOpt(optStr) && format != "" {
		return t.amendHelp(graph.Lookup(format), format)
	}
	if len(ops) != 1 {
		return t.errorf("Expecting one image file name")
	}
	filename := ops[0]
	im, err := t.open(filename, openFlags{format: format, writable: !isHelpOpt(optStr)})
	if err != nil {
		return t.errorf("%s", err)
	}
	defer im.close(t.Ctx)
	drv := im.node.Driver()
	if isHelpOpt(optStr) {
		return t.amendHelp(drv, drv.Name)
	}
	am, ok := im.node.Instance().(graph.Amender)
	if !ok || drv.NewAmendOptions == nil {
		return t.errorf("Format driver '%s' does not support option amendment", drv.Name)
	}
	target := newTarget(drv.NewAmendOptions())
	if err := route(parseOptList(optStr), target, nil); err != nil {
		return t.errorf("%s", err)
	}
	if err := qapi.Decode(target.tree, target.opts, qapi.Keyval); err != nil {
		return t.errorf("%s", errText(err))
	}
	if err := am.Amend(t.Ctx, target.opts, force); err != nil {
		// A driver's message in QEMU's words is printed as it is (as
		// qemu-img 7.2 does for qcow2's "Unknown compatibility level"
		// and LUKS key slot errors); a bare failure gets the prefix.
		var qe *qapi.Error
		if errors.As(err, &qe) {
			return t.errorf("%s", errText(err))
		}
		return t.errorf("Error while amending options: %s", errnoText(err))
	}
	if err := im.node.RefreshSize(); err != nil {
		return t.errorf("%s", errText(err))
	}
	if err := im.close(t.Ctx); err != nil {
		return t.errorf("%s", errText(err))
	}
	return 0
}

func (t *Tool) amendHelp(drv *graph.Driver, name string) int {
	if drv == nil {
		return t.errorf("Unknown file format '%s'", name)
	}
	if drv.NewAmendOptions == nil {
		return t.errorf("Format driver '%s' does not support option amendment", name)
	}
	fmt.Fprintf(t.Stdout, "Amend options for '%s':\n", name)
	var b strings.Builder
	writeOptHelp(&b, drv.NewAmendOptions(), nil)
	fmt.Fprint(t.Stdout, strings.TrimPrefix(b.String(), "Supported options:\n"))
	return 0
}
