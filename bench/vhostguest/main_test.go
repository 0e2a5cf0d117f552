package main

import (
	"errors"
	"io"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"blockbackend/bench/internal/benchutil"
	"blockbackend/tests/guest"
)

func TestParseFlags(t *testing.T) {
	fl, re, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if fl.Runs != 3 || fl.Time != 5*time.Second || fl.Size != 1<<30 || !slices.Equal(fl.Queues, []int{1, 2}) || re.String() != "" {
		t.Errorf("defaults: %+v, jobs %q", fl, re)
	}
	fl, re, err = parseFlags([]string{"-runs", "1", "-time", "2s", "-jobs", "QD32", "-queues", "2", "-size", "256M"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if fl.Runs != 1 || fl.Time != 2*time.Second || fl.Size != 256<<20 || !slices.Equal(fl.Queues, []int{2}) {
		t.Errorf("parsed: %+v", fl)
	}
	sel := selectJobs(fl.Queues, re)
	if len(sel) != 1 || len(sel[0]) != 2 || sel[0][0].Name != "4k randread QD32" || sel[0][1].Name != "4k randwrite QD32" || sel[0][0].Queues != 2 {
		t.Errorf("-jobs QD32 -queues 2 selects %+v", sel)
	}
	for _, bad := range [][]string{
		{"-runs", "0"},
		{"-time", "1500ms"},
		{"-time", "0s"},
		{"-queues", "0"},
		{"-queues", "1,x"},
		{"-queues", "1,1"},
		{"-queues", "9"},
		{"-jobs", "("},
		{"-jobs", "seqread"}, // matches nothing
		{"-size", "1M"},
		{"-size", "1000000"},
		{"extra"},
		{"-nosuchflag"},
	} {
		if _, _, err := parseFlags(bad, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) succeeded", bad)
		}
	}
}

func TestJobs(t *testing.T) {
	want := []string{"4k randread QD1", "4k randread QD32", "4k randwrite QD1", "4k randwrite QD32", "1M read QD4", "1M write QD4"}
	for _, nq := range []int{1, 2} {
		js := jobsFor(nq)
		var names []string
		for _, j := range js {
			names = append(names, j.Name)
			if j.Queues != nq {
				t.Errorf("%s: queues %d, want %d", j.Name, j.Queues, nq)
			}
		}
		if !slices.Equal(names, want) {
			t.Errorf("nq %d: jobs %q, want %q", nq, names, want)
		}
	}
	// Every script line is info, the statistics or a bench command the
	// agent accepts, with the job's parameters on the job's line.
	js := jobsFor(1)
	s := script(js, 2)
	if len(s) != 3+2*len(js) || s[0] != "info" || s[2] != statCmd {
		t.Fatalf("script %q", s)
	}
	for i, line := range s {
		n := i + 1
		ji, stat, isJob := lineJob(n)
		c, err := guest.ParseCommand(line)
		if err != nil {
			t.Fatalf("line %d %q: %v", n, line, err)
		}
		switch {
		case n == 1:
			continue
		case n == 3 || isJob && stat:
			if line != statCmd {
				t.Errorf("line %d %q is not the statistics", n, line)
			}
			continue
		}
		if c.Op != "bench" {
			t.Fatalf("line %d %q: %+v", n, line, c)
		}
		for k := range c.Args {
			if !slices.Contains([]string{"secs", "qd", "bs", "rw"}, k) {
				t.Errorf("line %q: argument %s", line, k)
			}
		}
		if !slices.Contains([]string{"randread", "randwrite", "read", "write"}, c.Arg("rw", "")) {
			t.Errorf("line %q: rw not one of the agent's", line)
		}
		if n == 2 {
			if isJob {
				t.Errorf("the warm-up counts as job %d", ji)
			}
			continue
		}
		j := js[ji]
		secs, _ := c.Int("secs", 0)
		qd, _ := c.Int("qd", 0)
		bs, _ := c.Int("bs", 0)
		if !isJob || jobLine(ji) != n || secs != 2 || int(qd) != j.QD || bs != j.BS || c.Arg("rw", "") != j.RW {
			t.Errorf("line %d %q does not run %+v for 2 s", n, line, j)
		}
	}
}

func TestParseDiskStat(t *testing.T) {
	// Documentation/block/stat.rst: read I/Os, merges, sectors, ticks,
	// then write I/Os, ...
	n, err := parseDiskStat("    1510        0    91634      717    20480      12  163840   900        0     1024     1617        0        0        0        0        0        0\n")
	if err != nil || n != 21990 {
		t.Errorf("parseDiskStat = %d, %v; want 21990", n, err)
	}
	for _, bad := range []string{"", "1 2 3 4", "1 2 3 4 x"} {
		if _, err := parseDiskStat(bad); err == nil {
			t.Errorf("parseDiskStat(%q) succeeded", bad)
		}
	}
}

func TestReport(t *testing.T) {
	fl, _, err := parseFlags([]string{"-runs", "3", "-queues", "1"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	js := jobsFor(1)
	r := newResults(fl, []backendSpec{{"qsd", "/usr/bin/qemu-storage-daemon", ""}, {"ours", "/tmp/blockbackend", ""}}, "6.1.0-test", js)
	for run, iops := range []float64{1000, 3000, 2000} {
		r.add(js[0], "qsd", sample{Run: run + 1, Metrics: benchutil.Metrics{IOPS: iops, CPUusPIO: 10, IOs: int64(iops)},
			AvgLatUs: 1e6 / iops, GuestCPUusPIO: 400, DevReqsPerIO: 1})
		r.add(js[0], "ours", sample{Run: run + 1, Metrics: benchutil.Metrics{IOPS: iops * 1.1, CPUusPIO: 5, IOs: int64(iops)},
			AvgLatUs: 1e6 / iops / 1.1, GuestCPUusPIO: 380})
	}
	r.add(js[4], "qsd", sample{Run: 1, Metrics: benchutil.Metrics{MBps: 500, IOPS: 476}})
	r.fail(js[4], "ours", 0, errors.New("guest ended early\nconsole: ..."))
	r.view("qsd", guest.Result{MaxSegments: 126, MaxSegSize: 4096, MaxHWSectKB: 1280, WriteCache: "write back"})
	r.view("qsd", guest.Result{MaxSegments: 126, MaxSegSize: 4096, MaxHWSectKB: 1280, WriteCache: "write back"})
	r.summarise()
	jr := r.Jobs[0]
	if jr.Median["qsd"].IOPS != 2000 || jr.Ratio == nil || !near(jr.Ratio.Throughput, 1.1) || !near(jr.Ratio.CPU, 0.5) || !near(jr.Ratio.AvgLat, 1/1.1) {
		t.Errorf("medians %+v, ratios %+v", jr.Median, jr.Ratio)
	}
	if r.Jobs[4].Ratio != nil {
		t.Errorf("a ratio with ours failed: %+v", r.Jobs[4].Ratio)
	}
	var b strings.Builder
	r.print(&b)
	out := b.String()
	t.Log("\n" + out)
	for _, want := range []string{
		"UNDERSTATE", "bench/vhost", "TCG",
		"3 runs x 5s per job",
		"guest's view of the disk (its limits decide how the guest splits 1 MiB requests):\n  qsd  max_segments 126, max_segment_size 4096, max_hw_sectors_kb 1280 (requests up to 504 KiB), write cache write back, discard max 0, write-zeroes max 0\nMedians",
		"4k randread QD1    1   IOPS |      2000      2200  1.10x |",
		"|   10.00    5.00  0.50x |    400.0    380.0 |   1.00      ?\n",
		"1M read QD4        1   MB/s |     500.0    FAILED      - |",
		"failures:\n  1M read QD4 nq1 ours run 1: guest ended early\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if !regexp.MustCompile(`(?m)^4k randwrite QD1 +1 +IOPS \|[^0-9]*$`).MatchString(out) {
		t.Errorf("a job without samples shows numbers")
	}
}

func near(a, b float64) bool { return a > b*0.999 && a < b*1.001 }
