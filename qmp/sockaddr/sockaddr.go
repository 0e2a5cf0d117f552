// Package sockaddr is QAPI's SocketAddress (unix, inet, vsock, fd) and
// listening on one, QEMU's way: a stale UNIX socket is unlinked first,
// abstract names (tight or padded) are supported, and errors read like
// QEMU's ("Failed to bind socket to PATH: No such file or directory").
// The QMP monitors' chardevs and the NBD server both listen through it.
package sockaddr

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"blockbackend/qmp/qapi"
)

// Type is QAPI's SocketAddressType.
type Type string

// EnumValues lists the address types.
func (Type) EnumValues() []string { return []string{"inet", "unix", "vsock", "fd"} }

// Address is QAPI's flat SocketAddress union.
type Address struct {
	Type Type `qapi:"type"`
	// unix
	Path     string `qapi:"path,optional"`
	Abstract bool   `qapi:"abstract,optional"`
	Tight    *bool  `qapi:"tight,optional"`
	// inet (port also for vsock)
	Host      string      `qapi:"host,optional"`
	Port      LooseString `qapi:"port,optional"`
	Numeric   bool        `qapi:"numeric,optional"`
	To        int64       `qapi:"to,optional"`
	IPv4      *bool       `qapi:"ipv4,optional"`
	IPv6      *bool       `qapi:"ipv6,optional"`
	KeepAlive bool        `qapi:"keep-alive,optional"`
	// vsock
	CID LooseString `qapi:"cid,optional"`
	// fd
	Str LooseString `qapi:"str,optional"`
}

// LooseString is a string member that JSON may also give as a number
// (port=4444 is a string in QEMU's schema; people write numbers).
type LooseString string

func (l *LooseString) UnmarshalQAPI(v any, mode qapi.Mode, path string) error {
	switch v := v.(type) {
	case string:
		*l = LooseString(v)
	case json.Number:
		*l = LooseString(v.String())
	default:
		return qapi.Errorf(qapi.GenericError, "Invalid parameter type for '%s', expected: string", path)
	}
	return nil
}

// Check reports a missing or malformed member for the address's type.
func (a *Address) Check() error {
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

// Listen creates a listening socket at the address.
func (a *Address) Listen() (net.Listener, error) {
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
