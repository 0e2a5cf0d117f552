// Command vhost compares blockbackend's vhost-user-blk export with
// qemu-storage-daemon's, without a guest: the Go vhost-user frontend in
// vhostuser/frontend plays QEMU's part (QEMU 7.2's handshake and feature
// set, split rings with EVENT_IDX and indirect descriptors by default)
// and drives each backend's virtqueues directly.
//
//	go run ./bench/vhost [-runs 5] [-time 3s] [-size 1G] [-jobs REGEXP] [-json]
//
// Both backends serve the same raw image on tmpfs (a byte-identical copy
// each), filled with data so that reads copy real pages, with the same
// command line (file node, cache.direct=off, aio=threads). For each run
// and each num-queues setting (1, then 2) both backends are started
// afresh and connected once; then every job runs on each in turn (qsd,
// ours; ours, qsd; ... alternating who goes first): 4 KiB random reads
// and writes at total queue depth 1 and 32, 1 MiB sequential reads and
// writes at total queue depth 4. With two queues both are driven and the
// total depth is split between them (QD32 becomes 2x16, QD4 2x2, and QD1
// becomes 2x1: one request on each queue). Each job runs
// -time after a -warmup that is not measured.
//
// Reported per job, as the median over runs: IOPS (4 KiB) or MB/s
// (1 MiB), the median completion latency (p50, submit to reap, which
// includes the frontend's own overhead, the same for both), and the
// backend process's CPU time per I/O (utime+stime of all its threads from
// /proc/PID/stat, read just before and after the measured part of the
// job). Then the targets: ours >= 1.2x qsd's IOPS at 4 KiB QD32, p50 <=
// 0.85x qsd's at QD1, >= 1.0x qsd's bandwidth for 1 MiB sequential.
//
// -backend replaces our binary (by default built from ./cmd/blockbackend,
// without -race) by another one taking the same command line; passing
// qemu-storage-daemon itself is the sanity check of the tool: the ratios
// should then be close to 1. -packed asks for packed rings, which qsd 7.2
// does not offer: only ours is measured then.
package main

import (
	"context"
	"encoding/json"
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
	vu "blockbackend/vhostuser"
	"blockbackend/vhostuser/frontend"
)

// jobSpec is one measured job on one num-queues setting.
type jobSpec struct {
	Name      string `json:"name"`
	Queues    int    `json:"queues"`
	PerQueue  int    `json:"depth_per_queue"`
	BlockSize int    `json:"block_size"`
	Random    bool   `json:"random"`
	Write     bool   `json:"write"`
	// class groups jobs for the targets: "qd1", "qd32" or "seq".
	class string
}

// jobsFor lists the jobs for one num-queues setting. depth is the total
// over all queues, split evenly (at least one per queue).
func jobsFor(queues int) []jobSpec {
	var js []jobSpec
	add := func(bs int, random, write bool, depth int, class string) {
		per := max(depth/queues, 1)
		qd := strconv.Itoa(depth)
		if queues > 1 {
			qd = fmt.Sprintf("%dx%d", queues, per)
		}
		kind := map[bool]string{false: "seq", true: "rand"}[random] + map[bool]string{false: "read", true: "write"}[write]
		size := "4k"
		if bs >= 1<<20 {
			size = strconv.Itoa(bs>>20) + "M"
		}
		js = append(js, jobSpec{Name: size + " " + kind + " QD" + qd, Queues: queues, PerQueue: per,
			BlockSize: bs, Random: random, Write: write, class: class})
	}
	for _, w := range []bool{false, true} {
		add(4096, true, w, 1, "qd1")
		add(4096, true, w, 32, "qd32")
	}
	for _, w := range []bool{false, true} {
		add(1<<20, false, w, 4, "seq")
	}
	return js
}

// sample is one measured job on one backend in one run.
type sample struct {
	Run int `json:"run,omitempty"`
	benchutil.Metrics
	P50us  float64 `json:"p50_us"`
	P99us  float64 `json:"p99_us"`
	MaxUs  float64 `json:"max_us,omitempty"`
	Errors int64   `json:"errors"`
}

type backendSpec struct {
	Name  string `json:"name"`
	Bin   string `json:"binary"`
	Image string `json:"image"`
}

type config struct {
	flags
	Backends []backendSpec `json:"backends"`
	Dir      string        `json:"dir"`
	Frontend string        `json:"frontend"`
}

