// Command luks compares blockbackend's LUKS driver with QEMU's, in the
// same run, on the same image: the Go frontend (vhostuser/frontend, QEMU
// 7.2's handshake and features) drives qemu-storage-daemon's and
// blockbackend's vhost-user-blk export of a LUKS1 image (aes-256-xts,
// plain64, sha256: qemu-img's defaults), each serving its own
// byte-identical copy, with 4 KiB random reads and writes at queue depth 1
// and 32 and 1 MiB sequential reads and writes at queue depth 4.
//
//	go run ./bench/luks [-runs 5] [-time 3s] [-size 1G] [-jobs RE] [-backend PATH]
//
// Every measurement starts its server afresh on a fresh copy of the
// image, the two backends one after the other, alternating who goes first
// from job to job and run to run. Reported: medians over -runs of IOPS
// (4 KiB) or MB/s (1 MiB), the ratio ours/qsd (target >= 1.0), and each
// backend's CPU time per request (user+system, from /proc), since on a
// shared machine the CPU cost is steadier than the throughput.
//
// The passphrase reaches both backends the same way, with --object
// secret,file= (a 0600 file in the benchmark's directory), so it is not on
// a command line. The image's key slot is made with iter-time=100, so
// that each start-up spends ~0.1 s in PBKDF2 rather than 2 s (the start-up
// is not measured either way). -backend replaces our binary (default:
// built from ./cmd/blockbackend without -race); -backend
// qemu-storage-daemon is the sanity check (ratios near 1).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
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
	"blockbackend/vhostuser/frontend"
)

type flags struct {
	runs    int
	time    time.Duration
	warmup  time.Duration
	size    int64
	jobs    string
	backend string
}

type backend struct{ name, bin string }

// job is one frontend job.
type job struct {
	name      string // "4k randread QD1", ...
	blockSize int
	depth     int
	random    bool
	write     bool
}

func jobs() []job {
	var js []job
	for _, w := range []bool{false, true} {
		kind := map[bool]string{false: "read", true: "write"}[w]
		js = append(js,
			job{"4k rand" + kind + " QD1", 4096, 1, true, w},
			job{"4k rand" + kind + " QD32", 4096, 32, true, w})
	}
	for _, w := range []bool{false, true} {
		kind := map[bool]string{false: "read", true: "write"}[w]
		js = append(js, job{"1M seq" + kind + " QD4", 1 << 20, 4, false, w})
	}
	return js
}

// sample is one measurement: throughput (IOPS or MB/s) and CPU time per
// request of the backend process.
type sample struct {
	value    float64
	cpuPerIO time.Duration
}

