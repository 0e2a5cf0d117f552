package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
	"blockbackend/graph/job"
	"blockbackend/nbd/nbdexport"
	"blockbackend/qmp"
	"blockbackend/qmp/keyval"
	"blockbackend/qmp/qapi"
)

const version = "0.1.0"

const usage = `Usage: blockbackend [options]
       blockbackend demo [--dir DIR]
       blockbackend qmp --socket PATH COMMAND [JSON-ARGUMENTS]
       blockbackend img COMMAND [OPTIONS]   (qemu-img's commands; img --help)
blockbackend serves QEMU's block layer out of process: a drop-in for
qemu-storage-daemon, driven over QMP.

  -h, --help                display this help and exit
  -V, --version             output version information and exit
  -T, --trace [[enable=]<pattern>]
                            accepted for compatibility; tracing is done with
                            log levels (BLOCKBACKEND_LOG=debug)

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                            configure a block backend (also as JSON: {...})

  --chardev socket,id=<id>,path=<path>[,server=on][,wait=off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on][,wait=off]
  --chardev socket,id=<id>,addr.type=unix|inet|vsock,...
  --chardev stdio,id=<id>
                            configure a character device (QMP monitors)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,share-rw=on|off][,description=<desc>]
                            export the specified block node over NBD
                            (needs --nbd-server); share-rw=on lets other
                            processes write the image while it is exported

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                            configure a QMP monitor
  --qmp <path>              shorthand: a QMP monitor on a UNIX socket at <path>

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
                            start an NBD server for exporting block nodes

  --object help             list object types that can be added
  --object secret,id=<id>,data=<data>[,format=raw|base64]
  --object secret,id=<id>,file=<file>[,format=raw|base64]
                            create a new object (secrets for now)

  --pidfile <path>          write process ID to a file after startup
  --daemonize               daemonize the process, and have the parent exit
                            once startup is complete
`

// option is one command-line option, kept in order.
type option struct{ name, value string }

// takesValue lists the options with an argument.
var takesValue = map[string]bool{
	"blockdev": true, "chardev": true, "export": true, "monitor": true, "qmp": true,
	"nbd-server": true, "object": true, "pidfile": true, "trace": true, "T": true,
}

func parseArgs(args []string) ([]option, error) {
	var out []option
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			return nil, fmt.Errorf("Unexpected argument: %s", a)
		}
		name := strings.TrimLeft(a, "-")
		value := ""
		hasValue := false
		if eq := strings.IndexByte(name, '='); eq >= 0 && strings.HasPrefix(a, "--") {
			name, value, hasValue = name[:eq], name[eq+1:], true
		}
		switch name {
		case "h", "help", "V", "version", "daemonize":
			if hasValue {
				return nil, fmt.Errorf("option '--%s' doesn't allow an argument", name)
			}
			out = append(out, option{name: name})
			continue
		}
		if !takesValue[name] {
			return nil, fmt.Errorf("unrecognized option '%s'", a)
		}
		if !hasValue {
			if i+1 >= len(args) {
				return nil, fmt.Errorf("option '%s' requires an argument", a)
			}
			i++
			value = args[i]
		}
		out = append(out, option{name: name, value: value})
	}
	return out, nil
}

// daemon is the running process's state.
type daemon struct {
	log      *slog.Logger
	g        *graph.Graph
	qmp      *qmp.Server
	jobs     *job.Manager
	chardevs map[string]*chardev
	pidfile  string
	pidfileF *os.File // kept open: its lock stops a second daemon
	quit     chan struct{}
	quitOnce sync.Once
}

type chardev struct {
	id    string
	sock  *qmp.ChardevSocket // nil for stdio
	stdio bool
	used  bool
}

