package img

import (
	"strings"
)

func (t *Tool) resize(args []string) int {
	// The size is always the last word, so that "-1M" is not taken for an
	// option (qemu-img takes it off before parsing options, too).
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
		return t.help("resize")
	}
	if len(args) < 2 {
		return t.usageErr("Not enough arguments")
	}
	sizeArg := args[len(args)-1]
	opts, ops, ok := t.getopt(args[:len(args)-1], optSpec{short: "f:hqU", long: []string{"help", "format=", "preallocation=", "shrink", "object=", "image-opts", "force-share"}})
	if !ok {
		return 1
	}
	var format string
	prealloc := "off"
	quiet, shrink := false, false
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("resize")
		case "f", "format":
			format = o.arg
		case "preallocation":
			switch o.arg {
			case "off", "metadata", "falloc", "full":
				prealloc = o.arg
			default:
				return t.errorf("Invalid preallocation mode '%s'", o.arg)
			}
		case "shrink":
			shrink = true
		case "q":
			quiet = true
		case "U", "force-share":
		case "object", "image-opts":
			t.imageOpt(o)
		}
	}
	if len(ops) != 1 {
		return t.usageErr("Expecting image file name and size")
	}
	filename := ops[0]
	rel := 0
	switch {
	case strings.HasPrefix(sizeArg, "+"):
		rel, sizeArg = 1, sizeArg[1:]
	case strings.HasPrefix(sizeArg, "-"):
		rel, sizeArg = -1, sizeArg[1:]
	}
	n, ok := parseSize(sizeArg)
	if !ok {
		return t.errorf("Parameter 'size' expects a non-negative number below 2^64\n" +
			"Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
			"and exabytes, respectively.")
	}
	im, err := t.open(filename, openFlags{format: format, writable: true, resize: true})
	if err != nil {
		return t.errorf("%s", err)
	}
	defer im.close(t.Ctx)
	cur := im.node.SizeNow()
	total := n
	switch rel {
	case 1:
		total = cur + n
	case -1:
		total = cur - n
	}
	if total <= 0 {
		return t.errorf("New image size must be positive")
	}
	if total < cur && !shrink {
		t.errorf("Use the --shrink option to perform a shrink operation.")
		t.warnf("Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.")
		return 1
	}
	if total < cur && prealloc != "off" {
		return t.errorf("Preallocation can only be used for growing images")
	}
	if err := im.node.Truncate(t.Ctx, total, false, prealloc); err != nil {
		return t.errorf("%s", truncErr(err))
	}
	if err := im.close(t.Ctx); err != nil {
		return t.errorf("%s", errText(err))
	}
	t.printf(quiet, "Image resized.\n")
	return 0
}

// truncErr drops the errno text QEMU does not show after its own message
// ("Unsupported preallocation mode: metadata").
func truncErr(err error) string {
	s := errText(err)
	for _, suffix := range []string{": operation not supported", ": not supported"} {
		s = strings.TrimSuffix(s, suffix)
	}
	return s
}
