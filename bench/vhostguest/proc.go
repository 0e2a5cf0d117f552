package main

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"blockbackend/bench/internal/benchutil"
)

// guestPID finds the guest's QEMU among our children (package guest does
// not export its process): the child whose name starts with
// "qemu-system" and is not in known (already seen before this boot).
func guestPID(known map[int]bool) (int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	me := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || known[pid] {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		if comm, ppid, _, err := benchutil.ParseStat(b); err == nil && ppid == me && strings.HasPrefix(comm, "qemu-system") {
			return pid, nil
		}
	}
	return 0, errors.New("the guest's QEMU is not among this process's children")
}

// qemuChildren lists our children named qemu-system* (guests of earlier
// boots that are still exiting), so that guestPID does not pick them.
func qemuChildren() map[int]bool {
	m := map[int]bool{}
	for {
		pid, err := guestPID(m)
		if err != nil {
			return m
		}
		m[pid] = true
	}
}
