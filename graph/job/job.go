// Package job is blockbackend's job machinery: QEMU's generic jobs (the
// JobStatus state machine, the JobVerb table that says which QMP verb a
// job accepts in which state, auto-finalize and auto-dismiss, progress,
// the error query-jobs shows) and the JOB_STATUS_CHANGE events, as QEMU's
// qapi/job.json documents them.
//
// It is not a block job: it knows no nodes. A kind of job (image creation,
// amend) is a Kind whose Run does the work in its own goroutine, with a
// context that job-cancel cancels. Commands built on jobs (blockdev-create,
// x-blockdev-amend) live with the QMP commands in package qmp.
//
// # States
//
// A job is created, then running; Run's work may pass through paused
// (job-pause, seen at the next PausePoint), ready (Ready: waiting for
// job-complete) and standby (paused while ready). When Run returns, a
// successful job goes waiting → pending, and is finalized at once with
// auto-finalize (else by job-finalize): concluded. A failed or cancelled
// job goes aborting → concluded. A concluded job stays in query-jobs until
// job-dismiss, or goes at once to null with auto-dismiss.
//
// # Locking
//
// Manager.mu guards every job's state; events are emitted with it held so
// that they leave in the order of the transitions. Kind callbacks other
// than Run are called with it held: they must be quick and must not call
// the Manager. Run is called without it. Lock order: Manager.mu, then
// whatever the callbacks take (graph.Graph's lock when Clean lets go of a
// node), then the event sink's (the QMP server's).
package job

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"blockbackend/qmp/qapi"
)

// Status is QEMU's JobStatus.
type Status string

// The job states, in QEMU's order.
const (
	Created   Status = "created"
	Running   Status = "running"
	Paused    Status = "paused"
	Ready     Status = "ready"
	Standby   Status = "standby"
	Waiting   Status = "waiting"
	Pending   Status = "pending"
	Aborting  Status = "aborting"
	Concluded Status = "concluded"
	Null      Status = "null"
)

// EnumValues lists JobStatus's values.
func (Status) EnumValues() []string {
	return []string{"undefined", "created", "running", "paused", "ready", "standby", "waiting",
		"pending", "aborting", "concluded", "null"}
}

// Verb is QEMU's JobVerb: what a QMP command asks of a job.
type Verb string

// The verbs.
const (
	VerbCancel   Verb = "cancel"
	VerbPause    Verb = "pause"
	VerbResume   Verb = "resume"
	VerbSetSpeed Verb = "set-speed"
	VerbComplete Verb = "complete"
	VerbFinalize Verb = "finalize"
	VerbDismiss  Verb = "dismiss"
	VerbChange   Verb = "change"
)

// verbs says in which states each verb is accepted.
var verbs = map[Verb][]Status{
	VerbCancel:   {Created, Running, Paused, Ready, Standby, Waiting, Pending},
	VerbPause:    {Created, Running, Paused, Ready, Standby},
	VerbResume:   {Created, Running, Paused, Ready, Standby},
	VerbSetSpeed: {Created, Running, Paused, Ready, Standby},
	VerbComplete: {Ready},
	VerbFinalize: {Pending},
	VerbDismiss:  {Concluded},
	VerbChange:   {Running, Paused, Ready, Standby},
}

// transitions says which state may follow which.
var transitions = map[Status][]Status{
	Created:   {Running, Aborting, Null},
	Running:   {Paused, Ready, Waiting, Aborting},
	Paused:    {Running},
	Ready:     {Standby, Waiting, Aborting},
	Standby:   {Ready},
	Waiting:   {Pending, Aborting},
	Pending:   {Aborting, Concluded},
	Aborting:  {Aborting, Concluded},
	Concluded: {Null},
	Null:      {},
}

// Allowed reports whether a job in state s accepts verb v.
func Allowed(v Verb, s Status) bool {
	for _, x := range verbs[v] {
		if x == s {
			return true
		}
	}
	return false
}

// CanTransition reports whether state to may follow state from.
func CanTransition(from, to Status) bool {
	for _, x := range transitions[from] {
		if x == to {
			return true
		}
	}
	return false
}

// ErrCanceled is the error a cancelled job reports (QEMU's strerror(ECANCELED)).
var ErrCanceled = errors.New("Operation canceled")

