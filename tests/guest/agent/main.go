// Command agent is /init of the test guest that package guest builds: it
// mounts /proc, /sys and /dev, loads the virtio modules listed in
// /lib/modules/order, waits for the virtio-blk disks, runs the commands of
// /agent/script (guest's script language) and prints one guest.Result a
// line ("AGENT {json}") on the console, then powers the guest off.
//
// It is a static binary (CGO_ENABLED=0) and needs nothing else in the
// initramfs. It is not a general init: it never reaps children beyond the
// ones it starts, and a watchdog (agent.timeout= on the kernel command line)
// powers off a guest whose I/O hangs.
package main

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"blockbackend/tests/guest"
)

var outMu sync.Mutex

// report prints r in one write so that lines of concurrent reports do not
// mix.
func report(r guest.Result) {
	outMu.Lock()
	defer outMu.Unlock()
	os.Stdout.WriteString(r.String() + "\n")
}

func main() {
	mountAll()
	disks, timeout := kernelArgs()
	time.AfterFunc(timeout, func() {
		report(guest.Result{Op: "watchdog", Err: fmt.Sprintf("script not finished after %v", timeout)})
		powerOff()
	})
	devs, err := setup(disks)
	ready := guest.Result{Op: "ready", OK: err == nil, Devs: devs, Uptime: uptime()}
	if err != nil {
		ready.Err = err.Error()
	}
	report(ready)
	if err == nil {
		runScript(devs)
	}
	report(guest.Result{Op: "done", OK: true, Uptime: uptime()})
	powerOff()
}

func mountAll() {
	for _, m := range []struct{ src, dir, fs string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		os.MkdirAll(m.dir, 0o755)
		if err := unix.Mount(m.src, m.dir, m.fs, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			report(guest.Result{Op: "mount", Err: fmt.Sprintf("mount %s: %v", m.dir, err)})
		}
	}
}

func kernelArgs() (disks int, timeout time.Duration) {
	disks, timeout = 1, 120*time.Second
	b, _ := os.ReadFile("/proc/cmdline")
	for _, f := range strings.Fields(string(b)) {
		if v, ok := strings.CutPrefix(f, "agent.disks="); ok {
			if n, err := strconv.Atoi(v); err == nil && n >= 0 {
				disks = n
			}
		}
		if v, ok := strings.CutPrefix(f, "agent.timeout="); ok {
			if n, err := strconv.Atoi(v); err == nil && n > 0 {
				timeout = time.Duration(n) * time.Second
			}
		}
	}
	return disks, timeout
}

