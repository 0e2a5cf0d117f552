package tests

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"blockbackend/tests/guest"
)

// Real-guest tests of the vhost-user-blk export: a Linux guest under QEMU
// (TCG) drives a vhost-user-blk-pci device served by qemu-storage-daemon,
// which proves the test, and by blockbackend, with the same command line.
// The guest's agent does the I/O and checks what it reads; the host checks
// the image's bytes afterwards. See package guest for the agent's commands.

const guestImageSize = 64 << 20

// TestIntegrationGuestBasicIO: writes of several sizes and alignments,
// flush, reads after dropping the caches (O_DIRECT and buffered), discard
// and write-zeroes; then the image on the host holds the same bytes.
func TestIntegrationGuestBasicIO(t *testing.T) {
	kit := needGuest(t)
	forBackends(t, func(t *testing.T, kind backendKind) {
		dir := shortDir(t)
		img := makeImage(t, dir, "a.img", guestImageSize)
		b := startBackend(t, kind, dir, img, exportOpts{})
		spans := []span{
			{0, 512, 1},
			{3584, 512, 2}, // the sector before a page
			{4096, 4096, 3},
			{65536, 65536, 4},
			{1<<20 + 512, 1 << 20, 5}, // 1 MiB at a sector, not a page, boundary
			{8 << 20, 1536, 6},        // three sectors
			{(48 << 20) - 4096, 8192, 7},
		}
		const zr = 16 << 20 // zero and discard region, 256 KiB written first
		script := []string{"info"}
		for _, s := range spans {
			script = append(script, guest.Write(s.off, s.n, s.seed))
		}
		script = append(script, "flush", "dropcaches")
		for _, s := range spans {
			script = append(script, guest.Read(s.off, s.n, s.seed, false), guest.Read(s.off, s.n, s.seed, true))
		}
		script = append(script,
			guest.Write(zr, 256<<10, 8),
			fmt.Sprintf("zero off=%d len=%d", zr+64<<10, 64<<10),
			fmt.Sprintf("discard off=%d len=%d", zr+192<<10, 64<<10),
			"flush", "dropcaches",
			fmt.Sprintf("readzero off=%d len=%d", zr+64<<10, 64<<10),
			fmt.Sprintf("readzero off=%d len=%d buffered=1", zr+64<<10, 64<<10),
			guest.Read(zr, 64<<10, 8, false),
			guest.Read(zr+128<<10, 64<<10, 8, true),
			// Never written: still zero.
			fmt.Sprintf("readzero off=%d len=%d", 32<<20, 1<<20),
		)
		res := runGuest(t, kit, guest.BootOptions{Sockets: []string{b.sock}, Script: script})
		info := result(t, res, 1)
		if info.Size != guestImageSize || info.Sectors != guestImageSize/512 || info.RO || info.Queues != 1 {
			t.Errorf("guest sees size %d (%d sectors), ro %v, %d queues; want %d, rw, 1 queue",
				info.Size, info.Sectors, info.RO, info.Queues, guestImageSize)
		}
		t.Logf("guest's view: %+v", info)
		b.p.stop(t)
		spans = append(spans, span{zr, 64 << 10, 8}, span{zr + 128<<10, 64 << 10, 8})
		checkImage(t, img, spans, [][2]int64{{zr + 64<<10, 64 << 10}, {32 << 20, 1 << 20}, {512, 3072}})
	})
}