type flags struct {
	Size      int64         `json:"size"`
	Runs      int           `json:"runs"`
	Time      time.Duration `json:"time_ns"`
	Warmup    time.Duration `json:"warmup_ns"`
	Jobs      string        `json:"jobs"`
	Backend   string        `json:"backend,omitempty"`
	JSON      bool          `json:"-"`
	Profile   string        `json:"profile"`
	EventIdx  bool          `json:"event_idx"`
	Indirect  bool          `json:"indirect"`
	Packed    bool          `json:"packed"`
	QueueSize int           `json:"queue_size"`
	Queues    string        `json:"queues"`
}

func main() {
	var fl flags
	size := flag.String("size", "1G", "image size (suffixes K, M, G)")
	flag.IntVar(&fl.Runs, "runs", 5, "runs per backend (medians are reported)")
	flag.DurationVar(&fl.Time, "time", 3*time.Second, "measured time per job")
	flag.DurationVar(&fl.Warmup, "warmup", 500*time.Millisecond, "unmeasured warm-up before each job")
	flag.StringVar(&fl.Jobs, "jobs", "", "run only jobs whose name matches this regexp (e.g. 'QD32|QD2x16')")
	flag.StringVar(&fl.Backend, "backend", "", "binary to measure as \"ours\" instead of building ./cmd/blockbackend (qemu-storage-daemon: sanity check)")
	flag.BoolVar(&fl.JSON, "json", false, "print the results as JSON instead of a table")
	flag.StringVar(&fl.Profile, "profile", frontend.QEMU72.Name, "frontend profile (QEMU release whose handshake and features to use)")
	flag.BoolVar(&fl.EventIdx, "eventidx", true, "negotiate VIRTIO_RING_F_EVENT_IDX")
	flag.BoolVar(&fl.Indirect, "indirect", true, "negotiate VIRTIO_RING_F_INDIRECT_DESC")
	flag.BoolVar(&fl.Packed, "packed", false, "use packed rings (qsd 7.2 has none: measures only ours)")
	flag.IntVar(&fl.QueueSize, "queue-size", 128, "virtqueue size (QEMU's default is 128)")
	flag.StringVar(&fl.Queues, "queues", "1,2", "num-queues settings to run, comma-separated")
	flag.Parse()
	var err error
	if fl.Size, err = benchutil.ParseSize(*size, false); err != nil {
		fail("-size: %v", err)
	}
	if fl.Runs < 1 || fl.Time <= 0 || fl.Warmup < 0 {
		fail("-runs must be >= 1, -time > 0, -warmup >= 0")
	}
	if fl.QueueSize < 1 || fl.QueueSize > 32768 || fl.QueueSize&(fl.QueueSize-1) != 0 {
		fail("-queue-size %d: not a power of two up to 32768", fl.QueueSize)
	}
	jobRE, err := regexp.Compile(fl.Jobs)
	if err != nil {
		fail("-jobs: %v", err)
	}
	prof, ok := profileByName(fl.Profile)
	if !ok {
		fail("-profile %q: unknown (have %s)", fl.Profile, profileNames())
	}
	var queueSettings []int
	for _, s := range strings.Split(fl.Queues, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		// The bench buffers of one connection must fit the frontend's
		// 256 MiB of guest memory.
		if err != nil || n < 1 || n > 16 {
			fail("-queues: %q is not a queue count", s)
		}
		queueSettings = append(queueSettings, n)
	}
	if _, err := exec.LookPath("qemu-storage-daemon"); err != nil && !fl.Packed {
		fail("qemu-storage-daemon not found: apt-get install qemu-system-x86 (Debian 12: qemu-system-common ships it)")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	dir, ours, err := benchutil.Workdir("bbvhost", fl.Backend, func(f string, a ...any) { fmt.Fprintf(os.Stderr, "bench/vhost: "+f+"\n", a...) })
	if err != nil {
		fail("%v", err)
	}
	defer os.RemoveAll(dir)
	exit := func(format string, a ...any) {
		os.RemoveAll(dir)
		fail(format, a...)
	}
	cfg := config{flags: fl, Dir: dir}
	if !fl.Packed {
		qsd, _ := exec.LookPath("qemu-storage-daemon")
		cfg.Backends = append(cfg.Backends, backendSpec{"qsd", qsd, filepath.Join(dir, "disk-qsd.img")})
	}
	cfg.Backends = append(cfg.Backends, backendSpec{"ours", ours, filepath.Join(dir, "disk-ours.img")})
	ring := map[bool]string{false: "split", true: "packed"}[fl.Packed]
	cfg.Frontend = fmt.Sprintf("%s, %s rings, event-idx=%v indirect=%v, queue size %d", prof.Name,
		ring, fl.EventIdx, fl.Indirect, fl.QueueSize)
	// One copy of the same image per backend: both processes stay up
	// during a num-queues setting, and two writers on one image would
	// depend on their image locking agreeing (each export shares
	// everything in qsd), which is not what is measured here.
	var paths []string
	for _, b := range cfg.Backends {
		paths = append(paths, b.Image)
	}
	if err := benchutil.MakeImages(paths, fl.Size); err != nil {
		exit("%v", err)
	}

	var jobs []jobSpec
	for _, nq := range queueSettings {
		for _, j := range jobsFor(nq) {
			if jobRE.MatchString(j.Name) {
				jobs = append(jobs, j)
			}
		}
	}
	if len(jobs) == 0 {
		exit("-jobs %q matches no job (names look like \"4k randread QD32\", \"1M seqwrite QD2x2\")", fl.Jobs)
	}

	res := newResults(cfg, jobs)
	res.LoadBefore = benchutil.LoadAvg()
	fo := frontend.Options{Profile: prof, QueueSize: uint16(fl.QueueSize), EventIdx: fl.EventIdx,
		Indirect: fl.Indirect, Packed: fl.Packed,
		// Room for the bench buffers of every job on one connection
		// (they are not freed until Close): 1 MiB x 4 x 2 (warm-up).
		MemSize: 256 << 20,
		// A backend that stops completing requests fails the job
		// instead of hanging the benchmark.
		IOTimeout: 10 * time.Second,
	}
	logf("image %d MiB in %s, frontend %s", fl.Size>>20, dir, cfg.Frontend)
	for _, b := range cfg.Backends {
		logf("%s = %s on %s", b.Name, b.Bin, b.Image)
	}
	for run := 0; run < fl.Runs && ctx.Err() == nil; run++ {
		for _, nq := range queueSettings {
			var js []jobSpec
			for _, j := range jobs {
				if j.Queues == nq {
					js = append(js, j)
				}
			}
			if len(js) == 0 {
				continue
			}
			o := fo
			o.NumQueues = nq
			runSetting(ctx, res, cfg.Backends, dir, o, js, run)
		}
	}
	if ctx.Err() != nil {
		exit("interrupted")
	}
	res.LoadAfter = benchutil.LoadAvg()
	res.summarise()
	if fl.JSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			exit("%v", err)
		}
	} else {
		res.print(os.Stdout)
	}
}

