package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"blockbackend/qmp/qapi"
)

type echoArgs struct {
	Text  string `qapi:"text"`
	Count int    `qapi:"count,optional"`
}

type echoRet struct {
	Text  string `json:"text"`
	Count int    `json:"count"`
}

type emitArgs struct {
	N int `qapi:"n,optional"`
}

// testServer has a few commands besides the built-ins.
func testServer(t testing.TB) (*Server, chan struct{}) {
	s := NewServer(ServerOptions{Version: VersionInfo{Major: 7, Minor: 2, Micro: 22, Package: "blockbackend test"}})
	release := make(chan struct{})
	s.Register(Command{Name: "echo", ArgType: reflect.TypeOf(echoArgs{}), RetType: reflect.TypeOf(echoRet{}),
		Handler: func(ctx context.Context, args map[string]any) (any, error) {
			var a echoArgs
			if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
				return nil, err
			}
			return echoRet{a.Text, a.Count}, nil
		}})
	s.Register(Command{Name: "emit", ArgType: reflect.TypeOf(emitArgs{}),
		Handler: func(ctx context.Context, args map[string]any) (any, error) {
			var a emitArgs
			if err := qapi.Decode(args, &a, qapi.JSON); err != nil {
				return nil, err
			}
			for i := 0; i < max(a.N, 1); i++ {
				s.Emit("TEST_EVENT", map[string]any{"i": i})
			}
			return nil, nil
		}})
	s.Register(Command{Name: "fail", Handler: func(ctx context.Context, args map[string]any) (any, error) {
		return nil, &qapi.Error{Class: qapi.DeviceNotFound, Desc: "Device 'x' not found"}
	}})
	s.Register(Command{Name: "plainerr", Handler: func(ctx context.Context, args map[string]any) (any, error) {
		return nil, errors.New("something broke")
	}})
	s.Register(Command{Name: "panic", Handler: func(ctx context.Context, args map[string]any) (any, error) {
		panic("boom")
	}})
	s.Register(Command{Name: "ping", AllowOOB: true, Handler: func(ctx context.Context, args map[string]any) (any, error) {
		return "pong", nil
	}})
	s.Register(Command{Name: "block", Handler: func(ctx context.Context, args map[string]any) (any, error) {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil, nil
	}})
	s.RegisterEvent("TEST_EVENT", reflect.TypeOf(struct {
		I int `json:"i"`
	}{}))
	t.Cleanup(func() { s.Close() })
	return s, release
}

type client struct {
	c net.Conn
	r *bufio.Reader
}

func pipeClient(t testing.TB, s *Server, opts ...MonitorOptions) *client {
	a, b := net.Pipe()
	go s.ServeConn(a, opts...)
	t.Cleanup(func() { b.Close() })
	return &client{c: b, r: bufio.NewReader(b)}
}

// line reads one message (up to "\r\n"; pretty ones span lines: use read).
func (c *client) line(t testing.TB) string {
	t.Helper()
	c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	l, err := c.r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading reply: %v (got %q)", err, l)
	}
	if !strings.HasSuffix(l, "\r\n") {
		t.Fatalf("reply %q does not end with CRLF", l)
	}
	return strings.TrimSuffix(l, "\r\n")
}

func (c *client) send(t testing.TB, s string) {
	t.Helper()
	c.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.c.Write([]byte(s)); err != nil {
		t.Fatalf("send: %v", err)
	}
}

// noMore checks that nothing arrives within a short time.
func (c *client) noMore(t testing.TB) {
	t.Helper()
	c.c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if l, err := c.r.ReadString('\n'); err == nil || l != "" {
		t.Errorf("unexpected output %q", l)
	}
}

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockbackend test"}, "capabilities": ["oob"]}}`

func negotiated(t testing.TB, s *Server, opts ...MonitorOptions) *client {
	c := pipeClient(t, s, opts...)
	if g := c.line(t); g != greeting {
		t.Fatalf("greeting %s", g)
	}
	c.send(t, `{"execute": "qmp_capabilities"}`)
	if r := c.line(t); r != `{"return": {}}` {
		t.Fatalf("qmp_capabilities: %s", r)
	}
	return c
}

