package main

import (
	"cmp"
	"fmt"
	"io"
	"slices"

	"blockbackend/bench/internal/benchutil"
)

// results collects the samples of every job and backend and, after
// summarise, their medians, ratios and targets. It is also the -json
// output.
type results struct {
	Config     config        `json:"config"`
	Negotiated []negotiation `json:"negotiated"`
	Jobs       []*jobResult  `json:"jobs"`
	Targets    []target      `json:"targets,omitempty"`
	LoadBefore string        `json:"loadavg_before"`
	LoadAfter  string        `json:"loadavg_after"`

	byName map[string]*jobResult
}

// negotiation is what the frontend agreed with one backend.
type negotiation struct {
	Backend  string `json:"backend"`
	Queues   int    `json:"queues"`
	Virtio   string `json:"virtio_features"`
	Protocol string `json:"protocol_features"`
}

type jobResult struct {
	jobSpec
	Samples  map[string][]sample `json:"samples"`            // by backend, successful runs
	Failures map[string][]string `json:"failures,omitempty"` // by backend
	Median   map[string]sample   `json:"median"`             // each metric's median on its own
	// Spread is each backend's (max-min)/2/median of the throughput, a
	// measure of the run-to-run noise.
	Spread map[string]float64 `json:"spread"`
	// Ratios are ours / qsd of the medians (absent if either is missing).
	Ratio *ratios `json:"ratio,omitempty"`
}

type ratios struct {
	Throughput float64 `json:"throughput"`
	// PairedThroughput is the median over runs of ours/qsd within the
	// run (measured seconds apart), less sensitive to slow drifts in
	// background load than the ratio of the medians.
	PairedThroughput float64 `json:"paired_throughput"`
	P50              float64 `json:"p50"`
	CPU              float64 `json:"cpu_per_io"`
}

// target is one goal checked on one job.
type target struct {
	Job    string  `json:"job"`
	Metric string  `json:"metric"`
	Want   string  `json:"want"`
	Ratio  float64 `json:"ratio"`
	Met    bool    `json:"met"`
	Known  bool    `json:"known"` // false: a median was missing
}

func newResults(cfg config, jobs []jobSpec) *results {
	r := &results{Config: cfg, byName: map[string]*jobResult{}}
	for _, j := range jobs {
		jr := &jobResult{jobSpec: j, Samples: map[string][]sample{}, Failures: map[string][]string{}, Median: map[string]sample{},
			Spread: map[string]float64{}}
		r.Jobs = append(r.Jobs, jr)
		r.byName[j.Name] = jr
	}
	return r
}

func (r *results) add(j jobSpec, backend string, s sample) {
	jr := r.byName[j.Name]
	jr.Samples[backend] = append(jr.Samples[backend], s)
}

func (r *results) fail(j jobSpec, backend string, run int, err error) {
	jr := r.byName[j.Name]
	jr.Failures[backend] = append(jr.Failures[backend], fmt.Sprintf("run %d: %v", run+1, err))
}

func (r *results) negotiated(backend string, queues int, virtio, proto uint64) {
	n := negotiation{backend, queues, fmt.Sprintf("%#x", virtio), fmt.Sprintf("%#x", proto)}
	if !slices.Contains(r.Negotiated, n) {
		r.Negotiated = append(r.Negotiated, n)
	}
}

func (r *results) summarise() {
	for _, jr := range r.Jobs {
		bs := int64(jr.BlockSize)
		for b, ss := range jr.Samples {
			jr.Median[b] = sample{
				Metrics: benchutil.MedianMetrics(ss, func(s sample) benchutil.Metrics { return s.Metrics }),
				P50us:   benchutil.MedianOf(ss, func(s sample) float64 { return s.P50us }),
				P99us:   benchutil.MedianOf(ss, func(s sample) float64 { return s.P99us }),
			}
			lo := slices.MinFunc(ss, func(a, b sample) int { return cmp.Compare(a.Throughput(bs), b.Throughput(bs)) })
			hi := slices.MaxFunc(ss, func(a, b sample) int { return cmp.Compare(a.Throughput(bs), b.Throughput(bs)) })
			jr.Spread[b] = benchutil.Ratio(hi.Throughput(bs)-lo.Throughput(bs), 2*jr.Median[b].Throughput(bs))
		}
		q, okq := jr.Median["qsd"]
		o, oko := jr.Median["ours"]
		if okq && oko {
			jr.Ratio = &ratios{Throughput: benchutil.Ratio(o.Throughput(bs), q.Throughput(bs)), P50: benchutil.Ratio(o.P50us, q.P50us), CPU: benchutil.Ratio(o.CPUusPIO, q.CPUusPIO)}
			var paired []float64
			for _, so := range jr.Samples["ours"] {
				for _, sq := range jr.Samples["qsd"] {
					if so.Run == sq.Run {
						paired = append(paired, benchutil.Ratio(so.Throughput(bs), sq.Throughput(bs)))
					}
				}
			}
			jr.Ratio.PairedThroughput = benchutil.Median(paired)
		}
		if !slices.ContainsFunc(r.Config.Backends, func(b backendSpec) bool { return b.Name == "qsd" }) {
			continue // nothing to compare with (-packed)
		}
		t := target{Job: jr.Name, Known: jr.Ratio != nil}
		switch jr.class {
		case "qd32":
			t.Metric, t.Want = "IOPS", ">= 1.20x"
			if t.Known {
				t.Ratio = jr.Ratio.Throughput
				t.Met = t.Ratio >= 1.2
			}
		case "qd1":
			t.Metric, t.Want = "p50 latency", "<= 0.85x"
			if t.Known {
				t.Ratio = jr.Ratio.P50
				t.Met = t.Ratio <= 0.85
			}
		case "seq":
			t.Metric, t.Want = "MB/s", ">= 1.00x"
			if t.Known {
				t.Ratio = jr.Ratio.Throughput
				t.Met = t.Ratio >= 1.0
			}
		default:
			continue
		}
		r.Targets = append(r.Targets, t)
	}
}