// live is one backend started and connected for one num-queues setting.
type live struct {
	spec backendSpec
	srv  *benchutil.Server
	f    *frontend.Frontend
	span int64
	err  error // set once it failed: its remaining jobs are skipped
}

// runSetting starts every backend with o.NumQueues queues, connects to
// each once, then runs the jobs in order, each on every backend in turn
// (alternately qsd or ours first), so that the two measurements of a job
// are seconds apart and share the machine's background load. A backend that fails is
// skipped for the rest of the setting (its jobs are recorded as failed).
func runSetting(ctx context.Context, res *results, backends []backendSpec, dir string, o frontend.Options, js []jobSpec, run int) {
	var ls []*live
	defer func() {
		for _, l := range ls {
			if l.f != nil {
				l.f.Close()
			}
			if l.srv != nil {
				if err := l.srv.Stop(); err != nil {
					logf("run %d q=%d: %v", run+1, o.NumQueues, err)
				}
			}
		}
	}()
	for _, b := range backends {
		l := &live{spec: b}
		ls = append(ls, l)
		sock := filepath.Join(dir, b.Name+".sock")
		l.srv, l.err = benchutil.Start(ctx, benchutil.Options{Name: b.Name, Bin: b.Bin, Args: benchutil.FileExportArgs(b.Image, sock, o.NumQueues), Sock: sock})
		if l.err != nil {
			continue
		}
		if l.f, l.err = l.srv.Dial(ctx, o); l.err != nil {
			l.err = fmt.Errorf("connect: %w", l.err)
			continue
		}
		virtio, proto := l.f.Features()
		res.negotiated(b.Name, o.NumQueues, virtio, proto)
		if o.Packed && virtio&(1<<vu.FRingPacked) == 0 {
			l.err = fmt.Errorf("packed rings requested but not negotiated (features %#x)", virtio)
			continue
		}
		cfg, err := l.f.Config()
		if err != nil {
			l.err = err
			continue
		}
		l.span = int64(cfg.Capacity) * frontend.SectorSize
	}
	for _, l := range ls {
		if l.err != nil {
			logf("run %d q=%d %s: %v", run+1, o.NumQueues, l.spec.Name, l.err)
		}
	}
	for ji, j := range js {
		// Who goes first alternates from job to job and run to run, so
		// that neither backend always follows the other (a position
		// bias of up to 20% showed in qsd-vs-qsd runs without this).
		order := slices.Clone(ls)
		if (run+ji)%2 == 1 {
			slices.Reverse(order)
		}
		for _, l := range order {
			if ctx.Err() != nil {
				return
			}
			if l.err != nil {
				res.fail(j, l.spec.Name, run, l.err)
				continue
			}
			smp, err := measure(ctx, res.Config.flags, l, ls, j, run)
			if err != nil {
				l.err = fmt.Errorf("%s: %w", j.Name, err)
				res.fail(j, l.spec.Name, run, err)
				logf("run %d %-20s %-5s %v", run+1, j.Name, l.spec.Name, err)
				continue
			}
			if smp.Errors > 0 {
				res.fail(j, l.spec.Name, run, fmt.Errorf("%d of %d requests completed with an error status", smp.Errors, smp.IOs))
			} else {
				res.add(j, l.spec.Name, smp)
			}
			logf("run %d %-20s %-5s %9.0f IOPS %8.1f MB/s  p50 %7.1fµs p99 %7.1fµs  cpu %6.2fµs/IO%s",
				run+1, j.Name, l.spec.Name, smp.IOPS, smp.MBps, smp.P50us, smp.P99us, smp.CPUusPIO,
				map[bool]string{false: "", true: fmt.Sprintf("  %d ERRORS", smp.Errors)}[smp.Errors > 0])
		}
	}
}

