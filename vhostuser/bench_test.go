package vhostuser_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"blockbackend/vhostuser"
	"blockbackend/vhostuser/frontend"
	"blockbackend/vhostuser/virtq"
)

// zeroDevice answers every request by zeroing its device-writable buffers
// with an OK status: what a read of an unallocated qcow2 cluster costs the
// device, so that a benchmark measures the transport (rings, worker,
// notifications) and little else.
type zeroDevice struct{ queues int }

func (zeroDevice) Features() uint64                 { return 0 }
func (d zeroDevice) NumQueues() int                 { return d.queues }
func (zeroDevice) ReadConfig(dst []byte) int        { clear(dst); dst[0] = 1; return 60 }
func (zeroDevice) WriteConfig(uint32, []byte) error { return nil }
func (zeroDevice) Handle(_ int, c *virtq.Chain) uint32 {
	if !c.TailOK {
		return 0
	}
	for _, b := range c.In {
		clear(b)
	}
	return uint32(c.InLen)
}

// BenchmarkTransport drives a zeroDevice with the Go frontend in the same
// process (which therefore shares the CPU: compare runs, not absolute
// figures): 4 KiB reads at queue depth 1 and 32, split and packed rings.
//
//	go test -run '^$' -bench Transport -cpuprofile cpu.out ./vhostuser/
func BenchmarkTransport(b *testing.B) {
	for _, packed := range []bool{false, true} {
		for _, depth := range []int{1, 32} {
			ring := map[bool]string{false: "split", true: "packed"}[packed]
			b.Run(fmt.Sprintf("%s/QD%d", ring, depth), func(b *testing.B) {
				benchTransport(b, packed, depth)
			})
		}
	}
}

func benchTransport(b *testing.B, packed bool, depth int) {
	sock := filepath.Join(b.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	srv := vhostuser.Serve(l, zeroDevice{queues: 1}, nil)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f, err := frontend.Dial(ctx, frontend.Options{Path: sock, Profile: frontend.QEMU72, EventIdx: true,
		Indirect: true, Packed: packed, IOTimeout: 10 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	o := frontend.BenchOptions{Depth: depth, Random: true, Span: 1 << 30, Count: 1000}
	if _, err := frontend.Bench(ctx, f, o); err != nil { // warm-up
		b.Fatal(err)
	}
	o.Count = int64(b.N)
	b.ResetTimer()
	r, err := frontend.Bench(ctx, f, o)
	if err != nil {
		b.Fatal(err)
	}
	if r.Errors != 0 {
		b.Fatalf("%d errors", r.Errors)
	}
	b.ReportMetric(r.IOPS(), "IOPS")
}
