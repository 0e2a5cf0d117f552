package img

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// cancelAfterWrites cancels a context on its n-th Write.
type cancelAfterWrites struct {
	mu     sync.Mutex
	n      int
	cancel context.CancelFunc
}

func (w *cancelAfterWrites) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n--; w.n == 0 {
		w.cancel()
	}
	return len(p), nil
}

// A conversion whose context is cancelled part-way fails (it used to
// return 0 with most of the target never written, or to hang with writers
// waiting for a turn that no one would pass).
func TestConvertCancelledFails(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "dst.raw")
	if err := os.WriteFile(src, bytes.Repeat([]byte{0xa5}, 16*convertChunk), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, par := range []string{"1", "4"} {
		ctx, cancel := context.WithCancel(context.Background())
		// Write 1 is the 0% of -p; write 2 comes after the first request.
		out := &cancelAfterWrites{n: 2, cancel: cancel}
		var errb bytes.Buffer
		tl := &Tool{Prog: "qemu-img", Stdout: out, Stderr: &errb, Ctx: ctx}
		done := make(chan int, 1)
		go func() { done <- tl.Run([]string{"convert", "-p", "-m", par, "-f", "raw", "-O", "raw", src, dst}) }()
		select {
		case code := <-done:
			if code == 0 {
				t.Errorf("-m %s: a cancelled convert exits 0", par)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("-m %s: a cancelled convert hangs", par)
		}
		cancel()
	}
}
