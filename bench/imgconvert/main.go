// Command imgconvert compares `blockbackend img convert` with `qemu-img
// convert` in the same run, on the same source image (on tmpfs when
// /dev/shm exists): for each case it times both tools -runs times,
// alternating, and prints the median wall-clock times and the ratio
// qemu-img / ours (above 1: ours is faster).
//
//	go run ./bench/imgconvert [-runs 5] [-size 1G] [-cases raw-raw,raw-qcow2,qcow2-raw,raw-qcow2-c]
//
// The source is written with qemu-io: half of its clusters hold data
// (random-looking, so that compression has work to do), the rest are
// holes, in runs of varying length. A case whose format blockbackend
// does not have yet is reported as skipped.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

type convCase struct {
	name     string
	srcFmt   string
	dstFmt   string
	compress bool
}

var allCases = []convCase{
	{"raw-raw", "raw", "raw", false},
	{"raw-qcow2", "raw", "qcow2", false},
	{"qcow2-raw", "qcow2", "raw", false},
	{"raw-qcow2-c", "raw", "qcow2", true},
}

func main() {
	runs := flag.Int("runs", 5, "repetitions per case and tool (the median is reported)")
	sizeArg := flag.String("size", "1G", "virtual size of the source image")
	casesArg := flag.String("cases", "raw-raw,raw-qcow2,qcow2-raw,raw-qcow2-c", "cases to run")
	bin := flag.String("blockbackend", "", "blockbackend binary (default: build it)")
	flag.Parse()
	for _, t := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(t); err != nil {
			fail("%s not found: apt-get install qemu-utils", t)
		}
	}
	base := "/dev/shm"
	if st, err := os.Stat(base); err != nil || !st.IsDir() {
		base = os.TempDir()
	}
	dir, err := os.MkdirTemp(base, "bbconv")
	if err != nil {
		fail("%v", err)
	}
	defer os.RemoveAll(dir)
	if *bin == "" {
		*bin = filepath.Join(dir, "blockbackend")
		out, err := exec.Command("go", "build", "-o", *bin, "./cmd/blockbackend").CombinedOutput()
		if err != nil {
			fail("build: %v\n%s", err, out)
		}
	}
	size, err := parseSize(*sizeArg)
	if err != nil {
		fail("-size: %v", err)
	}
	sources := map[string]string{}
	source := func(format string) string {
		if p, ok := sources[format]; ok {
			return p
		}
		p := filepath.Join(dir, "src."+format)
		run("qemu-img", "create", "-q", "-f", format, p, fmt.Sprint(size))
		fill(p, format, size)
		sources[format] = p
		return p
	}
	fmt.Printf("%-14s %12s %12s %8s\n", "case", "qemu-img", "blockbackend", "ratio")
	for _, name := range strings.Split(*casesArg, ",") {
		var c *convCase
		for i := range allCases {
			if allCases[i].name == name {
				c = &allCases[i]
			}
		}
		if c == nil {
			fail("unknown case %q", name)
		}
		if !ours(*bin, c.srcFmt) || !ours(*bin, c.dstFmt) {
			fmt.Printf("%-14s skipped: blockbackend has no %s/%s driver yet\n", c.name, c.srcFmt, c.dstFmt)
			continue
		}
		src := source(c.srcFmt)
		args := []string{"convert", "-f", c.srcFmt, "-O", c.dstFmt}
		if c.compress {
			args = append(args, "-c")
		}
		var tq, tb []time.Duration
		for i := 0; i < *runs; i++ {
			dst := filepath.Join(dir, "dst")
			tq = append(tq, timed(dst, "qemu-img", append(args, src, dst)...))
			tb = append(tb, timed(dst, *bin, append(append([]string{"img"}, args...), src, dst)...))
		}
		mq, mb := median(tq), median(tb)
		fmt.Printf("%-14s %12s %12s %8.2f\n", c.name, mq.Round(time.Millisecond), mb.Round(time.Millisecond), float64(mq)/float64(mb))
	}
}

// ours reports whether blockbackend knows the format.
func ours(bin, format string) bool {
	out, _ := exec.Command(bin, "img", "--help").Output()
	i := strings.Index(string(out), "Supported formats:")
	if i < 0 {
		return false
	}
	line := string(out[i:])
	if j := strings.IndexByte(line, '\n'); j >= 0 {
		line = line[:j]
	}
	for _, f := range strings.Fields(line)[2:] {
		if f == format {
			return true
		}
	}
	return false
}

// fill writes data into half of the image's 64 KiB clusters, in runs of
// 1 to 16 clusters, with patterns that differ per run.
func fill(path, format string, size int64) {
	const cluster = 64 << 10
	var cmds []string
	seed := uint64(1)
	for off := int64(0); off < size; {
		seed = seed*6364136223846793005 + 1442695040888963407
		n := int64(seed>>60+1) * cluster
		n = min(n, size-off)
		if (seed>>32)&1 == 0 {
			cmds = append(cmds, "-c", fmt.Sprintf("write -P %d %d %d", 1+(seed>>40)%250, off, n))
		}
		off += n
	}
	// qemu-io takes many -c; run them in batches.
	for len(cmds) > 0 {
		k := min(len(cmds), 400)
		run("qemu-io", append([]string{"-f", format}, append(cmds[:k:k], path)...)...)
		cmds = cmds[k:]
	}
}

func timed(dst, name string, args ...string) time.Duration {
	os.Remove(dst)
	start := time.Now()
	run(name, args...)
	d := time.Since(start)
	os.Remove(dst)
	return d
}

func run(name string, args ...string) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		fail("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	}
	var v int64
	if _, err := fmt.Sscan(s, &v); err != nil {
		return 0, err
	}
	return v * mult, nil
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "imgconvert: "+format+"\n", a...)
	os.Exit(1)
}