func uptime() float64 {
	b, _ := os.ReadFile("/proc/uptime")
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

func powerOff() {
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	// PID 1 must not return; the kernel would panic (and QEMU, run with
	// -no-reboot and panic=-1, would exit anyway).
	select {}
}

// setup loads the modules and waits for the disks.
func setup(disks int) ([]string, error) {
	order, err := os.ReadFile("/lib/modules/order")
	if err != nil {
		return nil, err
	}
	for _, m := range strings.Fields(string(order)) {
		img, err := os.ReadFile("/lib/modules/" + m + ".ko")
		if err != nil {
			return nil, err
		}
		if err := unix.InitModule(img, ""); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("init_module %s: %w", m, err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		devs, _ := filepath.Glob("/sys/block/vd*")
		for i, d := range devs {
			devs[i] = filepath.Base(d)
		}
		sort.Strings(devs)
		if len(devs) >= disks {
			ok := true
			for _, d := range devs {
				if _, err := os.Stat("/dev/" + d); err != nil {
					ok = false
				}
			}
			if ok {
				return devs, nil
			}
		}
		if time.Now().After(deadline) {
			return devs, fmt.Errorf("found disks %v, want %d", devs, disks)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func runScript(devs []string) {
	b, err := os.ReadFile("/agent/script")
	if err != nil {
		report(guest.Result{Op: "script", Err: err.Error()})
		return
	}
	for i, line := range strings.Split(string(b), "\n") {
		c, err := guest.ParseCommand(line)
		if err != nil {
			report(guest.Result{Op: "parse", Line: i + 1, Err: err.Error()})
			continue
		}
		if c.Op == "" {
			continue
		}
		dev := c.Arg("dev", "")
		delete(c.Args, "dev")
		if dev == "" && len(devs) > 0 {
			dev = devs[0]
		}
		r := run(i+1, dev, c)
		r.Op, r.Line = c.Op, i+1
		if r.Dev == "" && c.Op != "sleep" && c.Op != "sh" {
			r.Dev = dev
		}
		report(r)
	}
}

// args reads the named size arguments, with defaults; any other argument
// is an error.
func args(c guest.Command, spec ...arg) ([]int64, error) {
	known := map[string]bool{}
	var out []int64
	for _, a := range spec {
		k, def := a.k, a.def
		known[k] = true
		if def == need {
			if _, ok := c.Args[k]; !ok {
				return nil, fmt.Errorf("missing argument %s=", k)
			}
		}
		v, err := c.Int(k, def)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	for k := range c.Args {
		if !known[k] && k != "buffered" && k != "rw" {
			return nil, fmt.Errorf("unknown argument %s=", k)
		}
	}
	return out, nil
}

type arg struct {
	k   string
	def int64
}

func p(k string, def int64) arg { return arg{k, def} }

// need marks a required argument.
const need = math.MinInt64

func fail(err error) guest.Result { return guest.Result{Err: err.Error()} }

func run(line int, dev string, c guest.Command) guest.Result {
	path := "/dev/" + dev
	switch c.Op {
	case "info":
		return info(dev)
	case "write", "read", "readzero":
		a, err := args(c, p("off", need), p("len", need), p("seed", 0))
		if err != nil {
			return fail(err)
		}
		if c.Op == "write" {
			return doWrite(path, a[0], a[1], uint64(a[2]))
		}
		return doRead(path, a[0], a[1], uint64(a[2]), c.Op == "readzero", c.Arg("buffered", "") == "1")
	case "flush":
		return withFD(path, unix.O_RDWR, func(fd int) error { return unix.Fsync(fd) })
	case "dropcaches":
		r := withFD(path, unix.O_RDONLY, func(fd int) error {
			return unix.IoctlSetInt(fd, unix.BLKFLSBUF, 0)
		})
		if r.Err != "" {
			return r
		}
		if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
			return fail(err)
		}
		return r
	case "discard", "zero":
		a, err := args(c, p("off", need), p("len", need))
		if err != nil {
			return fail(err)
		}
		req := uint(unix.BLKDISCARD)
		if c.Op == "zero" {
			req = unix.BLKZEROOUT
		}
		rng := [2]uint64{uint64(a[0]), uint64(a[1])}
		return withFD(path, unix.O_RDWR, func(fd int) error {
			return ioctlPtr(fd, req, unsafe.Pointer(&rng))
		})
	case "writefail":
		a, err := args(c, p("off", need), p("len", need))
		if err != nil {
			return fail(err)
		}
		return writeFail(path, a[0], a[1])
	case "waitsize":
		a, err := args(c, p("from", -1), p("timeout", 30))
		if err != nil {
			return fail(err)
		}
		return waitSize(dev, a[0], time.Duration(a[1])*time.Second)
	case "loop":
		a, err := args(c, p("secs", need), p("qd", 4), p("bs", 4096), p("off", 0), p("blocks", 256), p("seed", 1))
		if err != nil {
			return fail(err)
		}
		return loop(line, dev, a[0], int(a[1]), a[2], a[3], a[4], uint64(a[5]))
	case "bench":
		a, err := args(c, p("secs", need), p("qd", 8), p("bs", 4096), p("off", 0), p("size", 0))
		if err != nil {
			return fail(err)
		}
		return bench(path, c.Arg("rw", "randread"), a[0], int(a[1]), a[2], a[3], a[4])
	case "sleep":
		a, err := args(c, p("secs", need))
		if err != nil {
			return fail(err)
		}
		time.Sleep(time.Duration(a[0]) * time.Second)
		return guest.Result{OK: true}
	case "sh":
		out, err := exec.Command("/bin/busybox", "sh", "-c", c.Rest).CombinedOutput()
		r := guest.Result{OK: err == nil, Output: string(out)}
		if err != nil {
			r.Err = err.Error()
		}
		return r
	}
	return fail(fmt.Errorf("unknown operation %q", c.Op))
}

func ioctlPtr(fd int, req uint, p unsafe.Pointer) error {
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(p)); e != 0 {
		return e
	}
	return nil
}

func withFD(path string, flags int, f func(fd int) error) guest.Result {
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(fmt.Errorf("open %s: %w", path, err))
	}
	defer unix.Close(fd)
	if err := f(fd); err != nil {
		return fail(err)
	}
	return guest.Result{OK: true}
}

// alignedBuf is page-aligned memory, as O_DIRECT wants.
func alignedBuf(n int64) []byte {
	size := (n + 4095) &^ 4095
	if size == 0 {
		size = 4096
	}
	b, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		panic(err) // out of memory in a 256 MiB guest: nothing sensible to do
	}
	return b[:n]
}

func freeBuf(b []byte) { _ = unix.Munmap(b[:cap(b)]) }

func pwriteFull(fd int, b []byte, off int64) error { return ioFull("pwrite", unix.Pwrite, fd, b, off) }

func preadFull(fd int, b []byte, off int64) error { return ioFull("pread", unix.Pread, fd, b, off) }

// ioFull repeats op (pread or pwrite) until all of b is done.
func ioFull(name string, op func(int, []byte, int64) (int, error), fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := op(fd, b, off)
		if err != nil {
			return fmt.Errorf("%s at %d: %w", name, off, err)
		}
		if n == 0 {
			return fmt.Errorf("%s at %d: end of device", name, off)
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

const chunk = 1 << 20

func doWrite(path string, off, n int64, seed uint64) guest.Result {
	return withFD(path, unix.O_RDWR|unix.O_DIRECT, func(fd int) error {
		buf := alignedBuf(min(n, chunk))
		defer freeBuf(buf)
		for done := int64(0); done < n; {
			k := min(n-done, chunk)
			guest.Pattern(seed, off+done, buf[:k])
			if err := pwriteFull(fd, buf[:k], off+done); err != nil {
				return err
			}
			done += k
		}
		return nil
	})
}

func doRead(path string, off, n int64, seed uint64, zero, buffered bool) guest.Result {
	flags := unix.O_RDONLY | unix.O_DIRECT
	if buffered {
		flags = unix.O_RDONLY
	}
	return withFD(path, flags, func(fd int) error {
		buf := alignedBuf(min(n, chunk))
		defer freeBuf(buf)
		want := make([]byte, min(n, chunk))
		for done := int64(0); done < n; {
			k := min(n-done, chunk)
			if err := preadFull(fd, buf[:k], off+done); err != nil {
				return err
			}
			clear(want[:k])
			if !zero {
				guest.Pattern(seed, off+done, want[:k])
			}
			if i := firstDiff(buf[:k], want[:k]); i >= 0 {
				return fmt.Errorf("at offset %d: got %#02x, want %#02x", off+done+int64(i), buf[i], want[i])
			}
			done += k
		}
		return nil
	})
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

func writeFail(path string, off, n int64) guest.Result {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return guest.Result{OK: true, Output: "open: " + err.Error()}
	}
	defer unix.Close(fd)
	buf := alignedBuf(n)
	defer freeBuf(buf)
	guest.Pattern(99, off, buf)
	if err := pwriteFull(fd, buf, off); err != nil {
		return guest.Result{OK: true, Output: err.Error()}
	}
	if err := unix.Fsync(fd); err != nil {
		return guest.Result{OK: true, Output: "fsync: " + err.Error()}
	}
	return guest.Result{Err: "the write succeeded"}
}

func readSys(dev, name string) string {
	b, _ := os.ReadFile("/sys/block/" + dev + "/" + name)
	return strings.TrimSpace(string(b))
}

func sysInt(dev, name string) int64 {
	v, _ := strconv.ParseInt(readSys(dev, name), 10, 64)
	return v
}

func info(dev string) guest.Result {
	var r guest.Result
	res := withFD("/dev/"+dev, unix.O_RDONLY, func(fd int) error {
		var size uint64
		if err := ioctlPtr(fd, unix.BLKGETSIZE64, unsafe.Pointer(&size)); err != nil {
			return fmt.Errorf("BLKGETSIZE64: %w", err)
		}
		ro, err := unix.IoctlGetInt(fd, unix.BLKROGET)
		if err != nil {
			return fmt.Errorf("BLKROGET: %w", err)
		}
		r.Size, r.RO = int64(size), ro != 0
		return nil
	})
	if !res.OK {
		return res
	}
	mq, _ := os.ReadDir("/sys/block/" + dev + "/mq")
	r.OK = true
	r.Queues = len(mq)
	r.Sectors = sysInt(dev, "size")
	r.LogicalBlock = sysInt(dev, "queue/logical_block_size")
	r.WriteCache = readSys(dev, "queue/write_cache")
	r.DiscardMax = sysInt(dev, "queue/discard_max_bytes")
	r.WriteZeroMax = sysInt(dev, "queue/write_zeroes_max_bytes")
	r.MaxSegments = sysInt(dev, "queue/max_segments")
	r.MaxSegSize = sysInt(dev, "queue/max_segment_size")
	r.MaxHWSectKB = sysInt(dev, "queue/max_hw_sectors_kb")
	return r
}

func waitSize(dev string, from int64, timeout time.Duration) guest.Result {
	if from < 0 {
		from = sysInt(dev, "size")
	}
	deadline := time.Now().Add(timeout)
	for {
		if s := sysInt(dev, "size"); s != from {
			r := info(dev)
			r.Sectors = s
			return r
		}
		if time.Now().After(deadline) {
			return guest.Result{Sectors: from, Err: fmt.Sprintf("size still %d sectors after %v", from, timeout)}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// loopSeed is the pattern seed of generation gen of a loop block.
func loopSeed(seed, gen uint64) uint64 { return seed<<32 ^ gen }

type stats struct {
	writes, reads, errors atomic.Int64
	maxLat                atomic.Int64 // ns
	sumLat                atomic.Int64 // ns
}

func (s *stats) lat(d time.Duration) {
	s.sumLat.Add(int64(d))
	for {
		m := s.maxLat.Load()
		if int64(d) <= m || s.maxLat.CompareAndSwap(m, int64(d)) {
			return
		}
	}
}

// loop writes generations of Pattern to random blocks of a region from qd
// workers, each owning the blocks i%qd == w, checks a block of its own now
// and then, and at the end checks every block it wrote: what was
// acknowledged must be there. A failed write (the backend gone) is retried
// until it succeeds, so that the block's content is known.
func loop(line int, dev string, secs int64, qd int, bs, off, blocks int64, seed uint64) guest.Result {
	if qd < 1 || bs <= 0 || bs%512 != 0 || blocks < int64(qd) {
		return fail(errors.New("loop: bad qd, bs or blocks"))
	}
	path := "/dev/" + dev
	gens := make([]uint64, blocks) // element i is only touched by worker i%qd
	var st stats
	var once sync.Once
	start := time.Now()
	deadline := start.Add(time.Duration(secs) * time.Second)
	errs := make([]error, qd)
	var wg sync.WaitGroup
	for w := 0; w < qd; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[w] = loopWorker(path, w, qd, bs, off, blocks, seed, gens, deadline, &st, func() {
				if st.writes.Load() >= int64(2*qd) {
					once.Do(func() { report(guest.Result{Op: "loop", Line: line, Event: "running", OK: true, Dev: dev}) })
				}
			})
		}()
	}
	wg.Wait()
	r := guest.Result{OK: true, Writes: st.writes.Load(), Reads: st.reads.Load(), Errors: st.errors.Load(),
		Secs: time.Since(start).Seconds(), MaxLatMs: float64(st.maxLat.Load()) / 1e6}
	for _, err := range errs {
		if err != nil {
			r.OK, r.Err = false, err.Error()
			break
		}
	}
	return r
}

func loopWorker(path string, w, qd int, bs, off, blocks int64, seed uint64, gens []uint64, deadline time.Time, st *stats, progress func()) error {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	buf := alignedBuf(bs)
	defer freeBuf(buf)
	want := make([]byte, bs)
	rnd := rand.New(rand.NewPCG(seed, uint64(w)))
	own := (blocks - int64(w) + int64(qd) - 1) / int64(qd)
	var written []int64
	verify := func(i int64) error {
		o := off + i*bs
		t0 := time.Now()
		if err := preadFull(fd, buf, o); err != nil {
			return err
		}
		st.lat(time.Since(t0))
		st.reads.Add(1)
		guest.Pattern(loopSeed(seed, gens[i]), o, want)
		if j := firstDiff(buf, want); j >= 0 {
			return fmt.Errorf("block %d (offset %d), generation %d: byte %d differs (got %#02x, want %#02x): an acknowledged write is lost",
				i, o, gens[i], j, buf[j], want[j])
		}
		return nil
	}
	for time.Now().Before(deadline) {
		i := int64(w) + int64(qd)*rnd.Int64N(own)
		gen := gens[i] + 1
		o := off + i*bs
		guest.Pattern(loopSeed(seed, gen), o, buf)
		t0 := time.Now()
		for {
			err := pwriteFull(fd, buf, o)
			if err == nil {
				break
			}
			st.errors.Add(1)
			if time.Since(deadline) > 60*time.Second {
				return fmt.Errorf("write still failing after the run: %w", err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		st.lat(time.Since(t0))
		if gens[i] == 0 {
			written = append(written, i)
		}
		gens[i] = gen
		st.writes.Add(1)
		progress()
		if rnd.IntN(2) == 0 {
			j := written[rnd.IntN(len(written))]
			if err := verify(j); err != nil {
				return err
			}
		}
	}
	for _, i := range written {
		if err := verify(i); err != nil {
			return err
		}
	}
	return nil
}

// bench is a fio-like random I/O run: qd workers, each with one request in
// flight, O_DIRECT, block size bs, within [off, off+size).
func bench(path, rw string, secs int64, qd int, bs, off, size int64) guest.Result {
	if qd < 1 || bs <= 0 || bs%512 != 0 {
		return fail(errors.New("bench: bad qd or bs"))
	}
	switch rw {
	case "randread", "randwrite", "randrw", "read", "write":
	default:
		return fail(fmt.Errorf("bench: rw=%q: want randread, randwrite, randrw, read or write", rw))
	}
	// Sequential jobs share one cursor: the qd workers take the next
	// blocks in turn, as fio's sequential jobs with iodepth do.
	var cursor atomic.Int64
	seq := rw == "read" || rw == "write"
	if size == 0 {
		var total uint64
		r := withFD(path, unix.O_RDONLY, func(fd int) error {
			return ioctlPtr(fd, unix.BLKGETSIZE64, unsafe.Pointer(&total))
		})
		if !r.OK {
			return r
		}
		size = int64(total) - off
	}
	nblocks := size / bs
	if nblocks <= 0 {
		return fail(errors.New("bench: region smaller than a block"))
	}
	var st stats
	start := time.Now()
	deadline := start.Add(time.Duration(secs) * time.Second)
	errs := make([]error, qd)
	var wg sync.WaitGroup
	for w := 0; w < qd; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
			if err != nil {
				errs[w] = err
				return
			}
			defer unix.Close(fd)
			buf := alignedBuf(bs)
			defer freeBuf(buf)
			guest.Pattern(uint64(w), 0, buf)
			rnd := rand.New(rand.NewPCG(uint64(w), 7))
			for time.Now().Before(deadline) {
				o := off + rnd.Int64N(nblocks)*bs
				if seq {
					o = off + (cursor.Add(1)-1)%nblocks*bs
				}
				write := rw == "randwrite" || rw == "write" || (rw == "randrw" && rnd.IntN(2) == 0)
				t0 := time.Now()
				if write {
					err = pwriteFull(fd, buf, o)
					st.writes.Add(1)
				} else {
					err = preadFull(fd, buf, o)
					st.reads.Add(1)
				}
				if err != nil {
					errs[w] = err
					return
				}
				st.lat(time.Since(t0))
			}
		}()
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	ops := st.writes.Load() + st.reads.Load()
	r := guest.Result{OK: true, Writes: st.writes.Load(), Reads: st.reads.Load(), Secs: el,
		IOPS: float64(ops) / el, MBps: float64(ops*bs) / el / 1e6, MaxLatMs: float64(st.maxLat.Load()) / 1e6}
	if ops > 0 {
		r.AvgLatUs = float64(st.sumLat.Load()) / float64(ops) / 1e3
	}
	for _, err := range errs {
		if err != nil {
			r.OK, r.Err = false, err.Error()
			break
		}
	}
	return r
}
