package job

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"
)

// recorder collects JOB_STATUS_CHANGE events.
type recorder struct {
	mu  sync.Mutex
	evs []StatusChange
}

func (r *recorder) emit(name string, data any) {
	if name != EventStatusChange {
		panic(name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.evs = append(r.evs, data.(StatusChange))
}

func (r *recorder) statuses(id string) []Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Status
	for _, e := range r.evs {
		if e.ID == id {
			out = append(out, e.Status)
		}
	}
	return out
}

func wait(t *testing.T, j *Job) {
	t.Helper()
	select {
	case <-j.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("job %s did not conclude (status %s)", j.ID(), j.Status())
	}
}

func waitStatus(t *testing.T, j *Job, s Status) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for j.Status() != s {
		if time.Now().After(deadline) {
			t.Fatalf("job %s: status %s, want %s", j.ID(), j.Status(), s)
		}
		time.Sleep(time.Millisecond)
	}
}

func wantStatuses(t *testing.T, r *recorder, id string, want ...Status) {
	t.Helper()
	if got := r.statuses(id); !reflect.DeepEqual(got, want) {
		t.Errorf("events of %s: %v, want %v", id, got, want)
	}
}

func TestVerbTable(t *testing.T) {
	all := []Status{Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting, Concluded, Null}
	// Rows of QEMU's table, in the order of all.
	table := map[Verb]string{
		VerbCancel:   "1111111000",
		VerbPause:    "1111100000",
		VerbResume:   "1111100000",
		VerbSetSpeed: "1111100000",
		VerbComplete: "0001000000",
		VerbFinalize: "0000001000",
		VerbDismiss:  "0000000010",
		VerbChange:   "0111100000",
	}
	for v, row := range table {
		for i, s := range all {
			if got := Allowed(v, s); got != (row[i] == '1') {
				t.Errorf("Allowed(%s, %s) = %v", v, s, got)
			}
		}
	}
	if CanTransition(Concluded, Running) || !CanTransition(Concluded, Null) || !CanTransition(Running, Paused) ||
		CanTransition(Null, Created) || !CanTransition(Pending, Concluded) {
		t.Error("transition table")
	}
}

func TestSuccessManualDismiss(t *testing.T) {
	r := &recorder{}
	m := NewManager(r.emit)
	defer m.Close()
	k := &Kind{Type: "create", Run: func(ctx context.Context, j *Job) error {
		j.SetRemaining(1)
		j.Progress(1)
		return nil
	}}
	j, err := m.Start(k, Options{ID: "j1", AutoFinalize: true})
	if err != nil {
		t.Fatal(err)
	}
	wait(t, j)
	wantStatuses(t, r, "j1", Created, Running, Waiting, Pending, Concluded)
	q := m.Query()
	if len(q) != 1 || q[0] != (Info{ID: "j1", Type: "create", Status: Concluded, CurrentProgress: 1, TotalProgress: 1}) {
		t.Errorf("query %+v", q)
	}
	if _, err := m.Start(k, Options{ID: "j1"}); err == nil || err.Error() != "Job ID 'j1' already in use" {
		t.Errorf("duplicate id: %v", err)
	}
	if err := m.Cancel("j1"); err == nil || err.Error() != "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'" {
		t.Errorf("cancel concluded: %v", err)
	}
	if err := m.Resume("j1"); err == nil || err.Error() != "Can't resume a job that was not paused" {
		t.Errorf("resume: %v", err)
	}
	if err := m.Dismiss("j1"); err != nil {
		t.Fatal(err)
	}
	wantStatuses(t, r, "j1", Created, Running, Waiting, Pending, Concluded, Null)
	if len(m.Query()) != 0 {
		t.Error("dismissed job still listed")
	}
	if err := m.Dismiss("j1"); err == nil || err.Error() != "Job not found" {
		t.Errorf("dismiss twice: %v", err)
	}
}

func TestAutoDismissAndInvalidID(t *testing.T) {
	r := &recorder{}
	m := NewManager(r.emit)
	defer m.Close()
	k := &Kind{Type: "create", Run: func(ctx context.Context, j *Job) error { return nil }}
	for _, id := range []string{"", "2x", "a b"} {
		if _, err := m.Start(k, Options{ID: id}); err == nil || err.Error() != "Invalid job ID '"+id+"'" {
			t.Errorf("id %q: %v", id, err)
		}
	}
	j, err := m.Start(k, Options{ID: "a", AutoFinalize: true, AutoDismiss: true})
	if err != nil {
		t.Fatal(err)
	}
	wait(t, j)
	wantStatuses(t, r, "a", Created, Running, Waiting, Pending, Concluded, Null)
	if len(m.Query()) != 0 {
		t.Error("auto-dismissed job still listed")
	}
}

func TestFailure(t *testing.T) {
	r := &recorder{}
	m := NewManager(r.emit)
	defer m.Close()
	var aborted, committed bool
	k := &Kind{Type: "create",
		Run:    func(ctx context.Context, j *Job) error { return errors.New("Could not create 'x': boom") },
		Abort:  func(*Job) { aborted = true },
		Commit: func(*Job) { committed = true },
	}
	j, _ := m.Start(k, Options{ID: "f", AutoFinalize: true})
	wait(t, j)
	wantStatuses(t, r, "f", Created, Running, Aborting, Concluded)
	if q := m.Query(); q[0].Error != "Could not create 'x': boom" || q[0].Status != Concluded {
		t.Errorf("query %+v", q)
	}
	if !aborted || committed {
		t.Errorf("aborted %v committed %v", aborted, committed)
	}
}

