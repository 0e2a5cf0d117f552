package tests

// Persistent dirty bitmaps (issue 4): the block-dirty-bitmap-* commands
// side by side with qemu-storage-daemon 7.2, and the bitmaps blockbackend
// stores in qcow2 images read back by QEMU (qemu-img info/check, and the
// dirty bits through qsd's NBD export with qemu-img map's x-dirty-bitmap).

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// bitmapDaemon is a running blockbackend or qemu-storage-daemon.
type bitmapDaemon struct {
	cmd    *exec.Cmd
	stderr *syncBuf
	done   chan error
}

// startBitmapDaemon runs bin (blockbackend or qemu-storage-daemon) with args
// and waits for sock.
func startBitmapDaemon(t *testing.T, bin, sock string, args ...string) *bitmapDaemon {
	t.Helper()
	d := &bitmapDaemon{cmd: exec.Command(bin, args...), stderr: &syncBuf{}, done: make(chan error, 1)}
	d.cmd.Stderr = d.stderr
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() { _ = d.cmd.Process.Kill(); <-d.done })
	deadline := time.Now().Add(20 * time.Second)
	for !dialable(sock) {
		select {
		case err := <-d.done:
			d.done <- err
			t.Fatalf("%s exited early (%v): %s", filepath.Base(bin), err, d.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not open %s: %s", filepath.Base(bin), sock, d.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return d
}

// wait waits for the process to exit (after quit) and checks stderr.
func (d *bitmapDaemon) wait(t *testing.T) {
	t.Helper()
	select {
	case err := <-d.done:
		d.done <- err
	case <-time.After(20 * time.Second):
		_ = d.cmd.Process.Signal(syscall.SIGQUIT) // a Go process prints its goroutines
		time.Sleep(time.Second)
		t.Fatalf("%s did not exit: %s", d.cmd.Path, d.stderr.String())
	}
	if s := d.stderr.String(); strings.Contains(s, "DATA RACE") || strings.Contains(s, "panic:") {
		t.Fatalf("stderr shows a race or panic:\n%s", s)
	}
}

func qsdBinary(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Fatalf("qemu-storage-daemon is needed (apt-get install qemu-system-x86): %v", err)
	}
	return p
}

func mustTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := cmdOut(name, args...)
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return out
}