// TestIntegrationGuestMultiqueue: with num-queues=2 and two vCPUs the guest
// has two blk-mq hardware queues, uses both, and verified I/O works.
func TestIntegrationGuestMultiqueue(t *testing.T) {
	kit := needGuest(t)
	forBackends(t, func(t *testing.T, kind backendKind) {
		dir := shortDir(t)
		img := makeImage(t, dir, "a.img", guestImageSize)
		b := startBackend(t, kind, dir, img, exportOpts{numQueues: 2})
		script := []string{
			"info",
			"loop secs=3 qd=4 blocks=512 seed=3",
			"bench secs=2 qd=8 rw=randrw size=32M",
			// How often blk-mq ran each hardware queue: both served requests.
			"sh mount -t debugfs none /sys/kernel/debug && cat /sys/kernel/debug/block/vda/hctx*/run",
		}
		res := runGuest(t, kit, guest.BootOptions{Sockets: []string{b.sock}, NumQueues: 2, Script: script})
		if info := result(t, res, 1); info.Queues != 2 {
			t.Errorf("guest sees %d queues, want 2", info.Queues)
		}
		loop := result(t, res, 2)
		t.Logf("loop: %d writes, %d reads verified in %.1fs", loop.Writes, loop.Reads, loop.Secs)
		bench := result(t, res, 3)
		t.Logf("bench randrw 4k QD8: %.0f IOPS, avg %.0f µs, max %.1f ms", bench.IOPS, bench.AvgLatUs, bench.MaxLatMs)
		q := strings.Fields(result(t, res, 4).Output)
		if len(q) != 2 || q[0] == "0" || q[1] == "0" {
			t.Errorf("runs per hardware queue: %q, want two non-zero counts", q)
		}
	})
}

// TestIntegrationGuestReadOnly: writable=off gives a read-only disk; the
// guest can read but not write, and the image is unchanged.
func TestIntegrationGuestReadOnly(t *testing.T) {
	kit := needGuest(t)
	forBackends(t, func(t *testing.T, kind backendKind) {
		dir := shortDir(t)
		img := makeImage(t, dir, "a.img", guestImageSize)
		data := span{0, 1 << 20, 11}
		fillImage(t, img, data)
		b := startBackend(t, kind, dir, img, exportOpts{readOnly: true})
		script := []string{
			"info",
			guest.Read(0, 1<<20, 11, false),
			"writefail off=0 len=4096",
			"writefail off=1M len=512",
			"dropcaches",
			guest.Read(0, 1<<20, 11, true),
		}
		res := runGuest(t, kit, guest.BootOptions{Sockets: []string{b.sock}, Script: script})
		if info := result(t, res, 1); !info.RO {
			t.Errorf("guest does not see a read-only disk: %+v", info)
		}
		t.Logf("write on the read-only disk: %s", result(t, res, 3).Output)
		b.p.stop(t)
		checkImage(t, img, []span{data}, [][2]int64{{1 << 20, 1 << 20}})
	})
}

// TestIntegrationGuestResize: block_resize over QMP reaches the guest
// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, then GET_CONFIG), which can then
// use the new space.
func TestIntegrationGuestResize(t *testing.T) {
	kit := needGuest(t)
	forBackends(t, func(t *testing.T, kind backendKind) {
		if kind.qsd {
			if major, minor := qsdVersion(t); major < 8 || major == 8 && minor < 1 {
				t.Skipf("qemu-storage-daemon %d.%d does not tell the frontend about a resize (CONFIG_CHANGE_MSG came in 8.1)", major, minor)
			}
		}
		dir := shortDir(t)
		img := makeImage(t, dir, "a.img", 32<<20)
		b := startBackend(t, kind, dir, img, exportOpts{})
		const newSize = 48 << 20
		tail := span{40 << 20, 1 << 20, 21}
		script := []string{
			"info",
			fmt.Sprintf("waitsize from=%d timeout=60", 32<<20/512),
			guest.Write(tail.off, tail.n, tail.seed),
			"dropcaches",
			guest.Read(tail.off, tail.n, tail.seed, true),
		}
		vm := bootGuest(t, kit, guest.BootOptions{Sockets: []string{b.sock}, Script: script})
		ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
		defer cancel()
		if _, err := vm.WaitFor(ctx, func(r guest.Result) bool { return r.Line == 1 }); err != nil {
			t.Fatal(err)
		}
		m := monitor(t, b.qmp)
		run(t, m, "block_resize", map[string]any{"node-name": "d", "size": newSize})
		res := finish(t, vm)
		if r := result(t, res, 2); r.Size != newSize || r.Sectors != newSize/512 {
			t.Errorf("guest sees %d bytes (%d sectors) after block_resize to %d", r.Size, r.Sectors, newSize)
		}
		b.p.stop(t)
		checkImage(t, img, []span{tail}, nil)
	})
}

