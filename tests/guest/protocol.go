package guest

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// The agent's script language: one command a line, an operation name and
// key=value arguments separated by blanks ("write off=4096 len=4K seed=2").
// Sizes take the suffixes K, M and G (powers of 1024). Blank lines and lines
// starting with # are ignored. The agent runs the commands in order, prints
// one Result per command and powers the guest off after the last.
//
// Operations (dev= selects a disk by name, "vda" by default):
//
//	info                          size, read-only flag, queue count, limits
//	write off= len= seed=         O_DIRECT write of Pattern(seed)
//	read off= len= seed= [buffered=1]  read back and compare with Pattern(seed)
//	readzero off= len= [buffered=1]    read back and expect zeros
//	flush                         fsync(2) on the device (a virtio-blk FLUSH)
//	dropcaches                    BLKFLSBUF and echo 3 > /proc/sys/vm/drop_caches
//	discard off= len=             BLKDISCARD
//	zero off= len=                BLKZEROOUT
//	writefail off= len=           expect the write (or opening for write) to fail
//	waitsize [from=SECTORS] [timeout=SECONDS]  poll /sys/block/DEV/size until it changes
//	loop secs= [qd=] [bs=] [off=] [blocks=] [seed=]  verified random writes for secs
//	bench secs= [qd=] [bs=] [rw=randread|randwrite|randrw|read|write] [off=] [size=]
//	sleep secs=
//	sh CMDLINE                    run CMDLINE with busybox sh, report its output
//
// loop prints an extra Result with Event "running" once its first writes
// have completed, so that the host can disturb the backend while I/O is in
// flight.

// Prefix starts every line the agent prints for the host.
const Prefix = "AGENT "

// Result is one report of the agent, printed as Prefix + JSON on the
// serial console.
type Result struct {
	Op    string `json:"op"`
	Line  int    `json:"line,omitempty"` // 1-based script line, 0 for ready/done
	Event string `json:"event,omitempty"`
	OK    bool   `json:"ok"`
	Err   string `json:"err,omitempty"`
	Dev   string `json:"dev,omitempty"`

	// ready
	Devs   []string `json:"devs,omitempty"`
	Uptime float64  `json:"uptime,omitempty"` // guest seconds since boot

	// info, waitsize
	Size         int64  `json:"size,omitempty"`    // BLKGETSIZE64
	Sectors      int64  `json:"sectors,omitempty"` // /sys/block/DEV/size
	RO           bool   `json:"ro,omitempty"`      // BLKROGET
	Queues       int    `json:"queues,omitempty"`  // entries of /sys/block/DEV/mq
	LogicalBlock int64  `json:"lbs,omitempty"`
	WriteCache   string `json:"write_cache,omitempty"`
	DiscardMax   int64  `json:"discard_max,omitempty"`
	WriteZeroMax int64  `json:"write_zeroes_max,omitempty"`
	MaxSegments  int64  `json:"max_segments,omitempty"`     // seg_max
	MaxSegSize   int64  `json:"max_segment_size,omitempty"` // size_max
	MaxHWSectKB  int64  `json:"max_hw_sectors_kb,omitempty"`

	// loop, bench
	Writes   int64   `json:"writes,omitempty"`
	Reads    int64   `json:"reads,omitempty"`
	Errors   int64   `json:"errors,omitempty"`
	Secs     float64 `json:"secs,omitempty"`
	IOPS     float64 `json:"iops,omitempty"`
	MBps     float64 `json:"mbps,omitempty"`
	MaxLatMs float64 `json:"max_lat_ms,omitempty"`
	AvgLatUs float64 `json:"avg_lat_us,omitempty"`

	// writefail: the errno seen; sh: the output
	Output string `json:"output,omitempty"`
}

// String is the line the agent prints.
func (r Result) String() string {
	b, _ := json.Marshal(r)
	return Prefix + string(b)
}

// ParseLine finds an agent report in one line of console output. ok is
// false for lines that hold none (kernel messages, noise).
func ParseLine(line string) (r Result, ok bool) {
	i := strings.Index(line, Prefix)
	if i < 0 {
		return Result{}, false
	}
	s := strings.TrimSpace(line[i+len(Prefix):])
	if err := json.Unmarshal([]byte(s), &r); err != nil || r.Op == "" {
		return Result{}, false
	}
	return r, true
}

// Command is one parsed script line.
type Command struct {
	Op   string
	Args map[string]string
	Rest string // everything after the operation name (for sh)
}

