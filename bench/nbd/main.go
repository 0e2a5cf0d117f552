// Command nbd compares blockbackend's NBD export with qemu-storage-daemon's,
// in the same run, on the same image (on tmpfs when /dev/shm exists):
// `qemu-img bench` drives each server over a UNIX socket with 4 KiB random
// reads and writes at queue depth 1 and 32 and 1 MiB sequential transfers.
// It prints operations per second and the ratio ours / qsd's, repeating
// each case -runs times and reporting the medians.
//
//	go run ./bench/nbd [-runs 5] [-count 20000]
//
// The block layer below the export is the same file/raw graph in both, so
// the ratio measures the server, the graph and the driver path together.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

type benchCase struct {
	name  string
	args  []string
	bytes int64 // per op
}

func main() {
	runs := flag.Int("runs", 5, "repetitions per case (the median is reported)")
	count := flag.Int("count", 20000, "requests per 4k run")
	bin := flag.String("blockbackend", "", "blockbackend binary (default: build it)")
	flag.Parse()
	for _, t := range []string{"qemu-img", "qemu-storage-daemon"} {
		if _, err := exec.LookPath(t); err != nil {
			fail("%s not found: apt-get install qemu-utils qemu-system-x86", t)
		}
	}
	base := "/dev/shm"
	if st, err := os.Stat(base); err != nil || !st.IsDir() {
		base = os.TempDir()
	}
	dir, err := os.MkdirTemp(base, "bbbench")
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
	img := filepath.Join(dir, "disk.img")
	const size = 1 << 30
	if out, err := exec.Command("qemu-img", "create", "-f", "raw", "-o", "preallocation=full", img, strconv.Itoa(size/4)).CombinedOutput(); err != nil {
		fail("create image: %v\n%s", err, out)
	}
	c := strconv.Itoa(*count)
	seqCount := strconv.Itoa(max(*count/20, 200))
	cases := []benchCase{
		{"4k randread QD1", []string{"-c", c, "-d", "1", "-s", "4k", "-S", "1234567"}, 4096},
		{"4k randread QD32", []string{"-c", c, "-d", "32", "-s", "4k", "-S", "1234567"}, 4096},
		{"4k randwrite QD1", []string{"-w", "-c", c, "-d", "1", "-s", "4k", "-S", "1234567"}, 4096},
		{"4k randwrite QD32", []string{"-w", "-c", c, "-d", "32", "-s", "4k", "-S", "1234567"}, 4096},
		{"1M seqread QD8", []string{"-c", seqCount, "-d", "8", "-s", "1M"}, 1 << 20},
		{"1M seqwrite QD8", []string{"-w", "-c", seqCount, "-d", "8", "-s", "1M"}, 1 << 20},
	}
	servers := []struct {
		name string
		cmd  func(sock string) *exec.Cmd
	}{
		{"qsd", func(sock string) *exec.Cmd {
			return exec.Command("qemu-storage-daemon",
				"--blockdev", "driver=file,node-name=f,filename="+img,
				"--blockdev", "driver=raw,node-name=r,file=f",
				"--nbd-server", "addr.type=unix,addr.path="+sock,
				"--export", "type=nbd,id=e,node-name=r,name=r,writable=on")
		}},
		{"blockbackend", func(sock string) *exec.Cmd {
			return exec.Command(*bin,
				"--blockdev", "driver=file,node-name=f,filename="+img,
				"--blockdev", "driver=raw,node-name=r,file=f",
				"--nbd-server", "addr.type=unix,addr.path="+sock,
				"--export", "type=nbd,id=e,node-name=r,name=r,writable=on")
		}},
	}
	fmt.Printf("%-20s %14s %14s %8s\n", "case (median of "+strconv.Itoa(*runs)+")", "qsd ops/s", "ours ops/s", "ratio")
	for _, bc := range cases {
		results := map[string][]float64{}
		for r := 0; r < *runs; r++ {
			// Alternate the order so that neither server always runs warm.
			for i := range servers {
				s := servers[(i+r)%len(servers)]
				sock := filepath.Join(dir, s.name+".sock")
				ops, err := measure(s.cmd(sock), sock, bc)
				if err != nil {
					fail("%s %s: %v", s.name, bc.name, err)
				}
				results[s.name] = append(results[s.name], ops)
			}
		}
		q, o := median(results["qsd"]), median(results["blockbackend"])
		fmt.Printf("%-20s %14.0f %14.0f %7.2fx\n", bc.name, q, o, o/q)
	}
}

var elapsedRE = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)

// measure starts a server, runs one qemu-img bench against it and returns
// operations per second.
func measure(server *exec.Cmd, sock string, bc benchCase) (float64, error) {
	_ = os.Remove(sock)
	var stderr strings.Builder
	server.Stderr = &stderr
	if err := server.Start(); err != nil {
		return 0, err
	}
	defer func() {
		_ = server.Process.Kill()
		_ = server.Wait()
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("server did not start: %s", stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	url := "nbd+unix:///r?socket=" + sock
	args := append([]string{"bench", "-f", "raw", "-t", "none", "-n"}, bc.args...)
	args = append(args, url)
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("qemu-img %v: %v\n%s", args, err, out)
	}
	m := elapsedRE.FindSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("unexpected qemu-img bench output: %s", out)
	}
	secs, _ := strconv.ParseFloat(string(m[1]), 64)
	n, _ := strconv.Atoi(bc.args[indexOf(bc.args, "-c")+1])
	return float64(n) / secs, nil
}

func indexOf(a []string, s string) int {
	for i, x := range a {
		if x == s {
			return i
		}
	}
	return -1
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench/nbd: "+format+"\n", a...)
	os.Exit(1)
}
