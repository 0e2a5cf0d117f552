// Command vhostguest compares blockbackend's vhost-user-blk export with
// qemu-storage-daemon's under a real Linux guest: QEMU (TCG) boots the
// test guest of package tests/guest with a vhost-user-blk-pci disk on the
// backend's socket, and the guest's agent runs its "bench" command.
//
//	go run ./bench/vhostguest [-runs 3] [-time 5s] [-jobs REGEXP] [-queues 1,2]
//
// It is the secondary benchmark: under TCG the guest's own cost (an
// emulated CPU running the kernel's block layer and virtio driver)
// dominates every request, so the differences between the backends show
// much smaller here than they are. bench/vhost, without a guest, is the
// primary one; this one checks that what it finds survives a real
// guest driver, with its request splitting, notifications and interrupts.
//
// Both backends serve the same raw image on tmpfs (a byte-identical copy
// each) with bench/vhost's command line. For each run and each num-queues
// setting, each backend in turn (alternating who goes first) is started,
// a guest with as many vCPUs as queues is booted against it and runs every
// job once after an unmeasured one-second warm-up, then both are stopped.
// Jobs are the agent's bench: O_DIRECT, qd workers with one request in
// flight each: 4 KiB reads and writes at uniformly random block-aligned
// offsets at queue depth 1 and 32, 1 MiB sequential reads and writes (the
// workers share one cursor) at queue depth 4.
//
// Reported per job, as the median over runs: IOPS (4 KiB) or MB/s
// (1 MiB), the agent's mean request latency, and the CPU time per I/O
// of the backend process and of the guest's QEMU (utime+stime of all
// threads from /proc/PID/stat, read when the agent reports the job and
// the command before it), the requests the guest's disk completed per
// I/O (/sys/block/vda/stat: the guest's splitting), with the ratios
// ours/qsd; and the guest's view of each disk (its limits).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"blockbackend/bench/internal/benchutil"
	"blockbackend/tests/guest"
)

// jobSpec is one agent bench job on one num-queues setting.
type jobSpec struct {
	Name   string // "4k randread QD32"
	Queues int
	QD     int
	BS     int64
	RW     string // the agent's rw=
}

func (j jobSpec) key() string { return fmt.Sprintf("%s nq%d", j.Name, j.Queues) }

// script is the agent's command line for the job.
func (j jobSpec) script(secs int) string {
	return fmt.Sprintf("bench secs=%d qd=%d bs=%d rw=%s", secs, j.QD, j.BS, j.RW)
}

// jobsFor lists the jobs for one num-queues setting. The queue depth is
// the number of agent workers; with several queues blk-mq spreads them by
// the vCPU they run on.
func jobsFor(queues int) []jobSpec {
	var js []jobSpec
	for _, j := range []struct {
		bs     int64
		rw     string
		depths []int
	}{
		{4096, "randread", []int{1, 32}},
		{4096, "randwrite", []int{1, 32}},
		{1 << 20, "read", []int{4}},
		{1 << 20, "write", []int{4}},
	} {
		size := "4k"
		if j.bs >= 1<<20 {
			size = strconv.FormatInt(j.bs>>20, 10) + "M"
		}
		for _, qd := range j.depths {
			js = append(js, jobSpec{Name: fmt.Sprintf("%s %s QD%d", size, j.rw, qd), Queues: queues, QD: qd, BS: j.bs, RW: j.rw})
		}
	}
	return js
}

// warmup is the script's first bench, not measured: it faults in the
// agent's buffers and the guest's and backend's first paths.
const warmup = "bench secs=1 qd=4 bs=4096 rw=randread"

// statCmd prints the disk's I/O statistics (Documentation/block/stat.rst:
// requests completed, after the guest's splitting and merging), to count
// the requests that reached the backend per agent I/O.
const statCmd = "sh cat /sys/block/vda/stat"

// script is the agent's script for one guest: info (line 1), the warm-up
// (line 2), the statistics (line 3), then for job i the bench (line
// jobLine(i)) followed by the statistics.
func script(js []jobSpec, secs int) []string {
	s := []string{"info", warmup, statCmd}
	for _, j := range js {
		s = append(s, j.script(secs), statCmd)
	}
	return s
}

