package qmp

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"blockbackend/qmp/qapi"
)

// ChardevSocket is a `--chardev socket,...` option, the part of QEMU's
// socket character device that a QMP monitor needs: a listening socket.
//
// The address is given QEMU's way (path=, or host= and port=, or fd=) or,
// as our extension, as a SocketAddress under addr. (addr.type=unix|inet|
// vsock|fd, addr.path, addr.host, addr.port, addr.cid, ...); vsock is
// only reachable through addr.
//
// Refused, with an error: server=off (we only listen), reconnect (QEMU
// refuses it for a server too), telnet, tn3270, websocket, tls-creds,
// mux, logfile. wait is accepted but we never wait for a client before
// starting: the monitor simply accepts clients when they come (QEMU's
// wait=on would block start-up until the first one).
type ChardevSocket struct {
	ID        string         `qapi:"id"`
	Path      string         `qapi:"path,optional"`
	Host      string         `qapi:"host,optional"`
	Port      looseString    `qapi:"port,optional"`
	FD        looseString    `qapi:"fd,optional"`
	Addr      *SocketAddress `qapi:"addr,optional"`
	Server    bool           `qapi:"server,optional"`
	Wait      *bool          `qapi:"wait,optional"`
	Telnet    bool           `qapi:"telnet,optional"`
	TN3270    bool           `qapi:"tn3270,optional"`
	Websocket bool           `qapi:"websocket,optional"`
	Reconnect int64          `qapi:"reconnect,optional"`
	Abstract  bool           `qapi:"abstract,optional"`
	Tight     *bool          `qapi:"tight,optional"`
	IPv4      bool           `qapi:"ipv4,optional"`
	IPv6      bool           `qapi:"ipv6,optional"`
	To        int64          `qapi:"to,optional"`
	Nodelay   *bool          `qapi:"nodelay,optional"`
	Delay     *bool          `qapi:"delay,optional"`
	TLSCreds  string         `qapi:"tls-creds,optional"`
	TLSAuthz  string         `qapi:"tls-authz,optional"`
	Mux       bool           `qapi:"mux,optional"`
	Logfile   string         `qapi:"logfile,optional"`
	Logappend bool           `qapi:"logappend,optional"`
}

// SocketAddressType is QAPI's SocketAddressType.
type SocketAddressType string

// EnumValues lists the address types.
func (SocketAddressType) EnumValues() []string { return []string{"inet", "unix", "vsock", "fd"} }

// SocketAddress is QAPI's flat SocketAddress union.
type SocketAddress struct {
	Type SocketAddressType `qapi:"type"`
	// unix
	Path     string `qapi:"path,optional"`
	Abstract bool   `qapi:"abstract,optional"`
	Tight    *bool  `qapi:"tight,optional"`
	// inet (port also for vsock)
	Host      string      `qapi:"host,optional"`
	Port      looseString `qapi:"port,optional"`
	Numeric   bool        `qapi:"numeric,optional"`
	To        int64       `qapi:"to,optional"`
	IPv4      *bool       `qapi:"ipv4,optional"`
	IPv6      *bool       `qapi:"ipv6,optional"`
	KeepAlive bool        `qapi:"keep-alive,optional"`
	// vsock
	CID looseString `qapi:"cid,optional"`
	// fd
	Str looseString `qapi:"str,optional"`
}

// looseString is a string member that JSON may also give as a number
// (port=4444 is a string in QEMU's schema; people write numbers).
type looseString string

func (l *looseString) UnmarshalQAPI(v any, mode qapi.Mode, path string) error {
	switch v := v.(type) {
	case string:
		*l = looseString(v)
	case json.Number:
		*l = looseString(v.String())
	default:
		return qapi.Errorf(qapi.GenericError, "Invalid parameter type for '%s', expected: string", path)
	}
	return nil
}

var chardevKeys = map[string]bool{
	"id": true, "path": true, "host": true, "port": true, "fd": true, "addr": true,
	"server": true, "wait": true, "telnet": true, "tn3270": true, "websocket": true,
	"reconnect": true, "abstract": true, "tight": true, "ipv4": true, "ipv6": true,
	"to": true, "nodelay": true, "delay": true, "tls-creds": true, "tls-authz": true,
	"mux": true, "logfile": true, "logappend": true,
}

// ParseChardevSocket decodes a socket chardev's options (without
// "backend"), as parsed by package keyval (mode Keyval) or from JSON,
// and checks them.
func ParseChardevSocket(m map[string]any, mode qapi.Mode) (*ChardevSocket, error) {
	// QEMU parses --chardev with QemuOpts, whose wording differs from
	// QAPI's for an unknown key.
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !chardevKeys[k] {
			return nil, qapi.Errorf(qapi.GenericError, "Invalid parameter '%s'", k)
		}
	}
	var c ChardevSocket
	if err := qapi.Decode(m, &c, mode); err != nil {
		return nil, err
	}
	if err := c.check(); err != nil {
		return nil, err
	}
	return &c, nil
}

