package nbd

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
)

// memCore is the in-memory Backend with only the required methods.
type memCore struct {
	mu      sync.RWMutex
	data    []byte // guarded by mu
	alloc   []bool // guarded by mu: per memGrain block, written since last unmap
	flushes atomic.Int64
	fuas    atomic.Int64
	// gate, when set, is called at the start of every ReadV/WriteV: tests
	// block requests there.
	gate func(ctx context.Context) error
}

const memGrain = 64 << 10

func newMem(size int) *memCore {
	return &memCore{data: make([]byte, size), alloc: make([]bool, (size+memGrain-1)/memGrain)}
}

func (m *memCore) Size() int64 { return int64(len(m.data)) }

func (m *memCore) check(off int64, n int) error {
	if off < 0 || off+int64(n) > int64(len(m.data)) {
		return fmt.Errorf("mem: [%d,+%d) out of range: %w", off, n, syscall.EINVAL)
	}
	return nil
}

func iovLen(iov [][]byte) int {
	n := 0
	for _, b := range iov {
		n += len(b)
	}
	return n
}

func (m *memCore) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	if m.gate != nil {
		if err := m.gate(ctx); err != nil {
			return err
		}
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check(off, iovLen(iov)); err != nil {
		return err
	}
	for _, b := range iov {
		off += int64(copy(b, m.data[off:]))
	}
	return nil
}

func (m *memCore) WriteV(ctx context.Context, off int64, iov [][]byte, fua bool) error {
	if m.gate != nil {
		if err := m.gate(ctx); err != nil {
			return err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	n := iovLen(iov)
	if err := m.check(off, n); err != nil {
		return err
	}
	start := off
	for _, b := range iov {
		off += int64(copy(m.data[off:], b))
	}
	for g := start / memGrain; n > 0 && g <= (start+int64(n)-1)/memGrain; g++ {
		m.alloc[g] = true
	}
	if fua {
		m.fuas.Add(1)
	}
	return nil
}

func (m *memCore) Flush(ctx context.Context) error {
	m.flushes.Add(1)
	return nil
}

func (m *memCore) snapshot() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
}

// memFull adds every optional capability. Unmapping zeroes data and marks
// whole grains unallocated.
type memFull struct {
	*memCore
	discards  atomic.Int64
	lastUnmap atomic.Bool
	fastOK    bool // WriteZeroes with fast succeeds (else ENOTSUP)
}

func newFull(size int) *memFull { return &memFull{memCore: newMem(size), fastOK: true} }

func (m *memFull) zero(off, n int64, unmap bool) {
	clear(m.data[off : off+n])
	if !unmap {
		for g := off / memGrain; n > 0 && g <= (off+n-1)/memGrain; g++ {
			m.alloc[g] = true
		}
		return
	}
	for g := (off + memGrain - 1) / memGrain; (g+1)*memGrain <= off+n; g++ {
		m.alloc[g] = false
	}
}

func (m *memFull) Discard(ctx context.Context, off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int(n)); err != nil {
		return err
	}
	m.discards.Add(1)
	m.zero(off, n, true)
	return nil
}

func (m *memFull) WriteZeroes(ctx context.Context, off, n int64, mayUnmap, fast bool) error {
	if fast && !m.fastOK {
		return fmt.Errorf("mem: slow zeroes: %w", syscall.ENOTSUP)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int(n)); err != nil {
		return err
	}
	m.lastUnmap.Store(mayUnmap)
	m.zero(off, n, mayUnmap)
	return nil
}

// BlockStatus reports runs of grains: allocated grains are data, the rest
// holes that read as zeroes.
func (m *memFull) BlockStatus(ctx context.Context, off, n int64) (zero, data bool, length int64, err error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check(off, int(n)); err != nil || n <= 0 {
		return false, false, 0, fmt.Errorf("mem: block status [%d,+%d): %w", off, n, syscall.EINVAL)
	}
	g := off / memGrain
	a := m.alloc[g]
	end := off
	for end < off+n && m.alloc[end/memGrain] == a {
		end = (end/memGrain + 1) * memGrain
	}
	end = min(end, off+n)
	return !a, a, end - off, nil
}