// TestIntegrationGuestReconnect: the backend dies (SIGKILL) while the guest
// has writes in flight and comes back on the same socket; QEMU (chardev
// reconnect=1) renegotiates, and no write the guest saw acknowledged is
// lost: the guest checks every block it wrote at the end.
func TestIntegrationGuestReconnect(t *testing.T) {
	kit := needGuest(t)
	forBackends(t, func(t *testing.T, kind backendKind) {
		dir := shortDir(t)
		img := makeImage(t, dir, "a.img", guestImageSize)
		b := startBackend(t, kind, dir, img, exportOpts{})
		script := []string{
			"info",
			"loop secs=8 qd=4 blocks=512 seed=5",
			"info",
		}
		vm := bootGuest(t, kit, guest.BootOptions{Sockets: []string{b.sock}, Reconnect: 1, Script: script})
		ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
		defer cancel()
		if _, err := vm.WaitFor(ctx, func(r guest.Result) bool { return r.Event == "running" }); err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		b.kill(t)
		time.Sleep(time.Second)
		b.restart(t)
		res := finish(t, vm)
		loop := result(t, res, 2)
		t.Logf("loop across the restart: %d writes, %d reads verified, %d write errors retried, longest request %.0f ms",
			loop.Writes, loop.Reads, loop.Errors, loop.MaxLatMs)
		if loop.MaxLatMs < 500 {
			t.Errorf("no request waited for the restart (longest %.0f ms): was I/O in flight?", loop.MaxLatMs)
		}
	})
}

