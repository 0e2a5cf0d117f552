package img

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"blockbackend/graph"
	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

func (t *Tool) create(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "F:b:f:ho:qu", long: []string{"help", "object="}})
	if !ok {
		return 1
	}
	fmtName, backing, backingFmt := "raw", "", ""
	var optStrs []string
	quiet, unsafe := false, false
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("create")
		case "f":
			fmtName = o.arg
		case "o":
			optStrs = append(optStrs, o.arg)
		case "b":
			backing = o.arg
		case "F":
			backingFmt = o.arg
		case "q":
			quiet = true
		case "u":
			unsafe = true
		case "object":
			t.objects = append(t.objects, o.arg)
		}
	}
	optStr := strings.Join(optStrs, ",")
	if isHelpOpt(optStr) {
		return t.printCreateHelp(fmtName, firstOr(ops, ""))
	}
	if len(ops) < 1 {
		return t.usageErr("Expecting image file name")
	}
	filename := ops[0]
	size := int64(-1)
	if len(ops) >= 2 {
		s, ok := parseSize(ops[1])
		if !ok {
			if v, err := qapi.ParseSize(strings.TrimSuffix(ops[1], "b")); err == nil && v > 1<<63-1 {
				return t.errorf("Invalid image size specified. Must be between 0 and %d.", int64(1<<63-1))
			}
			return t.invalidSize()
		}
		size = s
	}
	if len(ops) > 2 {
		return t.usageErr("Unexpected argument: %s", ops[2])
	}
	if err := t.createImage(createReq{
		filename: filename, format: fmtName, size: size, opts: parseOptList(optStr),
		backing: backing, backingFmt: backingFmt, unsafe: unsafe, quiet: quiet,
	}); err != nil {
		var he *hintError
		if errors.As(err, &he) {
			fmt.Fprintf(t.Stderr, "%s: %s: %s\n%s", t.Prog, filename, he.msg, he.hint)
			return 1
		}
		return t.errorf("%s: %s", filename, errText(err))
	}
	return 0
}

// hintError is a message with a hint on the lines after it, printed as
// qemu-img prints an error's hint: verbatim, so with no newline after it
// unless the hint ends with one (qemu-img 7.2's "Detected format of raw."
// does not).
type hintError struct{ msg, hint string }

func (e *hintError) Error() string { return e.msg + "\n" + e.hint }

func firstOr(s []string, def string) string {
	if len(s) > 0 {
		return s[0]
	}
	return def
}

// protocolFor is the protocol driver that holds filename.
func protocolFor(filename string) (*graph.Driver, error) {
	if strings.HasPrefix(filename, "json:") {
		return nil, errors.New("json: filenames cannot be created; create the plain file")
	}
	d, err := graph.ProtocolFor(filename)
	if err != nil {
		return nil, err
	}
	if d == nil {
		d = graph.Lookup("file")
	}
	if d == nil {
		return nil, errors.New("no protocol driver for plain files")
	}
	return d, nil
}

func (t *Tool) printCreateHelp(fmtName, filename string) int {
	drv := graph.Lookup(fmtName)
	if drv == nil {
		return t.errorf("Unknown file format '%s'", fmtName)
	}
	dc, ok := creatorOf(drv)
	if !ok {
		return t.errorf("Format driver '%s' does not support image creation", fmtName)
	}
	// With a file name qemu-img adds the protocol's options; without one
	// (convert, create with no name) it lists the format's alone.
	var protoOpts any
	title := "Supported options:"
	if filename == "" {
		title = fmt.Sprintf("Supported %s options:", fmtName)
	} else if !drv.Protocol {
		if p, err := protocolFor(filename); err == nil {
			if pc, ok := creatorOf(p); ok {
				protoOpts = pc.newOpts()
			}
		}
	}
	var b strings.Builder
	writeOptHelp(&b, dc.newOpts(), protoOpts)
	fmt.Fprint(t.Stdout, title+strings.TrimPrefix(b.String(), "Supported options:"))
	return 0
}

