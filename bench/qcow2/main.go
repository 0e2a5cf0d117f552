// Command qcow2 compares blockbackend's qcow2 with QEMU's, in the same
// run, on the same images:
//
//   - through the vhost-user-blk export, without a guest: the Go frontend
//     (vhostuser/frontend, QEMU 7.2's handshake and features) drives
//     qemu-storage-daemon and blockbackend, each serving its own
//     byte-identical copy of a qcow2 image, empty (every write allocates)
//     or fully allocated (every cluster holds data), with 4 KiB random
//     reads and writes at queue depth 1 and 32 and 1 MiB sequential reads
//     and writes at queue depth 4;
//
//   - image conversion: `blockbackend img convert` against `qemu-img
//     convert`, raw→qcow2, raw→qcow2 -c (zlib and zstd), qcow2→raw and
//     compressed qcow2→raw, of data of mixed compressibility.
//
//     go run ./bench/qcow2 [-runs 5] [-time 3s] [-size 1G] [-convert-size 256M] [-jobs RE] [-backend PATH]
//
// Every measurement starts its server afresh on a fresh copy of the
// image (a write job on the "empty" image must find it empty), the two
// backends one after the other, alternating who goes first from job to
// job and run to run. Reported: medians over -runs of IOPS (4 KiB) or MB/s
// (1 MiB), the ratio ours/qsd (target >= 1.2), and for conversions the
// median wall time of each tool and the ratio qemu-img time / ours
// (target >= 1.0: ours at least as fast). The output of each of our
// conversions is checked against its source with qemu-img compare, once.
//
// The qcow2 driver is reached only through the binary (its command line
// and img subcommand), so this builds whatever the state of the driver:
// a backend that cannot open qcow2 shows as failed jobs, and when
// `blockbackend img convert --help` fails the conversion part is skipped
// with a message. -backend replaces our binary (default: built from
// ./cmd/blockbackend without -race); -backend qemu-storage-daemon is the
// sanity check of the export part (ratios near 1).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
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
	runs        int
	time        time.Duration
	warmup      time.Duration
	size        int64
	convertSize int64
	jobs        string
	backend     string
	noConvert   bool
	noExport    bool
	refs        bool
}