// ParseCommand parses one script line. A blank or comment line gives an
// empty Op and no error.
func ParseCommand(line string) (Command, error) {
	line = strings.TrimSpace(line)
	if line == "" || strings.HasPrefix(line, "#") {
		return Command{}, nil
	}
	op, rest, _ := strings.Cut(line, " ")
	c := Command{Op: op, Args: map[string]string{}, Rest: strings.TrimSpace(rest)}
	if op == "sh" {
		return c, nil
	}
	for _, f := range strings.Fields(rest) {
		k, v, ok := strings.Cut(f, "=")
		if !ok || k == "" {
			return Command{}, fmt.Errorf("argument %q is not key=value", f)
		}
		if _, dup := c.Args[k]; dup {
			return Command{}, fmt.Errorf("argument %q given twice", k)
		}
		c.Args[k] = v
	}
	return c, nil
}

// Int returns argument k as a size (K, M, G suffixes allowed), def when
// absent.
func (c Command) Int(k string, def int64) (int64, error) {
	v, ok := c.Args[k]
	if !ok {
		return def, nil
	}
	return ParseSize(v)
}

// Arg returns argument k, def when absent.
func (c Command) Arg(k, def string) string {
	if v, ok := c.Args[k]; ok {
		return v
	}
	return def
}

// ParseSize parses a non-negative decimal number with an optional K, M or G
// suffix (powers of 1024).
func ParseSize(s string) (int64, error) {
	mul := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mul, s = 1<<10, s[:len(s)-1]
	case strings.HasSuffix(s, "M"):
		mul, s = 1<<20, s[:len(s)-1]
	case strings.HasSuffix(s, "G"):
		mul, s = 1<<30, s[:len(s)-1]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	if n > (1<<62)/mul {
		return 0, fmt.Errorf("size %q too large", s)
	}
	return n * mul, nil
}

// mix is splitmix64's finaliser: a cheap, well-spread function of a word.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// Pattern fills b with the bytes that a write with seed puts at disk offset
// off. Every byte depends on the seed and on its absolute offset, so a
// block written to or read from the wrong place, or a stale block, shows.
func Pattern(seed uint64, off int64, b []byte) {
	i := 0
	for i < len(b) {
		o := uint64(off) + uint64(i)
		w := mix(seed*0x2545f4914f6cdd1d ^ o>>3)
		if o&7 == 0 && len(b)-i >= 8 {
			binary.LittleEndian.PutUint64(b[i:], w)
			i += 8
			continue
		}
		b[i] = byte(w >> (8 * (o & 7)))
		i++
	}
}

// ErrMismatch is returned by CheckPattern and CheckZero when data differ.
var ErrMismatch = errors.New("data mismatch")

// CheckPattern reads n bytes at off from r and compares them with
// Pattern(seed); the error names the first differing offset.
func CheckPattern(r io.ReaderAt, seed uint64, off, n int64) error {
	return check(r, off, n, func(o int64, want []byte) { Pattern(seed, o, want) })
}

// CheckZero reads n bytes at off from r and expects zeros.
func CheckZero(r io.ReaderAt, off, n int64) error {
	return check(r, off, n, func(int64, []byte) {})
}

func check(r io.ReaderAt, off, n int64, fill func(int64, []byte)) error {
	const chunk = 1 << 20
	got := make([]byte, chunk)
	want := make([]byte, chunk)
	for done := int64(0); done < n; {
		k := min(n-done, chunk)
		if _, err := r.ReadAt(got[:k], off+done); err != nil {
			return fmt.Errorf("reading %d bytes at %d: %w", k, off+done, err)
		}
		clear(want[:k])
		fill(off+done, want[:k])
		for i := int64(0); i < k; i++ {
			if got[i] != want[i] {
				return fmt.Errorf("at offset %d: got %#02x, want %#02x: %w", off+done+i, got[i], want[i], ErrMismatch)
			}
		}
		done += k
	}
	return nil
}

// Script helpers: they format one command line each.

// Write formats "write off= len= seed=".
func Write(off, n int64, seed uint64) string {
	return fmt.Sprintf("write off=%d len=%d seed=%d", off, n, seed)
}

// Read formats "read off= len= seed=" (O_DIRECT, or buffered).
func Read(off, n int64, seed uint64, buffered bool) string {
	s := fmt.Sprintf("read off=%d len=%d seed=%d", off, n, seed)
	if buffered {
		s += " buffered=1"
	}
	return s
}

// OnDev adds dev=NAME to a command line.
func OnDev(dev, cmd string) string { return cmd + " dev=" + dev }
