package qmp

import (
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/mdlayher/vsock"

	"blockbackend/qmp/qapi"
)

func TestParseChardevSocket(t *testing.T) {
	tests := []struct {
		in      map[string]any
		mode    qapi.Mode
		wantErr string
	}{
		{map[string]any{"id": "m", "path": "/tmp/x", "server": "on", "wait": "off"}, qapi.Keyval, ""},
		{map[string]any{"id": "m", "path": "/tmp/x", "server": "on"}, qapi.Keyval, ""},
		{map[string]any{"id": "m", "host": "127.0.0.1", "port": "0", "server": "on", "ipv4": "on"}, qapi.Keyval, ""},
		{map[string]any{"id": "m", "addr": map[string]any{"type": "vsock", "cid": "2", "port": "1234"}, "server": "on", "wait": "off"}, qapi.Keyval, ""},
		{map[string]any{"id": "m", "addr": map[string]any{"type": "unix", "path": "/tmp/x"}, "server": true}, qapi.JSON, ""},
		{map[string]any{"id": "m", "addr": map[string]any{"type": "inet", "host": "::1", "port": json.Number("4444")}, "server": true}, qapi.JSON, ""},
		{map[string]any{"id": "m", "path": "/tmp/x", "server": "on", "bogus": "1"}, qapi.Keyval, "Invalid parameter 'bogus'"},
		{map[string]any{"id": "m", "path": "/tmp/x", "server": "maybe"}, qapi.Keyval, "Parameter 'server' expects 'on' or 'off'"},
		{map[string]any{"id": "m", "path": "/tmp/x", "server": "on", "reconnect": "1"}, qapi.Keyval, "'reconnect' option is incompatible with socket in server listen mode"},
		{map[string]any{"id": "m", "path": "/tmp/x", "host": "localhost", "server": "on"}, qapi.Keyval, "None or one of 'path', 'fd' or 'host' option required."},
		{map[string]any{"id": "m", "host": "127.0.0.1", "server": "on"}, qapi.Keyval, "chardev: socket: no port given"},
		{map[string]any{"id": "m", "path": "/tmp/x", "wait": "off"}, qapi.Keyval, "'wait' option is incompatible with socket in client connect mode"},
		{map[string]any{"id": "m", "path": "/tmp/x"}, qapi.Keyval, "client mode (server=off) is not supported"},
		{map[string]any{"id": "m", "path": "/tmp/x", "server": "on", "telnet": "on"}, qapi.Keyval, "'telnet' is not supported"},
		{map[string]any{"id": "m", "path": "/tmp/x", "server": "on", "tls-creds": "t"}, qapi.Keyval, "'tls-creds' is not supported"},
		{map[string]any{"id": "m", "addr": map[string]any{"type": "vsock", "cid": "x", "port": "1"}, "server": "on"}, qapi.Keyval, "Parameter 'addr.cid' expects uint32_t"},
		{map[string]any{"id": "m", "addr": map[string]any{"type": "bogus"}, "server": "on"}, qapi.Keyval, "does not accept value 'bogus'"},
		{map[string]any{"path": "/tmp/x", "server": "on"}, qapi.Keyval, "Parameter 'id' is missing"},
		{map[string]any{"id": "m", "server": "on"}, qapi.Keyval, "no path or host given"},
	}
	for _, tc := range tests {
		_, err := ParseChardevSocket(tc.in, tc.mode)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%v: %v", tc.in, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%v: error %v, want %q", tc.in, err, tc.wantErr)
		}
	}
}

func TestParseMonitorOptions(t *testing.T) {
	mo, err := ParseMonitorOptions(map[string]any{"chardev": "m", "pretty": "on", "mode": "control"}, qapi.Keyval)
	if err != nil || mo.Chardev != "m" || !mo.Pretty || mo.Mode != "control" {
		t.Errorf("%+v %v", mo, err)
	}
	mo, err = ParseMonitorOptions(map[string]any{"chardev": "m", "id": "mon0", "pretty": false}, qapi.JSON)
	if err != nil || mo.Chardev != "m" || mo.ID != "mon0" || mo.Pretty {
		t.Errorf("%+v %v", mo, err)
	}
	for in, want := range map[string]map[string]any{
		"Only QMP is supported":                      {"chardev": "m", "mode": "readline"},
		"Parameter 'bogus' is unexpected":            {"chardev": "m", "bogus": "1"},
		"Parameter 'chardev' is missing":             {"pretty": "on"},
		"Parameter 'mode' does not accept value 'x'": {"chardev": "m", "mode": "x"},
	} {
		if _, err := ParseMonitorOptions(want, qapi.Keyval); err == nil || err.Error() != in {
			t.Errorf("%v: %v, want %q", want, err, in)
		}
	}
}

