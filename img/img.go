package img

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"syscall"

	"blockbackend/graph"
	"blockbackend/permissions"
	"blockbackend/qmp/keyval"
	"blockbackend/qmp/qapi"
)

// Version is what `img --version` prints first: QEMU's version, since our
// behaviour follows qemu-img 7.2's.
const Version = "7.2.22"

// Tool runs image commands. Its zero value is not usable; see Main.
type Tool struct {
	// Prog prefixes error messages ("qemu-img: ..."), as qemu-img's name
	// does; scripts match on that text.
	Prog   string
	Stdout io.Writer
	Stderr io.Writer
	// Log receives the graph's logs (discarded when nil).
	Log *slog.Logger
	// Ctx bounds every operation (Background when nil).
	Ctx context.Context

	extraOpts map[string]any // merged into the next open's format node options
	objects   []string       // --object definitions, added to every graph
	imageOpts bool           // --image-opts: image names are block options
}

// newGraph is a graph with the --object objects (secrets) in it.
func (t *Tool) newGraph() (*graph.Graph, error) {
	g := graph.New(t.Log)
	g.ImageTool = true
	for _, def := range t.objects {
		m, isJSON, err := keyval.ParseOption(def, "qom-type")
		if err == nil {
			mode := qapi.Keyval
			if isJSON {
				mode = qapi.JSON
			}
			err = g.Objects.Add(m, mode)
		}
		if err != nil {
			g.Close()
			return nil, err
		}
	}
	return g, nil
}

// Main runs `img ARGS...` with qemu-img's name in messages and returns
// the exit status.
func Main(args []string, stdout, stderr io.Writer) int {
	t := &Tool{Prog: "qemu-img", Stdout: stdout, Stderr: stderr}
	return t.Run(args)
}

type command struct {
	name string
	run  func(t *Tool, args []string) int
}

var commands []command

func init() {
	commands = []command{
		{"amend", (*Tool).amend},
		{"check", (*Tool).check},
		{"compare", (*Tool).compare},
		{"convert", (*Tool).convert},
		{"create", (*Tool).create},
		{"info", (*Tool).info},
		{"map", (*Tool).mapCmd},
		{"measure", (*Tool).measure},
		{"snapshot", (*Tool).snapshot},
		{"rebase", (*Tool).rebase},
		{"resize", (*Tool).resize},
	}
}

// Run runs one command line (without the program name).
func (t *Tool) Run(args []string) int {
	if t.Ctx == nil {
		t.Ctx = context.Background()
	}
	if t.Log == nil {
		t.Log = slog.New(slog.DiscardHandler)
	}
	// Standard options come before the command.
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		switch args[0] {
		case "-h", "--help":
			t.help("")
			return 0
		case "-V", "--version":
			fmt.Fprintf(t.Stdout, "%s version %s (blockbackend)\n%s\n", t.Prog, Version, copyright)
			return 0
		case "-T", "--trace":
			if len(args) < 2 {
				return t.usageErr("missing argument for option '%s'", args[0])
			}
			args = args[2:] // tracing is accepted and ignored
			continue
		}
		if strings.HasPrefix(args[0], "--trace=") {
			args = args[1:]
			continue
		}
		return t.usageErr("unrecognized option '%s'", args[0])
	}
	if len(args) == 0 {
		return t.usageErr("Not enough arguments")
	}
	for _, c := range commands {
		if c.name == args[0] {
			return c.run(t, args[1:])
		}
	}
	return t.usageErr("Command not found: %s", args[0])
}

const copyright = "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers"

// errorf prints "prog: message" and returns 1, qemu-img's usual failure.
func (t *Tool) errorf(format string, a ...any) int {
	fmt.Fprintf(t.Stderr, "%s: %s\n", t.Prog, fmt.Sprintf(format, a...))
	return 1
}

// warnf prints "prog: warning: message".
func (t *Tool) warnf(format string, a ...any) {
	fmt.Fprintf(t.Stderr, "%s: warning: %s\n", t.Prog, fmt.Sprintf(format, a...))
}

// usageErr is errorf plus qemu-img's pointer to --help.
func (t *Tool) usageErr(format string, a ...any) int {
	t.errorf(format, a...)
	fmt.Fprintf(t.Stderr, "Try '%s --help' for more information\n", t.Prog)
	return 1
}

