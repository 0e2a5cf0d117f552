package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

// jobSession is a raw QMP session that keeps the JOB_STATUS_CHANGE events
// it reads, per job, whatever their place relative to the replies.
type jobSession struct {
	q      *rawQMP
	status map[string][]string
}

func newJobSession(t *testing.T, sock string) *jobSession {
	s := &jobSession{q: dialRaw(t, sock), status: map[string][]string{}}
	s.q.line(t) // greeting
	if r := s.call(t, "qmp_capabilities", nil); r.Err != nil {
		t.Fatalf("qmp_capabilities: %v", r.Err)
	}
	return s
}

type qmpReply struct {
	Return any            `json:"return"`
	Err    map[string]any `json:"error"`
}

func (s *jobSession) read(t *testing.T) (qmpReply, bool) {
	t.Helper()
	l := s.q.line(t)
	var m struct {
		qmpReply
		Event string         `json:"event"`
		Data  map[string]any `json:"data"`
	}
	if err := json.Unmarshal([]byte(l), &m); err != nil {
		t.Fatalf("%v: %s", err, l)
	}
	if m.Event != "" {
		if m.Event == "JOB_STATUS_CHANGE" {
			id := m.Data["id"].(string)
			s.status[id] = append(s.status[id], m.Data["status"].(string))
		}
		return qmpReply{}, false
	}
	return m.qmpReply, true
}

func (s *jobSession) call(t *testing.T, cmd string, args any) qmpReply {
	t.Helper()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	s.q.send(t, string(b)+"\n")
	for {
		if r, ok := s.read(t); ok {
			return r
		}
	}
}

// errText is the error's description, or "" on success.
func (r qmpReply) errText() string {
	if r.Err == nil {
		return ""
	}
	return fmt.Sprint(r.Err["desc"])
}

// waitStatus reads events until job id has reached status.
func (s *jobSession) waitStatus(t *testing.T, id, status string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if st := s.status[id]; len(st) > 0 && st[len(st)-1] == status {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s did not reach %s: %v", id, status, s.status[id])
		}
		s.read(t)
	}
}

// jobTranscript is what one daemon answered to the job scenario.
type jobTranscript struct {
	Status  map[string][]string
	Replies []string // per step: error text or the normalised return
	Files   map[string]imgFacts
}

type imgFacts struct {
	VirtualSize float64
	ActualSize  float64
	Format      string
}

func qemuImgInfo(t *testing.T, path string) imgFacts {
	t.Helper()
	out, err := cmdOut("qemu-img", "info", "--output=json", "-U", path)
	if err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	return imgFacts{VirtualSize: m["virtual-size"].(float64), ActualSize: m["actual-size"].(float64), Format: m["format"].(string)}
}

