package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	_ "blockbackend/drivers/raw"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// Fake drivers for the job commands, registered once for the package.

type fakeCreateOpts struct {
	Size qapi.Size `qapi:"size"`
	Mode string    `qapi:"mode,optional"` // "ok", "fail", "block"
}

type fakeOpenOpts struct {
	Size int64 `qapi:"size,optional"`
}

type fakeAmendOpts struct {
	Label string `qapi:"label,optional"`
}

// fakeNode is an in-memory node; with snaps it is a Snapshotter and an
// Amender.
type fakeNode struct {
	size int64

	mu     sync.Mutex
	snaps  []graph.SnapshotInfo
	nextID int
	label  string
}

func (f *fakeNode) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	for _, b := range iov {
		clear(b)
	}
	return nil
}
func (f *fakeNode) WriteV(context.Context, int64, [][]byte, graph.WriteFlags) error { return nil }
func (f *fakeNode) Flush(context.Context) error                                     { return nil }
func (f *fakeNode) Size() (int64, error)                                            { return f.size, nil }
func (f *fakeNode) Close() error                                                    { return nil }

type snapNode struct{ *fakeNode }

func (s snapNode) Snapshots(context.Context) ([]graph.SnapshotInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]graph.SnapshotInfo(nil), s.snaps...), nil
}

func (s snapNode) CreateSnapshot(_ context.Context, si graph.SnapshotInfo) (graph.SnapshotInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if si.ID == "" {
		s.nextID++
		si.ID = fmt.Sprint(s.nextID)
	}
	s.snaps = append(s.snaps, si)
	return si, nil
}

func (s snapNode) ApplySnapshot(context.Context, string, string) error { return nil }

func (s snapNode) DeleteSnapshot(_ context.Context, id, name string) (graph.SnapshotInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, x := range s.snaps {
		if x.ID == id && x.Name == name {
			s.snaps = append(s.snaps[:i], s.snaps[i+1:]...)
			return x, nil
		}
	}
	return graph.SnapshotInfo{}, errors.New("no such snapshot")
}

