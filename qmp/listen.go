package qmp

import (
	"net"
	"sort"

	"blockbackend/qmp/qapi"
	"blockbackend/qmp/sockaddr"
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

// SocketAddressType is QAPI's SocketAddressType (see package sockaddr).
type SocketAddressType = sockaddr.Type

// SocketAddress is QAPI's flat SocketAddress (see package sockaddr).
type SocketAddress = sockaddr.Address

type looseString = sockaddr.LooseString

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
	if c.Addr != nil {
		return c.Addr.Check()
	}
	return nil
}

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