func main() {
	var fl flags
	size := flag.String("size", "1G", "virtual size of the exported images (suffixes K, M, G)")
	csize := flag.String("convert-size", "256M", "size of the image converted")
	flag.IntVar(&fl.runs, "runs", 5, "runs (medians are reported)")
	flag.DurationVar(&fl.time, "time", 3*time.Second, "measured time per export job")
	flag.DurationVar(&fl.warmup, "warmup", 500*time.Millisecond, "unmeasured warm-up before each read job")
	flag.StringVar(&fl.jobs, "jobs", "", "run only export jobs and conversions whose name matches this regexp")
	flag.StringVar(&fl.backend, "backend", "", "binary to measure as \"ours\" instead of building ./cmd/blockbackend")
	flag.BoolVar(&fl.noConvert, "no-convert", false, "skip the img convert part")
	flag.BoolVar(&fl.noExport, "no-export", false, "skip the vhost-user-blk part")
	flag.BoolVar(&fl.refs, "refs", true, "also run every export job on the reference images (null-co, raw)")
	flag.Parse()
	var err error
	if fl.size, err = benchutil.ParseSize(*size, true); err != nil {
		fail("-size: %v", err)
	}
	if fl.convertSize, err = benchutil.ParseSize(*csize, true); err != nil {
		fail("-convert-size: %v", err)
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

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	dir, ours, err := benchutil.Workdir("bbqcow2", fl.backend, logf)
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

	if !fl.noExport {
		res := runExport(ctx, fl, jobRE, dir, []backend{{"qsd", qsd}, {"ours", ours}})
		if ctx.Err() != nil {
			exit("interrupted")
		}
		res.print(os.Stdout, fl.runs)
	}
	if !fl.noConvert {
		if err := runConvert(ctx, fl, jobRE, dir, ours); err != nil {
			exit("%v", err)
		}
	}
	logf("load average %s", benchutil.LoadAvg())
}

// ------------------------------------------------------- vhost-user-blk part

type backend struct{ name, bin string }

// exportJob is one frontend job on one kind of image.
type exportJob struct {
	image     string // "empty" or "full"; references: "null" or "raw"
	name      string // "4k randread QD1", ...
	blockSize int
	depth     int
	random    bool
	write     bool
}

func (j exportJob) String() string { return j.image + " " + j.name }

// isRef reports whether the job is a reference, without a target: "null"
// is null-co (read-zeroes=on), where the backend does no I/O at all, so
// both backends show the ceiling of the frontend and the ring; "raw" is
// the full image's data as a raw file, the same file I/O without qcow2.
func (j exportJob) isRef() bool { return j.image == "null" || j.image == "raw" }

func exportJobs(refs bool) []exportJob {
	var js []exportJob
	images := []string{"empty", "full"}
	if refs {
		images = append(images, "null", "raw")
	}
	for _, img := range images {
		for _, w := range []bool{false, true} {
			kind := map[bool]string{false: "read", true: "write"}[w]
			js = append(js,
				exportJob{img, "4k rand" + kind + " QD1", 4096, 1, true, w},
				exportJob{img, "4k rand" + kind + " QD32", 4096, 32, true, w})
		}
		for _, w := range []bool{false, true} {
			kind := map[bool]string{false: "read", true: "write"}[w]
			js = append(js, exportJob{img, "1M seq" + kind + " QD4", 1 << 20, 4, false, w})
		}
	}
	return js
}

// exportResults holds every sample, by job and backend.
type exportResults struct {
	jobs     []exportJob
	samples  map[string]map[string][]float64 // job -> backend -> IOPS or MB/s
	failures map[string]map[string]string
}

// runExport measures every job on every backend, -runs times.
func runExport(ctx context.Context, fl flags, jobRE *regexp.Regexp, dir string, backends []backend) *exportResults {
	res := &exportResults{samples: map[string]map[string][]float64{}, failures: map[string]map[string]string{}}
	for _, j := range exportJobs(fl.refs) {
		if jobRE.MatchString(j.String()) {
			res.jobs = append(res.jobs, j)
			res.samples[j.String()] = map[string][]float64{}
			res.failures[j.String()] = map[string]string{}
		}
	}
	if len(res.jobs) == 0 {
		return res
	}
	// The fully allocated master: every cluster holds data (qemu-img
	// convert of a raw image full of data); each measurement gets a copy.
	full := filepath.Join(dir, "full-master.qcow2")
	raw := filepath.Join(dir, "full-src.raw")
	if err := writeData(raw, fl.size, 1, false); err != nil {
		fail("%v", err)
	}
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, full).CombinedOutput(); err != nil {
		fail("qemu-img convert (full image): %v\n%s", err, out)
	}
	if !fl.refs {
		os.Remove(raw)
	}
	logf("export: %d MiB qcow2 images (empty: qemu-img create; full: every cluster allocated), %d jobs x %d backends x %d runs",
		fl.size>>20, len(res.jobs), len(backends), fl.runs)
	failed := map[string]bool{} // backend -> cannot serve at all: skip its jobs
	for run := 0; run < fl.runs && ctx.Err() == nil; run++ {
		for ji, j := range res.jobs {
			order := slices.Clone(backends)
			if (run+ji)%2 == 1 {
				slices.Reverse(order)
			}
			for _, b := range order {
				if ctx.Err() != nil {
					return res
				}
				if failed[b.name] {
					if res.failures[j.String()][b.name] == "" {
						res.failures[j.String()][b.name] = "skipped: it could not serve the image before"
					}
					continue
				}
				v, err := measureExport(ctx, fl, dir, full, raw, b, j, uint64(run+1))
				if err != nil {
					res.failures[j.String()][b.name] = err.Error()
					logf("run %d %-26s %-4s failed: %v", run+1, j, b.name, err)
					var se *startError
					if errors.As(err, &se) {
						failed[b.name] = true
						logf("%s cannot serve the image: its remaining jobs are skipped", b.name)
					}
					continue
				}
				res.samples[j.String()][b.name] = append(res.samples[j.String()][b.name], v)
				unit := map[bool]string{false: "IOPS", true: "MB/s"}[j.blockSize >= 1<<20]
				logf("run %d %-26s %-4s %10.1f %s", run+1, j, b.name, v, unit)
			}
		}
	}
	return res
}

// startError is a backend that did not start or accept the frontend.
type startError struct{ err error }

func (e *startError) Error() string { return e.err.Error() }