func (s snapNode) Amend(_ context.Context, opts any, force bool) error {
	o := opts.(*fakeAmendOpts)
	if o.Label == "bad" && !force {
		return errors.New("label 'bad' needs force")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.label = o.Label
	return nil
}

var (
	fakeOnce    sync.Once
	fakeCreated = make(chan *fakeCreateOpts, 16)
)

func registerFakes() {
	fakeOnce.Do(func() {
		open := func(snaps bool) func(context.Context, *graph.OpenContext, any) (graph.Instance, error) {
			return func(_ context.Context, _ *graph.OpenContext, o any) (graph.Instance, error) {
				n := &fakeNode{size: o.(*fakeOpenOpts).Size}
				if snaps {
					return snapNode{n}, nil
				}
				return n, nil
			}
		}
		graph.Register(&graph.Driver{
			Name: "jobtest-fake", Protocol: true,
			NewOptions:       func() any { return &fakeOpenOpts{Size: 1 << 20} },
			Open:             open(true),
			NewCreateOptions: func() any { return &fakeCreateOpts{Mode: "ok"} },
			NewAmendOptions:  func() any { return &fakeAmendOpts{} },
			Create: func(ctx context.Context, cc *graph.CreateContext, o any) error {
				opts := o.(*fakeCreateOpts)
				switch opts.Mode {
				case "fail":
					return qapi.Errorf(qapi.GenericError, "Could not create 'x': %w", errors.New("boom"))
				case "block":
					<-ctx.Done()
					return ctx.Err()
				}
				fakeCreated <- opts
				return nil
			},
		})
		graph.Register(&graph.Driver{
			Name: "jobtest-plain", Protocol: true,
			NewOptions: func() any { return &fakeOpenOpts{Size: 1 << 20} },
			Open:       open(false),
		})
	})
}

// jobServer is a server with the block and job commands over a new graph.
func jobServer(t *testing.T) (*Server, *graph.Graph) {
	registerFakes()
	s := NewServer(ServerOptions{Version: VersionInfo{Major: 7, Minor: 2, Micro: 22, Package: "blockbackend test"}})
	g := graph.New(nil)
	g.Events = s.Emit
	BlockCommands(s, g, func() {})
	m := JobCommands(s, g)
	t.Cleanup(func() {
		s.Close()
		m.Close()
		g.Close()
	})
	return s, g
}

type reply struct {
	events []map[string]any // "data" of each event, with "event" added
	ret    any
	err    string
}

// call sends a command and reads up to its reply, keeping the events
// that came first.
func (c *client) call(t *testing.T, cmd string, args any) reply {
	t.Helper()
	m := map[string]any{"execute": cmd}
	if args != nil {
		m["arguments"] = args
	}
	b, _ := json.Marshal(m)
	c.send(t, string(b))
	var r reply
	for {
		var msg map[string]any
		if err := json.Unmarshal([]byte(c.line(t)), &msg); err != nil {
			t.Fatal(err)
		}
		if ev, ok := msg["event"].(string); ok {
			d, _ := msg["data"].(map[string]any)
			d["event"] = ev
			r.events = append(r.events, d)
			continue
		}
		if e, ok := msg["error"].(map[string]any); ok {
			r.err = e["desc"].(string)
		} else {
			r.ret = msg["return"]
		}
		return r
	}
}

func (c *client) ok(t *testing.T, cmd string, args any) reply {
	t.Helper()
	r := c.call(t, cmd, args)
	if r.err != "" {
		t.Fatalf("%s %v: %s", cmd, args, r.err)
	}
	return r
}

// event reads the next message, which must be an event.
func (c *client) event(t *testing.T) map[string]any {
	t.Helper()
	var msg map[string]any
	if err := json.Unmarshal([]byte(c.line(t)), &msg); err != nil {
		t.Fatal(err)
	}
	if _, ok := msg["event"]; !ok {
		t.Fatalf("expected an event, got %v", msg)
	}
	d := msg["data"].(map[string]any)
	d["event"] = msg["event"]
	return d
}

// statuses are the JOB_STATUS_CHANGE states of evs, as "id:status".
func statuses(evs []map[string]any) []string {
	var out []string
	for _, e := range evs {
		if e["event"] == "JOB_STATUS_CHANGE" {
			out = append(out, fmt.Sprintf("%s:%s", e["id"], e["status"]))
		}
	}
	return out
}

func wantSeq(t *testing.T, got []string, want ...string) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("events %v, want %v", got, want)
	}
}

// nextStatuses reads n more events.
func (c *client) nextStatuses(t *testing.T, n int) []string {
	t.Helper()
	var evs []map[string]any
	for range n {
		evs = append(evs, c.event(t))
	}
	return statuses(evs)
}