func newLogger() *slog.Logger {
	level := slog.LevelWarn
	switch strings.ToLower(os.Getenv("BLOCKBACKEND_LOG")) {
	case "debug":
		level = slog.LevelDebug
	case "info":
		level = slog.LevelInfo
	case "error":
		level = slog.LevelError
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

func runDaemon(args []string) int {
	opts, err := parseArgs(args)
	if err != nil {
		return fatalf("%v\nTry 'blockbackend --help' for more information.", err)
	}
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			fmt.Print(usage)
			return 0
		case "V", "version":
			fmt.Printf("blockbackend version %s (compatible with qemu-storage-daemon %d.%d.%d)\n",
				version, qemuVersion.Major, qemuVersion.Minor, qemuVersion.Micro)
			return 0
		}
	}
	daemonize := false
	for _, o := range opts {
		if o.name == "daemonize" {
			daemonize = true
		}
	}
	if daemonize && os.Getenv(daemonEnv) == "" {
		return forkDaemon()
	}

	// Catch the signals before any option is applied: a monitor may
	// already answer (and its client send SIGTERM) while later options
	// are still being applied, and SIGTERM must still end in exit 0.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	d := &daemon{
		log:      newLogger(),
		chardevs: map[string]*chardev{},
		quit:     make(chan struct{}),
	}
	d.g = graph.New(d.log)
	d.qmp = qmp.NewServer(qmp.ServerOptions{Version: qemuVersion, Logger: d.log})
	d.g.Events = d.qmp.Emit
	// quit may come from several monitors at once (its hook runs after the
	// reply, on its own goroutine).
	qmp.BlockCommands(d.qmp, d.g, func() { d.quitOnce.Do(func() { close(d.quit) }) })
	nbdexport.SetLogger(d.log)
	qmp.NBDCommands(d.qmp, d.g)
	d.jobs = qmp.JobCommands(d.qmp, d.g)

	for _, o := range opts {
		if err := d.apply(o); err != nil {
			d.shutdown()
			return fatalf("--%s %s: %s", o.name, o.value, errText(err))
		}
	}
	for id, c := range d.chardevs {
		if !c.used {
			d.log.Warn("chardev is not used by any monitor", "chardev", id)
		}
	}
	if d.pidfile != "" {
		f, err := writePidfile(d.pidfile)
		if err != nil {
			d.shutdown()
			return fatalf("cannot create PID file: %v", err)
		}
		d.pidfileF = f
	}
	if daemonize {
		if err := daemonReady(); err != nil {
			d.shutdown()
			return fatalf("%v", err)
		}
	}

	select {
	case <-sig:
	case <-d.quit:
	}
	d.shutdown()
	return 0
}

// errText is the message a person sees: QMP's description and, on the
// next line, any hint QEMU would print (lock conflicts have one).
func errText(err error) string {
	var h interface{ Hint() string }
	if errors.As(err, &h) {
		return err.Error() + "\n" + h.Hint()
	}
	return err.Error()
}

func (d *daemon) shutdown() {
	_ = d.qmp.Close()
	if nbdexport.Default().Running() {
		_ = qmp.StopNBD(context.Background(), d.g)
	}
	if d.jobs != nil {
		d.jobs.Close()
	}
	if err := d.g.Close(); err != nil {
		d.log.Error("closing block nodes", "err", err)
	}
	if d.pidfileF != nil {
		_ = os.Remove(d.pidfile)
		_ = d.pidfileF.Close()
	}
}

func (d *daemon) apply(o option) error {
	switch o.name {
	case "T", "trace":
		d.log.Warn("tracing is not built; use BLOCKBACKEND_LOG=debug", "pattern", o.value)
		return nil
	case "daemonize":
		return nil
	case "pidfile":
		d.pidfile = o.value
		return nil
	case "blockdev":
		m, isJSON, err := keyval.ParseOption(o.value, "driver")
		if err != nil {
			return err
		}
		_, err = d.g.Add(context.Background(), m, modeOf(isJSON))
		return err
	case "object":
		if o.value == "help" {
			fmt.Println("List of user creatable objects:\n  secret")
			os.Exit(0)
		}
		m, isJSON, err := keyval.ParseOption(o.value, "qom-type")
		if err != nil {
			return err
		}
		return d.g.Objects.Add(m, modeOf(isJSON))
	case "export":
		m, isJSON, err := keyval.ParseOption(o.value, "type")
		if err != nil {
			return err
		}
		_, err = d.g.AddExport(context.Background(), m, modeOf(isJSON))
		return err
	case "chardev":
		return d.addChardev(o.value)
	case "monitor":
		m, isJSON, err := keyval.ParseOption(o.value, "chardev")
		if err != nil {
			return err
		}
		mo, err := qmp.ParseMonitorOptions(m, modeOf(isJSON))
		if err != nil {
			return err
		}
		return d.startMonitor(mo)
	case "qmp":
		id := fmt.Sprintf("qmp%d", len(d.chardevs))
		if err := d.addChardev(fmt.Sprintf("socket,id=%s,path=%s,server=on,wait=off", id, strings.ReplaceAll(o.value, ",", ",,"))); err != nil {
			return err
		}
		return d.startMonitor(qmp.MonitorOptions{Chardev: id})
	case "nbd-server":
		m, isJSON, err := keyval.ParseOption(o.value, "")
		if err != nil {
			return err
		}
		var so nbdexport.ServerOptions
		if err := qapi.Decode(m, &so, modeOf(isJSON)); err != nil {
			return err
		}
		return nbdexport.Default().Start(so)
	}
	return fmt.Errorf("unhandled option --%s", o.name)
}