// measureExport runs one job on a fresh image copy and a fresh server.
func measureExport(ctx context.Context, fl flags, dir, full, raw string, b backend, j exportJob, seed uint64) (float64, error) {
	img := filepath.Join(dir, b.name+".qcow2")
	_ = os.Remove(img)
	var err error
	switch j.image {
	case "empty":
		var out []byte
		out, err = exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, strconv.FormatInt(fl.size, 10)).CombinedOutput()
		if err != nil {
			err = fmt.Errorf("qemu-img create: %v: %s", err, out)
		}
	case "full":
		err = copyFile(full, img)
	case "raw":
		err = copyFile(raw, img)
	}
	if err != nil {
		return 0, err
	}
	defer os.Remove(img)
	sock := filepath.Join(dir, b.name+".sock")
	args := serverArgs(img, sock, j.image, fl.size)
	srv, err := benchutil.Start(ctx, benchutil.Options{Name: b.bin, Bin: b.bin, Args: args, Sock: sock})
	if err != nil {
		return 0, &startError{err}
	}
	defer func() {
		if err := srv.Stop(); err != nil {
			logf("%s: %v", b.name, err)
		}
	}()
	f, err := srv.Dial(ctx, frontend.Options{Profile: frontend.QEMU72, NumQueues: 1, EventIdx: true, Indirect: true,
		MemSize: 128 << 20, IOTimeout: 10 * time.Second})
	if err != nil {
		return 0, &startError{fmt.Errorf("connect: %w", err)}
	}
	defer f.Close()
	cfg, err := f.Config()
	if err != nil {
		return 0, &startError{err}
	}
	bo := frontend.BenchOptions{Queues: []int{0}, Depth: j.depth, BlockSize: j.blockSize, Random: j.random, Write: j.write,
		Span: int64(cfg.Capacity) * frontend.SectorSize, Seed: seed}
	// A warm-up would allocate clusters of the empty image before the
	// measurement: only read jobs get one.
	if fl.warmup > 0 && !j.write {
		bo.Duration = fl.warmup
		if _, err := frontend.Bench(ctx, f, bo); err != nil {
			return 0, fmt.Errorf("warm-up: %w", err)
		}
	}
	bo.Duration = fl.time
	bo.Seed += 1 << 32
	bt0, _ := srv.CPUTicks()
	ft0, _ := benchutil.CPUTicks(os.Getpid())
	r, err := frontend.Bench(ctx, f, bo)
	if err != nil {
		return 0, err
	}
	bt1, _ := srv.CPUTicks()
	ft1, _ := benchutil.CPUTicks(os.Getpid())
	if r.IOs > 0 {
		// What the backend costs, and what it costs the frontend: CPU
		// per I/O of each process, and the frontend's notifications.
		tick := float64(benchutil.ClockTick) / float64(time.Microsecond)
		logf("    %s %s: CPU per I/O %.2f us backend, %.2f us frontend; kicks/IO %.3f, frontend sleeps/IO %.3f",
			b.name, j, float64(bt1-bt0)*tick/float64(r.IOs), float64(ft1-ft0)*tick/float64(r.IOs),
			float64(r.Kicks)/float64(r.IOs), float64(r.Sleeps)/float64(r.IOs))
	}
	if r.Errors > 0 {
		return 0, fmt.Errorf("%d of %d requests completed with an error status", r.Errors, r.IOs)
	}
	if j.blockSize >= 1<<20 {
		return r.MBps(), nil
	}
	return r.IOPS(), nil
}

func (res *exportResults) print(w *os.File, runs int) {
	if len(res.jobs) == 0 {
		return
	}
	fmt.Fprintf(w, "\nvhost-user-blk export, qcow2 (median of %d runs; 4k: IOPS, 1M: MB/s; target ours/qsd >= 1.20)\n", runs)
	fmt.Fprintf(w, "%-28s %12s %12s %8s  %s\n", "job", "qsd", "ours", "ratio", "")
	refs := false
	for _, j := range res.jobs {
		if j.isRef() && !refs {
			refs = true
			fmt.Fprintf(w, "references, no target (null: null-co, the frontend and ring alone; raw: the full image's data as a raw file):\n")
		}
		s := res.samples[j.String()]
		q, o := benchutil.Median(s["qsd"]), benchutil.Median(s["ours"])
		ratio, note := "-", ""
		if q > 0 && o > 0 {
			ratio = fmt.Sprintf("%.2fx", o/q)
			note = map[bool]string{false: "below target", true: "ok"}[o/q >= 1.2]
			if j.isRef() {
				note = ""
			}
		}
		for _, name := range []string{"qsd", "ours"} {
			if e := res.failures[j.String()][name]; e != "" && len(s[name]) == 0 {
				note += fmt.Sprintf(" %s failed: %s", name, benchutil.Short(benchutil.FirstLine(e)))
			}
		}
		fmt.Fprintf(w, "%-28s %12s %12s %8s  %s\n", j, benchutil.Num(q), benchutil.Num(o), ratio, strings.TrimSpace(note))
	}
}

