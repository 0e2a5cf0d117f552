package guest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// BootOptions describe one guest.
type BootOptions struct {
	// Sockets are vhost-user sockets; each becomes a vhost-user-blk-pci
	// device (vda, vdb, … in this order).
	Sockets []string
	// NumQueues is each device's num-queues (0: 1).
	NumQueues int
	// CPUs is the number of vCPUs (0: NumQueues, at least 1). Linux's
	// virtio-blk uses at most one queue per CPU.
	CPUs int
	// Reconnect is the chardev's reconnect= (seconds; 0: none). With it
	// QEMU survives a backend restart and renegotiates.
	Reconnect int
	// MemMB is the guest memory (0: 256).
	MemMB int
	// Script is the agent's commands (see the package's script language).
	Script []string
	// QMPSocket, if set, is where QEMU's own QMP monitor listens.
	QMPSocket string
	// Stdout, if set, gets a copy of the serial console.
	Stdout io.Writer
	// Timeout is the agent's watchdog: it reports and powers off when the
	// script has not finished by then (0: 120 s).
	Timeout time.Duration
	// QEMU is the emulator binary (default qemu-system-x86_64).
	QEMU string
	// EDD lets the kernel's setup code probe the disks through the BIOS
	// (Enhanced Disk Drive services): SeaBIOS's own virtio-blk driver, a
	// polling frontend with its rings in firmware memory, then reads sector
	// 0 of each disk before Linux starts. Off by default (edd=off).
	EDD bool
}

// VM is a running guest.
type VM struct {
	cmd     *exec.Cmd
	dir     string
	started time.Time

	mu      sync.Mutex
	results []Result
	ready   time.Duration // host time from start to the agent's "ready"
	console bytes.Buffer
	stderr  bytes.Buffer
	changed chan struct{} // closed and replaced whenever results grow or QEMU exits
	exited  bool
	exitErr error
}

// Boot starts QEMU. The guest runs the script and powers off; use Next or
// WaitFor to follow it and Wait for the end.
func Boot(ctx context.Context, kit *Kit, o BootOptions) (*VM, error) {
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if _, err := exec.LookPath(o.QEMU); err != nil {
		return nil, fmt.Errorf("guest: %s not found: %w", o.QEMU, ErrUnavailable)
	}
	if o.NumQueues <= 0 {
		o.NumQueues = 1
	}
	if o.CPUs <= 0 {
		o.CPUs = o.NumQueues
	}
	if o.MemMB <= 0 {
		o.MemMB = 256
	}
	if o.Timeout <= 0 {
		o.Timeout = 120 * time.Second
	}
	dir, err := os.MkdirTemp("", "bbguest-")
	if err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	initrd := filepath.Join(dir, "initrd")
	if err := writeBootInitrd(initrd, kit.Initrd, o.Script); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	appendLine := strings.Join([]string{
		"console=ttyS0", "quiet", "loglevel=1", "panic=-1",
		// Skip work that is slow under TCG and useless here.
		"mitigations=off", "nokaslr", "tsc=reliable", "no_timer_check",
		"i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
		"random.trust_cpu=on",
		"edd=" + map[bool]string{false: "off", true: "on"}[o.EDD],
		"agent.disks=" + strconv.Itoa(len(o.Sockets)),
		"agent.timeout=" + strconv.Itoa(int(o.Timeout.Seconds())),
	}, " ")
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "pc", "-accel", "tcg", "-cpu", "max",
		"-smp", strconv.Itoa(o.CPUs),
		"-m", strconv.Itoa(o.MemMB),
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", o.MemMB),
		"-numa", "node,memdev=mem",
		"-serial", "stdio", "-no-reboot",
		"-kernel", kit.Kernel, "-initrd", initrd, "-append", appendLine,
	}
	for i, s := range o.Sockets {
		ch := fmt.Sprintf("socket,id=c%d,path=%s", i, s)
		if o.Reconnect > 0 {
			ch += ",reconnect=" + strconv.Itoa(o.Reconnect)
		}
		args = append(args, "-chardev", ch, "-device",
			fmt.Sprintf("vhost-user-blk-pci,chardev=c%d,num-queues=%d", i, o.NumQueues))
	}
	if o.QMPSocket != "" {
		args = append(args, "-qmp", "unix:"+o.QMPSocket+",server=on,wait=off")
	}
	v := &VM{dir: dir, changed: make(chan struct{})}
	v.cmd = exec.CommandContext(ctx, o.QEMU, args...)
	v.cmd.WaitDelay = 5 * time.Second
	// A test binary killed by its -timeout must not leave guests behind.
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	v.cmd.Stderr = &lockedWriter{mu: &v.mu, w: &v.stderr}
	stdout, err := v.cmd.StdoutPipe()
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("guest: %w", err)
	}
	v.started = time.Now()
	if err := v.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("guest: starting %s: %w", o.QEMU, err)
	}
	go v.read(stdout, o.Stdout)
	return v, nil
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// writeBootInitrd copies the kit's initramfs and appends an archive with
// the script (the kernel unpacks concatenated archives in order).
func writeBootInitrd(path, base string, script []string) error {
	b, err := os.ReadFile(base)
	if err != nil {
		return fmt.Errorf("guest: %w", err)
	}
	buf := bytes.NewBuffer(b)
	w := &cpioWriter{w: buf}
	w.File("agent/script", 0o644, []byte(strings.Join(script, "\n")+"\n"))
	if err := w.Close(); err != nil {
		return err
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("guest: %w", err)
	}
	return nil
}

