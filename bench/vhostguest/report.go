package main

import (
	"fmt"
	"io"
	"slices"
	"strings"

	"blockbackend/bench/internal/benchutil"
	"blockbackend/tests/guest"
)

// sample is one job on one backend in one run.
type sample struct {
	Run int
	benchutil.Metrics
	AvgLatUs      float64 // the agent's mean request latency
	MaxLatMs      float64
	GuestCPUusPIO float64 // the guest's QEMU process
	DevReqsPerIO  float64 // requests the disk completed per agent I/O (0: unknown)
}

type jobResult struct {
	jobSpec
	Samples  map[string][]sample // by backend
	Failures map[string][]string // by backend
	Median   map[string]sample   // each metric's median on its own
	Ratio    *ratios             // ours / qsd of the medians; nil if either is missing
}

type ratios struct {
	Throughput, AvgLat, CPU float64
}

// results collects the samples and, after summarise, medians and ratios.
type results struct {
	Flags      flags
	Backends   []backendSpec
	Kernel     string
	Jobs       []*jobResult
	LoadBefore string
	LoadAfter  string
	// Views is how the guest sees each backend's disk: limits that
	// change how the guest splits requests (and so its own cost), not a
	// property of the backend's speed.
	Views []string

	byKey map[string]*jobResult
}

// view records the guest's view of backend's disk (the agent's info).
func (r *results) view(backend string, info guest.Result) {
	// A request holds at most max_segments segments of at most
	// max_segment_size, and max_hw_sectors_kb. The agent's buffers are
	// pages that are only merged into larger segments where physically
	// contiguous, so this is an upper bound; with 4 KiB segments it is
	// exact.
	largest := min(info.MaxSegments*info.MaxSegSize>>10, info.MaxHWSectKB)
	v := fmt.Sprintf("%-4s max_segments %d, max_segment_size %d, max_hw_sectors_kb %d (requests up to %d KiB), write cache %s, discard max %d, write-zeroes max %d",
		backend, info.MaxSegments, info.MaxSegSize, info.MaxHWSectKB, largest, info.WriteCache, info.DiscardMax, info.WriteZeroMax)
	if !slices.Contains(r.Views, v) {
		r.Views = append(r.Views, v)
	}
}

func newResults(fl flags, backends []backendSpec, kernel string, jobs []jobSpec) *results {
	r := &results{Flags: fl, Backends: backends, Kernel: kernel, byKey: map[string]*jobResult{}}
	for _, j := range jobs {
		jr := &jobResult{jobSpec: j, Samples: map[string][]sample{}, Failures: map[string][]string{}, Median: map[string]sample{}}
		r.Jobs = append(r.Jobs, jr)
		r.byKey[j.key()] = jr
	}
	return r
}

func (r *results) add(j jobSpec, backend string, s sample) {
	jr := r.byKey[j.key()]
	jr.Samples[backend] = append(jr.Samples[backend], s)
}

func (r *results) fail(j jobSpec, backend string, run int, err error) {
	jr := r.byKey[j.key()]
	msg := strings.SplitN(err.Error(), "\n", 2)[0]
	jr.Failures[backend] = append(jr.Failures[backend], fmt.Sprintf("run %d: %s", run+1, msg))
}

func (r *results) summarise() {
	for _, jr := range r.Jobs {
		for b, ss := range jr.Samples {
			jr.Median[b] = sample{
				Metrics:       benchutil.MedianMetrics(ss, func(s sample) benchutil.Metrics { return s.Metrics }),
				AvgLatUs:      benchutil.MedianOf(ss, func(s sample) float64 { return s.AvgLatUs }),
				MaxLatMs:      benchutil.MedianOf(ss, func(s sample) float64 { return s.MaxLatMs }),
				GuestCPUusPIO: benchutil.MedianOf(ss, func(s sample) float64 { return s.GuestCPUusPIO }),
				DevReqsPerIO:  benchutil.MedianOf(ss, func(s sample) float64 { return s.DevReqsPerIO }),
			}
		}
		q, okq := jr.Median["qsd"]
		o, oko := jr.Median["ours"]
		if okq && oko {
			jr.Ratio = &ratios{Throughput: benchutil.Ratio(o.Throughput(jr.BS), q.Throughput(jr.BS)),
				AvgLat: benchutil.Ratio(o.AvgLatUs, q.AvgLatUs), CPU: benchutil.Ratio(o.CPUusPIO, q.CPUusPIO)}
		}
	}
}