func main() {
	var fl flags
	size := flag.String("size", "1G", "virtual size of the exported image (suffixes K, M, G)")
	flag.IntVar(&fl.runs, "runs", 5, "runs (medians are reported)")
	flag.DurationVar(&fl.time, "time", 3*time.Second, "measured time per job")
	flag.DurationVar(&fl.warmup, "warmup", 500*time.Millisecond, "unmeasured warm-up before each job")
	flag.StringVar(&fl.jobs, "jobs", "", "run only the jobs whose name matches this regexp")
	flag.StringVar(&fl.backend, "backend", "", "binary to measure as \"ours\" instead of building ./cmd/blockbackend")
	flag.Parse()
	var err error
	if fl.size, err = benchutil.ParseSize(*size, true); err != nil {
		fail("-size: %v", err)
	}
	if fl.runs < 1 || fl.time <= 0 {
		fail("-runs must be >= 1 and -time > 0")
	}
	jobRE, err := regexp.Compile(fl.jobs)
	if err != nil {
		fail("-jobs: %v", err)
	}
	for _, tool := range []string{"qemu-img", "qemu-storage-daemon"} {
		if _, err := exec.LookPath(tool); err != nil {
			fail("%s not found: apt-get install qemu-utils qemu-system-x86 (Debian 12: qemu-system-common ships qemu-storage-daemon)", tool)
		}
	}
	var selected []job
	for _, j := range jobs() {
		if jobRE.MatchString(j.name) {
			selected = append(selected, j)
		}
	}
	if len(selected) == 0 {
		fail("-jobs %q matches no job", fl.jobs)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	dir, ours, err := benchutil.Workdir("bbluks", fl.backend, logf)
	if err != nil {
		fail("%v", err)
	}
	defer os.RemoveAll(dir)
	exit := func(format string, a ...any) {
		os.RemoveAll(dir)
		fail(format, a...)
	}
	qsd, _ := exec.LookPath("qemu-storage-daemon")
	logf("ours = %s; load average %s", ours, benchutil.LoadAvg())

	secret := filepath.Join(dir, "passphrase")
	if err := os.WriteFile(secret, []byte("bench passphrase"), 0o600); err != nil {
		exit("%v", err)
	}
	master := filepath.Join(dir, "master.luks")
	if err := makeImage(master, secret, fl.size); err != nil {
		exit("%v", err)
	}
	logf("%d MiB LUKS image (aes-256-xts, plain64, sha256; preallocation=full), %d jobs x 2 backends x %d runs",
		fl.size>>20, len(selected), fl.runs)

	backends := []backend{{"qsd", qsd}, {"ours", ours}}
	samples := map[string]map[string][]sample{}
	failures := map[string]map[string]string{}
	for _, j := range selected {
		samples[j.name], failures[j.name] = map[string][]sample{}, map[string]string{}
	}
	failed := map[string]bool{}
	for run := 0; run < fl.runs && ctx.Err() == nil; run++ {
		for ji, j := range selected {
			order := slices.Clone(backends)
			if (run+ji)%2 == 1 {
				slices.Reverse(order)
			}
			for _, b := range order {
				if ctx.Err() != nil {
					break
				}
				if failed[b.name] {
					continue
				}
				s, err := measure(ctx, fl, dir, master, secret, b, j, uint64(run+1))
				if err != nil {
					failures[j.name][b.name] = err.Error()
					logf("run %d %-18s %-4s failed: %v", run+1, j.name, b.name, err)
					var se *startError
					if errors.As(err, &se) {
						failed[b.name] = true
						logf("%s cannot serve the image: its remaining jobs are skipped", b.name)
					}
					continue
				}
				samples[j.name][b.name] = append(samples[j.name][b.name], s)
				logf("run %d %-18s %-4s %10.1f %s  cpu/io %v", run+1, j.name, b.name, s.value, unit(j), s.cpuPerIO)
			}
		}
	}
	if ctx.Err() != nil {
		exit("interrupted")
	}

	fmt.Printf("\nvhost-user-blk export, LUKS aes-256-xts (median of %d runs; 4k: IOPS, 1M: MB/s; target ours/qsd >= 1.00)\n", fl.runs)
	fmt.Printf("%-18s %10s %10s %7s %12s %12s  %s\n", "job", "qsd", "ours", "ratio", "qsd cpu/io", "ours cpu/io", "")
	for _, j := range selected {
		s := samples[j.name]
		val := func(x sample) float64 { return x.value }
		cpu := func(x sample) float64 { return float64(x.cpuPerIO) }
		q, o := benchutil.MedianOf(s["qsd"], val), benchutil.MedianOf(s["ours"], val)
		ratio, note := "-", ""
		if q > 0 && o > 0 {
			ratio = fmt.Sprintf("%.2fx", o/q)
			note = map[bool]string{false: "below target", true: "ok"}[o/q >= 1.0]
		}
		for _, name := range []string{"qsd", "ours"} {
			if e := failures[j.name][name]; e != "" && len(s[name]) == 0 {
				note += fmt.Sprintf(" %s failed: %s", name, benchutil.Short(benchutil.FirstLine(e)))
			}
		}
		fmt.Printf("%-18s %10s %10s %7s %12v %12v  %s\n", j.name, benchutil.Num(q), benchutil.Num(o), ratio,
			time.Duration(benchutil.MedianOf(s["qsd"], cpu)).Round(100*time.Nanosecond),
			time.Duration(benchutil.MedianOf(s["ours"], cpu)).Round(100*time.Nanosecond), strings.TrimSpace(note))
	}
	logf("load average %s", benchutil.LoadAvg())
}

func unit(j job) string {
	if j.blockSize >= 1<<20 {
		return "MB/s"
	}
	return "IOPS"
}

// makeImage creates the master image with qemu-img: LUKS with QEMU's
// default algorithms, the payload written in full (preallocation=full)
// so that every page of it exists in tmpfs.
func makeImage(path, secret string, size int64) error {
	var out []byte
	var err error
	for try := 0; try < 5; try++ {
		out, err = exec.Command("qemu-img", "create", "-q", "-f", "luks",
			"--object", "secret,id=sec0,file="+secret,
			"-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256,iter-time=100,preallocation=full",
			path, strconv.FormatInt(size, 10)).CombinedOutput()
		// qemu-img's PBKDF2 calibration fails now and then on a busy
		// machine ("Unable to get accurate CPU usage"): try again.
		if err == nil || !strings.Contains(string(out), "accurate CPU usage") {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("qemu-img create -f luks: %v: %s", err, out)
	}
	return nil
}

// serverArgs is qemu-storage-daemon's command line, which blockbackend
// takes verbatim: the secret object, a file node (page cache, thread pool
// AIO, as bench/vhost) under a luks node, exported writable on one queue.
func serverArgs(img, secret, sock string) []string {
	return []string{
		"--object", "secret,id=sec0,file=" + secret,
		"--blockdev", "driver=file,node-name=f,filename=" + img + ",cache.direct=off,aio=threads",
		"--blockdev", "driver=luks,node-name=d,file=f,key-secret=sec0",
		"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=" + sock + ",writable=on,num-queues=1",
	}
}

// startError is a backend that did not start or accept the frontend.
type startError struct{ err error }

func (e *startError) Error() string { return e.err.Error() }

// measure runs one job on a fresh image copy and a fresh server.
func measure(ctx context.Context, fl flags, dir, master, secret string, b backend, j job, seed uint64) (sample, error) {
	img := filepath.Join(dir, b.name+".luks")
	_ = os.Remove(img)
	if out, err := exec.Command("cp", master, img).CombinedOutput(); err != nil {
		return sample{}, fmt.Errorf("cp: %v: %s", err, out)
	}
	defer os.Remove(img)
	sock := filepath.Join(dir, b.name+".sock")
	srv, err := benchutil.Start(ctx, benchutil.Options{Name: b.name, Bin: b.bin, Args: serverArgs(img, secret, sock), Sock: sock})
	if err != nil {
		return sample{}, &startError{err}
	}
	defer func() {
		if err := srv.Stop(); err != nil {
			logf("%s: %v", b.name, err)
		}
	}()
	f, err := srv.Dial(ctx, frontend.Options{Profile: frontend.QEMU72, NumQueues: 1, EventIdx: true, Indirect: true,
		MemSize: 128 << 20, IOTimeout: 10 * time.Second})
	if err != nil {
		return sample{}, &startError{fmt.Errorf("connect: %w", err)}
	}
	defer f.Close()
	cfg, err := f.Config()
	if err != nil {
		return sample{}, &startError{err}
	}
	bo := frontend.BenchOptions{Queues: []int{0}, Depth: j.depth, BlockSize: j.blockSize, Random: j.random, Write: j.write,
		Span: int64(cfg.Capacity) * frontend.SectorSize, Seed: seed}
	if fl.warmup > 0 {
		bo.Duration = fl.warmup
		if _, err := frontend.Bench(ctx, f, bo); err != nil {
			return sample{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	bo.Duration = fl.time
	bo.Seed += 1 << 32
	t0, err := srv.CPUTicks()
	if err != nil {
		return sample{}, err
	}
	r, err := frontend.Bench(ctx, f, bo)
	if err != nil {
		return sample{}, err
	}
	t1, err := srv.CPUTicks()
	if err != nil {
		return sample{}, err
	}
	if r.Errors > 0 {
		return sample{}, fmt.Errorf("%d of %d requests completed with an error status", r.Errors, r.IOs)
	}
	s := sample{value: r.IOPS()}
	if j.blockSize >= 1<<20 {
		s.value = r.MBps()
	}
	if r.IOs > 0 {
		s.cpuPerIO = time.Duration(t1-t0) * benchutil.ClockTick / time.Duration(r.IOs)
	}
	return s, nil
}

func logf(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench/luks: "+format+"\n", a...)
	os.Exit(1)
}