// TestIntegrationGuestTwoExports: two processes export one image. Without
// share-rw, blockbackend keeps the second writer out with QEMU's lock error
// (qemu-storage-daemon's exports share everything, so its second process
// starts). With share-rw=on, two guests write disjoint ranges at once and
// the image holds both.
func TestIntegrationGuestTwoExports(t *testing.T) {
	kit := needGuest(t)
	forBackends(t, func(t *testing.T, kind backendKind) {
		dir := shortDir(t)
		img := makeImage(t, dir, "a.img", guestImageSize)

		t.Run("exclusive", func(t *testing.T) {
			b1 := startBackend(t, kind, dir, img, exportOpts{name: "x1"})
			args := backendArgs(kind, img, filepath.Join(dir, "vhostx2.sock"), filepath.Join(dir, "qmpx2.sock"), exportOpts{})
			if kind.qsd {
				b2 := startProgram(t, kind.bin, filepath.Join(dir, "qmpx2.sock"), filepath.Join(dir, "vhostx2.sock"), args...)
				t.Logf("qemu-storage-daemon shares the image with a second exporting process (its exports share write)")
				b2.stop(t)
			} else {
				out, err := runFor(20*time.Second, kind.bin, args...)
				if err == nil || !strings.Contains(out, "Failed to get") || !strings.Contains(out, "lock") {
					t.Errorf("second export of an image exported without share-rw: %v\n%s", err, out)
				}
				t.Logf("second process: %s", strings.TrimSpace(out))
				// In one process: a second export of the node conflicts too.
				m := monitor(t, b1.qmp)
				_, err = runErr(m, "block-export-add", map[string]any{
					"type": "vhost-user-blk", "id": "e2", "node-name": "d", "writable": true,
					"addr": map[string]any{"type": "unix", "path": filepath.Join(dir, "vhostx3.sock")}})
				if err == nil {
					t.Errorf("a second writable export of node d without share-rw was accepted in one process")
				} else {
					t.Logf("second export in one process: %v", err)
				}
			}
			b1.p.stop(t)
		})

		t.Run("share-rw", func(t *testing.T) {
			o1, o2 := exportOpts{name: "s1", shareRW: !kind.qsd}, exportOpts{name: "s2", shareRW: !kind.qsd}
			b1 := startBackend(t, kind, dir, img, o1)
			b2 := startBackend(t, kind, dir, img, o2)
			var spans []span
			mk := func(base int64, seed uint64) []string {
				var s []string
				for i := int64(0); i < 8; i++ {
					sp := span{base + i*(512<<10), 256 << 10, seed + uint64(i)}
					spans = append(spans, sp)
					s = append(s, guest.Write(sp.off, sp.n, sp.seed))
				}
				s = append(s, "flush", "dropcaches")
				for _, sp := range spans[len(spans)-8:] {
					s = append(s, guest.Read(sp.off, sp.n, sp.seed, true))
				}
				return append(s, fmt.Sprintf("loop secs=3 qd=2 off=%d blocks=128 seed=%d", base+(8<<20), seed))
			}
			s1, s2 := mk(0, 100), mk(24<<20, 200)
			var wg sync.WaitGroup
			vms := []*guest.VM{
				bootGuest(t, kit, guest.BootOptions{Sockets: []string{b1.sock}, Script: s1}),
				bootGuest(t, kit, guest.BootOptions{Sockets: []string{b2.sock}, Script: s2}),
			}
			results := make([][]guest.Result, 2)
			errs := make([]error, 2)
			for i, vm := range vms {
				wg.Add(1)
				go func() {
					defer wg.Done()
					results[i], errs[i] = vm.Wait()
				}()
			}
			wg.Wait()
			for i, vm := range vms {
				if n := len(results[i]); n >= 2 {
					l := results[i][n-2]
					t.Logf("guest %d: ready after %v; loop %d writes, %d reads verified in %.1fs", i+1,
						vm.BootTime().Round(time.Millisecond), l.Writes, l.Reads, l.Secs)
				}
				if errs[i] != nil {
					t.Errorf("guest %d: %v", i+1, errs[i])
				}
				for _, r := range guest.Failed(results[i]) {
					t.Errorf("guest %d: %s (script line %d) failed: %s", i+1, r.Op, r.Line, r.Err)
				}
			}
			b1.p.stop(t)
			b2.p.stop(t)
			checkImage(t, img, spans, [][2]int64{{256 << 10, 256 << 10}, {(24 << 20) + 256<<10, 256 << 10}})
		})
	})
}

// TestIntegrationGuestFirmwareRead: with EDD probing on, the kernel's setup
// code reads each disk's first sector through SeaBIOS's virtio-blk driver,
// a second frontend that polls the used ring with its rings in memory the
// firmware then hands to Linux. The guest only comes up if that read
// completes. SeaBIOS 1.16 splits a read into size_max*seg_max bytes, computed
// in 32 bits and cast to a 16-bit sector count: a device whose product
// overflows makes it loop forever on zero-length reads.
func TestIntegrationGuestFirmwareRead(t *testing.T) {
	kit := needGuest(t)
	forBackends(t, func(t *testing.T, kind backendKind) {
		dir := shortDir(t)
		img := makeImage(t, dir, "a.img", guestImageSize)
		mbr := span{0, 512, 31}
		fillImage(t, img, mbr)
		b := startBackend(t, kind, dir, img, exportOpts{})
		vm := bootGuest(t, kit, guest.BootOptions{Sockets: []string{b.sock}, EDD: true,
			Script: []string{guest.Read(0, 512, 31, false), guest.Write(4096, 4096, 32), guest.Read(4096, 4096, 32, true)}})
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if _, err := vm.WaitFor(ctx, func(r guest.Result) bool { return r.Op == "ready" }); err != nil {
			vm.Kill()
			t.Fatalf("the guest did not come up within 60 s (%v): SeaBIOS's read of sector 0 through its virtio-blk driver (the kernel's EDD probe) never completed", err)
		}
		finish(t, vm)
	})
}