func (r *results) print(w io.Writer) {
	c := r.Config
	fmt.Fprintf(w, "vhost-user-blk, no guest: frontend %s\n", c.Frontend)
	fmt.Fprintf(w, "image: %d MiB raw in %s (a copy per backend), file node cache.direct=off aio=threads;\n", c.Size>>20, c.Dir)
	fmt.Fprintf(w, "%d runs x %v per job (+%v warm-up)\n", c.Runs, c.Time, c.Warmup)
	for _, b := range c.Backends {
		fmt.Fprintf(w, "%-5s %s\n", b.Name+":", b.Bin)
	}
	for _, n := range r.Negotiated {
		fmt.Fprintf(w, "negotiated with %s, num-queues=%d: virtio %s, protocol %s\n", n.Backend, n.Queues, n.Virtio, n.Protocol)
	}
	fmt.Fprintf(w, "load average before %s, after %s (other work on the machine is the main source of noise)\n", r.LoadBefore, r.LoadAfter)
	fmt.Fprintln(w, "QDAxB: A queues, B requests in flight on each. Medians over runs; ±: half the range over runs;")
	fmt.Fprintln(w, "ratio: of the medians; paired: median of the per-run ratios; p50: submit-to-reap latency;")
	fmt.Fprintln(w, "CPU: backend process utime+stime per I/O (10 ms ticks).")
	fmt.Fprintln(w)
	const row = "%-20s %-4s | %14s %14s %6s %6s | %7s %7s %6s | %7s %7s %6s\n"
	fmt.Fprintf(w, row, "job", "", "qsd", "ours", "ratio", "paired", "p50 qsd", "p50 ours", "ratio", "CPU qsd", "CPU ours", "ratio")
	fmt.Fprintf(w, row, "", "", "", "", "", "", "µs", "µs", "", "µs/IO", "µs/IO", "")
	for _, jr := range r.Jobs {
		prec := benchutil.ThroughputPrec(jr.BlockSize)
		cell := benchutil.Row[sample]{Median: jr.Median, Failures: jr.Failures}.Cell
		tput := func(b string) string {
			c := cell(b, func(s sample) float64 { return s.Throughput(int64(jr.BlockSize)) }, prec)
			if _, ok := jr.Median[b]; ok {
				c += fmt.Sprintf(" ±%2.0f%%", 100*jr.Spread[b])
			}
			return c
		}
		rat := func(f func(*ratios) float64) string {
			if jr.Ratio == nil {
				return benchutil.RatioCell(false, 0)
			}
			return benchutil.RatioCell(true, f(jr.Ratio))
		}
		fmt.Fprintf(w, row, jr.Name, benchutil.Unit(jr.BlockSize),
			tput("qsd"), tput("ours"),
			rat(func(r *ratios) float64 { return r.Throughput }), rat(func(r *ratios) float64 { return r.PairedThroughput }),
			cell("qsd", func(s sample) float64 { return s.P50us }, 1), cell("ours", func(s sample) float64 { return s.P50us }, 1),
			rat(func(r *ratios) float64 { return r.P50 }),
			cell("qsd", func(s sample) float64 { return s.CPUusPIO }, 2), cell("ours", func(s sample) float64 { return s.CPUusPIO }, 2),
			rat(func(r *ratios) float64 { return r.CPU }))
	}
	if len(r.Targets) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "targets (ours/qsd of the medians):")
		for _, t := range r.Targets {
			verdict, got := "unknown (missing results)", "-"
			if t.Known {
				got = fmt.Sprintf("%.2fx", t.Ratio)
				verdict = map[bool]string{true: "met", false: "NOT met"}[t.Met]
			}
			fmt.Fprintf(w, "  %-20s %-12s %-9s %7s  %s\n", t.Job, t.Metric, t.Want, got, verdict)
		}
	}
	var failed []string
	for _, jr := range r.Jobs {
		for _, b := range sortedKeys(jr.Failures) {
			for _, f := range jr.Failures[b] {
				failed = append(failed, fmt.Sprintf("  %s %s %s", jr.Name, b, f))
			}
		}
	}
	benchutil.PrintFailures(w, failed)
}

func sortedKeys[V any](m map[string]V) []string {
	k := make([]string, 0, len(m))
	for s := range m {
		k = append(k, s)
	}
	slices.Sort(k)
	return k
}