// ---------------------------------------------------------- img convert part

type convertCase struct {
	name string
	src  string // "raw" or "qcow2" or "qcow2c" (compressed)
	args []string
	out  string // output format
}

func runConvert(ctx context.Context, fl flags, jobRE *regexp.Regexp, dir, ours string) error {
	if out, err := exec.Command(ours, "img", "convert", "--help").CombinedOutput(); err != nil {
		fmt.Printf("\nimg convert: skipped: `%s img convert --help` failed (%v): %s\n", filepath.Base(ours), err, benchutil.FirstLine(string(out)))
		return nil
	}
	cases := []convertCase{
		{"raw -> qcow2", "raw", []string{"-O", "qcow2"}, "qcow2"},
		{"raw -> qcow2 -c (zlib)", "raw", []string{"-O", "qcow2", "-c"}, "qcow2"},
		{"raw -> qcow2 -c (zstd)", "raw", []string{"-O", "qcow2", "-c", "-o", "compression_type=zstd"}, "qcow2"},
		{"qcow2 -> raw", "qcow2", []string{"-O", "raw"}, "raw"},
		{"qcow2 (compressed) -> raw", "qcow2c", []string{"-O", "raw"}, "raw"},
	}
	var selected []convertCase
	for _, c := range cases {
		if jobRE.MatchString("convert " + c.name) {
			selected = append(selected, c)
		}
	}
	if len(selected) == 0 {
		return nil
	}
	srcs := map[string]string{
		"raw":    filepath.Join(dir, "conv-src.raw"),
		"qcow2":  filepath.Join(dir, "conv-src.qcow2"),
		"qcow2c": filepath.Join(dir, "conv-src-c.qcow2"),
	}
	// Data of mixed compressibility, with holes: random, text-like,
	// repeated bytes, and zero runs (which a sparse convert skips).
	if err := writeData(srcs["raw"], fl.convertSize, 2, true); err != nil {
		return err
	}
	for _, s := range []struct {
		name string
		args []string
	}{{"qcow2", nil}, {"qcow2c", []string{"-c"}}} {
		args := append([]string{"convert", "-f", "raw", "-O", "qcow2"}, s.args...)
		if out, err := exec.Command("qemu-img", append(args, srcs["raw"], srcs[s.name])...).CombinedOutput(); err != nil {
			return fmt.Errorf("preparing %s: %v\n%s", s.name, err, out)
		}
	}
	logf("convert: %d MiB of mixed data, %d cases x 2 tools x %d runs", fl.convertSize>>20, len(selected), fl.runs)
	tools := []backend{{"qemu-img", "qemu-img"}, {"ours", ours}}
	times := map[string]map[string][]time.Duration{}
	failures := map[string]string{}
	checked := map[string]bool{}
	for run := 0; run < fl.runs && ctx.Err() == nil; run++ {
		for ci, c := range selected {
			if times[c.name] == nil {
				times[c.name] = map[string][]time.Duration{}
			}
			order := slices.Clone(tools)
			if (run+ci)%2 == 1 {
				slices.Reverse(order)
			}
			for _, tool := range order {
				if failures[c.name+tool.name] != "" {
					continue
				}
				dst := filepath.Join(dir, "conv-dst."+c.out)
				_ = os.Remove(dst)
				srcFmt := map[string]string{"raw": "raw", "qcow2": "qcow2", "qcow2c": "qcow2"}[c.src]
				args := append([]string{"convert", "-f", srcFmt}, c.args...)
				args = append(args, srcs[c.src], dst)
				var cmd *exec.Cmd
				if tool.name == "ours" {
					cmd = exec.CommandContext(ctx, tool.bin, append([]string{"img"}, args...)...)
				} else {
					cmd = exec.CommandContext(ctx, tool.bin, args...)
				}
				t0 := time.Now()
				out, err := cmd.CombinedOutput()
				d := time.Since(t0)
				if err != nil {
					failures[c.name+tool.name] = fmt.Sprintf("%v: %s", err, benchutil.FirstLine(string(out)))
					logf("run %d convert %-28s %-8s failed: %v\n%s", run+1, c.name, tool.name, err, out)
					continue
				}
				// A fast wrong answer is no answer: compare our output
				// with the source once per case.
				if tool.name == "ours" && !checked[c.name] {
					if out, err := exec.Command("qemu-img", "compare", "-f", srcFmt, "-F", c.out, srcs[c.src], dst).CombinedOutput(); err != nil {
						failures[c.name+tool.name] = "output differs from the source: " + benchutil.FirstLine(string(out))
						logf("convert %s: our output differs from the source: %v\n%s", c.name, err, out)
						continue
					}
					if c.out == "qcow2" {
						if out, err := exec.Command("qemu-img", "check", dst).CombinedOutput(); err != nil {
							failures[c.name+tool.name] = "qemu-img check: " + benchutil.FirstLine(string(out))
							logf("convert %s: qemu-img check of our output: %v\n%s", c.name, err, out)
							continue
						}
					}
					checked[c.name] = true
				}
				times[c.name][tool.name] = append(times[c.name][tool.name], d)
				logf("run %d convert %-28s %-8s %8.3fs", run+1, c.name, tool.name, d.Seconds())
			}
		}
	}
	if ctx.Err() != nil {
		return errors.New("interrupted")
	}
	fmt.Printf("\nimg convert, %d MiB (median wall time of %d runs; ratio = qemu-img time / ours, target >= 1.00)\n", fl.convertSize>>20, fl.runs)
	fmt.Printf("%-28s %12s %12s %8s  %s\n", "case", "qemu-img", "ours", "ratio", "")
	for _, c := range selected {
		q, o := medianDur(times[c.name]["qemu-img"]), medianDur(times[c.name]["ours"])
		ratio, note := "-", ""
		if q > 0 && o > 0 {
			ratio = fmt.Sprintf("%.2fx", q.Seconds()/o.Seconds())
			note = map[bool]string{false: "below target", true: "ok"}[q >= o]
		}
		for _, name := range []string{"qemu-img", "ours"} {
			if e := failures[c.name+name]; e != "" {
				note += " " + name + " failed: " + benchutil.Short(e)
			}
		}
		fmt.Printf("%-28s %12s %12s %8s  %s\n", c.name, durStr(q), durStr(o), ratio, strings.TrimSpace(note))
	}
	return nil
}