// Kind is a kind of job: its QMP JobType and what it does.
type Kind struct {
	// Type is QEMU's JobType ("create", "amend", ...).
	Type string
	// Run does the work. ctx is cancelled by job-cancel and when the
	// manager closes; Run should then return soon (its error is replaced
	// by ErrCanceled unless it says more). It may call the Job's
	// progress methods, PausePoint and Ready.
	Run func(ctx context.Context, j *Job) error
	// Complete asks a ready job to finish (job-complete). Without it a
	// job cannot be completed.
	Complete func(j *Job) error
	// Prepare, Commit, Abort and Clean are QEMU's finalization steps, all
	// optional: Prepare may still fail the job; then exactly one of
	// Commit (success) and Abort (failure or cancel) runs, then Clean.
	Prepare func(j *Job) error
	Commit  func(j *Job)
	Abort   func(j *Job)
	Clean   func(j *Job)
}

// Options are the generic job options of QMP commands that start jobs.
type Options struct {
	ID string
	// AutoFinalize finalizes the job as soon as it is pending; without
	// it, job-finalize must. AutoDismiss removes a concluded job; without
	// it, job-dismiss must.
	AutoFinalize, AutoDismiss bool
	// Remaining is the work expected at the start: total-progress shows
	// it from the first query-jobs (Run may change it with SetRemaining).
	Remaining uint64
}

// Info is query-jobs' JobInfo.
type Info struct {
	ID              string `json:"id"`
	Type            string `json:"type"`
	Status          Status `json:"status"`
	CurrentProgress uint64 `json:"current-progress"`
	TotalProgress   uint64 `json:"total-progress"`
	Error           string `json:"error,omitempty"`
}

// StatusChange is JOB_STATUS_CHANGE's data.
type StatusChange struct {
	ID     string `json:"id" qapi:"id"`
	Status Status `json:"status" qapi:"status"`
}

// EventStatusChange is the event's name.
const EventStatusChange = "JOB_STATUS_CHANGE"

// Manager holds the jobs of a process.
type Manager struct {
	emit func(name string, data any)
	wg   sync.WaitGroup // running Run goroutines

	mu     sync.Mutex // guards everything below and every Job's state
	jobs   []*Job     // creation order
	closed bool
}

// NewManager returns a manager that emits events with emit (nil: none),
// typically graph.(*Graph).Emit.
func NewManager(emit func(name string, data any)) *Manager {
	if emit == nil {
		emit = func(string, any) {}
	}
	return &Manager{emit: emit}
}

// Job is one job.
type Job struct {
	m            *Manager
	id           string
	kind         *Kind
	autoFinalize bool
	autoDismiss  bool
	ctx          context.Context
	cancel       context.CancelFunc

	// Guarded by m.mu:
	status     Status
	cancelled  bool
	userPaused bool
	pauseCount int
	resume     chan struct{} // closed when a paused job may go on
	err        error
	cur, total uint64
	done       chan struct{} // closed once concluded
}

// ID is the job's id.
func (j *Job) ID() string { return j.id }

// Type is the job's JobType.
func (j *Job) Type() string { return j.kind.Type }

// Status is the job's current state.
func (j *Job) Status() Status {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	return j.status
}

// Err is the error the job failed with (nil while running or on success).
func (j *Job) Err() error {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	return j.err
}

// Done is closed when the job has concluded (and, with auto-dismiss,
// been dismissed), after the events for that were emitted.
func (j *Job) Done() <-chan struct{} { return j.done }

// SetRemaining says how much work is left (QEMU's progress "remaining"):
// total-progress becomes current-progress + n.
func (j *Job) SetRemaining(n uint64) {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	j.total = j.cur + n
}

// AddRemaining adds n to total-progress.
func (j *Job) AddRemaining(n uint64) {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	j.total += n
}

// Progress records n more units done.
func (j *Job) Progress(n uint64) {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	j.cur += n
	j.total = max(j.total, j.cur)
}