// caveat heads the report: the figures must not be read like bench/vhost's.
const caveat = `NOTE: the guest runs under TCG (emulated CPU; nested KVM hangs here), so its own cost
dominates every request (see "guestCPU"): throughput and latency ratios here UNDERSTATE the
differences between the backends. bench/vhost (no guest) is the primary comparison; this one
checks that its findings survive a real Linux virtio-blk driver. Backend CPU per I/O is the
column least diluted by the guest.`

func (r *results) print(w io.Writer) {
	fl := r.Flags
	fmt.Fprintln(w, "vhost-user-blk under a real guest: Linux", r.Kernel, "in QEMU (TCG), agent bench (O_DIRECT)")
	fmt.Fprintln(w, caveat)
	fmt.Fprintf(w, "image: %d MiB raw on tmpfs (a copy per backend), file node cache.direct=off aio=threads;\n", fl.Size>>20)
	fmt.Fprintf(w, "%d runs x %v per job (+1 s warm-up per guest); one guest per backend, run and num-queues (vCPUs = queues)\n", fl.Runs, fl.Time)
	for _, b := range r.Backends {
		fmt.Fprintf(w, "%-5s %s\n", b.Name+":", b.Bin)
	}
	fmt.Fprintf(w, "load average before %s, after %s\n", r.LoadBefore, r.LoadAfter)
	fmt.Fprintln(w, "guest's view of the disk (its limits decide how the guest splits 1 MiB requests):")
	for _, v := range r.Views {
		fmt.Fprintln(w, "  "+v)
	}
	fmt.Fprintln(w, "Medians over runs; ratio: ours/qsd of the medians; avg: the agent's mean request latency;")
	fmt.Fprintln(w, "CPU: utime+stime per I/O of the backend process / of the guest's QEMU (10 ms ticks);")
	fmt.Fprintln(w, "req/IO: requests the guest's disk completed (/sys/block/vda/stat) per agent I/O.")
	fmt.Fprintln(w)
	const row = "%-18s %-3s %-4s | %9s %9s %6s | %8s %8s %6s | %7s %7s %6s | %8s %8s | %6s %6s\n"
	fmt.Fprintf(w, row, "job", "nq", "", "qsd", "ours", "ratio", "avg qsd", "avg ours", "ratio", "CPU qsd", "CPU ours", "ratio", "guestCPU", "guestCPU", "req/IO", "req/IO")
	fmt.Fprintf(w, row, "", "", "", "", "", "", "µs", "µs", "", "µs/IO", "µs/IO", "", "qsd", "ours", "qsd", "ours")
	for _, jr := range r.Jobs {
		prec := benchutil.ThroughputPrec(jr.BS)
		tput := func(s sample) float64 { return s.Throughput(jr.BS) }
		cell := benchutil.Row[sample]{Median: jr.Median, Failures: jr.Failures}.Cell
		reqs := func(b string) string {
			if s, ok := jr.Median[b]; ok && s.DevReqsPerIO == 0 {
				return "?"
			}
			return cell(b, func(s sample) float64 { return s.DevReqsPerIO }, 2)
		}
		rat := func(f func(*ratios) float64) string {
			if jr.Ratio == nil {
				return benchutil.RatioCell(false, 0)
			}
			return benchutil.RatioCell(true, f(jr.Ratio))
		}
		fmt.Fprintf(w, row, jr.Name, fmt.Sprint(jr.Queues), benchutil.Unit(jr.BS),
			cell("qsd", tput, prec), cell("ours", tput, prec),
			rat(func(r *ratios) float64 { return r.Throughput }),
			cell("qsd", func(s sample) float64 { return s.AvgLatUs }, 1), cell("ours", func(s sample) float64 { return s.AvgLatUs }, 1),
			rat(func(r *ratios) float64 { return r.AvgLat }),
			cell("qsd", func(s sample) float64 { return s.CPUusPIO }, 2), cell("ours", func(s sample) float64 { return s.CPUusPIO }, 2),
			rat(func(r *ratios) float64 { return r.CPU }),
			cell("qsd", func(s sample) float64 { return s.GuestCPUusPIO }, 1), cell("ours", func(s sample) float64 { return s.GuestCPUusPIO }, 1),
			reqs("qsd"), reqs("ours"))
	}
	var failed []string
	for _, jr := range r.Jobs {
		for _, b := range []string{"qsd", "ours"} {
			for _, f := range jr.Failures[b] {
				failed = append(failed, fmt.Sprintf("  %s nq%d %s %s", jr.Name, jr.Queues, b, f))
			}
		}
	}
	benchutil.PrintFailures(w, failed)
}