func (c *ChardevSocket) check() error {
	n := 0
	for _, set := range []bool{c.Path != "", c.Host != "" || c.Port != "", c.FD != "", c.Addr != nil} {
		if set {
			n++
		}
	}
	if n > 1 {
		return qapi.Errorf(qapi.GenericError, "None or one of 'path', 'fd' or 'host' option required.")
	}
	if n == 0 {
		return qapi.Errorf(qapi.GenericError, "chardev: socket: no path or host given")
	}
	if !c.Server {
		if c.Wait != nil {
			return qapi.Errorf(qapi.GenericError, "'wait' option is incompatible with socket in client connect mode")
		}
		return qapi.Errorf(qapi.GenericError, "chardev '%s': client mode (server=off) is not supported: blockbackend only listens (use server=on)", c.ID)
	}
	if c.Reconnect != 0 {
		return qapi.Errorf(qapi.GenericError, "'reconnect' option is incompatible with socket in server listen mode")
	}
	for _, f := range []struct {
		on   bool
		name string
	}{{c.Telnet, "telnet"}, {c.TN3270, "tn3270"}, {c.Websocket, "websocket"}, {c.TLSCreds != "", "tls-creds"}, {c.Mux, "mux"}, {c.Logfile != "", "logfile"}} {
		if f.on {
			return qapi.Errorf(qapi.GenericError, "chardev '%s': '%s' is not supported by blockbackend", c.ID, f.name)
		}
	}
	if c.Host != "" && c.Port == "" {
		return qapi.Errorf(qapi.GenericError, "chardev: socket: no port given")
	}
	if a := c.Addr; a != nil {
		switch a.Type {
		case "unix":
			if a.Path == "" {
				return qapi.Errorf(qapi.GenericError, "Parameter 'addr.path' is missing")
			}
		case "inet":
			if a.Port == "" {
				return qapi.Errorf(qapi.GenericError, "Parameter 'addr.port' is missing")
			}
		case "vsock":
			if a.CID == "" {
				return qapi.Errorf(qapi.GenericError, "Parameter 'addr.cid' is missing")
			}
			if a.Port == "" {
				return qapi.Errorf(qapi.GenericError, "Parameter 'addr.port' is missing")
			}
			if _, err := parseU32(string(a.CID), "addr.cid"); err != nil {
				return err
			}
			if _, err := parseU32(string(a.Port), "addr.port"); err != nil {
				return err
			}
		case "fd":
			if a.Str == "" {
				return qapi.Errorf(qapi.GenericError, "Parameter 'addr.str' is missing")
			}
		}
	}
	return nil
}

func parseU32(s, name string) (uint32, error) {
	if s == "-1" && name == "addr.cid" {
		return vsockCIDAny, nil
	}
	u, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, qapi.Errorf(qapi.GenericError, "Parameter '%s' expects uint32_t: %w", name, err)
	}
	return uint32(u), nil
}

// vsockCIDAny is VMADDR_CID_ANY.
const vsockCIDAny = 0xFFFFFFFF

// Listen creates the listening socket. A UNIX socket path that already
// holds a socket is unlinked first, as QEMU does (a stale socket of a
// previous run, or one a test created); any other existing file is left
// alone and the bind fails.
func (c ChardevSocket) Listen() (net.Listener, error) {
	a := c.Addr
	if a == nil {
		switch {
		case c.Path != "":
			a = &SocketAddress{Type: "unix", Path: c.Path, Abstract: c.Abstract, Tight: c.Tight}
		case c.FD != "":
			a = &SocketAddress{Type: "fd", Str: c.FD}
		default:
			v4, v6 := c.IPv4, c.IPv6
			a = &SocketAddress{Type: "inet", Host: c.Host, Port: c.Port}
			if v4 || v6 {
				a.IPv4, a.IPv6 = &v4, &v6
			}
		}
	}
	return a.Listen()
}

