package crypto

import (
	"fmt"
	"math"
	"runtime"
	"time"

	"golang.org/x/crypto/pbkdf2"
	"golang.org/x/sys/unix"
)

// PBKDF2 derives keyLen bytes from pass and salt (PKCS #5 v2.0 with HMAC
// over h).
func PBKDF2(h HashAlg, pass, salt []byte, iter uint32, keyLen int) ([]byte, error) {
	f := h.newFunc()
	if f == nil {
		return nil, &UnsupportedError{fmt.Sprintf("Hash algorithm '%s' not supported", h)}
	}
	if iter == 0 {
		return nil, fmt.Errorf("PBKDF2 with zero iterations")
	}
	return pbkdf2.Key(pass, salt, int(iter), keyLen, f), nil
}

// threadCPU is the CPU time the calling OS thread has used.
func threadCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0, err
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}

// Iterations calibrates PBKDF2 as QEMU's iter-time option asks: the
// number of iterations that derive keyLen bytes with h in about iterTime
// of CPU time on this machine. CPU time of the calling thread, not wall
// time, so that a busy machine does not lower the count.
func Iterations(h HashAlg, keyLen int, iterTime time.Duration) (uint64, error) {
	f := h.newFunc()
	if f == nil {
		return 0, &UnsupportedError{fmt.Sprintf("Hash algorithm '%s' not supported", h)}
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Measure for a fraction of the target, at least a few ms so that
	// the clock's granularity does not matter, at most half a second.
	minMeasure := min(max(iterTime/4, 5*time.Millisecond), 500*time.Millisecond)
	pass, salt := []byte("calibration"), make([]byte, 32)
	for iter := 1 << 8; ; iter *= 2 {
		start, err := threadCPU()
		if err != nil {
			return 0, err
		}
		pbkdf2.Key(pass, salt, iter, keyLen, f)
		end, err := threadCPU()
		if err != nil {
			return 0, err
		}
		spent := end - start
		if spent >= minMeasure || iter >= 1<<30 {
			if spent <= 0 {
				spent = 1
			}
			n := float64(iter) * float64(iterTime) / float64(spent)
			if n > math.MaxUint64/2 {
				n = math.MaxUint64 / 2
			}
			return uint64(n), nil
		}
	}
}