// infoBitmaps is qemu-img info's "bitmaps" list, printed compactly.
func infoBitmaps(t *testing.T, img string, extra ...string) string {
	t.Helper()
	out := mustTool(t, "qemu-img", append(append([]string{"info", "--output=json"}, extra...), img)...)
	var m struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps any `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(m.FormatSpecific.Data.Bitmaps)
	return string(b)
}

// bitmapScenario makes its images in dir, opens them through QMP on sock,
// sends the bitmap commands and returns one line per step.
func bitmapScenario(t *testing.T, sock, dir string) []string {
	img := func(name, opts string) string {
		p := filepath.Join(dir, name)
		args := []string{"create", "-q", "-f", "qcow2"}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		mustTool(t, "qemu-img", append(args, p, "64M")...)
		return p
	}
	q := img("q.qcow2", "")
	mustTool(t, "qemu-img", "bitmap", "--add", q, "b0")
	mustTool(t, "qemu-img", "bitmap", "--add", "-g", "128k", "--disable", q, "b1")
	ro := img("ro.qcow2", "")
	mustTool(t, "qemu-img", "bitmap", "--add", ro, "b0")
	v2 := img("v2.qcow2", "compat=0.10")
	small := img("small.qcow2", "cluster_size=512")
	raw := filepath.Join(dir, "r.raw")
	mustTool(t, "qemu-img", "create", "-q", "-f", "raw", raw, "64M")

	s := newJobSession(t, sock)
	var out []string
	long := strings.Repeat("L", 1024)
	step := func(cmd string, args map[string]any) {
		r := s.call(t, cmd, args)
		b, _ := json.Marshal(args)
		b = []byte(strings.ReplaceAll(strings.ReplaceAll(string(b), dir, "DIR"), long[:1023], "<1023 L>"))
		if e := r.errText(); e != "" {
			e = strings.ReplaceAll(e, long[:1023], "<1023 L>")
			out = append(out, fmt.Sprintf("%s %s: error %s", cmd, b, e))
		} else {
			out = append(out, fmt.Sprintf("%s %s: ok", cmd, b))
		}
	}
	add := func(node, file string, readOnly bool, drv string) {
		step("blockdev-add", map[string]any{"driver": drv, "node-name": node, "read-only": readOnly,
			"file": map[string]any{"driver": "file", "filename": file}})
	}
	add("q", q, false, "qcow2")
	add("ro", ro, true, "qcow2")
	add("v2", v2, false, "qcow2")
	add("s", small, false, "qcow2")
	add("r", raw, false, "raw")
	type A = map[string]any
	for _, c := range []struct {
		cmd  string
		args A
	}{
		{"block-dirty-bitmap-add", A{"node": "q", "name": "n1"}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "n1"}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "b0"}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "b0", "persistent": true}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": ""}},
		{"block-dirty-bitmap-add", A{"node": "zz", "name": ""}},
		{"block-dirty-bitmap-add", A{"node": "zz", "name": "x"}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "p1", "persistent": true}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "p2", "persistent": true, "granularity": 512, "disabled": true}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "p3", "persistent": true, "granularity": 2147483648}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "g1", "granularity": 1000}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "g2", "granularity": 256}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "g3", "granularity": 4294967296}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "g5", "granularity": 0}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": long[:1023], "persistent": true}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": long, "persistent": true}},
		{"block-dirty-bitmap-add", A{"node": "s", "name": long}},
		{"block-dirty-bitmap-add", A{"node": "s", "name": "d1"}},
		{"block-dirty-bitmap-add", A{"node": "r", "name": "p", "persistent": true}},
		{"block-dirty-bitmap-add", A{"node": "r", "name": "nr"}},
		{"block-dirty-bitmap-add", A{"node": "v2", "name": "p", "persistent": true}},
		{"block-dirty-bitmap-add", A{"node": "ro", "name": "np"}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "x", "bogus": 1}},
		{"block-dirty-bitmap-add", A{"node": "q"}},
		{"block-dirty-bitmap-clear", A{"node": "ro", "name": "b0"}},
		{"block-dirty-bitmap-clear", A{"node": "ro", "name": "np"}},
		{"block-dirty-bitmap-clear", A{"node": "q", "name": "zz"}},
		{"block-dirty-bitmap-clear", A{"node": "zz", "name": "zz"}},
		{"block-dirty-bitmap-clear", A{"node": "q", "name": "b0"}},
		{"block-dirty-bitmap-disable", A{"node": "q", "name": "b0"}},
		{"block-dirty-bitmap-disable", A{"node": "q", "name": "b0"}},
		{"block-dirty-bitmap-enable", A{"node": "q", "name": "b1"}},
		{"block-dirty-bitmap-enable", A{"node": "ro", "name": "b0"}},
		{"block-dirty-bitmap-disable", A{"node": "ro", "name": "b0"}},
		{"block-dirty-bitmap-remove", A{"node": "ro", "name": "b0"}},
		{"block-dirty-bitmap-remove", A{"node": "q", "name": "zz"}},
		{"block-dirty-bitmap-remove", A{"node": "zz", "name": "zz"}},
		{"block-dirty-bitmap-remove", A{"node": "q", "name": "p2"}},
		{"block-dirty-bitmap-remove", A{"node": "q", "name": "n1"}},
		{"block-dirty-bitmap-remove", A{"node": "q", "name": long[:1023]}},
		{"block-dirty-bitmap-add", A{"node": "q", "name": "m", "granularity": 4096}},
		{"block-dirty-bitmap-merge", A{"node": "q", "target": "m", "bitmaps": []any{"b0", "b1", A{"node": "s", "name": "d1"}}}},
		{"block-dirty-bitmap-merge", A{"node": "q", "target": "m", "bitmaps": []any{A{"node": "zz", "name": "b0"}}}},
		{"block-dirty-bitmap-merge", A{"node": "q", "target": "m", "bitmaps": []any{"zz"}}},
		{"block-dirty-bitmap-merge", A{"node": "q", "target": "zz", "bitmaps": []any{"b0"}}},
		{"block-dirty-bitmap-merge", A{"node": "q", "target": "m", "bitmaps": []any{1}}},
		{"block-dirty-bitmap-merge", A{"node": "q", "target": "m", "bitmaps": []any{A{"node": "q"}}}},
		{"block-dirty-bitmap-merge", A{"node": "ro", "target": "b0", "bitmaps": []any{"np"}}},
		{"block-dirty-bitmap-merge", A{"node": "q", "target": "m"}},
		{"block-dirty-bitmap-enable", A{"node": "q", "name": "zz"}},
		{"block-dirty-bitmap-disable", A{"node": "q"}},
	} {
		step(c.cmd, c.args)
	}
	// The dirty-bitmaps of every node, and the image while open.
	r := s.call(t, "query-named-block-nodes", map[string]any{"flat": true})
	var nodes []struct {
		NodeName     string `json:"node-name"`
		DirtyBitmaps any    `json:"dirty-bitmaps"`
	}
	b, _ := json.Marshal(r.Return)
	if err := json.Unmarshal(b, &nodes); err != nil {
		t.Fatal(err)
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].NodeName < nodes[j].NodeName })
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, "#") {
			continue // implicit file nodes: generated names differ
		}
		db, _ := json.Marshal(n.DirtyBitmaps)
		out = append(out, fmt.Sprintf("%s dirty-bitmaps %s", n.NodeName, strings.ReplaceAll(string(db), long[:1023], "<1023 L>")))
	}
	out = append(out, "while open: "+infoBitmaps(t, q, "-U"))
	s.call(t, "quit", nil)
	return out
}

// TestIntegrationBitmapsLikeQSD sends the same bitmap commands to
// blockbackend and to qemu-storage-daemon 7.2 and wants the same replies,
// the same dirty-bitmaps lists and the same bitmaps in the images.
func TestIntegrationBitmapsLikeQSD(t *testing.T) {
	needTool(t, "qemu-img")
	qsd := qsdBinary(t)
	ourDir, qsdDir := shortDir(t), shortDir(t)
	monitorArgs := func(sock string) []string {
		return []string{"--chardev", "socket,id=m,path=" + sock + ",server=on,wait=off", "--monitor", "chardev=m"}
	}
	ourSock := filepath.Join(ourDir, "qmp.sock")
	d := startBitmapDaemon(t, binary, ourSock, monitorArgs(ourSock)...)
	ours := bitmapScenario(t, ourSock, ourDir)
	d.wait(t)
	qsdSock := filepath.Join(qsdDir, "qmp.sock")
	d = startBitmapDaemon(t, qsd, qsdSock, monitorArgs(qsdSock)...)
	theirs := bitmapScenario(t, qsdSock, qsdDir)
	d.wait(t)

	for i := range max(len(ours), len(theirs)) {
		var o, q string
		if i < len(ours) {
			o = ours[i]
		}
		if i < len(theirs) {
			q = theirs[i]
		}
		if o != q {
			t.Errorf("step %d differs:\nours: %.400s\nqsd:  %.400s", i, o, q)
		}
	}
	for _, name := range []string{"q.qcow2", "ro.qcow2", "v2.qcow2", "small.qcow2"} {
		o, q := filepath.Join(ourDir, name), filepath.Join(qsdDir, name)
		if a, b := infoBitmaps(t, o), infoBitmaps(t, q); a != b {
			t.Errorf("%s: bitmaps after close:\nours: %s\nqsd:  %s", name, a, b)
		}
		requireCleanCheck(t, o, "qcow2")
	}
	if t.Failed() || testing.Verbose() {
		t.Logf("our transcript:\n%s", strings.Join(ours, "\n"))
	}
}

// dirtyRanges asks QEMU which ranges of bitmap name in img are dirty:
// qsd exports img read-only over NBD with the bitmap, and qemu-img map
// reads the qemu:dirty-bitmap context (x-dirty-bitmap: dirty ranges show
// as "data": false).
func dirtyRanges(t *testing.T, img, name string) [][2]int64 {
	t.Helper()
	dir := shortDir(t)
	qmpSock, nbdSock := filepath.Join(dir, "qmp.sock"), filepath.Join(dir, "nbd.sock")
	d := startBitmapDaemon(t, qsdBinary(t), nbdSock,
		"--blockdev", "driver=file,node-name=f,filename="+img+",read-only=on",
		"--blockdev", "driver=qcow2,node-name=q,file=f,read-only=on",
		"--nbd-server", "addr.type=unix,addr.path="+nbdSock,
		"--export", "type=nbd,id=e,node-name=q,bitmaps.0="+name,
		"--chardev", "socket,id=m,path="+qmpSock+",server=on,wait=off", "--monitor", "chardev=m")
	out := mustTool(t, "qemu-img", "map", "--output=json", "--image-opts",
		"driver=nbd,server.type=unix,server.path="+nbdSock+",export=q,x-dirty-bitmap=qemu:dirty-bitmap:"+name)
	s := newJobSession(t, qmpSock)
	s.call(t, "quit", nil)
	d.wait(t)
	var ext []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal([]byte(out), &ext); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	var r [][2]int64
	for _, e := range ext {
		if !e.Data {
			r = append(r, [2]int64{e.Start, e.Length})
		}
	}
	return r
}

// TestIntegrationBitmapsRecordWrites writes through blockbackend's NBD
// export to an image with qemu-img's bitmaps and a bitmap added over QMP,
// then has QEMU read the dirty bits.
func TestIntegrationBitmapsRecordWrites(t *testing.T) {
	needTool(t, "qemu-img", "qemu-io")
	dir := shortDir(t)
	img := filepath.Join(dir, "w.qcow2")
	mustTool(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	mustTool(t, "qemu-img", "bitmap", "--add", img, "b0")
	mustTool(t, "qemu-img", "bitmap", "--add", "--disable", img, "d0")
	qmpSock, nbdSock := filepath.Join(dir, "qmp.sock"), filepath.Join(dir, "nbd.sock")
	d := startBitmapDaemon(t, binary, qmpSock,
		"--blockdev", "driver=file,node-name=f,filename="+img,
		"--blockdev", "driver=qcow2,node-name=q,file=f,discard=unmap",
		"--nbd-server", "addr.type=unix,addr.path="+nbdSock,
		"--export", "type=nbd,id=e,node-name=q,writable=on",
		"--chardev", "socket,id=m,path="+qmpSock+",server=on,wait=off", "--monitor", "chardev=m")
	s := newJobSession(t, qmpSock)
	if r := s.call(t, "block-dirty-bitmap-add", map[string]any{"node": "q", "name": "p4k", "persistent": true, "granularity": 4096}); r.Err != nil {
		t.Fatal(r.errText())
	}
	if got := infoBitmaps(t, img, "-U"); got != `[{"flags":["in-use","auto"],"granularity":65536,"name":"b0"},{"flags":["in-use"],"granularity":65536,"name":"d0"}]` {
		t.Errorf("while open: %s", got)
	}
	mustTool(t, "qemu-io", "-f", "raw", "-c", "write 0 4k", "-c", "write 1M 100k", "-c", "write -z 10M 64k",
		"-c", "discard 20M 1M", "-c", "write 5000 10", "nbd+unix:///q?socket="+nbdSock)
	s.call(t, "quit", nil)
	d.wait(t)

	requireCleanCheck(t, img, "qcow2")
	if got := infoBitmaps(t, img); got != `[{"flags":["auto"],"granularity":65536,"name":"b0"},{"flags":[],"granularity":65536,"name":"d0"},{"flags":["auto"],"granularity":4096,"name":"p4k"}]` {
		t.Errorf("after close: %s", got)
	}
	want := [][2]int64{{0, 64 << 10}, {1 << 20, 128 << 10}, {10 << 20, 64 << 10}, {20 << 20, 1 << 20}}
	if got := dirtyRanges(t, img, "b0"); !reflect.DeepEqual(got, want) {
		t.Errorf("b0 dirty ranges %v, want %v", got, want)
	}
	want = [][2]int64{{0, 8 << 10}, {1 << 20, 100 << 10}, {10 << 20, 64 << 10}, {20 << 20, 1 << 20}}
	if got := dirtyRanges(t, img, "p4k"); !reflect.DeepEqual(got, want) {
		t.Errorf("p4k dirty ranges %v, want %v", got, want)
	}
	if got := dirtyRanges(t, img, "d0"); got != nil {
		t.Errorf("the disabled bitmap has dirty ranges %v", got)
	}
}

// TestIntegrationBitmapsCrash kills blockbackend while an image with
// bitmaps is open: the bitmaps stay in use, qemu-img check reports what it
// reports after a QEMU crash, and both daemons then see them inconsistent.
func TestIntegrationBitmapsCrash(t *testing.T) {
	needTool(t, "qemu-img", "qemu-io")
	dir := shortDir(t)
	crash := func(bin, name string) string {
		img := filepath.Join(dir, name)
		mustTool(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
		mustTool(t, "qemu-img", "bitmap", "--add", img, "b0")
		qmpSock, nbdSock := filepath.Join(dir, name+".qmp"), filepath.Join(dir, name+".nbd")
		d := startBitmapDaemon(t, bin, qmpSock,
			"--blockdev", "driver=file,node-name=f,filename="+img,
			"--blockdev", "driver=qcow2,node-name=q,file=f",
			"--nbd-server", "addr.type=unix,addr.path="+nbdSock,
			"--export", "type=nbd,id=e,node-name=q,writable=on",
			"--chardev", "socket,id=m,path="+qmpSock+",server=on,wait=off", "--monitor", "chardev=m")
		s := newJobSession(t, qmpSock)
		s.call(t, "block-dirty-bitmap-add", map[string]any{"node": "q", "name": "p1", "persistent": true})
		mustTool(t, "qemu-io", "-f", "raw", "-c", "write 0 4k", "-c", "flush", "nbd+unix:///q?socket="+nbdSock)
		_ = d.cmd.Process.Kill()
		<-d.done
		d.done <- nil
		return img
	}
	ours, theirs := crash(binary, "ours.qcow2"), crash(qsdBinary(t), "qsd.qcow2")
	if a, b := infoBitmaps(t, ours), infoBitmaps(t, theirs); a != b || !strings.Contains(a, "in-use") {
		t.Errorf("bitmaps after a crash:\nours: %s\nqsd:  %s", a, b)
	}
	oc, oOut := qemuCheck(t, ours, "qcow2")
	qc, qOut := qemuCheck(t, theirs, "qcow2")
	if oc.Corruptions != 0 || oc.CheckErrors != 0 || oc.Corruptions != qc.Corruptions || oc.CheckErrors != qc.CheckErrors {
		t.Errorf("qemu-img check after a crash:\nours: %s\nqsd:  %s", oOut, qOut)
	}

	// Both daemons open the crashed images and report the bitmap
	// inconsistent, with the same errors for its use.
	look := func(bin, img string) []string {
		sock := filepath.Join(dir, filepath.Base(img)+".qmp2")
		d := startBitmapDaemon(t, bin, sock,
			"--blockdev", "driver=file,node-name=f,filename="+img,
			"--blockdev", "driver=qcow2,node-name=q,file=f",
			"--chardev", "socket,id=m,path="+sock+",server=on,wait=off", "--monitor", "chardev=m")
		s := newJobSession(t, sock)
		var out []string
		r := s.call(t, "query-named-block-nodes", map[string]any{"flat": true})
		b, _ := json.Marshal(r.Return)
		var nodes []struct {
			NodeName     string `json:"node-name"`
			DirtyBitmaps any    `json:"dirty-bitmaps"`
		}
		_ = json.Unmarshal(b, &nodes)
		for _, n := range nodes {
			if n.NodeName == "q" {
				db, _ := json.Marshal(n.DirtyBitmaps)
				out = append(out, string(db))
			}
		}
		for _, c := range []string{"block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-remove"} {
			out = append(out, c+": "+s.call(t, c, map[string]any{"node": "q", "name": "b0"}).errText())
		}
		s.call(t, "quit", nil)
		d.wait(t)
		return append(out, infoBitmaps(t, img))
	}
	if a, b := look(binary, ours), look(qsdBinary(t), theirs); !reflect.DeepEqual(a, b) {
		t.Errorf("after reopening the crashed image:\nours: %v\nqsd:  %v", a, b)
	}
	requireCleanCheck(t, ours, "qcow2")
}
