package permissions

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Holding is one lock on a file as /proc/locks shows it. The kernel merges
// adjacent locks of one owner and type, so QEMU's bytes 100 and 101 show as
// one Holding with Start 100 and End 101.
type Holding struct {
	Kind       string // "OFDLCK", "POSIX", "FLOCK", "LEASE", …
	Write      bool   // a write (exclusive) lock; false for READ
	PID        int    // -1 for OFD locks on kernels that record no owner
	Start, End int64  // inclusive; End is math.MaxInt64 for "EOF"
}

// Holders lists the locks that anyone holds on the file at path, read from
// /proc/locks (locks being waited for are left out). It is meant for tests
// and debugging: "does QEMU hold 100, 101 and 201?". It sees locks of
// every process, within this mount namespace's view of the device.
func Holders(path string) ([]Holding, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("permissions: stat %s: %w", path, err)
	}
	f, err := os.Open("/proc/locks")
	if err != nil {
		return nil, fmt.Errorf("permissions: %w", err)
	}
	defer f.Close()
	return parseProcLocks(f, unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
}

// HeldLockBytes lists, ascending and without repeats, the bytes in QEMU's
// lock area (100 to 299) that anyone holds on the file at path.
func HeldLockBytes(path string) ([]int64, error) {
	hs, err := Holders(path)
	if err != nil {
		return nil, err
	}
	return LockAreaBytes(hs), nil
}

// LockAreaBytes lists, ascending and without repeats, the bytes in QEMU's
// lock area (100 to 299) that hs cover.
func LockAreaBytes(hs []Holding) []int64 {
	set := map[int64]bool{}
	for _, h := range hs {
		lo, hi := max(h.Start, PermByteBase), min(h.End, SharedByteBase+99)
		for b := lo; b <= hi; b++ {
			set[b] = true
		}
	}
	return sortedBytes(set)
}

// maxProcLocksLine bounds one line; real ones are under 100 bytes.
const maxProcLocksLine = 4096

// parseProcLocks reads /proc/locks lines of the form
//
//	1: OFDLCK ADVISORY  READ -1 fe:00:9978714 100 101
//	2: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF
//	3: -> POSIX  ADVISORY  WRITE 1235 08:01:5678 0 EOF   (a waiter)
//
// and returns the held locks on the inode ino of device major:minor (the
// kernel prints both numbers of the device in hex, the inode in decimal).
// Lines it cannot make sense of are skipped: the format is the kernel's, not
// ours, and a debugging aid must not fail on a new lock kind.
func parseProcLocks(r io.Reader, major, minor uint32, ino uint64) ([]Holding, error) {
	var out []Holding
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), maxProcLocksLine)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 8 || !strings.HasSuffix(f[0], ":") || f[1] == "->" {
			continue
		}
		dev := strings.Split(f[5], ":")
		if len(dev) != 3 {
			continue
		}
		maj, err1 := strconv.ParseUint(dev[0], 16, 32)
		mnr, err2 := strconv.ParseUint(dev[1], 16, 32)
		in, err3 := strconv.ParseUint(dev[2], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil || uint32(maj) != major || uint32(mnr) != minor || in != ino {
			continue
		}
		pid, err := strconv.Atoi(f[4])
		if err != nil {
			continue
		}
		start, err := strconv.ParseInt(f[6], 10, 64)
		if err != nil || start < 0 {
			continue
		}
		end := int64(math.MaxInt64)
		if f[7] != "EOF" {
			end, err = strconv.ParseInt(f[7], 10, 64)
			if err != nil || end < start {
				continue
			}
		}
		out = append(out, Holding{Kind: f[1], Write: f[3] == "WRITE", PID: pid, Start: start, End: end})
	}
	if err := sc.Err(); err != nil {
		return out, fmt.Errorf("permissions: reading /proc/locks: %w", err)
	}
	return out, nil
}

// String renders h like a /proc/locks entry, for test failures.
func (h Holding) String() string {
	rw := "READ"
	if h.Write {
		rw = "WRITE"
	}
	end := strconv.FormatInt(h.End, 10)
	if h.End == math.MaxInt64 {
		end = "EOF"
	}
	return fmt.Sprintf("%s %s pid %d %d-%s", h.Kind, rw, h.PID, h.Start, end)
}