// PausePoint is where Run may be paused: while the job is paused
// (job-pause) it waits there, in state paused (standby when it was
// ready). It returns ctx.Err() when the job is cancelled.
func (j *Job) PausePoint(ctx context.Context) error {
	m := j.m
	m.mu.Lock()
	if j.pauseCount == 0 || j.cancelled {
		m.mu.Unlock()
		return ctx.Err()
	}
	was := j.status
	to := Paused
	if was == Ready {
		to = Standby
	}
	j.transitionLocked(to)
	if j.resume == nil {
		j.resume = make(chan struct{})
	}
	ch := j.resume
	m.mu.Unlock()
	select {
	case <-ch:
	case <-ctx.Done():
	}
	m.mu.Lock()
	j.transitionLocked(was)
	m.mu.Unlock()
	return ctx.Err()
}

// Ready moves a running job to ready: its work is in a state where
// job-complete may end it (mirror's synchronised phase).
func (j *Job) Ready() {
	j.m.mu.Lock()
	defer j.m.mu.Unlock()
	if j.status == Running {
		j.transitionLocked(Ready)
	}
}

func (j *Job) transitionLocked(to Status) {
	if !CanTransition(j.status, to) {
		panic(fmt.Sprintf("job %s: illegal transition %s -> %s", j.id, j.status, to))
	}
	j.status = to
	j.m.emit(EventStatusChange, StatusChange{ID: j.id, Status: to})
}

// validID applies QEMU's rule for ids: a letter, then letters, digits,
// '-', '.' and '_'.
func validID(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
		case i > 0 && (r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_'):
		default:
			return false
		}
	}
	return true
}

// CheckID returns QEMU's error for an id that a new job cannot have.
func (m *Manager) CheckID(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.checkIDLocked(id)
}

func (m *Manager) checkIDLocked(id string) error {
	if !validID(id) {
		return qapi.Errorf(qapi.GenericError, "Invalid job ID '%s'", id)
	}
	if m.findLocked(id) != nil {
		return qapi.Errorf(qapi.GenericError, "Job ID '%s' already in use", id)
	}
	return nil
}

// Start creates a job and starts it: the events for created and running
// are emitted before Start returns; Run goes on in its own goroutine.
func (m *Manager) Start(k *Kind, o Options) (*Job, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, qapi.Errorf(qapi.GenericError, "jobs are shutting down")
	}
	if err := m.checkIDLocked(o.ID); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	j := &Job{
		m: m, id: o.ID, kind: k, autoFinalize: o.AutoFinalize, autoDismiss: o.AutoDismiss,
		ctx: ctx, cancel: cancel, done: make(chan struct{}), total: o.Remaining,
	}
	m.jobs = append(m.jobs, j)
	j.status = Created
	m.emit(EventStatusChange, StatusChange{ID: j.id, Status: Created})
	j.transitionLocked(Running)
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		err := k.Run(ctx, j)
		m.mu.Lock()
		defer m.mu.Unlock()
		j.completedLocked(err)
	}()
	return j, nil
}

// completedLocked is what happens when Run returns.
func (j *Job) completedLocked(err error) {
	if j.cancelled && (err == nil || errors.Is(err, context.Canceled)) {
		err = ErrCanceled
	}
	if err != nil {
		j.abortLocked(err)
		return
	}
	j.transitionLocked(Waiting)
	j.transitionLocked(Pending)
	if j.autoFinalize {
		j.finalizeLocked()
	}
}

func (j *Job) abortLocked(err error) {
	j.err = err
	j.transitionLocked(Aborting)
	if j.kind.Abort != nil {
		j.kind.Abort(j)
	}
	j.concludeLocked()
}

func (j *Job) finalizeLocked() {
	if j.kind.Prepare != nil {
		if err := j.kind.Prepare(j); err != nil {
			j.abortLocked(err)
			return
		}
	}
	if j.kind.Commit != nil {
		j.kind.Commit(j)
	}
	j.concludeLocked()
}

func (j *Job) concludeLocked() {
	if j.kind.Clean != nil {
		j.kind.Clean(j)
	}
	j.cancel()
	j.transitionLocked(Concluded)
	if j.autoDismiss {
		j.dismissLocked()
	}
	close(j.done)
}

func (j *Job) dismissLocked() {
	j.transitionLocked(Null)
	m := j.m
	for i, x := range m.jobs {
		if x == j {
			m.jobs = append(m.jobs[:i], m.jobs[i+1:]...)
			break
		}
	}
}

