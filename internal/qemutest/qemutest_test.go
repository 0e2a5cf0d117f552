package qemutest

import (
	"os/exec"
	"testing"
)

func TestRetry(t *testing.T) {
	for _, c := range []struct {
		outs  []string // what each call prints; the last call succeeds if the list runs out
		calls int
	}{
		{[]string{}, 1},
		{[]string{"qemu-img: Unable to get accurate CPU usage"}, 2},
		{[]string{"Unable to get accurate CPU usage", "Unable to get accurate CPU usage"}, 3},
		{[]string{"qemu-img: Could not open 'x'"}, 1},
		{[]string{"accurate CPU usage", "accurate CPU usage", "accurate CPU usage", "accurate CPU usage",
			"accurate CPU usage", "accurate CPU usage", "accurate CPU usage", "accurate CPU usage", "accurate CPU usage"}, Tries},
	} {
		calls := 0
		Retry(func() (string, bool) {
			calls++
			if calls <= len(c.outs) {
				return c.outs[calls-1], true
			}
			return "", false
		})
		if calls != c.calls {
			t.Errorf("%q: %d calls, want %d", c.outs, calls, c.calls)
		}
	}
}

func TestCombinedOutput(t *testing.T) {
	n := 0
	out, err := CombinedOutput(func() *exec.Cmd {
		n++
		if n == 1 {
			return exec.Command("sh", "-c", "echo 'Unable to get accurate CPU usage' >&2; exit 1")
		}
		return exec.Command("sh", "-c", "echo ok")
	})
	if err != nil || string(out) != "ok\n" || n != 2 {
		t.Fatalf("got %q, %v after %d runs; want \"ok\\n\" after 2", out, err, n)
	}
	if _, err := CombinedOutput(func() *exec.Cmd { return exec.Command("sh", "-c", "exit 3") }); err == nil {
		t.Fatal("a failure without the calibration message: no error")
	}
}