func TestBlockdevCreateJob(t *testing.T) {
	s, _ := jobServer(t)
	c := negotiated(t, s)

	r := c.ok(t, "blockdev-create", map[string]any{"job-id": "j1",
		"options": map[string]any{"driver": "jobtest-fake", "size": 4096}})
	// created and running come before the reply, as with qemu-storage-daemon.
	wantSeq(t, statuses(r.events), "j1:created", "j1:running")
	wantSeq(t, c.nextStatuses(t, 3), "j1:waiting", "j1:pending", "j1:concluded")
	if got := <-fakeCreated; got.Size != 4096 || got.Mode != "ok" {
		t.Errorf("create options %+v", got)
	}
	// Without auto-dismiss the job stays until job-dismiss.
	q := c.ok(t, "query-jobs", nil).ret
	want := []any{map[string]any{"id": "j1", "type": "create", "status": "concluded",
		"current-progress": 1.0, "total-progress": 1.0}}
	if !reflect.DeepEqual(q, want) {
		t.Errorf("query-jobs %v, want %v", q, want)
	}
	for _, v := range []string{"cancel", "pause", "complete", "finalize"} {
		r := c.call(t, "job-"+v, map[string]any{"id": "j1"})
		if w := "Job 'j1' in state 'concluded' cannot accept command verb '" + v + "'"; r.err != w {
			t.Errorf("job-%s: %q, want %q", v, r.err, w)
		}
	}
	if r := c.call(t, "job-resume", map[string]any{"id": "j1"}); r.err != "Can't resume a job that was not paused" {
		t.Errorf("job-resume: %q", r.err)
	}
	if r := c.call(t, "blockdev-create", map[string]any{"job-id": "j1",
		"options": map[string]any{"driver": "jobtest-fake", "size": 1}}); r.err != "Job ID 'j1' already in use" {
		t.Errorf("duplicate: %q", r.err)
	}
	r = c.ok(t, "job-dismiss", map[string]any{"id": "j1"})
	wantSeq(t, statuses(r.events), "j1:null")
	if q := c.ok(t, "query-jobs", nil).ret; !reflect.DeepEqual(q, []any{}) {
		t.Errorf("query-jobs after dismiss: %v", q)
	}
	if r := c.call(t, "job-dismiss", map[string]any{"id": "j1"}); r.err != "Job not found" {
		t.Errorf("dismiss twice: %q", r.err)
	}
	c.noMore(t)
}

func TestBlockdevCreateFailsAndCancel(t *testing.T) {
	s, _ := jobServer(t)
	c := negotiated(t, s)

	r := c.ok(t, "blockdev-create", map[string]any{"job-id": "f",
		"options": map[string]any{"driver": "jobtest-fake", "size": 1, "mode": "fail"}})
	got := statuses(r.events)
	got = append(got, c.nextStatuses(t, 4-len(got))...)
	wantSeq(t, got, "f:created", "f:running", "f:aborting", "f:concluded")
	q := c.ok(t, "query-jobs", nil).ret.([]any)[0].(map[string]any)
	if q["error"] != "Could not create 'x': boom" || q["status"] != "concluded" {
		t.Errorf("query-jobs %v", q)
	}

	r = c.ok(t, "blockdev-create", map[string]any{"job-id": "b",
		"options": map[string]any{"driver": "jobtest-fake", "size": 1, "mode": "block"}})
	wantSeq(t, statuses(r.events), "b:created", "b:running")
	if q := c.ok(t, "query-jobs", nil).ret.([]any)[0]; !reflect.DeepEqual(q, map[string]any{"id": "b", "type": "create",
		"status": "running", "current-progress": 0.0, "total-progress": 1.0}) {
		t.Errorf("query-jobs while running: %v", q)
	}
	if r := c.call(t, "job-complete", map[string]any{"id": "b"}); r.err != "Job 'b' in state 'running' cannot accept command verb 'complete'" {
		t.Errorf("complete: %q", r.err)
	}
	c.ok(t, "job-pause", map[string]any{"id": "b"})
	if r := c.call(t, "job-pause", map[string]any{"id": "b"}); r.err != "Job is already paused" {
		t.Errorf("pause twice: %q", r.err)
	}
	c.ok(t, "job-resume", map[string]any{"id": "b"})
	r = c.ok(t, "job-cancel", map[string]any{"id": "b"})
	got = statuses(r.events)
	got = append(got, c.nextStatuses(t, 2-len(got))...)
	wantSeq(t, got, "b:aborting", "b:concluded")
	jobs := c.ok(t, "query-jobs", nil).ret.([]any)
	if len(jobs) != 2 || jobs[0].(map[string]any)["id"] != "b" || jobs[0].(map[string]any)["error"] != "Operation canceled" {
		t.Errorf("query-jobs (newest first) %v", jobs)
	}
}

