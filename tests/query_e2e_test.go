package tests

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"blockbackend/internal/qemutest"
)

// TestIntegrationQueryNodesLikeQSD opens the same node graphs in
// qemu-storage-daemon 7.2 and in blockbackend, one daemon after the other
// on the same image files, and wants the same answers to
// query-named-block-nodes (nested, flat) and query-block: qcow2 chains
// with relative and json: backing names, explicit backing nodes and
// backing null, internal snapshots, lazy refcounts' dirty flag after a
// write, qcow v1, qcow2 with a data file, qcow2+LUKS, LUKS, raw
// over a file (whole and sliced) and over qcow2, and a graph built over
// QMP with dirty bitmaps and an export.
//
// Normalised: generated node names (QEMU's carry a random part; each is
// replaced by its order of first appearance, so the graphs' shapes still
// have to agree), and in the scenario that writes, actual-size (the two
// qcow2 drivers allocate differently).
func TestIntegrationQueryNodesLikeQSD(t *testing.T) {
	needTool(t, "qemu-storage-daemon", "qemu-img", "qemu-io")
	dir := shortDir(t)
	p := func(name string) string { return filepath.Join(dir, name) }
	img := func(args ...string) {
		t.Helper()
		if out, err := qemutest.CombinedOutput(func() *exec.Cmd {
			c := exec.Command("qemu-img", args...)
			c.Dir = dir
			return c
		}); err != nil {
			t.Fatalf("qemu-img %v: %v: %s", args, err, out)
		}
	}
	luks := []string{"--object", "secret,id=s,data=pw"}
	img("create", "-q", "-f", "qcow2", "base.qcow2", "64M")
	if out, err := exec.Command("qemu-io", "-c", "write -P 1 0 1M", p("base.qcow2")).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	// Relative backing names, resolved against the image's directory.
	img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
	img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
	img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
		`json:{"driver":"qcow2","file":{"driver":"file","filename":"`+p("base.qcow2")+`"}}`, "js.qcow2")
	img("create", "-q", "-f", "qcow", "base.qcow", "16M")
	img("create", "-q", "-f", "qcow", "-b", "base.qcow", "-F", "qcow", "v1.qcow")
	// QEMU 7.2 opens a relative data-file name relative to its working
	// directory, we relative to the image's (README): an absolute one.
	img("create", "-q", "-f", "qcow2", "-o", "data_file="+p("df.raw"), "df.qcow2", "16M")
	img(append([]string{"create", "-q", "-f", "qcow2"}, append(luks, "-o",
		"encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", "enc.qcow2", "16M")...)...)
	img(append([]string{"create", "-q", "-f", "luks"}, append(luks, "-o", "key-secret=s,iter-time=10", "l.luks", "16M")...)...)
	// Not a multiple of 512 (qemu-img create would round the size up).
	if err := os.WriteFile(p("r.raw"), make([]byte, 196616), 0o644); err != nil {
		t.Fatal(err)
	}
	img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lazy0.qcow2", "16M")
	// A name QEMU escapes inside a json: filename.
	if err := os.Mkdir(p("é"), 0o755); err != nil {
		t.Fatal(err)
	}
	img("create", "-q", "-f", "raw", "é/r.raw", "1M")
	img("create", "-q", "-f", "qcow2", "snap.qcow2", "16M")
	img("snapshot", "-c", "s1", "snap.qcow2")

	queries := []map[string]any{
		{"execute": "query-named-block-nodes"},
		{"execute": "query-named-block-nodes", "arguments": map[string]any{"flat": false}},
		{"execute": "query-named-block-nodes", "arguments": map[string]any{"flat": true}},
		{"execute": "query-block"},
	}
	fileNode := func(name, file string, extra ...string) string {
		return strings.Join(append([]string{"driver=file,node-name=" + name + ",filename=" + p(file)}, extra...), ",")
	}
	type scenario struct {
		name  string
		args  []string
		steps []map[string]any
		// write: before the queries, write through an NBD export of node
		// q with qemu-io.
		write bool
	}
	bd := func(specs ...string) []string {
		var out []string
		for _, s := range specs {
			out = append(out, "--blockdev", s)
		}
		return out
	}
	scenarios := []scenario{
		{name: "chain", args: bd("driver=qcow2,node-name=top,file.driver=file,file.filename=" + p("top.qcow2"))},
		{name: "explicit-backing", args: bd(
			fileNode("fb", "base.qcow2", "read-only=on"), "driver=qcow2,node-name=b,file=fb,read-only=on",
			fileNode("fm", "mid.qcow2"), "driver=qcow2,node-name=m,file=fm,backing=b")},
		{name: "backing-to-other", args: bd(
			`{"driver":"qcow2","node-name":"b","file":{"driver":"file","filename":"`+p("mid.qcow2")+`"},"backing":null}`,
			"driver=qcow2,node-name=t,file.driver=file,file.filename="+p("base.qcow2")+",backing=b")},
		{name: "json-backing", args: bd("driver=qcow2,node-name=top,file.driver=file,file.filename=" + p("js.qcow2"))},
		{name: "backing-null", args: bd(fileNode("f", "top.qcow2"), `{"driver":"qcow2","node-name":"top","file":"f","backing":null}`)},
		{name: "internal-snapshot", args: bd("driver=qcow2,node-name=s,file.driver=file,file.filename=" + p("snap.qcow2"))},
		{name: "qcow", args: bd("driver=qcow,node-name=top,file.driver=file,file.filename=" + p("v1.qcow"))},
		{name: "data-file", args: bd("driver=qcow2,node-name=top,file.driver=file,file.filename=" + p("df.qcow2"))},
		{name: "data-file-ref", args: bd(fileNode("d", "df.raw"),
			"driver=qcow2,node-name=t,file.driver=file,file.filename="+p("df.qcow2")+",data-file=d")},
		{name: "qcow2-luks-json", args: append(luks, bd(`{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"`+
			p("enc.qcow2")+`"},"encrypt":{"format":"luks","key-secret":"s"}}`)...)},
		{name: "qcow2-luks-keyval", args: append(luks, bd("driver=qcow2,node-name=t,file.driver=file,file.filename="+
			p("enc.qcow2")+",encrypt.key-secret=s,encrypt.format=luks")...)},
		{name: "luks", args: append(luks, bd("driver=luks,node-name=l,key-secret=s,file.driver=file,file.filename="+p("l.luks"))...)},
		{name: "raw", args: bd(fileNode("f", "r.raw"), "driver=raw,node-name=r,file=f,offset=512,size=1024", "driver=raw,node-name=r2,file=f")},
		{name: "raw-non-ascii", args: bd("driver=raw,node-name=r,offset=512,file.driver=file,file.filename=" + p("é/r.raw"))},
		{name: "raw-over-qcow2", args: bd("driver=raw,node-name=r,file.driver=qcow2,file.file.driver=file,file.file.filename=" + p("top.qcow2"))},
		{name: "qcow2-over-raw", args: bd("driver=qcow2,node-name=q,file.driver=raw,file.file.driver=file,file.file.filename=" + p("base.qcow2"))},
		{name: "weak-options", args: bd("driver=qcow2,node-name=t,file.driver=file,file.filename=" + p("base.qcow2") +
			",lazy-refcounts=on,cache-size=1000000,discard=unmap,detect-zeroes=on,file.locking=off,file.aio=threads," +
			"pass-discard-request=on,overlap-check=none,read-only=on")},
		{name: "qmp", steps: []map[string]any{
			{"execute": "blockdev-add", "arguments": map[string]any{"driver": "qcow2", "node-name": "q",
				"file":          map[string]any{"driver": "file", "filename": p("top.qcow2"), "cache": map[string]any{"no-flush": true}},
				"detect-zeroes": "unmap", "discard": "unmap", "cache": map[string]any{"no-flush": true}}},
			{"execute": "block-dirty-bitmap-add", "arguments": map[string]any{"node": "q", "name": "b0", "granularity": 131072}},
			{"execute": "block-dirty-bitmap-add", "arguments": map[string]any{"node": "q", "name": "b1", "disabled": true}},
			{"execute": "block-export-add", "arguments": map[string]any{"type": "vhost-user-blk", "id": "e", "node-name": "q",
				"addr": map[string]any{"type": "unix", "path": p("vu.sock")}, "writable": true}},
			{"execute": "blockdev-add", "arguments": map[string]any{"driver": "raw", "node-name": "r", "read-only": true,
				"file": map[string]any{"driver": "file", "filename": p("r.raw"), "auto-read-only": true, "read-only": true}}},
		}},
		// The dirty bit of lazy refcounts is set by the first write.
		{name: "lazy-dirty", args: bd("driver=qcow2,node-name=q,file.driver=file,file.filename=" + p("lazy.qcow2")), write: true},
	}

	generated := regexp.MustCompile(`#block[0-9]+`)
	actualSize := regexp.MustCompile(`"actual-size":[0-9]+`)
	transcript := func(t *testing.T, sc scenario, startDaemon func(sock string, args ...string)) string {
		lazy, err := os.ReadFile(p("lazy0.qcow2"))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p("lazy.qcow2"), lazy, 0o644); err != nil {
			t.Fatal(err)
		}
		sock := p("qmp.sock")
		startDaemon(sock, sc.args...)
		s := newJobSession(t, sock)
		var out []string
		call := func(req map[string]any) {
			r := s.call(t, req["execute"].(string), req["arguments"])
			b, _ := json.Marshal(r)
			out = append(out, fmt.Sprintf("%v: %s", req["execute"], b))
		}
		for _, req := range sc.steps {
			call(req)
		}
		if sc.write {
			nbd := p("nbd.sock")
			call(map[string]any{"execute": "nbd-server-start", "arguments": map[string]any{
				"addr": map[string]any{"type": "unix", "data": map[string]any{"path": nbd}}}})
			call(map[string]any{"execute": "nbd-server-add", "arguments": map[string]any{"device": "q", "writable": true}})
			if o, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "nbd+unix:///q?socket="+nbd).CombinedOutput(); err != nil {
				t.Fatalf("qemu-io: %v: %s", err, o)
			}
		}
		for _, req := range queries {
			call(req)
		}
		// Generated names by order of first appearance.
		names := map[string]string{}
		text := generated.ReplaceAllStringFunc(strings.Join(out, "\n"), func(s string) string {
			if _, ok := names[s]; !ok {
				names[s] = fmt.Sprintf("#gen%d", len(names))
			}
			return names[s]
		})
		if sc.write {
			text = actualSize.ReplaceAllString(text, `"actual-size":N`)
		}
		return text
	}
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			var qsd, ours string
			t.Run("qsd", func(t *testing.T) {
				qsd = transcript(t, sc, func(sock string, args ...string) { startQSD(t, sock, args...) })
			})
			t.Run("blockbackend", func(t *testing.T) {
				ours = transcript(t, sc, func(sock string, args ...string) {
					start(t, sock, append([]string{"--chardev", "socket,id=m,path=" + sock + ",server=on,wait=off",
						"--monitor", "chardev=m"}, args...)...)
				})
			})
			if qsd == "" || ours == "" {
				return // a daemon failed; its subtest says why
			}
			ql, ol := strings.Split(qsd, "\n"), strings.Split(ours, "\n")
			for i := range max(len(ql), len(ol)) {
				var q, o string
				if i < len(ql) {
					q = ql[i]
				}
				if i < len(ol) {
					o = ol[i]
				}
				if q != o {
					t.Errorf("reply %d differs:\nqsd:  %s\nours: %s", i, q, o)
				}
			}
		})
	}
}