// measure runs one job on l: a warm-up, then the measured part with the
// backend's CPU time read around it. It also reads the CPU time of the
// other, idle backends: one that burns CPU while idle (busy polling)
// steals it from the one being measured on a small machine, which the
// results should say.
func measure(ctx context.Context, fl flags, l *live, all []*live, j jobSpec, run int) (sample, error) {
	queues := make([]int, j.Queues)
	for q := range queues {
		queues[q] = q
	}
	bo := frontend.BenchOptions{Queues: queues, Depth: j.PerQueue, BlockSize: j.BlockSize, Random: j.Random,
		Write: j.Write, Span: l.span, Seed: uint64(run + 1)}
	if fl.Warmup > 0 {
		bo.Duration = fl.Warmup
		if _, err := frontend.Bench(ctx, l.f, bo); err != nil {
			return sample{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	bo.Duration = fl.Time
	bo.Seed += 1 << 32 // the measured part does not replay the warm-up's offsets
	idle0 := map[*live]int64{}
	for _, o := range all {
		if o != l && o.srv != nil {
			idle0[o], _ = o.srv.CPUTicks()
		}
	}
	t0, err0 := l.srv.CPUTicks()
	r, err := frontend.Bench(ctx, l.f, bo)
	t1, err1 := l.srv.CPUTicks()
	if err == nil {
		err = ctx.Err()
	}
	if err == nil {
		err = firstErr(err0, err1)
	}
	if err != nil {
		return sample{}, err
	}
	for o, t := range idle0 {
		if t2, err := o.srv.CPUTicks(); err == nil && time.Duration(t2-t)*benchutil.ClockTick > r.Elapsed/20 {
			logf("warning: %s used %v of CPU while idle during %s's %s (more than 5%% of a core): it competes with the measured backend",
				o.spec.Name, time.Duration(t2-t)*benchutil.ClockTick, l.spec.Name, j.Name)
		}
	}
	smp := sample{Run: run + 1, Metrics: benchutil.Metrics{IOPS: r.IOPS(), MBps: r.MBps(), IOs: r.IOs},
		P50us: us(r.P50), P99us: us(r.P99), MaxUs: us(r.Max), Errors: r.Errors}
	if r.IOs > 0 {
		smp.CPUusPIO = us(time.Duration(t1-t0)*benchutil.ClockTick) / float64(r.IOs)
	}
	return smp, nil
}

func profileByName(name string) (frontend.Profile, bool) {
	for _, p := range frontend.Profiles {
		if p.Name == name {
			return p, true
		}
	}
	return frontend.Profile{}, false
}

func profileNames() string {
	var n []string
	for _, p := range frontend.Profiles {
		n = append(n, p.Name)
	}
	return strings.Join(n, ", ")
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

var logOut io.Writer = os.Stderr

func logf(format string, a ...any) { fmt.Fprintf(logOut, format+"\n", a...) }

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench/vhost: "+format+"\n", a...)
	os.Exit(1)
}