// ------------------------------------------------------------------ helpers

// writeData writes size bytes of deterministic data: non-zero throughout
// (mixed=false: every cluster of a converted image is allocated), or of
// mixed compressibility with zero runs (mixed=true).
func writeData(path string, size int64, seed uint64, mixed bool) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(seed, 0xbe7c))
	buf := make([]byte, 1<<20)
	const alphabet = "the quick brown fox jumps over a lazy dog; qcow2 clusters\n"
	for off := int64(0); off < size; off += int64(len(buf)) {
		p := buf[:min(int64(len(buf)), size-off)]
		for i := 0; i < len(p); {
			n := min(len(p)-i, 4096*(1+r.IntN(32)))
			q := p[i : i+n]
			kind := 0
			if mixed {
				kind = r.IntN(4)
			}
			switch kind {
			case 0:
				for k := 0; k+8 <= len(q); k += 8 {
					v := r.Uint64() | 1
					for b := 0; b < 8; b++ {
						q[k+b] = byte(v >> (8 * b))
					}
				}
			case 1:
				for k := range q {
					q[k] = alphabet[r.IntN(len(alphabet))]
				}
			case 2:
				c := byte(1 + r.IntN(255))
				for k := range q {
					q[k] = c
				}
			case 3:
				clear(q)
			}
			i += n
		}
		if _, err := f.Write(p); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

func copyFile(from, to string) error {
	out, err := exec.Command("cp", "--sparse=always", from, to).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cp %s: %v: %s", from, err, out)
	}
	return nil
}

func medianDur(v []time.Duration) time.Duration {
	f := make([]float64, len(v))
	for i, d := range v {
		f[i] = float64(d)
	}
	return time.Duration(benchutil.Median(f))
}

func durStr(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3fs", d.Seconds())
}

func logf(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench/qcow2: "+format+"\n", a...)
	os.Exit(1)
}