func modeOf(isJSON bool) qapi.Mode {
	if isJSON {
		return qapi.JSON
	}
	return qapi.Keyval
}

func (d *daemon) addChardev(value string) error {
	m, isJSON, err := keyval.ParseOption(value, "backend")
	if err != nil {
		return err
	}
	id, _ := m["id"].(string)
	if id == "" {
		return qapi.Errorf(qapi.GenericError, "Parameter 'id' is missing")
	}
	if _, dup := d.chardevs[id]; dup {
		return qapi.Errorf(qapi.GenericError, "Duplicate ID '%s' for chardev", id)
	}
	backend, _ := m["backend"].(string)
	switch backend {
	case "stdio":
		d.chardevs[id] = &chardev{id: id, stdio: true}
		return nil
	case "socket":
		delete(m, "backend")
		cs, err := qmp.ParseChardevSocket(m, modeOf(isJSON))
		if err != nil {
			return err
		}
		d.chardevs[id] = &chardev{id: id, sock: cs}
		return nil
	case "":
		return qapi.Errorf(qapi.GenericError, "Parameter 'backend' is missing")
	default:
		return qapi.Errorf(qapi.GenericError, "chardev backend '%s' is not built into blockbackend (only socket and stdio)", backend)
	}
}

func (d *daemon) startMonitor(mo qmp.MonitorOptions) error {
	c := d.chardevs[mo.Chardev]
	if c == nil {
		return qapi.Errorf(qapi.GenericError, "chardev \"%s\" not found", mo.Chardev)
	}
	if c.used {
		return qapi.Errorf(qapi.GenericError, "Device '%s' is in use", mo.Chardev)
	}
	c.used = true
	if c.stdio {
		go d.qmp.ServeConn(stdioConn{}, mo)
		return nil
	}
	l, err := c.sock.Listen()
	if err != nil {
		return err
	}
	go func() {
		if err := d.qmp.Serve(l, mo); err != nil && !errors.Is(err, net.ErrClosed) {
			d.log.Error("QMP listener stopped", "chardev", c.id, "err", err)
		}
	}()
	return nil
}

// stdioConn is the process's stdin/stdout as one connection (--chardev stdio).
type stdioConn struct{ net.Conn }

func (stdioConn) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdioConn) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdioConn) Close() error                { return nil }

var _ io.ReadWriteCloser = stdioConn{}

// writePidfile writes our pid and takes a write lock on the file, so a
// second daemon with the same pidfile fails, as QEMU's does. The lock
// lasts while the returned file stays open.
func writePidfile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0}
	if err := unix.FcntlFlock(f.Fd(), unix.F_SETLK, &lk); err != nil {
		f.Close()
		return nil, fmt.Errorf("Cannot lock pid file: %w", err)
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.WriteString(strconv.Itoa(os.Getpid()) + "\n"); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// daemonEnv marks the re-executed child of --daemonize; its value is the
// fd of the pipe on which the child reports that start-up is complete.
const daemonEnv = "BLOCKBACKEND_DAEMON_READY_FD"

// forkDaemon starts ourselves again in a new session and exits 0 once the
// child says start-up is complete (1 if it failed: its message is on our
// shared stderr).
func forkDaemon() int {
	r, w, err := os.Pipe()
	if err != nil {
		return fatalf("daemonize: %v", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return fatalf("daemonize: %v", err)
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Env = append(os.Environ(), daemonEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fatalf("daemonize: %v", err)
	}
	w.Close()
	buf := make([]byte, 1)
	n, _ := r.Read(buf)
	if n == 1 && buf[0] == 'R' {
		return 0
	}
	_ = cmd.Wait()
	return 1
}

// daemonReady tells the waiting parent that start-up is complete and
// detaches from the terminal's stdio.
func daemonReady() error {
	fd, err := strconv.Atoi(os.Getenv(daemonEnv))
	if err != nil {
		return fmt.Errorf("daemonize: bad %s", daemonEnv)
	}
	f := os.NewFile(uintptr(fd), "ready")
	if _, err := f.Write([]byte{'R'}); err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	f.Close()
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	for _, std := range []int{0, 1, 2} {
		_ = unix.Dup2(int(null.Fd()), std)
	}
	return nil
}

// qemuVersion is what the greeting and query-version report: the QEMU
// release whose behaviour we match, with our own package string.
var qemuVersion = qmp.VersionInfo{Major: 7, Minor: 2, Micro: 22, Package: "blockbackend " + version}
