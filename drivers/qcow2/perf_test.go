package qcow2

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"blockbackend/graph"
)

// The benchmarks of the data path: 4 KiB random and 1 MiB sequential
// reads and writes on an empty image (every cluster unallocated) and a
// full one (every cluster allocated, host-contiguous as qemu-img convert
// leaves them), through the graph node as the exports call it. Images go
// to a tmpfs when there is one, so that the driver's own costs show.

const perfSize = 256 << 20

func perfDir(b *testing.B) string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "qcow2perf")
		if err == nil {
			b.Cleanup(func() { os.RemoveAll(d) })
			return d
		}
	}
	return b.TempDir()
}

func perfImage(b *testing.B, full bool) *graph.Node {
	dir := perfDir(b)
	p := filepath.Join(dir, "img.qcow2")
	if full {
		raw := filepath.Join(dir, "img.raw")
		buf := make([]byte, perfSize)
		for i := range buf {
			buf[i] = byte(i*7 + 1)
		}
		if err := os.WriteFile(raw, buf, 0o644); err != nil {
			b.Fatal(err)
		}
		qemu(b, "qemu-img", "convert", "-O", "qcow2", raw, p)
		os.Remove(raw)
	} else {
		qemu(b, "qemu-img", "create", "-q", "-f", "qcow2", p, "256M")
	}
	_, n := openQcow2(b, p, false, nil)
	return n
}

func benchRead(b *testing.B, full bool, bs int64, random bool) {
	n := perfImage(b, full)
	ctx := context.Background()
	var next, seeds atomic.Int64
	b.SetBytes(bs)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, bs)
		iov := [][]byte{buf}
		r := rand.New(rand.NewPCG(1, uint64(seeds.Add(1))))
		for pb.Next() {
			var off int64
			if random {
				off = r.Int64N(perfSize/bs) * bs
			} else {
				off = (next.Add(bs) - bs) % perfSize
			}
			if err := n.ReadV(ctx, off, iov); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func benchWrite(b *testing.B, full bool, bs int64, random bool) {
	n := perfImage(b, full)
	ctx := context.Background()
	var next, seeds atomic.Int64
	b.SetBytes(bs)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, bs)
		for i := range buf {
			buf[i] = byte(i + 1)
		}
		iov := [][]byte{buf}
		r := rand.New(rand.NewPCG(2, uint64(seeds.Add(1))))
		for pb.Next() {
			var off int64
			if random {
				off = r.Int64N(perfSize/bs) * bs
			} else {
				off = (next.Add(bs) - bs) % perfSize
			}
			if err := n.WriteV(ctx, off, iov, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkReadEmpty4k(b *testing.B)  { benchRead(b, false, 4<<10, true) }
func BenchmarkReadEmpty1M(b *testing.B)  { benchRead(b, false, 1<<20, false) }
func BenchmarkReadFull4k(b *testing.B)   { benchRead(b, true, 4<<10, true) }
func BenchmarkReadFull1M(b *testing.B)   { benchRead(b, true, 1<<20, false) }
func BenchmarkWriteEmpty4k(b *testing.B) { benchWrite(b, false, 4<<10, true) }
func BenchmarkWriteEmpty1M(b *testing.B) { benchWrite(b, false, 1<<20, false) }
func BenchmarkWriteFull4k(b *testing.B)  { benchWrite(b, true, 4<<10, true) }
func BenchmarkWriteFull1M(b *testing.B)  { benchWrite(b, true, 1<<20, false) }