func (m *Manager) findLocked(id string) *Job {
	for _, j := range m.jobs {
		if j.id == id {
			return j
		}
	}
	return nil
}

// Get returns the job called id, or QEMU's "Job not found".
func (m *Manager) Get(id string) (*Job, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.getLocked(id)
}

func (m *Manager) getLocked(id string) (*Job, error) {
	if j := m.findLocked(id); j != nil {
		return j, nil
	}
	return nil, qapi.Errorf(qapi.GenericError, "Job not found")
}

func (j *Job) verbLocked(v Verb) error {
	if Allowed(v, j.status) {
		return nil
	}
	return qapi.Errorf(qapi.GenericError, "Job '%s' in state '%s' cannot accept command verb '%s'", j.id, j.status, v)
}

// Query lists the jobs, newest first, as query-jobs does.
func (m *Manager) Query() []Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Info, 0, len(m.jobs))
	for i := len(m.jobs) - 1; i >= 0; i-- {
		j := m.jobs[i]
		inf := Info{ID: j.id, Type: j.kind.Type, Status: j.status, CurrentProgress: j.cur, TotalProgress: j.total}
		if j.err != nil {
			inf.Error = j.err.Error()
		}
		out = append(out, inf)
	}
	return out
}

// Cancel cancels a job (job-cancel): a running one has its context
// cancelled and aborts when Run returns; a pending one aborts at once.
func (m *Manager) Cancel(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.getLocked(id)
	if err != nil {
		return err
	}
	if err := j.verbLocked(VerbCancel); err != nil {
		return err
	}
	j.cancelled = true
	switch j.status {
	case Pending, Waiting:
		// Run has returned: nothing is left to stop.
		j.abortLocked(ErrCanceled)
	default:
		// A user pause ends with the cancel, as QEMU's does.
		if j.userPaused {
			j.userPaused = false
			j.pauseCount--
		}
		j.cancel()
	}
	return nil
}

// Pause asks a job to pause at its next pause point (job-pause).
func (m *Manager) Pause(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.getLocked(id)
	if err != nil {
		return err
	}
	if err := j.verbLocked(VerbPause); err != nil {
		return err
	}
	if j.userPaused {
		return qapi.Errorf(qapi.GenericError, "Job is already paused")
	}
	j.userPaused = true
	j.pauseCount++
	return nil
}

// Resume undoes Pause (job-resume).
func (m *Manager) Resume(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.getLocked(id)
	if err != nil {
		return err
	}
	if !j.userPaused {
		return qapi.Errorf(qapi.GenericError, "Can't resume a job that was not paused")
	}
	if err := j.verbLocked(VerbResume); err != nil {
		return err
	}
	j.userPaused = false
	j.pauseCount--
	if j.pauseCount == 0 && j.resume != nil {
		close(j.resume)
		j.resume = nil
	}
	return nil
}

// Complete asks a ready job to finish (job-complete).
func (m *Manager) Complete(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.getLocked(id)
	if err != nil {
		return err
	}
	if err := j.verbLocked(VerbComplete); err != nil {
		return err
	}
	if j.pauseCount > 0 || j.cancelled || j.kind.Complete == nil {
		return qapi.Errorf(qapi.GenericError, "The active block job '%s' cannot be completed", j.id)
	}
	return j.kind.Complete(j)
}

// Finalize finalizes a pending job (job-finalize).
func (m *Manager) Finalize(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.getLocked(id)
	if err != nil {
		return err
	}
	if err := j.verbLocked(VerbFinalize); err != nil {
		return err
	}
	j.finalizeLocked()
	return nil
}

// Dismiss removes a concluded job (job-dismiss).
func (m *Manager) Dismiss(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, err := m.getLocked(id)
	if err != nil {
		return err
	}
	if err := j.verbLocked(VerbDismiss); err != nil {
		return err
	}
	j.dismissLocked()
	return nil
}

// Close cancels every job that still runs and waits for their Run to
// return. No job starts afterwards. Safe twice.
func (m *Manager) Close() {
	m.mu.Lock()
	m.closed = true
	for _, j := range m.jobs {
		j.cancelled = true
		j.cancel()
	}
	m.mu.Unlock()
	m.wg.Wait()
}