func TestBlockdevCreateErrors(t *testing.T) {
	s, _ := jobServer(t)
	c := negotiated(t, s)
	cases := []struct {
		args map[string]any
		want string
	}{
		{map[string]any{"options": map[string]any{"driver": "jobtest-fake", "size": 1}}, "Parameter 'job-id' is missing"},
		{map[string]any{"job-id": "x"}, "Parameter 'options' is missing"},
		{map[string]any{"job-id": "x", "options": map[string]any{"size": 1}}, "Parameter 'options.driver' is missing"},
		{map[string]any{"job-id": "x", "options": map[string]any{"driver": "nosuch"}}, "Parameter 'driver' does not accept value 'nosuch'"},
		{map[string]any{"job-id": "x", "options": map[string]any{"driver": "jobtest-plain"}}, "Driver does not support blockdev-create"},
		{map[string]any{"job-id": "x", "options": map[string]any{"driver": "raw", "filename": "x"}}, "Parameter 'options.filename' is unexpected"},
		{map[string]any{"job-id": "x", "options": map[string]any{"driver": "jobtest-fake"}}, "Parameter 'options.size' is missing"},
		{map[string]any{"job-id": "x", "options": map[string]any{"driver": "jobtest-fake", "size": 1, "bogus": 1}}, "Parameter 'options.bogus' is unexpected"},
		{map[string]any{"job-id": "x", "options": map[string]any{"driver": "jobtest-fake", "size": 1}, "bogus": 1}, "Parameter 'bogus' is unexpected"},
		{map[string]any{"job-id": "2x", "options": map[string]any{"driver": "jobtest-fake", "size": 1}}, "Invalid job ID '2x'"},
		{map[string]any{"job-id": "", "options": map[string]any{"driver": "jobtest-fake", "size": 1}}, "Invalid job ID ''"},
	}
	for _, tc := range cases {
		r := c.call(t, "blockdev-create", tc.args)
		if r.err != tc.want {
			t.Errorf("blockdev-create %v: %q, want %q", tc.args, r.err, tc.want)
		}
		if len(r.events) != 0 {
			t.Errorf("blockdev-create %v: events %v", tc.args, r.events)
		}
	}
	for _, v := range []string{"cancel", "pause", "resume", "complete", "finalize", "dismiss"} {
		if r := c.call(t, "job-"+v, map[string]any{"id": "nosuch"}); r.err != "Job not found" {
			t.Errorf("job-%s: %q", v, r.err)
		}
	}
}