func jobLine(i int) int { return 4 + 2*i }

// lineJob is the index of the job whose bench (or, with stat, whose
// following statistics) is on script line; ok is false for the lines
// before the first job.
func lineJob(line int) (i int, stat, ok bool) {
	if line < jobLine(0) {
		return 0, false, false
	}
	return (line - jobLine(0)) / 2, (line-jobLine(0))%2 == 1, true
}

// parseDiskStat returns the completed requests (reads + writes) from the
// contents of /sys/block/DEV/stat.
func parseDiskStat(s string) (int64, error) {
	f := strings.Fields(s)
	if len(f) < 5 {
		return 0, fmt.Errorf("disk statistics %q: too few fields", s)
	}
	r, err1 := strconv.ParseInt(f[0], 10, 64)
	w, err2 := strconv.ParseInt(f[4], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("disk statistics %q: %w", s, err)
	}
	return r + w, nil
}

type backendSpec struct {
	Name  string
	Bin   string
	Image string
}

type flags struct {
	Runs    int
	Time    time.Duration
	Size    int64
	Jobs    string
	Queues  []int
	Backend string
}

// parseFlags parses the command line (without the program name).
func parseFlags(args []string, stderr io.Writer) (flags, *regexp.Regexp, error) {
	var fl flags
	fs := flag.NewFlagSet("vhostguest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&fl.Runs, "runs", 3, "runs (medians are reported)")
	fs.DurationVar(&fl.Time, "time", 5*time.Second, "measured time per job (whole seconds)")
	size := fs.String("size", "1G", "image size (suffixes K, M, G)")
	fs.StringVar(&fl.Jobs, "jobs", "", "run only jobs whose name matches this regexp (e.g. 'QD32')")
	queues := fs.String("queues", "1,2", "num-queues settings, comma-separated (the guest gets as many vCPUs)")
	fs.StringVar(&fl.Backend, "backend", "", "binary to measure as \"ours\" instead of building ./cmd/blockbackend (qemu-storage-daemon: sanity check)")
	if err := fs.Parse(args); err != nil {
		return fl, nil, err
	}
	if fs.NArg() > 0 {
		return fl, nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if fl.Runs < 1 {
		return fl, nil, errors.New("-runs must be >= 1")
	}
	if fl.Time < time.Second || fl.Time%time.Second != 0 {
		return fl, nil, fmt.Errorf("-time %v: the agent counts whole seconds (1s or more)", fl.Time)
	}
	sz, err := guest.ParseSize(strings.ToUpper(*size))
	if err != nil || sz < 64<<20 || sz%(1<<20) != 0 {
		return fl, nil, fmt.Errorf("-size %q: want a multiple of 1 MiB, at least 64M", *size)
	}
	fl.Size = sz
	for _, s := range strings.Split(*queues, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		// Each queue is a vCPU of an emulated guest on a small machine.
		if err != nil || n < 1 || n > 8 {
			return fl, nil, fmt.Errorf("-queues: %q is not a queue count from 1 to 8", s)
		}
		if slices.Contains(fl.Queues, n) {
			return fl, nil, fmt.Errorf("-queues: %d given twice", n)
		}
		fl.Queues = append(fl.Queues, n)
	}
	re, err := regexp.Compile(fl.Jobs)
	if err != nil {
		return fl, nil, fmt.Errorf("-jobs: %w", err)
	}
	if len(selectJobs(fl.Queues, re)) == 0 {
		return fl, nil, fmt.Errorf("-jobs %q matches no job (names look like \"4k randread QD32\", \"1M write QD4\")", fl.Jobs)
	}
	return fl, re, nil
}

// selectJobs is every setting's jobs that re matches, by setting.
func selectJobs(queues []int, re *regexp.Regexp) [][]jobSpec {
	var out [][]jobSpec
	for _, nq := range queues {
		var js []jobSpec
		for _, j := range jobsFor(nq) {
			if re.MatchString(j.Name) {
				js = append(js, j)
			}
		}
		if len(js) > 0 {
			out = append(out, js)
		}
	}
	return out
}

func main() {
	fl, re, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fail("%v", err)
	}
	for _, tool := range []string{"qemu-storage-daemon", "qemu-system-x86_64"} {
		if _, err := exec.LookPath(tool); err != nil {
			fail("%s not found: apt-get install qemu-system-x86 (Debian 12: qemu-system-common ships qemu-storage-daemon)", tool)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	t0 := time.Now()
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	kit, err := guest.Build(bctx, guest.DefaultCacheDir())
	cancel()
	if err != nil {
		fail("building the test guest: %v", err)
	}
	logf("guest kit (kernel %s) ready in %v", kit.Release, time.Since(t0).Round(time.Millisecond))

	dir, ours, err := benchutil.Workdir("bbvguest", fl.Backend, logf)
	if err != nil {
		fail("%v", err)
	}
	defer os.RemoveAll(dir)
	exit := func(format string, a ...any) {
		os.RemoveAll(dir)
		fail(format, a...)
	}
	qsd, _ := exec.LookPath("qemu-storage-daemon")
	backends := []backendSpec{
		{"qsd", qsd, filepath.Join(dir, "disk-qsd.img")},
		{"ours", ours, filepath.Join(dir, "disk-ours.img")},
	}
	if err := benchutil.MakeImages([]string{backends[0].Image, backends[1].Image}, fl.Size); err != nil {
		exit("%v", err)
	}

	settings := selectJobs(fl.Queues, re)
	var all []jobSpec
	for _, js := range settings {
		all = append(all, js...)
	}
	res := newResults(fl, backends, kit.Release, all)
	res.LoadBefore = benchutil.LoadAvg()
	logf("image %d MiB in %s; guest kernel %s under TCG", fl.Size>>20, dir, kit.Release)
	for _, b := range backends {
		logf("%s = %s", b.Name, b.Bin)
	}
	for run := 0; run < fl.Runs && ctx.Err() == nil; run++ {
		for si, js := range settings {
			order := slices.Clone(backends)
			// Who goes first alternates from setting to setting and run
			// to run.
			if (run+si)%2 == 1 {
				slices.Reverse(order)
			}
			for _, b := range order {
				if ctx.Err() != nil {
					break
				}
				runGuest(ctx, res, kit, b, dir, js, fl, run)
			}
		}
	}
	if ctx.Err() != nil {
		exit("interrupted")
	}
	res.LoadAfter = benchutil.LoadAvg()
	res.summarise()
	res.print(os.Stdout)
}

// runGuest starts backend b, boots one guest with js[0].Queues queues
// against it, records every job's sample (or failure) and stops both.
func runGuest(ctx context.Context, res *results, kit *guest.Kit, b backendSpec, dir string, js []jobSpec, fl flags, run int) {
	nq := js[0].Queues
	secs := int(fl.Time / time.Second)
	failAll := func(from int, err error) {
		for _, j := range js[from:] {
			res.fail(j, b.Name, run, err)
		}
		logf("run %d nq%d %s: %v", run+1, nq, b.Name, err)
	}
	sock := filepath.Join(dir, b.Name+".sock")
	srv, err := benchutil.Start(ctx, benchutil.Options{Name: b.Name, Bin: b.Bin, Args: benchutil.FileExportArgs(b.Image, sock, nq), Sock: sock,
		Listen: true, KillWithUs: true})
	if err != nil {
		failAll(0, err)
		return
	}
	defer func() {
		if err := srv.Stop(); err != nil {
			logf("run %d nq%d: %v", run+1, nq, err)
		}
	}()
	// Boot (a few seconds under TCG, more on a loaded machine) plus the
	// jobs at twice their time; the agent's watchdog reports first.
	watchdog := 120*time.Second + time.Duration(2*(1+len(js)*secs))*time.Second
	gctx, cancel := context.WithTimeout(ctx, watchdog+30*time.Second)
	defer cancel()
	known := qemuChildren()
	vm, err := guest.Boot(gctx, kit, guest.BootOptions{Sockets: []string{srv.Sock}, NumQueues: nq,
		Script: script(js, secs), Timeout: watchdog})
	if err != nil {
		failAll(0, err)
		return
	}
	defer vm.Kill()
	gpid, err := guestPID(known)
	if err != nil {
		failAll(0, err)
		return
	}
	// CPU times are read when each report arrives: a job's are the
	// difference from the report before it (the statistics after the
	// previous job, or after the warm-up). Its sample is recorded once
	// the statistics after it came.
	var prevB, prevG, prevReqs int64
	var pending *sample
	pendingJob := 0
	next := 0 // index in js of the next job expected
	for i := 0; ; i++ {
		r, err := vm.Next(gctx, i)
		bt, errB := benchutil.CPUTicks(srv.PID())
		gt, errG := benchutil.CPUTicks(gpid)
		if err != nil {
			_, werr := vm.Wait()
			failAll(next, fmt.Errorf("guest ended early (%v): %v", err, werr))
			return
		}
		ji, stat, isJob := lineJob(r.Line)
		switch {
		case r.Op == "ready" && !r.OK, r.Op == "watchdog", r.Op == "parse", r.Op == "mount":
			vm.Kill()
			vm.Wait()
			failAll(next, fmt.Errorf("guest: %s: %s\nconsole:\n%s", r.Op, r.Err, tail(vm.Console(), 20)))
			return
		case r.Op == "ready":
			logf("run %d nq%d %-4s guest ready after %v", run+1, nq, b.Name, vm.BootTime().Round(time.Millisecond))
		case r.Line == 1:
			if !r.OK || r.Queues != nq {
				vm.Kill()
				vm.Wait()
				failAll(0, fmt.Errorf("guest sees %d queues, want %d (info: %+v)", r.Queues, nq, r))
				return
			}
			res.view(b.Name, r)
		case r.Line == 2 && !r.OK:
			logf("run %d nq%d %s: warm-up failed: %s", run+1, nq, b.Name, r.Err)
		case r.Line == 3 || isJob && stat:
			reqs, err := parseDiskStat(r.Output)
			if !r.OK || err != nil {
				logf("run %d nq%d %s: disk statistics: %s %v", run+1, nq, b.Name, r.Err, err)
			}
			if pending != nil {
				if err == nil && r.OK && prevReqs > 0 && pending.IOs > 0 {
					pending.DevReqsPerIO = float64(reqs-prevReqs) / float64(pending.IOs)
				}
				res.add(js[pendingJob], b.Name, *pending)
				pending = nil
			}
			prevReqs = reqs
		case isJob && r.Event == "":
			j := js[ji]
			next = ji + 1
			if !r.OK {
				res.fail(j, b.Name, run, errors.New(r.Err))
				logf("run %d nq%d %-20s %-4s FAILED: %s", run+1, nq, j.Name, b.Name, r.Err)
				break
			}
			s := sample{Run: run + 1, Metrics: benchutil.Metrics{IOPS: r.IOPS, MBps: r.MBps, IOs: r.Reads + r.Writes},
				AvgLatUs: r.AvgLatUs, MaxLatMs: r.MaxLatMs}
			if err := errors.Join(errB, errG); err != nil {
				res.fail(j, b.Name, run, err)
				break
			}
			if s.IOs > 0 {
				s.CPUusPIO = us(time.Duration(bt-prevB)*benchutil.ClockTick) / float64(s.IOs)
				s.GuestCPUusPIO = us(time.Duration(gt-prevG)*benchutil.ClockTick) / float64(s.IOs)
			}
			pending, pendingJob = &s, ji
			logf("run %d nq%d %-20s %-4s %8.0f IOPS %7.1f MB/s  avg %7.1fµs  cpu %6.2fµs/IO  guest cpu %7.2fµs/IO",
				run+1, nq, j.Name, b.Name, s.IOPS, s.MBps, s.AvgLatUs, s.CPUusPIO, s.GuestCPUusPIO)
		case r.Op == "done":
			if pending != nil { // the last statistics are missing
				res.add(js[pendingJob], b.Name, *pending)
			}
			if _, err := vm.Wait(); err != nil {
				failAll(next, err)
			}
			return
		}
		prevB, prevG = bt, gt
	}
}

// tail is the last n lines of s.
func tail(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

var logOut io.Writer = os.Stderr

func logf(format string, a ...any) { fmt.Fprintf(logOut, format+"\n", a...) }

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench/vhostguest: "+format+"\n", a...)
	os.Exit(1)
}