// Listen creates a listening socket at the address.
func (a *SocketAddress) Listen() (net.Listener, error) {
	switch a.Type {
	case "unix":
		tight := a.Tight == nil || *a.Tight
		if a.Abstract {
			return listenAbstract(a.Path, tight)
		}
		if fi, err := os.Lstat(a.Path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			if err := os.Remove(a.Path); err != nil {
				return nil, sysError(err, "Failed to unlink socket %s", a.Path)
			}
		}
		l, err := net.Listen("unix", a.Path)
		if err != nil {
			return nil, sysError(err, "Failed to bind socket to %s", a.Path)
		}
		return l, nil
	case "inet":
		network := "tcp"
		v4 := a.IPv4 != nil && *a.IPv4
		v6 := a.IPv6 != nil && *a.IPv6
		if v4 && !v6 {
			network = "tcp4"
		} else if v6 && !v4 {
			network = "tcp6"
		}
		addr := net.JoinHostPort(a.Host, string(a.Port))
		l, err := net.Listen(network, addr)
		if err != nil {
			return nil, sysError(err, "Failed to bind socket to %s", addr)
		}
		return l, nil
	case "vsock":
		cid, err := parseU32(string(a.CID), "addr.cid")
		if err != nil {
			return nil, err
		}
		port, err := parseU32(string(a.Port), "addr.port")
		if err != nil {
			return nil, err
		}
		l, err := vsock.ListenContextID(cid, port, nil)
		if err != nil {
			return nil, sysError(err, "Failed to bind socket to vsock:%d:%d", cid, port)
		}
		return l, nil
	case "fd":
		fd, err := strconv.Atoi(string(a.Str))
		if err != nil || fd < 0 {
			return nil, qapi.Errorf(qapi.GenericError, "File descriptor named '%s' has not been found", a.Str)
		}
		f := os.NewFile(uintptr(fd), "chardev-fd-"+string(a.Str))
		l, err := net.FileListener(f)
		f.Close() // FileListener dup'ed it
		if err != nil {
			return nil, sysError(err, "Failed to use file descriptor %d as a listening socket", fd)
		}
		return l, nil
	}
	return nil, qapi.Errorf(qapi.GenericError, "Parameter 'addr.type' does not accept value '%s'", a.Type)
}

// listenAbstract binds in the abstract namespace. tight=off is QEMU's
// other encoding: the name padded with NULs to the full sun_path, which
// net.Listen cannot express.
func listenAbstract(name string, tight bool) (net.Listener, error) {
	if tight {
		l, err := net.Listen("unix", "@"+name)
		if err != nil {
			return nil, sysError(err, "Failed to bind socket to @%s", name)
		}
		return l, nil
	}
	const pathMax = 108 // sizeof(sun_path) on Linux
	if len(name)+1 > pathMax {
		return nil, qapi.Errorf(qapi.GenericError, "UNIX socket path '%s' is too long", name)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, sysError(err, "Failed to create socket")
	}
	// x/sys cannot pass the full sockaddr_un length: bind by hand.
	var sa unix.RawSockaddrUnix
	sa.Family = unix.AF_UNIX
	for i := 0; i < len(name); i++ {
		sa.Path[1+i] = int8(name[i])
	}
	if _, _, e := unix.Syscall(unix.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa)); e != 0 {
		unix.Close(fd)
		return nil, sysError(e, "Failed to bind socket to @%s", name)
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		unix.Close(fd)
		return nil, sysError(err, "Failed to listen on socket @%s", name)
	}
	f := os.NewFile(uintptr(fd), "@"+name)
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("qmp: abstract socket @%s: %w", name, err)
	}
	return l, nil
}

// sysError words a socket error as QEMU does ("...: No such file or
// directory"), keeping the errno reachable with errors.Is.
func sysError(err error, format string, args ...any) error {
	msg := err.Error()
	var errno syscall.Errno
	if errors.As(err, &errno) {
		msg = errno.Error()
		if msg != "" {
			msg = strings.ToUpper(msg[:1]) + msg[1:]
		}
	}
	return &qapi.Error{Class: qapi.GenericError, Desc: fmt.Sprintf(format, args...) + ": " + msg, Err: err}
}

// MonitorMode is QAPI's MonitorMode.
type MonitorMode string

// EnumValues lists the modes.
func (MonitorMode) EnumValues() []string { return []string{"readline", "control"} }

type monitorArgs struct {
	ID      string      `qapi:"id,optional"`
	Mode    MonitorMode `qapi:"mode,optional"`
	Pretty  bool        `qapi:"pretty,optional"`
	Chardev string      `qapi:"chardev"`
}

// ParseMonitorOptions decodes `--monitor [chardev=]ID[,mode=control]
// [,pretty=on|off][,id=ID]` (QAPI's MonitorOptions), as parsed by package
// keyval with implied key "chardev" (mode Keyval) or from JSON. Only
// control (QMP) monitors exist, as in qemu-storage-daemon.
func ParseMonitorOptions(m map[string]any, mode qapi.Mode) (MonitorOptions, error) {
	var a monitorArgs
	if err := qapi.Decode(m, &a, mode); err != nil {
		return MonitorOptions{}, err
	}
	if a.Mode == "readline" {
		return MonitorOptions{}, qapi.Errorf(qapi.GenericError, "Only QMP is supported")
	}
	return MonitorOptions{ID: a.ID, Chardev: a.Chardev, Mode: "control", Pretty: a.Pretty}, nil
}