// An existing socket is unlinked and bound again, as QEMU does; a regular
// file is left alone.
func TestListenUnixReplacesStaleSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	l1, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l1.(*net.UnixListener).SetUnlinkOnClose(false)
	l1.Close() // leaves a stale socket file behind
	cs := ChardevSocket{ID: "m", Path: sock, Server: true}
	l, err := cs.Listen()
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	l.Close()

	reg := filepath.Join(dir, "file")
	os.WriteFile(reg, []byte("keep"), 0o644)
	if _, err := (ChardevSocket{ID: "m", Path: reg, Server: true}).Listen(); err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("regular file: %v", err)
	}
	if b, _ := os.ReadFile(reg); string(b) != "keep" {
		t.Error("regular file was clobbered")
	}
	_, err = (ChardevSocket{ID: "m", Path: "/nonexistent/x.sock", Server: true}).Listen()
	if err == nil || err.Error() != "Failed to bind socket to /nonexistent/x.sock: No such file or directory" || !errors.Is(err, syscall.ENOENT) {
		t.Errorf("missing dir: %v", err)
	}
}

func TestListenAbstractAndTCP(t *testing.T) {
	name := "blockbackend-qmp-test-" + filepath.Base(t.TempDir())
	for _, tight := range []bool{true, false} {
		cs := ChardevSocket{ID: "m", Path: name, Abstract: true, Tight: &tight, Server: true}
		l, err := cs.Listen()
		if err != nil {
			t.Fatalf("abstract tight=%v: %v", tight, err)
		}
		addr := "@" + name
		if !tight {
			addr += strings.Repeat("\x00", 107-len(name))
		}
		c, err := net.Dial("unix", addr)
		if err != nil {
			t.Errorf("dial abstract tight=%v: %v", tight, err)
		} else {
			c.Close()
		}
		l.Close()
	}
	cs, err := ParseChardevSocket(map[string]any{"id": "m", "host": "127.0.0.1", "port": "0", "server": "on", "wait": "off", "ipv4": "on"}, qapi.Keyval)
	if err != nil {
		t.Fatal(err)
	}
	l, err := cs.Listen()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s, _ := testServer(t)
	go s.Serve(l)
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, 16)
	if n, err := conn.Read(buf); err != nil || !strings.HasPrefix(string(buf[:n]), `{"QMP"`) {
		t.Errorf("tcp greeting %q %v", buf[:n], err)
	}
}

// AF_VSOCK loopback (vsock_loopback, CID 1) is missing on some machines:
// skip there, saying so.
func TestIntegrationVsockListen(t *testing.T) {
	cs, err := ParseChardevSocket(map[string]any{"id": "m", "addr": map[string]any{"type": "vsock", "cid": "1", "port": "52001"}, "server": "on"}, qapi.Keyval)
	if err != nil {
		t.Fatal(err)
	}
	l, err := cs.Listen()
	if err != nil {
		t.Skipf("AF_VSOCK loopback is not available on this machine (listen on CID 1: %v)", err)
	}
	defer l.Close()
	s, _ := testServer(t)
	go s.Serve(l)
	conn, err := vsockDial(1, 52001)
	if err != nil {
		t.Skipf("AF_VSOCK loopback is not available on this machine (dial CID 1: %v)", err)
	}
	defer conn.Close()
	buf := make([]byte, 16)
	if n, err := conn.Read(buf); err != nil || !strings.HasPrefix(string(buf[:n]), `{"QMP"`) {
		t.Errorf("vsock greeting %q %v", buf[:n], err)
	}
}

func vsockDial(cid, port uint32) (net.Conn, error) { return vsock.Dial(cid, port, nil) }