// errText is an error as qemu-img prints it: QMP errors by their
// description, errnos as strerror, lock conflicts with their hint.
func errText(err error) string {
	var le *permissions.LockError
	if errors.As(err, &le) {
		return strings.TrimSuffix(strings.Replace(err.Error(), le.Error(), le.Full(), 1), "\n")
	}
	return err.Error()
}

// errnoText is "-N (strerror)", qemu-img's way to show a bare errno.
func errnoText(err error) string {
	var en syscall.Errno
	if errors.As(err, &en) {
		return fmt.Sprintf("-%d (%s)", int(en), strerror(en))
	}
	return err.Error()
}

// errString is an error as QEMU's error_setg_errno shows a bare errno
// (its strerror), or the error's own text.
func errString(err error) string {
	var en syscall.Errno
	if errors.As(err, &en) && err.Error() == en.Error() {
		return strerror(en)
	}
	return errText(err)
}

// ioErrString is an I/O error as qemu-img reports failed requests: the
// strerror of its errno, when it has one (the driver's context is lost,
// as in QEMU), else its text.
func ioErrString(err error) string {
	var en syscall.Errno
	if errors.As(err, &en) {
		return strerror(en)
	}
	return errText(err)
}

// strerror is glibc's wording (Go's texts are lower case).
func strerror(en syscall.Errno) string {
	s := en.Error()
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// image is an open image: its graph, the top node and the user edge that
// holds the permissions qemu-img's BlockBackend holds.
type image struct {
	g    *graph.Graph
	node *graph.Node
	user *graph.Child
	// fname is the image's name as qemu-img shows it: the filename given,
	// or for --image-opts the file's name when the options say no more
	// than driver and file, else "json:{...}" of the options.
	fname  string
	closed bool
}

type toolUser struct{}

func (toolUser) UserDesc() string { return "an unnamed block device" }

// openFlags say how to open an image.
type openFlags struct {
	format     string
	writable   bool
	forceShare bool // -U
	// noBacking opens without the backing chain (rebase -u, create -u).
	noBacking bool
	// exclusive: nobody else may write (convert's sources).
	exclusive bool
	// resize: the size will change (resize).
	resize bool
	// plainName: the name is a filename even with --image-opts (convert's
	// target).
	plainName bool
	// noIO: metadata only (graph.ImageOptions.NoIO), as qemu-img info.
	noIO bool
}

// open opens filename as qemu-img does (img_open): the graph's
// OpenImage, then a user with the permissions qemu-img's BlockBackend
// holds. Observed with qemu-img 7.2 against a qemu-nbd that writes the
// image: every command but convert shares write and resize with other
// users (info, map, compare, amend, rebase work; resize, which needs
// resize, does not), while convert's sources do not share write.
func (t *Tool) open(filename string, f openFlags) (*image, error) {
	if t.imageOpts && !f.plainName && f.format != "" {
		return nil, errors.New("--image-opts and --format are mutually exclusive")
	}
	g, err := t.newGraph()
	if err != nil {
		return nil, err
	}
	o := graph.ImageOptions{Format: f.format, ReadOnly: !f.writable, ForceShare: f.forceShare && !f.writable, NoIO: f.noIO}
	if f.writable { // even with -q, as qemu-img
		o.Warn = func(s string) { fmt.Fprintln(t.Stderr, s) }
	}
	extra := func(noBacking bool) map[string]any {
		m := map[string]any{}
		if noBacking {
			m["backing"] = nil
		}
		if t.extraOpts != nil {
			qapi.Merge(m, qapi.Clone(t.extraOpts))
		}
		if len(m) == 0 {
			return nil
		}
		return m
	}
	var optsGiven map[string]any // --image-opts, parsed
	openIt := func() (*graph.Node, error) {
		if t.imageOpts && !f.plainName {
			m, err := keyval.Parse(filename, "")
			if err != nil {
				return nil, err
			}
			optsGiven = m
			return g.OpenImageOptions(t.Ctx, m, qapi.Keyval, o)
		}
		return g.OpenImage(t.Ctx, filename, o)
	}
	o.Extra = extra(f.noBacking)
	n, err := openIt()
	if err != nil && f.noBacking && isUnexpected(err, "backing") {
		// A format without backing files: open it plainly.
		g.Close()
		if g, err = t.newGraph(); err != nil {
			return nil, err
		}
		o.Extra = extra(false)
		n, err = openIt()
	}
	if err != nil {
		g.Close()
		return nil, fmt.Errorf("Could not open '%s': %s", filename, errText(err))
	}
	perm := permissions.ConsistentRead
	shared := permissions.All
	if f.exclusive && !f.forceShare {
		shared = permissions.ConsistentRead | permissions.WriteUnchanged
	}
	if f.writable {
		perm |= permissions.Write
	}
	if f.resize {
		perm |= permissions.Resize
	}
	u, err := g.AttachUser(toolUser{}, n, "root", perm, shared)
	if err != nil {
		g.Close()
		return nil, fmt.Errorf("Could not open '%s': %s", filename, errText(err))
	}
	display := filename
	if optsGiven != nil {
		display = optionsName(optsGiven, n)
	}
	return &image{g: g, node: n, user: u, fname: display}, nil
}

func isUnexpected(err error, member string) bool {
	return strings.Contains(err.Error(), "'"+member+"' is unexpected")
}

// close flushes (when writable) and closes everything.
func (im *image) close(ctx context.Context) error {
	if im == nil || im.closed {
		return nil
	}
	im.closed = true
	var errs []error
	if !im.node.ReadOnly() {
		errs = append(errs, im.node.Flush(ctx))
	}
	im.g.DetachUser(im.user)
	errs = append(errs, im.g.Close())
	return errors.Join(errs...)
}

// parseOutput checks --output's value.
func (t *Tool) parseOutput(v string) (json bool, ok bool) {
	switch v {
	case "human":
		return false, true
	case "json":
		return true, true
	}
	t.errorf("--output must be used with human or json as argument.")
	return false, false
}

// imageOpt takes --object and --image-opts, which the image commands
// accept alike: they say how images are opened (secrets for encrypted
// ones; names as block options), whatever the command does with them.
func (t *Tool) imageOpt(o opt) {
	switch o.name {
	case "object":
		t.objects = append(t.objects, o.arg)
	case "image-opts":
		t.imageOpts = true
	}
}

// parseSize reads a size as qemu-img does (qemu_strtosz: k, M, G, T, P,
// E suffixes, a trailing 'b' ignored).
func parseSize(s string) (int64, bool) {
	s = strings.TrimSuffix(s, "b")
	if s == "" || strings.HasPrefix(s, "-") || strings.HasPrefix(s, "+") {
		return 0, false
	}
	v, err := qapi.ParseSize(s)
	if err != nil || v > 1<<63-1 {
		return 0, false
	}
	return int64(v), true
}

func (t *Tool) invalidSize() int {
	t.errorf("Invalid image size specified. You may use k, M, G, T, P or E suffixes for")
	t.errorf("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
	return 1
}

// printf prints to stdout unless quiet.
func (t *Tool) printf(quiet bool, format string, a ...any) {
	if !quiet {
		fmt.Fprintf(t.Stdout, format, a...)
	}
}

// sizeToStr is QEMU's size_to_str: three significant digits, binary
// units, switching to the next unit at 1000 of the current one.
func sizeToStr(v int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	f := float64(v)
	i := 0
	for i < len(units)-1 && f >= 1000 {
		f /= 1024
		i++
	}
	return fmt.Sprintf("%.3g %s", f, units[i]) // C's "%0.3g" prints the same
}

// optionsName is how QEMU names an image opened from options: its file's
// name when the options hold nothing but drivers and that file name, else
// the options as a json: filename.
func optionsName(m map[string]any, n *graph.Node) string {
	full := qapi.Clone(m)
	if f, ok := full["file"].(map[string]any); ok {
		if _, has := f["driver"]; !has {
			if c := n.Child("file"); c != nil {
				f["driver"] = c.Node().DriverName()
			}
		}
	}
	// Options that do not change what the image reads (QEMU's weak
	// options) do not make a json: name, and are left out of one.
	strong := false
	var prune func(m map[string]any, top bool)
	prune = func(m map[string]any, top bool) {
		for k, v := range m {
			switch k {
			case "read-only", "auto-read-only", "force-share", "cache", "discard", "detect-zeroes",
				"node-name", "locking", "aio", "aio-max-batch":
				delete(m, k)
			case "driver":
			case "filename":
				if top {
					strong = true // a format node named by file name
				}
			case "file":
				if f, ok := v.(map[string]any); ok {
					prune(f, false)
					continue
				}
				strong = true
			default:
				strong = true
			}
		}
	}
	prune(full, true)
	if _, isFormat := full["file"]; !isFormat {
		strong = false // a protocol node alone: its file name
	}
	if !strong {
		return n.Filename()
	}
	return "json:" + compactJSON(full)
}