// runJobScenario sends the same commands to whichever daemon listens on
// sock and records what it says.
func runJobScenario(t *testing.T, sock, dir string) jobTranscript {
	s := newJobSession(t, sock)
	tr := jobTranscript{Files: map[string]imgFacts{}}
	step := func(cmd string, args any) qmpReply {
		t.Helper()
		r := s.call(t, cmd, args)
		if r.Err != nil {
			tr.Replies = append(tr.Replies, fmt.Sprintf("%s: %v: %s", cmd, r.Err["class"], r.errText()))
		} else {
			b, _ := json.Marshal(r.Return)
			tr.Replies = append(tr.Replies, cmd+": "+string(b))
		}
		return r
	}
	create := func(id string, opts map[string]any) qmpReply {
		return step("blockdev-create", map[string]any{"job-id": id, "options": opts})
	}

	const size = 16 << 20
	falloc := filepath.Join(dir, "falloc.img")
	create("j1", map[string]any{"driver": "file", "filename": falloc, "size": size, "preallocation": "falloc"})
	s.waitStatus(t, "j1", "concluded")
	step("query-jobs", nil)
	for _, v := range []string{"cancel", "pause", "resume", "complete", "finalize"} {
		step("job-"+v, map[string]any{"id": "j1"})
	}
	create("j1", map[string]any{"driver": "file", "filename": falloc, "size": size})
	step("job-dismiss", map[string]any{"id": "j1"})
	step("query-jobs", nil)
	step("job-dismiss", map[string]any{"id": "j1"})
	tr.Files["falloc"] = qemuImgInfo(t, falloc)

	sparse := filepath.Join(dir, "off.img")
	create("j2", map[string]any{"driver": "file", "filename": sparse, "size": size})
	s.waitStatus(t, "j2", "concluded")
	step("job-dismiss", map[string]any{"id": "j2"})
	tr.Files["off"] = qemuImgInfo(t, sparse)

	// A create that fails: the error shows in query-jobs.
	create("j3", map[string]any{"driver": "file", "filename": "/nonexistent/dir/x.img", "size": size})
	s.waitStatus(t, "j3", "concluded")
	step("query-jobs", nil)
	step("job-dismiss", map[string]any{"id": "j3"})

	// Argument errors: no job is created.
	for _, a := range []map[string]any{
		{"job-id": "e", "options": map[string]any{"driver": "null-co"}},
		{"job-id": "e", "options": map[string]any{"driver": "raw", "filename": "x"}},
		{"job-id": "e", "options": map[string]any{"driver": "nosuch"}},
		{"job-id": "e", "options": map[string]any{"driver": "file", "filename": sparse}},
		{"job-id": "e", "options": map[string]any{"driver": "file", "filename": sparse, "size": 1, "preallocation": "bogus"}},
		{"job-id": "e", "options": map[string]any{"filename": sparse, "size": 1}},
		{"job-id": "9e", "options": map[string]any{"driver": "file", "filename": sparse, "size": 1}},
		{"options": map[string]any{"driver": "file", "filename": sparse, "size": 1}},
	} {
		step("blockdev-create", a)
	}
	step("job-cancel", map[string]any{"id": "nosuch"})
	step("query-jobs", nil)

	// Internal snapshots and amend on formats that have neither.
	step("blockdev-add", map[string]any{"driver": "file", "node-name": "f", "filename": sparse})
	step("blockdev-add", map[string]any{"driver": "raw", "node-name": "r", "file": "f"})
	step("blockdev-add", map[string]any{"driver": "raw", "node-name": "ro", "read-only": true,
		"file": map[string]any{"driver": "file", "filename": falloc}})
	for _, dev := range []string{"r", "f", "ro", "zz"} {
		step("blockdev-snapshot-internal-sync", map[string]any{"device": dev, "name": "s1"})
		step("blockdev-snapshot-delete-internal-sync", map[string]any{"device": dev, "name": "s1"})
		step("blockdev-snapshot-delete-internal-sync", map[string]any{"device": dev, "id": "1"})
	}
	step("blockdev-snapshot-delete-internal-sync", map[string]any{"device": "r"})
	for _, a := range []map[string]any{
		{"job-id": "a", "node-name": "r", "options": map[string]any{"driver": "raw"}},
		{"job-id": "a", "node-name": "r", "options": map[string]any{"driver": "file"}},
		{"job-id": "a", "node-name": "zz", "options": map[string]any{"driver": "raw"}},
		{"job-id": "a", "node-name": "r", "options": map[string]any{"driver": "nosuch"}},
	} {
		step("x-blockdev-amend", a)
	}
	tr.Status = s.status
	return tr
}