// blocking is a kind whose Run waits for cancellation, with pause points.
func blocking(started chan<- struct{}) *Kind {
	return &Kind{Type: "create", Run: func(ctx context.Context, j *Job) error {
		j.SetRemaining(10)
		close(started)
		for {
			if err := j.PausePoint(ctx); err != nil {
				return err
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Millisecond):
			}
		}
	}}
}

func TestCancelRunning(t *testing.T) {
	r := &recorder{}
	m := NewManager(r.emit)
	defer m.Close()
	started := make(chan struct{})
	j, _ := m.Start(blocking(started), Options{ID: "b", AutoFinalize: true})
	<-started
	if err := m.Complete("b"); err == nil || err.Error() != "Job 'b' in state 'running' cannot accept command verb 'complete'" {
		t.Errorf("complete: %v", err)
	}
	if err := m.Dismiss("b"); err == nil || err.Error() != "Job 'b' in state 'running' cannot accept command verb 'dismiss'" {
		t.Errorf("dismiss: %v", err)
	}
	if err := m.Cancel("b"); err != nil {
		t.Fatal(err)
	}
	wait(t, j)
	wantStatuses(t, r, "b", Created, Running, Aborting, Concluded)
	if q := m.Query(); q[0].Error != "Operation canceled" || q[0].TotalProgress != 10 {
		t.Errorf("query %+v", q)
	}
}

func TestPauseResume(t *testing.T) {
	r := &recorder{}
	m := NewManager(r.emit)
	defer m.Close()
	started := make(chan struct{})
	j, _ := m.Start(blocking(started), Options{ID: "p", AutoFinalize: true, AutoDismiss: true})
	<-started
	if err := m.Pause("p"); err != nil {
		t.Fatal(err)
	}
	if err := m.Pause("p"); err == nil || err.Error() != "Job is already paused" {
		t.Errorf("pause twice: %v", err)
	}
	waitStatus(t, j, Paused)
	if err := m.Resume("p"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, j, Running)
	// Cancelling a paused job ends the pause.
	if err := m.Pause("p"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, j, Paused)
	if err := m.Cancel("p"); err != nil {
		t.Fatal(err)
	}
	wait(t, j)
	wantStatuses(t, r, "p", Created, Running, Paused, Running, Paused, Running, Aborting, Concluded, Null)
}

func TestReadyComplete(t *testing.T) {
	r := &recorder{}
	m := NewManager(r.emit)
	defer m.Close()
	complete := make(chan struct{})
	k := &Kind{Type: "mirror",
		Run: func(ctx context.Context, j *Job) error {
			j.Ready()
			for {
				if err := j.PausePoint(ctx); err != nil {
					return err
				}
				select {
				case <-complete:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(time.Millisecond):
				}
			}
		},
		Complete: func(*Job) error { close(complete); return nil },
	}
	j, _ := m.Start(k, Options{ID: "y", AutoFinalize: true})
	waitStatus(t, j, Ready)
	if err := m.Pause("y"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, j, Standby)
	if err := m.Complete("y"); err == nil || err.Error() != "Job 'y' in state 'standby' cannot accept command verb 'complete'" {
		t.Errorf("complete in standby: %v", err)
	}
	if err := m.Resume("y"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, j, Ready)
	if err := m.Complete("y"); err != nil {
		t.Fatal(err)
	}
	wait(t, j)
	wantStatuses(t, r, "y", Created, Running, Ready, Standby, Ready, Waiting, Pending, Concluded)
}

func TestManualFinalize(t *testing.T) {
	r := &recorder{}
	m := NewManager(r.emit)
	defer m.Close()
	var prepared bool
	k := &Kind{Type: "create",
		Run:     func(ctx context.Context, j *Job) error { return nil },
		Prepare: func(*Job) error { prepared = true; return nil },
	}
	j, _ := m.Start(k, Options{ID: "m"})
	waitStatus(t, j, Pending)
	if err := m.Dismiss("m"); err == nil || err.Error() != "Job 'm' in state 'pending' cannot accept command verb 'dismiss'" {
		t.Errorf("dismiss pending: %v", err)
	}
	if err := m.Finalize("m"); err != nil {
		t.Fatal(err)
	}
	wait(t, j)
	if !prepared {
		t.Error("Prepare not called")
	}
	wantStatuses(t, r, "m", Created, Running, Waiting, Pending, Concluded)

	// A pending job can still be cancelled.
	j2, _ := m.Start(k, Options{ID: "m2", AutoDismiss: true})
	waitStatus(t, j2, Pending)
	if err := m.Cancel("m2"); err != nil {
		t.Fatal(err)
	}
	wait(t, j2)
	wantStatuses(t, r, "m2", Created, Running, Waiting, Pending, Aborting, Concluded, Null)

	// A failing Prepare fails the job.
	k3 := &Kind{Type: "create", Run: k.Run, Prepare: func(*Job) error { return errors.New("no") }}
	j3, _ := m.Start(k3, Options{ID: "m3", AutoFinalize: true})
	wait(t, j3)
	wantStatuses(t, r, "m3", Created, Running, Waiting, Pending, Aborting, Concluded)
	if j3.Err() == nil || j3.Err().Error() != "no" {
		t.Errorf("err %v", j3.Err())
	}
}

func TestCloseCancels(t *testing.T) {
	m := NewManager(nil)
	started := make(chan struct{})
	j, _ := m.Start(blocking(started), Options{ID: "c", AutoFinalize: true})
	<-started
	m.Close()
	wait(t, j)
	if !errors.Is(j.Err(), ErrCanceled) {
		t.Errorf("err %v", j.Err())
	}
	m.Close()
	if _, err := m.Start(blocking(make(chan struct{})), Options{ID: "d"}); err == nil {
		t.Error("Start after Close")
	}
}
