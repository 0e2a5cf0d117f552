package tests

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestIntegrationQMPSession drives the binary, started the way
// qemu-storage-daemon is, with go-qemu's client.
func TestIntegrationQMPSession(t *testing.T) {
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 16<<20)
	sock := filepath.Join(dir, "qmp.sock")
	start(t, sock,
		"--blockdev", "driver=file,node-name=f,filename="+img,
		"--nbd-server", "addr.type=unix,addr.path="+filepath.Join(dir, "nbd.sock"),
		"--chardev", "socket,id=m,path="+sock+",server=on,wait=off",
		"--monitor", "chardev=m")
	m := monitor(t, sock)

	ver := run(t, m, "query-version", nil).(map[string]any)
	q := ver["qemu"].(map[string]any)
	if q["major"].(float64) != 7 || q["minor"].(float64) != 2 {
		t.Errorf("query-version %v", ver)
	}
	cmds := run(t, m, "query-commands", nil).([]any)
	names := map[string]bool{}
	for _, c := range cmds {
		names[c.(map[string]any)["name"].(string)] = true
	}
	for _, want := range []string{"qmp_capabilities", "blockdev-add", "blockdev-del", "blockdev-reopen",
		"query-named-block-nodes", "object-add", "object-del", "block_resize", "x-debug-query-block-graph",
		"block-export-add", "block-export-del", "query-block-exports", "query-qmp-schema", "quit",
		"nbd-server-start", "nbd-server-stop"} {
		if !names[want] {
			t.Errorf("query-commands lacks %s", want)
		}
	}

	run(t, m, "blockdev-add", map[string]any{"driver": "raw", "node-name": "r", "file": "f"})
	nodes := run(t, m, "query-named-block-nodes", map[string]any{"flat": true}).([]any)
	if len(nodes) != 2 {
		t.Fatalf("query-named-block-nodes: %v", nodes)
	}
	first := nodes[0].(map[string]any)
	if first["node-name"] != "r" || first["drv"] != "raw" || first["file"] != img {
		t.Errorf("newest node first, like QEMU: %v", first)
	}
	image := first["image"].(map[string]any)
	if image["virtual-size"].(float64) != 16<<20 || image["format"] != "raw" {
		t.Errorf("image info %v", image)
	}

	// Errors: clear, QEMU's words, and the monitor carries on.
	errCases := []struct {
		cmd  string
		args any
		want string
	}{
		{"nosuch", nil, "The command nosuch has not been found"},
		{"blockdev-add", map[string]any{"driver": "raw", "node-name": "r", "file": "f"}, "Duplicate nodes with node-name='r'"},
		{"blockdev-add", map[string]any{"driver": "file", "node-name": "x", "filename": "/nonexistent/img"}, "Could not open '/nonexistent/img': No such file or directory"},
		{"blockdev-add", map[string]any{"driver": "null-co", "node-name": "x", "size": "big"}, "Invalid parameter type for 'size', expected: integer"},
		{"blockdev-add", map[string]any{"driver": "file", "node-name": "x", "filename": img, "bogus": 1}, "Parameter 'bogus' is unexpected"},
		{"blockdev-del", map[string]any{"node-name": "f"}, "Block device f is in use"},
		{"blockdev-del", map[string]any{"node-name": "zz"}, "Failed to find node with node-name='zz'"},
		{"block_resize", map[string]any{"node-name": "zz", "size": 1024}, "Cannot find device='' nor node-name='zz'"},
		{"block-export-del", map[string]any{"id": "nope"}, "Export 'nope' is not found"},
		{"object-del", map[string]any{"id": "zz"}, "object 'zz' not found"},
	}
	for _, c := range errCases {
		_, err := runErr(m, c.cmd, c.args)
		if err == nil || err.Error() != c.want {
			t.Errorf("%s %v: error %v, want %q", c.cmd, c.args, err, c.want)
		}
	}

	// Events reach every negotiated monitor; BLOCK_EXPORT_DELETED on delete.
	m2 := monitor(t, sock)
	events, err := m2.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	run(t, m, "block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "r", "writable": true})
	exps := run(t, m, "query-block-exports", nil).([]any)
	if len(exps) != 1 || exps[0].(map[string]any)["id"] != "e0" || exps[0].(map[string]any)["type"] != "nbd" {
		t.Fatalf("query-block-exports %v", exps)
	}
	if _, err := runErr(m, "blockdev-del", map[string]any{"node-name": "r"}); err == nil {
		t.Error("deleting an exported node succeeded")
	}
	run(t, m, "block-export-del", map[string]any{"id": "e0"})
	select {
	case ev := <-events:
		if ev.Event != "BLOCK_EXPORT_DELETED" || ev.Data["id"] != "e0" {
			t.Errorf("event %+v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Error("no BLOCK_EXPORT_DELETED event on the second monitor")
	}

	// Resize, reopen, graph dump, secrets.
	run(t, m, "block_resize", map[string]any{"node-name": "r", "size": 32 << 20})
	run(t, m, "blockdev-reopen", map[string]any{"options": []any{
		map[string]any{"driver": "raw", "node-name": "r", "file": "f", "read-only": true},
	}})
	for _, n := range run(t, m, "query-named-block-nodes", nil).([]any) {
		nm := n.(map[string]any)
		if nm["node-name"] == "r" && (nm["ro"] != true || nm["image"].(map[string]any)["virtual-size"].(float64) != 32<<20) {
			t.Errorf("after resize+reopen: %v", nm)
		}
	}
	dump := run(t, m, "x-debug-query-block-graph", nil).(map[string]any)
	if len(dump["nodes"].([]any)) != 2 || len(dump["edges"].([]any)) != 1 {
		t.Errorf("graph dump %v", dump)
	}
	run(t, m, "object-add", map[string]any{"qom-type": "secret", "id": "s0", "data": "hunter2"})
	run(t, m, "object-del", map[string]any{"id": "s0"})
	run(t, m, "blockdev-del", map[string]any{"node-name": "r"})
	run(t, m, "blockdev-del", map[string]any{"node-name": "f"})
	if nodes := run(t, m, "query-named-block-nodes", nil).([]any); len(nodes) != 0 {
		t.Errorf("nodes left: %v", nodes)
	}

	// query-qmp-schema is QEMU's introspection format.
	schema := run(t, m, "query-qmp-schema", nil).([]any)
	found := map[string]bool{}
	for _, e := range schema {
		em := e.(map[string]any)
		found[em["meta-type"].(string)+" "+em["name"].(string)] = true
	}
	for _, want := range []string{"command blockdev-add", "command block-export-del", "event BLOCK_EXPORT_DELETED"} {
		if !found[want] {
			t.Errorf("query-qmp-schema does not describe %s", want)
		}
	}
}

// TestIntegrationQMPWire checks wire details go-qemu hides: the greeting,
// negotiation errors, id echo, malformed input.
func TestIntegrationQMPWire(t *testing.T) {
	dir := shortDir(t)
	sock := filepath.Join(dir, "qmp.sock")
	start(t, sock, "--qmp", sock)
	q := dialRaw(t, sock)
	greeting := q.line(t)
	var g map[string]map[string]any
	if err := json.Unmarshal([]byte(greeting), &g); err != nil {
		t.Fatalf("greeting %q: %v", greeting, err)
	}
	if caps := g["QMP"]["capabilities"].([]any); len(caps) != 1 || caps[0] != "oob" {
		t.Errorf("greeting capabilities %v", caps)
	}
	steps := []struct{ send, want string }{
		{`{"execute": "query-version"}`, `{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}`},
		{`{"execute": "qmp_capabilities", "id": [1, "x"]}`, `{"return": {}, "id": [1, "x"]}`},
		{`{"execute": "qmp_capabilities"}`, `{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}`},
		{`garbage`, `{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'garbage'"}}`},
		{`{"execute": "blockdev-del", "arguments": {"node-name": 42}, "id": {"a": null}}`, `{"id": {"a": null}, "error": {"class": "GenericError", "desc": "Invalid parameter type for 'node-name', expected: string"}}`},
		{`{"execute": "quit", "foo": 1}`, `{"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}`},
		{`{"execute": "nosuch", "id": 5}`, `{"id": 5, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}`},
		{`{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0"}, "id": 7}`, `{"return": {}, "id": 7}`},
	}
	for _, s := range steps {
		q.send(t, s.send+"\n")
		if got := q.line(t); got != s.want {
			t.Errorf("sent %s\n got %s\nwant %s", s.send, got, s.want)
		}
	}
	// An unbalanced object waits for the rest.
	q.send(t, `{"execute": "query-block-exports",`)
	time.Sleep(100 * time.Millisecond)
	q.send(t, ` "id": "late"}`+"\n")
	if got := q.line(t); got != `{"return": [], "id": "late"}` {
		t.Errorf("split object: %s", got)
	}
	q.send(t, `{"execute": "quit"}`+"\n")
	if got := q.line(t); got != `{"return": {}}` {
		t.Errorf("quit: %s", got)
	}
}

// TestIntegrationCommandLine checks start-up errors and --help/--version.
func TestIntegrationCommandLine(t *testing.T) {
	out, err := cmdOut(binary, "--blockdev", "file,filename=/nonexistent,node-name=n")
	if err == nil {
		t.Fatal("missing file: exit 0")
	}
	want := "blockbackend: --blockdev file,filename=/nonexistent,node-name=n: Could not open '/nonexistent': No such file or directory"
	if strings.TrimSpace(out) != want {
		t.Errorf("got %q\nwant %q", out, want)
	}
	out, err = cmdOut(binary, "--blockdev", "driver=null-co,node-name=n,size=1x")
	if err == nil || !strings.Contains(out, "--blockdev driver=null-co,node-name=n,size=1x: Parameter 'size' expects") {
		t.Errorf("bad size: %v %q", err, out)
	}
	out, err = cmdOut(binary, "--bogus")
	if err == nil || !strings.Contains(out, "unrecognized option '--bogus'") {
		t.Errorf("unknown option: %v %q", err, out)
	}
	out, err = cmdOut(binary, "--export", "type=nbd,id=e,node-name=nope")
	if err == nil || !strings.Contains(out, "Cannot find device='' nor node-name='nope'") {
		t.Errorf("export of missing node: %v %q", err, out)
	}
	if out, err := cmdOut(binary, "--help"); err != nil || !strings.Contains(out, "--blockdev") {
		t.Errorf("--help: %v %q", err, out)
	}
	if out, err := cmdOut(binary, "-V"); err != nil || !strings.Contains(out, "blockbackend version") {
		t.Errorf("-V: %v %q", err, out)
	}
	// null-co's size is an integer, not a size: QEMU refuses suffixes there.
	out, err = cmdOut(binary, "--blockdev", "null-co,node-name=n,size=64M")
	if err == nil || !strings.Contains(out, "Parameter 'size' expects integer") {
		t.Errorf("suffix on an integer: %v %q", err, out)
	}
	// JSON --blockdev and --object, keyval integers and booleans.
	dir := shortDir(t)
	sock := filepath.Join(dir, "q.sock")
	start(t, sock,
		"--object", "secret,id=s0,data=abc",
		"--blockdev", `{"driver": "null-co", "node-name": "n1", "size": 1048576}`,
		"--blockdev", "null-co,node-name=n2,size=67108864,read-zeroes=on",
		"--qmp", sock)
	m := monitor(t, sock)
	sizes := map[string]float64{}
	for _, n := range run(t, m, "query-named-block-nodes", nil).([]any) {
		nm := n.(map[string]any)
		sizes[nm["node-name"].(string)] = nm["image"].(map[string]any)["virtual-size"].(float64)
	}
	if sizes["n1"] != 1<<20 || sizes["n2"] != 64<<20 {
		t.Errorf("sizes %v", sizes)
	}
}

// TestIntegrationDaemonize checks --daemonize and --pidfile.
func TestIntegrationDaemonize(t *testing.T) {
	dir := shortDir(t)
	sock := filepath.Join(dir, "q.sock")
	pidfile := filepath.Join(dir, "pid")
	out, err := cmdOut(binary, "--daemonize", "--pidfile", pidfile, "--qmp", sock)
	if err != nil {
		t.Fatalf("--daemonize: %v %s", err, out)
	}
	m := monitor(t, sock)
	run(t, m, "query-version", nil)
	if _, err := runErr(m, "quit", nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := cmdOut("test", "-e", pidfile); err != nil {
			return // pidfile removed at exit
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Error("daemon did not exit (pidfile still there) after quit")
}