func TestInternalSnapshots(t *testing.T) {
	s, _ := jobServer(t)
	c := negotiated(t, s)
	c.ok(t, "blockdev-add", map[string]any{"driver": "jobtest-fake", "node-name": "s"})
	c.ok(t, "blockdev-add", map[string]any{"driver": "jobtest-fake", "node-name": "ro", "read-only": true})
	c.ok(t, "blockdev-add", map[string]any{"driver": "jobtest-plain", "node-name": "p"})
	c.ok(t, "blockdev-add", map[string]any{"driver": "raw", "node-name": "r", "file": "p"})

	before := time.Now().Unix()
	c.ok(t, "blockdev-snapshot-internal-sync", map[string]any{"device": "s", "name": "s1"})
	c.ok(t, "blockdev-snapshot-internal-sync", map[string]any{"device": "s", "name": "s2"})
	errs := []struct {
		cmd  string
		args map[string]any
		want string
	}{
		{"blockdev-snapshot-internal-sync", map[string]any{"device": "s", "name": "s1"}, "Snapshot with name 's1' already exists on device 's'"},
		{"blockdev-snapshot-internal-sync", map[string]any{"device": "s", "name": ""}, "Name is empty"},
		{"blockdev-snapshot-internal-sync", map[string]any{"device": "ro", "name": ""}, "Device 'ro' is read only"},
		{"blockdev-snapshot-internal-sync", map[string]any{"device": "r", "name": "x"}, "Block format 'raw' used by device 'r' does not support internal snapshots"},
		{"blockdev-snapshot-internal-sync", map[string]any{"device": "p", "name": "x"}, "Need a root block node"},
		{"blockdev-snapshot-internal-sync", map[string]any{"device": "zz", "name": "x"}, "Cannot find device='zz' nor node-name='zz'"},
		{"blockdev-snapshot-delete-internal-sync", map[string]any{"device": "s"}, "Name or id must be provided"},
		{"blockdev-snapshot-delete-internal-sync", map[string]any{"device": "p"}, "Need a root block node"},
		{"blockdev-snapshot-delete-internal-sync", map[string]any{"device": "s", "name": "nope"}, "Snapshot with id 'null' and name 'nope' does not exist on device 's'"},
		{"blockdev-snapshot-delete-internal-sync", map[string]any{"device": "s", "id": "9", "name": "s1"}, "Snapshot with id '9' and name 's1' does not exist on device 's'"},
		{"blockdev-snapshot-delete-internal-sync", map[string]any{"device": "s", "id": "", "name": "s1"}, "Snapshot with id '' and name 's1' does not exist on device 's'"},
		{"blockdev-snapshot-delete-internal-sync", map[string]any{"device": "r", "name": "s1"}, "Failed to get a snapshot list: Operation not supported"},
	}
	for _, e := range errs {
		if r := c.call(t, e.cmd, e.args); r.err != e.want {
			t.Errorf("%s %v: %q, want %q", e.cmd, e.args, r.err, e.want)
		}
	}
	r := c.ok(t, "blockdev-snapshot-delete-internal-sync", map[string]any{"device": "s", "name": "s1"})
	info := r.ret.(map[string]any)
	if info["id"] != "1" || info["name"] != "s1" || info["vm-state-size"] != 0.0 ||
		info["date-sec"].(float64) < float64(before) || info["vm-clock-sec"].(float64) < float64(before) {
		t.Errorf("deleted snapshot info %v", info)
	}
	if _, has := info["icount"]; has {
		t.Errorf("icount printed though not recorded: %v", info)
	}
	r = c.ok(t, "blockdev-snapshot-delete-internal-sync", map[string]any{"device": "s", "id": "2"})
	if r.ret.(map[string]any)["name"] != "s2" {
		t.Errorf("delete by id: %v", r.ret)
	}
}