func (v *VM) notify() {
	close(v.changed)
	v.changed = make(chan struct{})
}

func (v *VM) read(stdout io.Reader, copyTo io.Writer) {
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if copyTo != nil {
			fmt.Fprintln(copyTo, line)
		}
		v.mu.Lock()
		v.console.WriteString(line + "\n")
		if r, ok := ParseLine(line); ok {
			if r.Op == "ready" && v.ready == 0 {
				v.ready = time.Since(v.started)
			}
			v.results = append(v.results, r)
			v.notify()
		}
		v.mu.Unlock()
	}
	io.Copy(io.Discard, stdout)
	err := v.cmd.Wait()
	v.mu.Lock()
	v.exited, v.exitErr = true, err
	v.notify()
	v.mu.Unlock()
	os.RemoveAll(v.dir)
}

// Next returns the i-th result (0-based), waiting for it. It returns
// io.EOF when QEMU has exited with fewer results.
func (v *VM) Next(ctx context.Context, i int) (Result, error) {
	for {
		v.mu.Lock()
		if i < len(v.results) {
			r := v.results[i]
			v.mu.Unlock()
			return r, nil
		}
		exited, ch := v.exited, v.changed
		v.mu.Unlock()
		if exited {
			return Result{}, io.EOF
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return Result{}, ctx.Err()
		}
	}
}

// WaitFor returns the first result (from the start of the run) for which
// match is true, waiting for it.
func (v *VM) WaitFor(ctx context.Context, match func(Result) bool) (Result, error) {
	for i := 0; ; i++ {
		r, err := v.Next(ctx, i)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return Result{}, fmt.Errorf("guest: QEMU exited before the awaited report: %w\n%s", err, v.Console())
			}
			return Result{}, err
		}
		if match(r) {
			return r, nil
		}
	}
}

// Wait waits for QEMU to exit and returns the agent's reports. The error
// is set when QEMU failed, or the agent did not report "done" (a crash, a
// hang ended by the context or the watchdog).
func (v *VM) Wait() ([]Result, error) {
	for {
		v.mu.Lock()
		if v.exited {
			res := append([]Result(nil), v.results...)
			err := v.exitErr
			v.mu.Unlock()
			if err != nil {
				return res, fmt.Errorf("guest: QEMU: %w; stderr: %s\nconsole:\n%s", err, v.Stderr(), v.Console())
			}
			if len(res) == 0 || res[len(res)-1].Op != "done" {
				return res, fmt.Errorf("guest: the agent did not finish its script; stderr: %s\nconsole:\n%s", v.Stderr(), v.Console())
			}
			return res, nil
		}
		ch := v.changed
		v.mu.Unlock()
		<-ch
	}
}

// Kill stops QEMU at once.
func (v *VM) Kill() {
	if v.cmd.Process != nil {
		_ = v.cmd.Process.Kill()
	}
}

// Console is the serial output so far.
func (v *VM) Console() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.console.String()
}

// Stderr is QEMU's standard error so far.
func (v *VM) Stderr() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.stderr.String()
}

// BootTime is the host time from starting QEMU to the agent's "ready"
// report (0 before it).
func (v *VM) BootTime() time.Duration {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.ready
}

// Failed returns the reports of commands that failed.
func Failed(res []Result) []Result {
	var bad []Result
	for _, r := range res {
		if !r.OK {
			bad = append(bad, r)
		}
	}
	return bad
}

// Find returns the reports of one script line (1-based), without loop
// progress events.
func Find(res []Result, line int) (Result, bool) {
	for _, r := range res {
		if r.Line == line && r.Event == "" {
			return r, true
		}
	}
	return Result{}, false
}
