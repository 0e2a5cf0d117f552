// Package qemutest is for tests only (unit tests beside the drivers and
// img, and ./tests): it runs QEMU's tools and retries the one failure of
// theirs that says nothing about the code under test.
//
// qemu-img calibrates PBKDF2 when it makes a LUKS key slot (qemu-img
// create -f luks, encrypt.format=luks, amend of key slots) and on a busy
// machine that sometimes fails with "Unable to get accurate CPU usage".
// The same command run again succeeds.
//
// It lives under internal/ at the top level because the tests of several
// top-level directories (drivers, img, tests) share it, and internal/
// keeps it out of the module's API; nothing but tests imports it.
package qemutest

import (
	"os/exec"
	"strings"
	"time"
)

// Tries is how many times a command is run at most.
const Tries = 8

// calibrationFailure is what qemu-img prints when its PBKDF2 calibration
// fails on a busy machine.
const calibrationFailure = "accurate CPU usage"

// CalibrationFailed reports whether out (a tool's stderr or combined
// output) shows qemu-img's PBKDF2 calibration failure.
func CalibrationFailed(out string) bool {
	return strings.Contains(out, calibrationFailure)
}

// Retry calls run until it succeeds or fails for another reason than the
// calibration failure, at most Tries times, 100 ms apart. run reports
// the output to look at (stderr or combined) and whether it failed; the
// caller keeps whatever else the last call produced.
func Retry(run func() (out string, failed bool)) {
	for try := 1; ; try++ {
		out, failed := run()
		if !failed || !CalibrationFailed(out) || try == Tries {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// CombinedOutput runs the command mk makes (a new one each time, as an
// exec.Cmd runs once) and returns its combined output and error, retried
// as Retry does.
func CombinedOutput(mk func() *exec.Cmd) ([]byte, error) {
	var out []byte
	var err error
	Retry(func() (string, bool) {
		out, err = mk().CombinedOutput()
		return string(out), err != nil
	})
	return out, err
}
