package benchutil

import (
	"fmt"
	"io"
)

// The comparison tables of bench/vhost and bench/vhostguest: one row per
// job, a pair of columns (qsd, ours) per metric and their ratio. Each
// program keeps its own columns; the cells, the headline metric and the
// list of failed runs are the same in both.

// Unit names Metrics.Throughput's unit, and ThroughputPrec the decimals it is
// printed with.
func Unit[N ~int | ~int64](blockSize N) string {
	if blockSize >= 1<<20 {
		return "MB/s"
	}
	return "IOPS"
}

// ThroughputPrec: see Unit.
func ThroughputPrec[N ~int | ~int64](blockSize N) int {
	if blockSize >= 1<<20 {
		return 1
	}
	return 0
}

// Ratio is a/b, or 0 when b is 0.
func Ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// Row holds one job's per-backend medians (S is the program's sample
// type) and failed runs, and formats them as table cells.
type Row[S any] struct {
	Median   map[string]S
	Failures map[string][]string
}

// Cell is f of backend's median with prec decimals; "FAILED" when the
// backend has no result because its runs failed, "-" when it has none.
func (r Row[S]) Cell(backend string, f func(S) float64, prec int) string {
	s, ok := r.Median[backend]
	if !ok {
		if len(r.Failures[backend]) > 0 {
			return "FAILED"
		}
		return "-"
	}
	return fmt.Sprintf("%.*f", prec, f(s))
}

// RatioCell is v as "1.23x", or "-" when it is not known (a median is
// missing).
func RatioCell(known bool, v float64) string {
	if !known {
		return "-"
	}
	return fmt.Sprintf("%.2fx", v)
}

// PrintFailures prints the failed runs' lines under "failures:" after a
// blank line; nothing when there are none.
func PrintFailures(w io.Writer, lines []string) {
	if len(lines) == 0 {
		return
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "failures:")
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
}

// Metrics are what every comparison measures of a job on a backend in
// one run (or their medians); the programs' samples embed it beside
// their own measurements. The JSON names are bench/vhost's -json output.
type Metrics struct {
	IOPS     float64 `json:"iops"`
	MBps     float64 `json:"mbps"`
	CPUusPIO float64 `json:"cpu_us_per_io"` // the backend process's utime+stime per I/O
	IOs      int64   `json:"ios"`
}

// Throughput is a job's headline number: MB/s for blocks of 1 MiB or
// more, IOPS for smaller ones.
func (m Metrics) Throughput(blockSize int64) float64 {
	if blockSize >= 1<<20 {
		return m.MBps
	}
	return m.IOPS
}

// MedianMetrics is each metric's median on its own over the samples ss,
// whose Metrics m returns.
func MedianMetrics[T any](ss []T, m func(T) Metrics) Metrics {
	return Metrics{
		IOPS:     MedianOf(ss, func(s T) float64 { return m(s).IOPS }),
		MBps:     MedianOf(ss, func(s T) float64 { return m(s).MBps }),
		CPUusPIO: MedianOf(ss, func(s T) float64 { return m(s).CPUusPIO }),
		IOs:      int64(MedianOf(ss, func(s T) float64 { return float64(m(s).IOs) })),
	}
}