func TestAmendJob(t *testing.T) {
	s, g := jobServer(t)
	c := negotiated(t, s)
	c.ok(t, "blockdev-add", map[string]any{"driver": "jobtest-fake", "node-name": "s"})
	c.ok(t, "blockdev-add", map[string]any{"driver": "jobtest-plain", "node-name": "p"})
	r := c.ok(t, "x-blockdev-amend", map[string]any{"job-id": "a1", "node-name": "s",
		"options": map[string]any{"driver": "jobtest-fake", "label": "L"}})
	got := statuses(r.events)
	got = append(got, c.nextStatuses(t, 5-len(got))...)
	wantSeq(t, got, "a1:created", "a1:running", "a1:waiting", "a1:pending", "a1:concluded")
	n, _ := g.FindNode("s")
	if l := n.Instance().(snapNode).label; l != "L" {
		t.Errorf("amended label %q", l)
	}
	// The job let go of the node: it can be deleted.
	q := c.ok(t, "query-jobs", nil).ret.([]any)[0].(map[string]any)
	if q["type"] != "amend" || q["status"] != "concluded" {
		t.Errorf("query-jobs %v", q)
	}

	r = c.ok(t, "x-blockdev-amend", map[string]any{"job-id": "a2", "node-name": "s",
		"options": map[string]any{"driver": "jobtest-fake", "label": "bad"}})
	got = statuses(r.events)
	got = append(got, c.nextStatuses(t, 4-len(got))...)
	wantSeq(t, got, "a2:created", "a2:running", "a2:aborting", "a2:concluded")
	c.ok(t, "x-blockdev-amend", map[string]any{"job-id": "a3", "node-name": "s", "force": true,
		"options": map[string]any{"driver": "jobtest-fake", "label": "bad"}})

	errs := []struct {
		args map[string]any
		want string
	}{
		{map[string]any{"job-id": "e", "node-name": "zz", "options": map[string]any{"driver": "jobtest-fake"}}, "Cannot find device='' nor node-name='zz'"},
		{map[string]any{"job-id": "e", "node-name": "s", "options": map[string]any{"driver": "raw"}}, "x-blockdev-amend doesn't support changing the block driver"},
		{map[string]any{"job-id": "e", "node-name": "p", "options": map[string]any{"driver": "jobtest-plain"}}, "Driver does not support x-blockdev-amend"},
		{map[string]any{"job-id": "e", "node-name": "s", "options": map[string]any{"driver": "jobtest-fake", "size": 5}}, "Parameter 'options.size' is unexpected"},
		{map[string]any{"job-id": "a1", "node-name": "s", "options": map[string]any{"driver": "jobtest-fake"}}, "Job ID 'a1' already in use"},
	}
	for _, e := range errs {
		if r := c.call(t, "x-blockdev-amend", e.args); r.err != e.want {
			t.Errorf("x-blockdev-amend %v: %q, want %q", e.args, r.err, e.want)
		}
	}
	// Wait for a3, then the node is free again.
	deadline := time.Now().Add(5 * time.Second)
	for {
		jobs := c.ok(t, "query-jobs", nil).ret.([]any)
		if jobs[0].(map[string]any)["status"] == "concluded" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a3 did not conclude: %v", jobs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.ok(t, "blockdev-del", map[string]any{"node-name": "s"})
}

func TestJobCommandsInSchema(t *testing.T) {
	s, _ := jobServer(t)
	c := negotiated(t, s)
	names := map[string]bool{}
	for _, x := range c.ok(t, "query-commands", nil).ret.([]any) {
		names[x.(map[string]any)["name"].(string)] = true
	}
	for _, n := range []string{"blockdev-create", "x-blockdev-amend", "query-jobs", "job-cancel", "job-pause",
		"job-resume", "job-complete", "job-finalize", "job-dismiss", "blockdev-snapshot-internal-sync",
		"blockdev-snapshot-delete-internal-sync"} {
		if !names[n] {
			t.Errorf("query-commands lacks %s", n)
		}
	}
	c.send(t, `{"execute": "query-qmp-schema"}`)
	line := c.line(t)
	var sr struct {
		Return []map[string]any `json:"return"`
	}
	if err := json.Unmarshal([]byte(line), &sr); err != nil {
		t.Fatal(err)
	}
	byName := map[string]map[string]any{}
	for _, e := range sr.Return {
		byName[e["name"].(string)] = e
	}
	// Every type an entry names is defined.
	var refs func(v any)
	refs = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && (k == "type" || k == "arg-type" || k == "ret-type" || k == "element-type") {
					if byName[s] == nil {
						t.Errorf("schema names undefined type %q", s)
					}
				}
				refs(x)
			}
		case []any:
			for _, x := range v {
				refs(x)
			}
		}
	}
	for _, e := range sr.Return {
		refs(e)
	}
	cmd := byName["blockdev-create"]
	if cmd == nil || cmd["meta-type"] != "command" {
		t.Fatalf("blockdev-create not in schema")
	}
	args := byName[cmd["arg-type"].(string)]
	var optType string
	for _, m := range args["members"].([]any) {
		if m.(map[string]any)["name"] == "options" {
			optType = m.(map[string]any)["type"].(string)
		}
	}
	union := byName[optType]
	if union == nil || union["tag"] != "driver" {
		t.Fatalf("options type %v", union)
	}
	found := false
	for _, v := range union["variants"].([]any) {
		if v.(map[string]any)["case"] == "jobtest-fake" {
			found = true
		}
		if v.(map[string]any)["case"] == "jobtest-plain" {
			t.Error("a driver without Create has a create variant")
		}
	}
	if !found {
		t.Errorf("no variant for jobtest-fake in %v", union)
	}
	ev := byName["JOB_STATUS_CHANGE"]
	if ev == nil || ev["meta-type"] != "event" {
		t.Errorf("JOB_STATUS_CHANGE not in schema")
	}
	if !strings.Contains(line, `"concluded"`) {
		t.Error("JobStatus enum missing")
	}
}