// creator is how img makes images of a driver: its ImageCreate when it
// has one (formats only qemu-img creates, such as raw), else its Create.
type creator struct {
	newOpts func() any
	create  func(ctx context.Context, cc *graph.CreateContext, opts any) error
}

func creatorOf(d *graph.Driver) (creator, bool) {
	if d.ImageCreate != nil && d.NewImageCreateOptions != nil {
		return creator{d.NewImageCreateOptions, d.ImageCreate}, true
	}
	if d.Create != nil && d.NewCreateOptions != nil {
		return creator{d.NewCreateOptions, d.Create}, true
	}
	return creator{}, false
}

// createReq is one image to create (img create, convert's target).
type createReq struct {
	filename, format   string
	size               int64 // -1: not given
	opts               []kv
	backing            string
	backingFmt         string
	unsafe, quiet      bool
	noFormattingOutput bool
}

// createImage makes an image as qemu-img create does: the protocol
// driver's Create makes the file, then the format's Create formats a node
// opened over it. Options go to whichever of the two structs has them.
func (t *Tool) createImage(r createReq) error {
	drv := graph.Lookup(r.format)
	if drv == nil {
		return fmt.Errorf("Unknown file format '%s'", r.format)
	}
	dc, ok := creatorOf(drv)
	if !ok {
		return fmt.Errorf("Format driver '%s' does not support image creation", r.format)
	}
	proto, err := protocolFor(r.filename)
	if err != nil {
		return err
	}
	pc, ok := creatorOf(proto)
	if !ok {
		return fmt.Errorf("Protocol driver '%s' does not support image creation", proto.Name)
	}
	var format, protoT *optTarget
	if drv.Protocol {
		// fmt=file (or another protocol): one struct takes everything.
		pc = dc
		protoT = newTarget(dc.newOpts())
	} else {
		format = newTarget(dc.newOpts())
		protoT = newTarget(pc.newOpts())
	}
	main := format
	if main == nil {
		main = protoT
	}
	given := map[string]string{}
	var items []kv
	sizeGiven := r.size >= 0 // the size operand; -o size may repeat (the last wins)
	for _, it := range r.opts {
		if it.key == "size" {
			s, ok := parseSize(it.val)
			if !ok {
				return errors.New("Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
			}
			if sizeGiven {
				return errors.New("The image size must be specified only once")
			}
			r.size = s
			continue
		}
		if it.key == "backing_file" && r.backing == "" {
			r.backing = it.val
			continue
		}
		if it.key == "backing_fmt" && r.backingFmt == "" {
			r.backingFmt = it.val
			continue
		}
		given[it.key] = it.val
		items = append(items, it)
	}
	if r.backing != "" {
		if !main.has("backing-file") {
			return optionError{fmt.Errorf("Backing file not supported for file format '%s'", r.format)}
		}
		items = append(items, kv{"backing_file", r.backing})
		given["backing_file"] = r.backing
		if !r.unsafe || r.size < 0 || r.backingFmt == "" {
			bsize, bfmt, err := t.probeBacking(r.filename, r.backing, r.backingFmt)
			if err != nil && !r.unsafe {
				return err
			}
			if err == nil {
				if r.backingFmt == "" {
					return &hintError{"Backing file specified without backing format", "Detected format of " + bfmt + "."}
				}
				if r.size < 0 {
					r.size = bsize
				}
			}
		}
		if r.backingFmt != "" {
			items = append(items, kv{"backing_fmt", r.backingFmt})
			given["backing_fmt"] = r.backingFmt
		}
	} else if r.backingFmt != "" {
		return errors.New("Backing file format is given without a backing file")
	}
	if r.size < 0 {
		return errors.New("Image creation needs a size parameter")
	}
	var other *optTarget
	if main != protoT {
		other = protoT
	}
	if err := route(items, main, other); err != nil {
		return optionError{err}
	}
	// qemu-img's legacy create path rounds the size up to whole sectors
	// for every format built here (file, raw, luks, qcow2), while QMP's
	// blockdev-create refuses an unaligned qcow2 size: round here, so the
	// drivers see what blockdev-create would be given.
	size := r.size
	if size <= 1<<63-1-511 {
		size = (size + 511) &^ 511
	}
	main.set("size", fmt.Sprint(size))
	// Decode once with a placeholder for the node (or file) name, to
	// check the options and learn the defaults before anything is made.
	placeholder := "file"
	if format == nil {
		placeholder = "filename"
	}
	main.set(placeholder, r.filename)
	if err := qapi.Decode(main.tree, main.opts, qapi.Keyval); err != nil {
		// qemu-img checks an enum's value only when the driver reads it,
		// after it has printed what it is about to do.
		if v, ok := enumValueError(err); ok {
			if !r.quiet && !r.noFormattingOutput {
				fmt.Fprintln(t.Stdout, formattingLine(r.filename, r.format, r.size, format, other, given, true))
			}
			if strings.Contains(err.Error(), "'preallocation'") && (v == "metadata" || v == "falloc" || v == "full") {
				// A PreallocMode value the format does not offer.
				return fmt.Errorf("Unsupported preallocation mode: %s", v)
			}
			if format != nil {
				// A format's create options go through QAPI in
				// qemu-img, whose message names the member (without
				// the path of a nested one: 'cipher-alg'); only
				// preallocation is parsed by the format itself where
				// it has no clusters (luks), as by the file protocol.
				if name, ok := enumParamName(err); ok && (name != "preallocation" || format.has("cluster-size")) {
					return fmt.Errorf("Parameter '%s' does not accept value '%s'", name, v)
				}
			}
			// The file protocol parses its enums itself.
			return fmt.Errorf("invalid parameter value: %s", v)
		}
		return err
	}
	if other != nil {
		// The protocol's options too, to check them and print them.
		preview := newTarget(pc.newOpts())
		preview.tree = qapi.Clone(other.tree)
		preview.set("filename", r.filename)
		preview.set("size", "0")
		if err := qapi.Decode(preview.tree, preview.opts, qapi.Keyval); err != nil {
			return err
		}
		other.opts = preview.opts
	}
	if !r.quiet && !r.noFormattingOutput {
		shown := other
		if format == nil {
			shown = protoT
		}
		fmt.Fprintln(t.Stdout, formattingLine(r.filename, r.format, r.size, format, shown, given, false))
	}

	g, err := t.newGraph()
	if err != nil {
		return err
	}
	defer g.Close()
	cc := g.NewCreateContext(t.Log)
	cc.Warn = func(msg string) { t.warnf("%s", msg) }
	// The protocol layer: the whole image for fmt=file, else an empty
	// file the format then fills.
	protoT.set("filename", r.filename)
	if format != nil {
		protoT.set("size", "0")
	}
	protoT.opts = pc.newOpts()
	if err := qapi.Decode(protoT.tree, protoT.opts, qapi.Keyval); err != nil {
		return err
	}
	if err := pc.create(t.Ctx, cc, protoT.opts); err != nil {
		return err
	}
	if format == nil {
		return nil
	}
	pn, err := g.OpenImage(t.Ctx, r.filename, graph.ImageOptions{Format: proto.Name})
	if err != nil {
		return err
	}
	u, err := g.AttachUser(toolUser{}, pn, "root", permissions.ConsistentRead|permissions.Write|permissions.Resize, permissions.All)
	if err != nil {
		return err
	}
	defer g.DetachUser(u)
	format.set("file", pn.Name())
	// Other members that name a node (qcow2's data-file) are given to
	// qemu-img as file names: make each file with the protocol driver,
	// open it and pass its node, as qemu-img creates data_file.
	for name, v := range format.tree {
		fname, ok := v.(string)
		if m, isMember := member(format.opts, name); name == "file" || !ok || fname == "" || !isMember || !isChildRef(m.Type) {
			continue
		}
		node, u, err := t.createAux(g, cc, fname)
		if err != nil {
			return err
		}
		defer g.DetachUser(u)
		format.tree[name] = node.Name()
	}
	format.opts = dc.newOpts()
	if err := qapi.Decode(format.tree, format.opts, qapi.Keyval); err != nil {
		return err
	}
	if err := dc.create(t.Ctx, cc, format.opts); err != nil {
		return err
	}
	return pn.Flush(t.Ctx)
}

// enumValueError recognises qapi's "Parameter 'x' does not accept value
// 'v'" and returns v.
func enumValueError(err error) (string, bool) {
	const mark = "does not accept value '"
	msg := err.Error()
	i := strings.Index(msg, mark)
	if i < 0 {
		return "", false
	}
	return strings.TrimSuffix(msg[i+len(mark):], "'"), true
}

// enumParamName returns the member an enum error is about, the last
// component of its path.
func enumParamName(err error) (string, bool) {
	const mark = "Parameter '"
	msg := err.Error()
	i := strings.Index(msg, mark)
	if i < 0 {
		return "", false
	}
	name := msg[i+len(mark):]
	j := strings.IndexByte(name, '\'')
	if j < 0 {
		return "", false
	}
	name = name[:j]
	return name[strings.LastIndexByte(name, '.')+1:], true
}

var childRefType = reflect.TypeOf(graph.ChildRef{})

func isChildRef(t reflect.Type) bool {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t == childRefType
}

// createAux makes an empty file for a node-valued create option and
// opens it, writable, in g.
func (t *Tool) createAux(g *graph.Graph, cc *graph.CreateContext, filename string) (*graph.Node, *graph.Child, error) {
	proto, err := protocolFor(filename)
	if err != nil {
		return nil, nil, err
	}
	pc, ok := creatorOf(proto)
	if !ok {
		return nil, nil, fmt.Errorf("Protocol driver '%s' does not support image creation", proto.Name)
	}
	opts := pc.newOpts()
	if err := qapi.Decode(map[string]any{"filename": filename, "size": "0"}, opts, qapi.Keyval); err != nil {
		return nil, nil, err
	}
	if err := pc.create(t.Ctx, cc, opts); err != nil {
		return nil, nil, err
	}
	n, err := g.OpenImage(t.Ctx, filename, graph.ImageOptions{Format: proto.Name})
	if err != nil {
		return nil, nil, err
	}
	u, err := g.AttachUser(toolUser{}, n, "root", permissions.ConsistentRead|permissions.Write|permissions.Resize, permissions.All)
	if err != nil {
		return nil, nil, err
	}
	return n, u, nil
}

// optionError is a bad -o option, found before anything is created
// (convert reports it without naming the target).
type optionError struct{ error }

func (e optionError) Unwrap() error { return e.error }

// probeBacking opens the backing file (relative to the new image's
// directory, as the format will resolve it) to check it and learn its
// size and format.
func (t *Tool) probeBacking(filename, backing, backingFmt string) (int64, string, error) {
	path := backing
	if !strings.HasPrefix(backing, "/") && !strings.Contains(backing, ":") {
		if i := strings.LastIndexByte(filename, '/'); i >= 0 {
			path = filename[:i+1] + backing
		}
	}
	g, err := t.newGraph()
	if err != nil {
		return 0, "", err
	}
	defer g.Close()
	n, err := g.OpenImage(t.Ctx, path, graph.ImageOptions{Format: backingFmt, ReadOnly: true, ForceShare: true, NoIO: true})
	if err != nil {
		return 0, "", fmt.Errorf("%s\nCould not open backing image.", errText(err))
	}
	return n.SizeNow(), n.DriverName(), nil
}