func TestGreetingBytes(t *testing.T) {
	s, _ := testServer(t)
	c := pipeClient(t, s)
	c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len(greeting)+2)
	if _, err := readFull(c.r, buf); err != nil {
		t.Fatal(err)
	}
	if string(buf) != greeting+"\r\n" {
		t.Errorf("greeting %q", buf)
	}
	// Default version: QEMU 7.2.22 numbers.
	d := NewServer(ServerOptions{})
	defer d.Close()
	c2 := pipeClient(t, d)
	if g := c2.line(t); !strings.HasPrefix(g, `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockbackend"}`) {
		t.Errorf("default greeting %s", g)
	}
}

func readFull(r *bufio.Reader, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := r.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// TestWire drives one connection through a script of requests and the
// exact replies qemu-storage-daemon 7.2 gives to them (recorded from it).
func TestWire(t *testing.T) {
	s, _ := testServer(t)
	c := pipeClient(t, s)
	if g := c.line(t); g != greeting {
		t.Fatalf("greeting %s", g)
	}
	steps := []struct {
		send string
		want []string
	}{
		// Capabilities negotiation mode.
		{`{"execute": "query-version"}`, []string{`{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}`}},
		{`{"execute": "nosuch", "id": 1}`, []string{`{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}`}},
		{`{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}`, []string{`{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'x'"}}`}},
		{`{"execute": "qmp_capabilities", "arguments": {"bogus": 1}}`, []string{`{"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}`}},
		{`{"exec-oob": "qmp_capabilities"}`, []string{`{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}`}},
		{`{"execute": "qmp_capabilities", "id": 1, "foo": 2}`, []string{`{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}`}},
		{"[1,2]\n", []string{`{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}`}},
		{`"str"`, []string{`{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}`}},
		{"garbage\n", []string{`{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'garbage'"}}`}},
		{"}\n", []string{`{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}`}},
		{`{"execute": 1}`, []string{`{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}`}},
		{`{"execute": "x", "arguments": 1}`, []string{`{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}`}},
		{`{"id": 5}`, []string{`{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}`}},
		{`{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "neg"}`, []string{`{"return": {}, "id": "neg"}`}},
		// Command mode, oob enabled.
		{`{"execute": "qmp_capabilities"}`, []string{`{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}`}},
		{`{"exec-oob": "query-version", "id": 3}`, []string{`{"id": 3, "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}`}},
		{`{"exec-oob": "nosuch", "id": 3}`, []string{`{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}`}},
		{`{"exec-oob": "query-version", "execute": "query-version", "id": 3}`, []string{`{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}`}},
		{`{"execute": "query-version", "exec-oob": "query-version", "id": 3}`, []string{`{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}`}},
		{`{"exec-oob": "ping", "id": "p"}`, []string{`{"return": "pong", "id": "p"}`}},
		{`{"execute": "query-version", "arguments": {"a": 1}}`, []string{`{"error": {"class": "GenericError", "desc": "Parameter 'a' is unexpected"}}`}},
		{`{"execute": "query-version", "arguments": {}, "id": 1.50e3}`, []string{`{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockbackend test"}, "id": 1500}`}},
		// id echo: any JSON value, printed as QEMU prints it.
		{`{"execute": "query-version", "id": {"a": [1, 2.0, "x\u00e9"], "b": null}}`, []string{`{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "blockbackend test"}, "id": {"a": [1, 2, "x\u00E9"], "b": null}}`}},
		{`{"execute": "fail", "id": "str"}`, []string{`{"id": "str", "error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}`}},
		{`{"execute": "fail", "id": 42}`, []string{`{"id": 42, "error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}`}},
		{`{"execute": "fail", "id": null}`, []string{`{"id": null, "error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}`}},
		{`{"execute": "fail", "id": [true, {}]}`, []string{`{"id": [true, {}], "error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}`}},
		{`{"execute": "plainerr"}`, []string{`{"error": {"class": "GenericError", "desc": "something broke"}}`}},
		{`{"execute": "panic"}`, []string{`{"error": {"class": "GenericError", "desc": "internal error in command panic: boom"}}`}},
		{`{"execute": "echo", "arguments": {"text": "hi", "count": 3}, "id": 1}`, []string{`{"return": {"text": "hi", "count": 3}, "id": 1}`}},
		{`{"execute": "echo", "arguments": {"text": 5}}`, []string{`{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'text', expected: string"}}`}},
		{`{"execute": "echo", "arguments": {"text": "a", "bogus": 1}}`, []string{`{"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}`}},
		{`{"execute": "fail", "arguments": {"x": 1}}`, []string{`{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}`}},
		{`{"execute": "nosuch"}`, []string{`{"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}`}},
		// Garbage and a valid command on the same connection.
		{`{"execute": "echo", "arguments": {"text": "a"}} garbage {"execute": "fail"}`, []string{
			`{"return": {"text": "a", "count": 0}}`,
			`{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'garbage'"}}`,
			`{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}`}},
		// Events come before the return of the command that caused them.
		{`{"execute": "emit", "arguments": {"n": 2}, "id": "e"}`, []string{
			`{"timestamp": {"seconds": S, "microseconds": U}, "event": "TEST_EVENT", "data": {"i": 0}}`,
			`{"timestamp": {"seconds": S, "microseconds": U}, "event": "TEST_EVENT", "data": {"i": 1}}`,
			`{"return": {}, "id": "e"}`}},
	}
	for _, st := range steps {
		c.send(t, st.send)
		for _, want := range st.want {
			got := c.line(t)
			if strings.Contains(want, `"seconds": S`) {
				got = maskTimestamp(t, got)
			}
			if got != want {
				t.Errorf("sent %s\n got %s\nwant %s", st.send, got, want)
			}
		}
	}
	c.noMore(t)

	// An unbalanced object waits for the rest.
	c.send(t, `{"execute": "echo", "arguments": {"text": "late"},`)
	c.noMore(t)
	c.send(t, ` "id": "late"}`)
	if got := c.line(t); got != `{"return": {"text": "late", "count": 0}, "id": "late"}` {
		t.Errorf("split object: %s", got)
	}
}

func maskTimestamp(t testing.TB, line string) string {
	var ev struct {
		Timestamp struct {
			Seconds      int64 `json:"seconds"`
			Microseconds int64 `json:"microseconds"`
		} `json:"timestamp"`
	}
	if err := json.Unmarshal([]byte(line), &ev); err != nil {
		t.Fatalf("event %s: %v", line, err)
	}
	if ev.Timestamp.Seconds < time.Now().Unix()-60 || ev.Timestamp.Microseconds < 0 || ev.Timestamp.Microseconds >= 1e6 {
		t.Errorf("timestamp in %s", line)
	}
	i := strings.Index(line, `"seconds": `)
	j := strings.Index(line, `}`)
	if i < 0 || j < i {
		return line
	}
	return line[:i] + `"seconds": S, "microseconds": U` + line[j:]
}

func TestExecOOBRequiresCapability(t *testing.T) {
	s, _ := testServer(t)
	c := negotiated(t, s)
	c.send(t, `{"exec-oob": "ping", "id": 3}`)
	if got := c.line(t); got != `{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}` {
		t.Errorf("got %s", got)
	}
}

// An OOB command overtakes an in-band command that is still running.
func TestOOBOvertakes(t *testing.T) {
	s, release := testServer(t)
	c := pipeClient(t, s)
	c.line(t)
	c.send(t, `{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}`)
	c.line(t)
	c.send(t, `{"execute": "block", "id": "slow"}{"execute": "echo", "arguments": {"text": "queued"}, "id": "q"}{"exec-oob": "ping", "id": "fast"}`)
	if got := c.line(t); got != `{"return": "pong", "id": "fast"}` {
		t.Errorf("first reply %s", got)
	}
	close(release)
	if got := c.line(t); got != `{"return": {}, "id": "slow"}` {
		t.Errorf("second reply %s", got)
	}
	if got := c.line(t); got != `{"return": {"text": "queued", "count": 0}, "id": "q"}` {
		t.Errorf("third reply %s", got)
	}
}

func TestEventsReachNegotiatedMonitorsOnly(t *testing.T) {
	s, _ := testServer(t)
	a := negotiated(t, s)
	b := negotiated(t, s)
	raw := pipeClient(t, s)
	if g := raw.line(t); g != greeting {
		t.Fatal(g)
	}
	a.send(t, `{"execute": "emit"}`)
	if got := maskTimestamp(t, a.line(t)); !strings.Contains(got, `"event": "TEST_EVENT"`) {
		t.Errorf("caller: %s", got)
	}
	if got := a.line(t); got != `{"return": {}}` {
		t.Errorf("caller return: %s", got)
	}
	if got := b.line(t); !strings.Contains(got, `"event": "TEST_EVENT", "data": {"i": 0}}`) {
		t.Errorf("other monitor: %s", got)
	}
	raw.noMore(t)
	// No data member when data is nil.
	s.Emit("BARE", nil)
	if got := maskTimestamp(t, b.line(t)); got != `{"timestamp": {"seconds": S, "microseconds": U}, "event": "BARE"}` {
		t.Errorf("bare event: %s", got)
	}
}

func TestPrettyMonitor(t *testing.T) {
	s, _ := testServer(t)
	c := pipeClient(t, s, MonitorOptions{Pretty: true})
	var g []string
	for {
		l := c.line(t)
		g = append(g, l)
		if l == "}" {
			break
		}
	}
	want := []string{"{", `    "QMP": {`, `        "version": {`, `            "qemu": {`, `                "micro": 22,`,
		`                "minor": 2,`, `                "major": 7`, `            },`, `            "package": "blockbackend test"`,
		`        },`, `        "capabilities": [`, `            "oob"`, `        ]`, `    }`, `}`}
	if strings.Join(g, "\n") != strings.Join(want, "\n") {
		t.Errorf("pretty greeting:\n%s", strings.Join(g, "\n"))
	}
	c.send(t, `{"execute": "qmp_capabilities"}`)
	for _, want := range []string{"{", `    "return": {`, `    }`, `}`} {
		if got := c.line(t); got != want {
			t.Errorf("got %q want %q", got, want)
		}
	}
}

func TestQueryCommands(t *testing.T) {
	s, _ := testServer(t)
	c := negotiated(t, s)
	c.send(t, `{"execute": "query-commands"}`)
	var r struct {
		Return []struct{ Name string } `json:"return"`
	}
	if err := json.Unmarshal([]byte(c.line(t)), &r); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, x := range r.Return {
		names = append(names, x.Name)
	}
	if want := s.Commands(); !reflect.DeepEqual(names, want) {
		t.Errorf("query-commands %v, Commands %v", names, want)
	}
	for _, n := range []string{"qmp_capabilities", "query-commands", "query-version", "query-qmp-schema", "echo"} {
		if !strings.Contains(strings.Join(names, " ")+" ", n+" ") {
			t.Errorf("missing %s in %v", n, names)
		}
	}
}

func TestRegisterDuplicatePanics(t *testing.T) {
	s := NewServer(ServerOptions{})
	defer func() {
		if recover() == nil {
			t.Error("duplicate registration did not panic")
		}
	}()
	s.Register(Command{Name: "query-version", Handler: func(context.Context, map[string]any) (any, error) { return nil, nil }})
}

// AfterReply runs after the reply went out; Close is safe twice.
func TestAfterReplyAndClose(t *testing.T) {
	s, _ := testServer(t)
	ran := make(chan struct{})
	s.Register(Command{Name: "quit", Handler: func(ctx context.Context, args map[string]any) (any, error) {
		return AfterReply(func() { close(ran) }), nil
	}})
	c := negotiated(t, s)
	c.send(t, `{"execute": "quit", "id": 9}`)
	select {
	case <-ran:
		t.Fatal("hook ran before the reply was read") // net.Pipe: the write completes only when read
	case <-time.After(50 * time.Millisecond):
	}
	if got := c.line(t); got != `{"return": {}, "id": 9}` {
		t.Errorf("quit: %s", got)
	}
	select {
	case <-ran:
	case <-time.After(5 * time.Second):
		t.Fatal("hook did not run")
	}
	if err := s.Close(); err != nil {
		t.Error(err)
	}
	if err := s.Close(); err != nil {
		t.Error(err)
	}
	c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.r.ReadString('\n'); err == nil {
		t.Error("connection still open after Close")
	}
}

// A client that never reads is dropped; others carry on.
func TestSlowClientDropped(t *testing.T) {
	s := NewServer(ServerOptions{OutputQueue: 4, Version: VersionInfo{Major: 7, Minor: 2, Micro: 22, Package: "blockbackend test"}})
	defer s.Close()
	good := negotiated(t, s)
	slow := pipeClient(t, s)
	slow.line(t)
	slow.send(t, `{"execute": "qmp_capabilities"}`)
	slow.line(t)
	// Wait until negotiated on the server side.
	time.Sleep(20 * time.Millisecond)
	for i := 0; i < 50; i++ {
		s.Emit("FLOOD", map[string]any{"i": i})
		if got := good.line(t); !strings.Contains(got, `"event": "FLOOD"`) {
			t.Fatalf("good client: %s", got)
		}
	}
	// The slow one was disconnected: after the buffered messages, EOF.
	slow.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n := 0
	for {
		if _, err := slow.r.ReadString('\n'); err != nil {
			break
		}
		n++
	}
	if n >= 50 {
		t.Errorf("slow client got all %d events", n)
	}
}

func TestServeUnixAndGoQemuClient(t *testing.T) {
	s, _ := testServer(t)
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	cs, err := ParseChardevSocket(map[string]any{"id": "m", "path": sock, "server": "on", "wait": "off"}, qapi.Keyval)
	if err != nil {
		t.Fatal(err)
	}
	l, err := cs.Listen()
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()

	mon, err := goqmp.NewSocketMonitor("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := mon.Connect(); err != nil {
		t.Fatal(err)
	}
	defer mon.Disconnect()
	evch, err := mon.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// go-qemu delivers events on an unbuffered channel from the goroutine
	// that also delivers replies: drain it concurrently.
	events := make(chan goqmp.Event, 16)
	go func() {
		for e := range evch {
			events <- e
		}
	}()
	out, err := mon.Run([]byte(`{"execute": "query-version"}`))
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Return versionReply `json:"return"`
	}
	if err := json.Unmarshal(out, &v); err != nil || v.Return.QEMU.Major != 7 || v.Return.QEMU.Minor != 2 {
		t.Errorf("query-version %s %v", out, err)
	}
	if _, err := mon.Run([]byte(`{"execute": "fail"}`)); err == nil || err.Error() != "Device 'x' not found" {
		t.Errorf("fail: %v", err)
	}
	if _, err := mon.Run([]byte(`{"execute": "emit"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-events:
		if ev.Event != "TEST_EVENT" || ev.Data["i"] != float64(0) {
			t.Errorf("event %+v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Error("no event")
	}
	// A second raw client on the same listener.
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c := &client{c: conn, r: bufio.NewReader(conn)}
	if g := c.line(t); g != greeting {
		t.Errorf("greeting %s", g)
	}
	conn.Close()

	s.Close()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve returned %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("Serve did not return after Close")
	}
}

// Client half-close: everything sent is answered before the hang-up.
func TestHalfCloseAnswersAll(t *testing.T) {
	s, _ := testServer(t)
	sock := filepath.Join(t.TempDir(), "q.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte(`{"execute": "qmp_capabilities"}{"execute": "echo", "arguments": {"text": "x"}}`))
	conn.(*net.UnixConn).CloseWrite()
	c := &client{c: conn, r: bufio.NewReader(conn)}
	c.line(t)
	c.line(t)
	if got := c.line(t); got != `{"return": {"text": "x", "count": 0}}` {
		t.Errorf("got %s", got)
	}
}