// startQSD runs qemu-storage-daemon with a QMP monitor on sock and the
// extra arguments.
func startQSD(t *testing.T, sock string, extra ...string) {
	t.Helper()
	cmd := exec.Command("qemu-storage-daemon", append([]string{
		"--chardev", "socket,id=m,path=" + sock + ",server=on,wait=off", "--monitor", "chardev=m"}, extra...)...)
	out := &syncBuf{}
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-storage-daemon did not open %s: %s", sock, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestIntegrationBlockdevCreateLikeQSD runs blockdev-create with the file
// driver and the job commands against blockbackend and against the real
// qemu-storage-daemon 7.2, and wants the same events, replies and images.
func TestIntegrationBlockdevCreateLikeQSD(t *testing.T) {
	needTool(t, "qemu-storage-daemon", "qemu-img")
	ourDir, qsdDir := shortDir(t), shortDir(t)

	ourSock := filepath.Join(ourDir, "qmp.sock")
	start(t, ourSock, "--chardev", "socket,id=m,path="+ourSock+",server=on,wait=off", "--monitor", "chardev=m")
	ours := runJobScenario(t, ourSock, ourDir)

	qsdSock := filepath.Join(qsdDir, "qmp.sock")
	startQSD(t, qsdSock)
	theirs := runJobScenario(t, qsdSock, qsdDir)

	if !reflect.DeepEqual(ours.Status, theirs.Status) {
		t.Errorf("JOB_STATUS_CHANGE sequences differ:\nours: %v\nqsd:  %v", ours.Status, theirs.Status)
	}
	want := map[string][]string{
		"j1": {"created", "running", "waiting", "pending", "concluded", "null"},
		"j2": {"created", "running", "waiting", "pending", "concluded", "null"},
		"j3": {"created", "running", "aborting", "concluded", "null"},
	}
	if !reflect.DeepEqual(ours.Status, want) {
		t.Errorf("our events %v, want %v", ours.Status, want)
	}
	for i := range max(len(ours.Replies), len(theirs.Replies)) {
		var o, q string
		if i < len(ours.Replies) {
			o = ours.Replies[i]
		}
		if i < len(theirs.Replies) {
			q = theirs.Replies[i]
		}
		if o != q {
			t.Errorf("step %d differs:\nours: %s\nqsd:  %s", i, o, q)
		}
	}
	for name, f := range ours.Files {
		if f != theirs.Files[name] {
			t.Errorf("%s: qemu-img info of ours %+v, of qsd's %+v", name, f, theirs.Files[name])
		}
		if f.Format != "raw" || f.VirtualSize != 16<<20 {
			t.Errorf("%s: %+v", name, f)
		}
	}
	if f := ours.Files["falloc"]; f.ActualSize < 16<<20 {
		t.Errorf("preallocation=falloc left %v bytes allocated", f.ActualSize)
	}
	if t.Failed() || testing.Verbose() {
		t.Logf("our replies:\n%s", strings.Join(ours.Replies, "\n"))
	}
}

// TestIntegrationCancelCreateLikeQSD cancels a long blockdev-create
// (preallocation=full) on both daemons.
func TestIntegrationCancelCreateLikeQSD(t *testing.T) {
	needTool(t, "qemu-storage-daemon")
	scenario := func(sock, dir string) (map[string][]string, any) {
		s := newJobSession(t, sock)
		r := s.call(t, "blockdev-create", map[string]any{"job-id": "big", "options": map[string]any{
			"driver": "file", "filename": filepath.Join(dir, "big.img"), "size": 256 << 20, "preallocation": "full"}})
		if r.Err != nil {
			t.Fatalf("blockdev-create: %v", r.Err)
		}
		running := s.call(t, "query-jobs", nil).Return
		if r := s.call(t, "job-cancel", map[string]any{"id": "big"}); r.Err != nil {
			t.Fatalf("job-cancel: %v", r.Err)
		}
		s.waitStatus(t, "big", "concluded")
		q := s.call(t, "query-jobs", nil).Return
		return s.status, []any{running, q}
	}
	ourDir, qsdDir := shortDir(t), shortDir(t)
	ourSock := filepath.Join(ourDir, "qmp.sock")
	start(t, ourSock, "--chardev", "socket,id=m,path="+ourSock+",server=on,wait=off", "--monitor", "chardev=m")
	ourEv, ourQ := scenario(ourSock, ourDir)
	qsdSock := filepath.Join(qsdDir, "qmp.sock")
	startQSD(t, qsdSock)
	qsdEv, qsdQ := scenario(qsdSock, qsdDir)
	if !reflect.DeepEqual(ourEv, qsdEv) {
		t.Errorf("events: ours %v, qsd %v", ourEv, qsdEv)
	}
	if !reflect.DeepEqual(ourQ, qsdQ) {
		t.Errorf("query-jobs: ours %v, qsd %v", ourQ, qsdQ)
	}
	want := []any{
		[]any{map[string]any{"id": "big", "type": "create", "status": "running",
			"current-progress": 0.0, "total-progress": 1.0}},
		[]any{map[string]any{"id": "big", "type": "create", "status": "concluded",
			"current-progress": 1.0, "total-progress": 1.0, "error": "Operation canceled"}},
	}
	if !reflect.DeepEqual(ourQ, want) {
		t.Errorf("query-jobs %v, want %v", ourQ, want)
	}
}

// TestIntegrationCreateRefLikeQSD formats with blockdev-create through an
// inline file definition (opened for the job only) and through a node
// name, on both daemons; the images must be alike. While a long create
// runs, blockdev-del of its file node fails as in QEMU.
func TestIntegrationCreateRefLikeQSD(t *testing.T) {
	needTool(t, "qemu-storage-daemon", "qemu-img")
	scenario := func(sock, dir string) ([]string, map[string]imgFacts) {
		s := newJobSession(t, sock)
		var replies []string
		step := func(cmd string, args any) qmpReply {
			r := s.call(t, cmd, args)
			if r.Err != nil {
				replies = append(replies, fmt.Sprintf("%s: %v: %s", cmd, r.Err["class"], r.errText()))
			} else {
				b, _ := json.Marshal(r.Return)
				replies = append(replies, cmd+": "+string(b))
			}
			return r
		}
		inline, named := filepath.Join(dir, "inline.qcow2"), filepath.Join(dir, "named.qcow2")
		for _, p := range []string{inline, named} {
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		step("blockdev-create", map[string]any{"job-id": "c1", "options": map[string]any{
			"driver": "qcow2", "size": 64 << 20, "cluster-size": 65536,
			"file": map[string]any{"driver": "file", "filename": inline}}})
		s.waitStatus(t, "c1", "concluded")
		step("job-dismiss", map[string]any{"id": "c1"})
		// The inline node is gone with the job.
		r := step("query-named-block-nodes", map[string]any{"flat": true})
		replies[len(replies)-1] = fmt.Sprintf("nodes after inline create: %d", len(r.Return.([]any)))
		step("blockdev-create", map[string]any{"job-id": "c2", "options": map[string]any{
			"driver": "qcow2", "size": 64 << 20, "file": map[string]any{"driver": "file", "filename": filepath.Join(dir, "nosuch", "x")}}})
		s.waitStatus(t, "c2", "concluded")
		step("query-jobs", nil)
		step("job-dismiss", map[string]any{"id": "c2"})
		step("blockdev-add", map[string]any{"driver": "file", "node-name": "f", "filename": named})
		step("blockdev-create", map[string]any{"job-id": "c3", "options": map[string]any{
			"driver": "qcow2", "size": 64 << 20, "file": "f", "lazy-refcounts": true}})
		s.waitStatus(t, "c3", "concluded")
		step("job-dismiss", map[string]any{"id": "c3"})
		step("blockdev-del", map[string]any{"node-name": "f"})
		facts := map[string]imgFacts{"inline": qemuImgInfo(t, inline), "named": qemuImgInfo(t, named)}
		// More layouts, each compared byte for byte below.
		for i, o := range []map[string]any{
			{"version": "v2", "cluster-size": 4096},
			{"preallocation": "metadata", "cluster-size": 4096, "refcount-bits": 1},
			{"preallocation": "falloc", "extended-l2": true},
			{"preallocation": "full", "cluster-size": 512, "size": 8 << 20},
			{"compression-type": "zstd", "size": 100 << 30},
			{"data-file": "DATA", "data-file-raw": true},
		} {
			name := fmt.Sprintf("more%d", i)
			p := filepath.Join(dir, name+".qcow2")
			opts := map[string]any{"driver": "qcow2", "size": 64 << 20, "file": map[string]any{"driver": "file", "filename": p}}
			for k, v := range o {
				opts[k] = v
			}
			// The data file's name is recorded in the image: the same
			// path for both daemons (they run one after the other), the
			// file moved beside the image afterwards.
			data := filepath.Join(os.TempDir(), fmt.Sprintf("bb-create-ref-%d.data", os.Getpid()))
			for _, f := range []string{p, data} {
				if err := os.WriteFile(f, nil, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if o["data-file"] != nil {
				opts["data-file"] = map[string]any{"driver": "file", "filename": data}
			}
			step("blockdev-create", map[string]any{"job-id": name, "options": opts})
			s.waitStatus(t, name, "concluded")
			step("query-jobs", nil)
			step("job-dismiss", map[string]any{"id": name})
			if err := os.Rename(data, p+".data"); err != nil {
				t.Fatal(err)
			}
			facts[name] = imgFacts{Format: "qcow2"}
		}
		return replies, facts
	}
	ourDir, qsdDir := shortDir(t), shortDir(t)
	ourSock := filepath.Join(ourDir, "qmp.sock")
	start(t, ourSock, "--chardev", "socket,id=m,path="+ourSock+",server=on,wait=off", "--monitor", "chardev=m")
	ours, ourFiles := scenario(ourSock, ourDir)
	qsdSock := filepath.Join(qsdDir, "qmp.sock")
	startQSD(t, qsdSock)
	theirs, qsdFiles := scenario(qsdSock, qsdDir)
	for i := range max(len(ours), len(theirs)) {
		var o, q string
		if i < len(ours) {
			o = ours[i]
		}
		if i < len(theirs) {
			q = theirs[i]
		}
		// Paths differ between the two runs' directories.
		o, q = strings.ReplaceAll(o, ourDir, "DIR"), strings.ReplaceAll(q, qsdDir, "DIR")
		if o != q {
			t.Errorf("step %d differs:\nours: %s\nqsd:  %s", i, o, q)
		}
	}
	for name, f := range ourFiles {
		q := qsdFiles[name]
		if f.VirtualSize != q.VirtualSize || f.Format != q.Format || f.Format != "qcow2" {
			t.Errorf("%s: qemu-img info of ours %+v, of qsd's %+v", name, f, qsdFiles[name])
		}
		// The files themselves are byte-identical (ending right after
		// the L1 table, mid-cluster, when nothing follows it); allocated
		// sizes are the file system's business and are not compared.
		for _, suffix := range []string{".qcow2", ".qcow2.data"} {
			ob, err1 := os.ReadFile(filepath.Join(ourDir, name+suffix))
			qb, err2 := os.ReadFile(filepath.Join(qsdDir, name+suffix))
			if os.IsNotExist(err1) && os.IsNotExist(err2) {
				continue
			}
			if err1 != nil || err2 != nil {
				t.Fatal(err1, err2)
			}
			if !bytes.Equal(ob, qb) {
				t.Errorf("%s%s: our file (%d bytes) differs from qsd's (%d bytes)", name, suffix, len(ob), len(qb))
			}
		}
	}

	// blockdev-del of the file node while a long create formats it.
	s := newJobSession(t, ourSock)
	big := filepath.Join(ourDir, "big.qcow2")
	if err := os.WriteFile(big, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := s.call(t, "blockdev-add", map[string]any{"driver": "file", "node-name": "fb", "filename": big}); r.Err != nil {
		t.Fatal(r.errText())
	}
	if r := s.call(t, "blockdev-create", map[string]any{"job-id": "big", "options": map[string]any{
		"driver": "qcow2", "size": 4 << 30, "file": "fb", "preallocation": "full"}}); r.Err != nil {
		t.Fatal(r.errText())
	}
	r := s.call(t, "blockdev-del", map[string]any{"node-name": "fb"})
	if got := r.errText(); got != "Block device fb is in use" {
		// Only a create already over may have let it go.
		jobs, _ := json.Marshal(s.call(t, "query-jobs", nil).Return)
		if !strings.Contains(string(jobs), "concluded") {
			t.Errorf("blockdev-del during create: %q, want QEMU's \"Block device fb is in use\" (jobs %s)", got, jobs)
		}
	}
	s.call(t, "job-cancel", map[string]any{"id": "big"})
	s.waitStatus(t, "big", "concluded")
}

// TestIntegrationQcow2AmendLikeQSD sends x-blockdev-amend to a qcow2+LUKS
// node on both daemons: QMP takes only "encrypt" (a union on format), not
// qemu-img amend's other options; replies and job results must agree.
func TestIntegrationQcow2AmendLikeQSD(t *testing.T) {
	needTool(t, "qemu-storage-daemon", "qemu-img")
	scenario := func(dir string, startDaemon func(sock string, args ...string)) []string {
		img := filepath.Join(dir, "e.qcow2")
		var err error
		for range 5 { // qemu-img's PBKDF calibration fails now and then on a loaded machine
			if _, err = cmdOut("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw",
				"-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=200", img, "16M"); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(dir, "qmp.sock")
		startDaemon(sock, "--object", "secret,id=s,data=pw", "--object", "secret,id=s2,data=pw2",
			"--blockdev", "driver=file,filename="+img+",node-name=f",
			"--blockdev", "driver=qcow2,file=f,node-name=q,encrypt.format=luks,encrypt.key-secret=s")
		s := newJobSession(t, sock)
		var out []string
		amend := func(id string, opts map[string]any) {
			opts["driver"] = "qcow2"
			r := s.call(t, "x-blockdev-amend", map[string]any{"job-id": id, "node-name": "q", "options": opts})
			if r.Err != nil {
				out = append(out, id+": "+r.errText())
				return
			}
			s.waitStatus(t, id, "concluded")
		}
		enc := func(m map[string]any) map[string]any { return map[string]any{"encrypt": m} }
		amend("a1", enc(map[string]any{"state": "active", "new-secret": "s2", "iter-time": 10}))
		amend("a2", map[string]any{"compat": "v2"})
		amend("a3", enc(map[string]any{"format": "aes"}))
		amend("a4", enc(map[string]any{"format": "qcow"}))
		amend("a5", enc(map[string]any{"format": "luks", "bogus": 1}))
		amend("a6", enc(map[string]any{"format": "luks", "state": "bogus"}))
		amend("a7", enc(map[string]any{"format": "luks", "state": "inactive", "keyslot": 0}))
		amend("a8", enc(map[string]any{"format": "luks", "state": "active", "new-secret": "s2", "iter-time": 10}))
		amend("a9", enc(map[string]any{"format": "luks", "state": "inactive", "old-secret": "s"}))
		amend("a10", map[string]any{})
		b, _ := json.Marshal(s.call(t, "query-jobs", nil).Return)
		return append(out, string(b))
	}
	ourDir, qsdDir := shortDir(t), shortDir(t)
	ours := scenario(ourDir, func(sock string, args ...string) {
		start(t, sock, append([]string{"--chardev", "socket,id=m,path=" + sock + ",server=on,wait=off", "--monitor", "chardev=m"}, args...)...)
	})
	theirs := scenario(qsdDir, func(sock string, args ...string) { startQSD(t, sock, args...) })
	if !reflect.DeepEqual(ours, theirs) {
		t.Errorf("x-blockdev-amend differs:\nours: %s\nqsd:  %s", strings.Join(ours, "\n      "), strings.Join(theirs, "\n      "))
	}
}
