package benchutil

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseStat(t *testing.T) {
	// A command name with spaces and parentheses; ppid 77, utime 1234, stime 56.
	stat := "4242 (qemu (x) d) S 77 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 3 0 100 1000 10\n"
	comm, ppid, n, err := ParseStat([]byte(stat))
	if err != nil || comm != "qemu (x) d" || ppid != 77 || n != 1290 {
		t.Fatalf("ParseStat = %q, %d, %d, %v; want \"qemu (x) d\", 77, 1290", comm, ppid, n, err)
	}
	for _, bad := range []string{"", "1 (x) S 1 2", "1 (x) S 1 2 3 4 5 6 7 8 9 10 x 12 13", "1 x) S"} {
		if _, _, _, err := ParseStat([]byte(bad)); err == nil {
			t.Errorf("ParseStat(%q) succeeded", bad)
		}
	}
}

func TestCPUTicksSelf(t *testing.T) {
	if _, err := CPUTicks(os.Getpid()); err != nil {
		t.Fatal(err)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		v    []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := Median(c.v); got != c.want {
			t.Errorf("Median(%v) = %v; want %v", c.v, got, c.want)
		}
	}
}

func TestMakeImages(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	if err := MakeImages([]string{a, b}, 2<<20); err != nil {
		t.Fatal(err)
	}
	da, _ := os.ReadFile(a)
	db, _ := os.ReadFile(b)
	if len(da) != 2<<20 || string(da) != string(db) {
		t.Fatalf("images differ or have the wrong size: %d, %d bytes", len(da), len(db))
	}
	for i := 0; i < len(da); i += 8 {
		if da[i]&1 == 0 {
			t.Fatalf("byte %d: %#x, want the low bit set (non-zero data)", i, da[i])
		}
	}
	if err := MakeImages([]string{a}, 1<<20); err == nil {
		t.Error("MakeImages over an existing file succeeded")
	}
	if err := MakeImages([]string{filepath.Join(dir, "c")}, 1000); err == nil {
		t.Error("MakeImages of 1000 bytes succeeded")
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"1G": 1 << 30, "64M": 64 << 20, "8k": 8 << 10, "1048576": 1 << 20} {
		if got, err := ParseSize(in, false); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "G", "-1M", "0", "1T", "99999999999G"} {
		if _, err := ParseSize(bad, false); err == nil {
			t.Errorf("ParseSize(%q) succeeded", bad)
		}
	}
	if _, err := ParseSize("8k", true); err == nil {
		t.Error("ParseSize(8k) of an image succeeded")
	}
}

func TestTableCells(t *testing.T) {
	type s struct{ v float64 }
	r := Row[s]{Median: map[string]s{"ours": {1.234}}, Failures: map[string][]string{"qsd": {"run 1: boom"}}}
	for _, c := range []struct{ got, want string }{
		{r.Cell("ours", func(x s) float64 { return x.v }, 1), "1.2"},
		{r.Cell("qsd", func(x s) float64 { return x.v }, 1), "FAILED"},
		{r.Cell("other", func(x s) float64 { return x.v }, 1), "-"},
		{RatioCell(true, Ratio(3, 2)), "1.50x"},
		{RatioCell(false, 0), "-"},
		{Unit(4096), "IOPS"},
		{Unit(int64(1 << 20)), "MB/s"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
	if Ratio(1, 0) != 0 || (Metrics{IOPS: 10, MBps: 20}).Throughput(4096) != 10 || (Metrics{IOPS: 10, MBps: 20}).Throughput(1<<20) != 20 || ThroughputPrec(1<<20) != 1 {
		t.Error("Ratio/Throughput/ThroughputPrec")
	}
	var b strings.Builder
	PrintFailures(&b, nil)
	PrintFailures(&b, []string{"  j ours run 1: x"})
	if b.String() != "\nfailures:\n  j ours run 1: x\n" {
		t.Errorf("PrintFailures: %q", b.String())
	}
}
