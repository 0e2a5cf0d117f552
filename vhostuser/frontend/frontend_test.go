package frontend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	vu "blockbackend/vhostuser"
)

// ---- The backend under test. Everything specific to qemu-storage-daemon
// is in this section: set VHOST_USER_BLK_BACKEND to a binary with the same
// command line (blockbackend) to run the same tests against it, and
// adjust backendTraits.

// backendTraits are facts about the backend that the tests check only
// when known.
type backendTraits struct {
	name       string
	segMax     uint32 // expected seg_max (0: not checked)
	serial     string // expected GET_ID (empty: not checked)
	proto72    uint64 // expected protocol features with QEMU72 (0: not checked)
	discardsTo string // "zeroes" if discard=unmap makes reads return zeroes
	// crashes lists the hostile cases known to kill the backend.
	crashes map[string]string
}

var qsdTraits = backendTraits{
	name:       "qemu-storage-daemon",
	segMax:     126,
	serial:     "vhost_user_blk",
	proto72:    0x8f2b,
	discardsTo: "zeroes",
	crashes: map[string]string{
		"bad-vring-index-num":  "qsd 7.2 (libvhost-user) does not check the vring index of SET_VRING_NUM and segfaults",
		"bad-vring-index-base": "qsd 7.2 (libvhost-user) does not check the vring index of GET_VRING_BASE and segfaults",
		// qsd 7.2 reads these payloads without checking their size.
		"short-SET_VRING_ADDR": "segfaults on a 3-byte payload",
		"short-SET_MEM_TABLE":  "segfaults on a 3-byte payload",
		"short-SET_VRING_NUM":  "segfaults on a 3-byte payload",
		"short-SET_VRING_BASE": "segfaults on a 3-byte payload",
		"short-GET_VRING_BASE": "segfaults on a 3-byte payload",
	},
}

type backend struct {
	sock, img string
	traits    backendTraits
	cmd       *exec.Cmd
	stderr    *bytes.Buffer
	crashed   bool // expected death: no exit status check
	exited    chan struct{}
	waitErr   error // valid once exited is closed
}

// startBackend creates a raw image of size bytes filled with a pattern and
// serves it writable over vhost-user-blk with numQueues queues.
func startBackend(t testing.TB, numQueues int, size int64) *backend {
	t.Helper()
	bin, traits := os.Getenv("VHOST_USER_BLK_BACKEND"), qsdTraits
	if bin == "" {
		p, err := exec.LookPath("qemu-storage-daemon")
		if err != nil {
			t.Skip("qemu-storage-daemon not installed (apt install qemu-utils); set VHOST_USER_BLK_BACKEND to test another backend")
		}
		bin = p
	} else {
		traits = backendTraits{name: filepath.Base(bin), discardsTo: "zeroes"}
	}
	dir := t.TempDir()
	b := &backend{sock: filepath.Join(dir, "vhost.sock"), img: filepath.Join(dir, "disk.img"), traits: traits, stderr: new(bytes.Buffer)}
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i/512) ^ byte(i)
	}
	if err := os.WriteFile(b.img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	b.cmd = exec.Command(bin,
		"--blockdev", "driver=file,node-name=d,discard=unmap,filename="+b.img,
		"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path="+b.sock+
			",writable=on,num-queues="+strconv.Itoa(numQueues))
	b.cmd.Stderr = b.stderr
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	b.exited = make(chan struct{})
	go func() { b.waitErr = b.cmd.Wait(); close(b.exited) }()
	t.Cleanup(func() {
		b.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-b.exited:
			if b.waitErr != nil && !b.crashed {
				t.Errorf("%s exited with %v on SIGTERM; stderr: %s", traits.name, b.waitErr, b.stderr)
			}
		case <-time.After(10 * time.Second):
			b.cmd.Process.Kill()
			t.Errorf("%s did not exit on SIGTERM", traits.name)
		}
	})
	for start := time.Now(); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(b.sock); err == nil {
			break
		}
		select {
		case <-b.exited:
			t.Fatalf("%s exited at start-up: %v: %s", traits.name, b.waitErr, b.stderr)
		default:
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("%s did not create %s: %s", traits.name, b.sock, b.stderr)
		}
	}
	return b
}

// alive checks that the backend process is still running.
func (b *backend) alive(t *testing.T) {
	t.Helper()
	if err := b.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("%s is gone: %v; stderr: %s", b.traits.name, err, b.stderr)
	}
}

// ---- Helpers.

const diskSize = 16 << 20

func dial(t testing.TB, b *backend, o Options) *Frontend {
	t.Helper()
	o.Path = b.sock
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f, err := Dial(ctx, o)
	if err != nil {
		t.Fatalf("Dial: %v; backend stderr: %s", err, b.stderr)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func (b *backend) fileAt(t testing.TB, off int64, n int) []byte {
	t.Helper()
	fd, err := os.Open(b.img)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	p := make([]byte, n)
	if _, err := fd.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	return p
}

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

// roundTrip writes through queue wq, reads back through rq, compares both
// with the image file.
func roundTrip(t *testing.T, f *Frontend, b *backend, wq, rq int, off int64, n int, segs int) {
	t.Helper()
	want := randBytes(uint64(off)+uint64(segs), n)
	buf := f.Alloc(n)
	copy(buf, want)
	w := Request{Type: TypeOut, Sector: uint64(off / SectorSize), Data: buf, Segs: segs}
	if err := f.Do(wq, &w); err != nil || w.Err() != nil {
		t.Fatalf("write %d+%d segs %d: %v %v", off, n, segs, err, w.Err())
	}
	if got := b.fileAt(t, off, n); !bytes.Equal(got, want) {
		t.Fatalf("image differs after write at %d+%d (segs %d)", off, n, segs)
	}
	clear(buf)
	r := Request{Type: TypeIn, Sector: uint64(off / SectorSize), Data: buf, Segs: segs}
	if err := f.Do(rq, &r); err != nil || r.Err() != nil {
		t.Fatalf("read %d+%d: %v %v", off, n, err, r.Err())
	}
	if !bytes.Equal(buf, want) {
		t.Fatalf("read back differs at %d+%d (segs %d)", off, n, segs)
	}
	if r.Written != uint32(n)+1 {
		t.Errorf("read used length %d, want %d (data + status)", r.Written, n+1)
	}
}

// ---- Tests.

func TestIntegrationProfiles(t *testing.T) {
	b := startBackend(t, 2, diskSize)
	for _, p := range Profiles {
		t.Run(p.Name, func(t *testing.T) {
			f := dial(t, b, Options{Profile: p, NumQueues: 2, EventIdx: true, Indirect: true})
			virtio, proto := f.Features()
			offV, offP := f.Offered()
			t.Logf("offered %#x/%#x, negotiated %#x/%#x", offV, offP, virtio, proto)
			if virtio&^(offV&p.Features) != 0 || proto != offP&p.ProtocolFeatures {
				t.Errorf("negotiated %#x/%#x beyond offer %#x/%#x and profile", virtio, proto, offV, offP)
			}
			if p.Name == QEMU72.Name && b.traits.proto72 != 0 && proto != b.traits.proto72 {
				t.Errorf("QEMU72 negotiated protocol features %#x, want %#x", proto, b.traits.proto72)
			}
			if has(proto, vu.ProtoMQ) && f.QueueNum() < 2 {
				t.Errorf("GET_QUEUE_NUM %d < 2", f.QueueNum())
			}
			c, err := f.Config()
			if err != nil {
				t.Fatal(err)
			}
			if len(c.Raw) != int(p.ConfigSize) {
				t.Errorf("config of %d bytes, asked %d", len(c.Raw), p.ConfigSize)
			}
			if c.Capacity != diskSize/SectorSize {
				t.Errorf("capacity %d sectors, want %d", c.Capacity, diskSize/SectorSize)
			}
			if b.traits.segMax != 0 && c.SegMax != b.traits.segMax {
				t.Errorf("seg_max %d, want %d", c.SegMax, b.traits.segMax)
			}
			if has(virtio, BlkFDiscard) != has(p.Features, BlkFDiscard) && has(offV, BlkFDiscard) {
				t.Errorf("discard negotiation: %#x", virtio)
			}
			roundTrip(t, f, b, 0, 1, 4096, 8192, 3)
			if err := f.Flush(1); err != nil {
				t.Error(err)
			}
			if err := f.Stop(); err != nil {
				t.Fatal(err)
			}
			// Each queue processed exactly one or two requests.
			if bs := f.Bases(); len(bs) != 2 || bs[0] != 1 || bs[1] != 2 {
				t.Errorf("GET_VRING_BASE after stop: %v, want [1 2]", bs)
			}
		})
	}
}

func TestIntegrationIO(t *testing.T) {
	b := startBackend(t, 2, diskSize)
	for _, tc := range []struct {
		name                       string
		eventIdx, indirect, packed bool
	}{
		{"plain", false, false, false},
		{"indirect", false, true, false},
		{"eventidx", true, false, false},
		{"both", true, true, false},
		{"packed", true, true, true},
		{"packed-plain", false, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := dial(t, b, Options{Profile: Modern, NumQueues: 2, EventIdx: tc.eventIdx, Indirect: tc.indirect,
				Packed: tc.packed, QueueSize: 64})
			virtio, _ := f.Features()
			if tc.packed && !has(virtio, vu.FRingPacked) {
				t.Skipf("%s does not offer packed virtqueues", b.traits.name)
			}
			if has(virtio, vu.FRingEventIdx) != tc.eventIdx || has(virtio, vu.FRingIndirectDesc) != tc.indirect {
				t.Fatalf("negotiated %#x", virtio)
			}
			// Enough requests to wrap the 64-entry rings several times.
			for i := 0; i < 150; i++ {
				segs := 1 + i%5
				if !tc.indirect && segs > 3 {
					segs = 3
				}
				roundTrip(t, f, b, i%2, (i+1)%2, int64(i%64)*65536+512*int64(i%7), 4096+512*(i%3), segs)
			}
			if err := f.Flush(0); err != nil {
				t.Fatal(err)
			}
			id, err := f.GetID(1)
			if err != nil {
				t.Fatal(err)
			}
			if b.traits.serial != "" && id != b.traits.serial {
				t.Errorf("GET_ID %q, want %q", id, b.traits.serial)
			}
			testDiscardZeroes(t, f, b)
		})
	}
}

func testDiscardZeroes(t *testing.T, f *Frontend, b *backend) {
	virtio, _ := f.Features()
	zero := make([]byte, 64<<10)
	got := make([]byte, 64<<10)
	if has(virtio, BlkFWriteZeroes) {
		for i, unmap := range []bool{false, true} {
			off := int64(1<<20 + i*(1<<20))
			if err := f.WriteZeroes(0, off, int64(len(zero)), unmap); err != nil {
				t.Fatalf("write zeroes (unmap %v): %v", unmap, err)
			}
			if !bytes.Equal(b.fileAt(t, off, len(zero)), zero) {
				t.Errorf("image not zero after WRITE_ZEROES (unmap %v)", unmap)
			}
			if err := f.Read(1, off, got); err != nil || !bytes.Equal(got, zero) {
				t.Errorf("read after WRITE_ZEROES: %v", err)
			}
		}
	}
	if has(virtio, BlkFDiscard) {
		off := int64(4 << 20)
		if err := f.Discard(0, off, int64(len(zero))); err != nil {
			t.Fatalf("discard: %v", err)
		}
		if b.traits.discardsTo == "zeroes" && !bytes.Equal(b.fileAt(t, off, len(zero)), zero) {
			t.Errorf("image not zero after DISCARD with discard=unmap")
		}
	}
	// A discard with a bad segment must fail cleanly, not hang.
	r := Request{Type: TypeDiscard, Discard: []DiscardSeg{{Sector: 1 << 40, NumSectors: 8}}}
	if err := f.Do(0, &r); err != nil {
		t.Fatal(err)
	}
	if has(virtio, BlkFDiscard) && r.Status != StatusIOErr && r.Status != StatusUnsupp {
		t.Errorf("discard beyond the end: status %d, want IOERR or UNSUPP", r.Status)
	}
}

func TestIntegrationRegions(t *testing.T) {
	b := startBackend(t, 1, diskSize)
	for _, p := range []Profile{QEMU40, QEMU72} { // SET_MEM_TABLE, then ADD_MEM_REG
		t.Run(p.Name, func(t *testing.T) {
			f := dial(t, b, Options{Profile: p, Regions: 5, MemSize: 40 << 20, Indirect: true})
			_, proto := f.Features()
			t.Logf("CONFIGURE_MEM_SLOTS negotiated: %v, max slots %d", has(proto, vu.ProtoConfigureMemSlots), f.MaxMemSlots())
			// Alloc goes round-robin over the regions: these land in all five.
			seen := map[uint64]bool{}
			for i := 0; i < 10; i++ {
				buf := f.Alloc(8192)
				g, _ := f.Raw().GPA(buf)
				seen[g/regionGap] = true
				want := randBytes(uint64(i), len(buf))
				copy(buf, want)
				if err := f.Write(0, int64(i)*8192, buf); err != nil {
					t.Fatal(err)
				}
				clear(buf)
				if err := f.Read(0, int64(i)*8192, buf); err != nil || !bytes.Equal(buf, want) {
					t.Fatalf("region round trip %d: %v", i, err)
				}
			}
			if len(seen) != 5 {
				t.Errorf("buffers in %d regions, want 5", len(seen))
			}
		})
	}
}

func TestIntegrationBench(t *testing.T) {
	b := startBackend(t, 2, 64<<20)
	f := dial(t, b, Options{Profile: QEMU72, NumQueues: 2, EventIdx: true, Indirect: true, QueueSize: 128})
	ctx := context.Background()
	for _, o := range []BenchOptions{
		{Depth: 1, Random: true},
		{Depth: 32, Random: true},
		{Depth: 32, Random: true, Write: true},
		{Depth: 32, Random: true, Queues: []int{0, 1}},
	} {
		o.Duration = 700 * time.Millisecond
		res, err := Bench(ctx, f, o)
		if err != nil {
			t.Fatal(err)
		}
		if res.IOs == 0 || res.Errors != 0 {
			t.Fatalf("bench %+v: %v", o, res)
		}
		t.Logf("%s 4k rand %s QD%d queues %v: %v", b.traits.name, map[bool]string{false: "read", true: "write"}[o.Write],
			o.Depth, o.Queues, res)
	}
	res, err := Bench(ctx, f, BenchOptions{Depth: 16, Count: 1000, BlockSize: 65536})
	if err != nil || res.IOs != 1000 {
		t.Fatalf("count-limited bench: %v %v", res, err)
	}
}

func TestIntegrationQueueDepth(t *testing.T) {
	b := startBackend(t, 1, diskSize)
	f := dial(t, b, Options{Profile: QEMU72, QueueSize: 32, EventIdx: true})
	// Without indirect descriptors a 3-descriptor request uses 3 of 32.
	var rs []*Request
	for i := 0; ; i++ {
		r := &Request{Type: TypeIn, Sector: uint64(i * 8), Data: f.Alloc(4096)}
		err := f.Submit(0, r)
		if errors.Is(err, ErrQueueFull) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		rs = append(rs, r)
	}
	if len(rs) != 10 {
		t.Errorf("%d requests fit a 32-entry ring, want 10", len(rs))
	}
	got := 0
	for got < len(rs) {
		done, err := f.Reap(0, len(rs)-got, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range done {
			if r.Err() != nil || !bytes.Equal(r.Data, b.fileAt(t, int64(r.Sector)*SectorSize, 4096)) {
				t.Fatalf("request at sector %d: %v", r.Sector, r.Err())
			}
		}
		got += len(done)
	}
	if _, err := f.Reap(0, 1, 50*time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Errorf("Reap with nothing in flight: %v, want ErrTimeout", err)
	}
}

func TestIntegrationReconnect(t *testing.T) {
	b := startBackend(t, 1, diskSize)
	f := dial(t, b, Options{Profile: QEMU72, Inflight: true, Indirect: true})
	roundTrip(t, f, b, 0, 0, 0, 4096, 1)
	if err := f.Reconnect(context.Background()); err != nil {
		t.Fatalf("reconnect: %v; stderr %s", err, b.stderr)
	}
	roundTrip(t, f, b, 0, 0, 8192, 4096, 2)

	// Requests in flight across the reconnection.
	var rs []*Request
	for i := 0; i < 16; i++ {
		buf := f.Alloc(4096)
		copy(buf, randBytes(uint64(100+i), 4096))
		r := &Request{Type: TypeOut, Sector: uint64(64 + 8*i), Data: buf}
		rs = append(rs, r)
	}
	if err := f.SubmitBatch(0, rs); err != nil {
		t.Fatal(err)
	}
	if err := f.Reconnect(context.Background()); err != nil {
		t.Fatalf("reconnect: %v; stderr %s", err, b.stderr)
	}
	_, proto := f.Features()
	if !has(proto, vu.ProtoInflightShmfd) {
		t.Logf("%s does not offer INFLIGHT_SHMFD: in-flight requests rely on in-order re-fetching from the used index", b.traits.name)
	}
	got := 0
	for got < len(rs) {
		done, err := f.Reap(0, 1, 5*time.Second)
		if err != nil {
			t.Fatalf("reaping after reconnect (%d of %d): %v", got, len(rs), err)
		}
		got += len(done)
	}
	for i, r := range rs {
		if r.Err() != nil || !bytes.Equal(b.fileAt(t, int64(r.Sector)*SectorSize, 4096), randBytes(uint64(100+i), 4096)) {
			t.Fatalf("request %d after reconnect: %v", i, r.Err())
		}
	}
}

// TestIntegrationHostile sends broken rings and messages; the backend may
// drop the connection but must survive and serve the next frontend.
func TestIntegrationHostile(t *testing.T) {
	cases := []struct {
		name string
		do   func(t *testing.T, f *Frontend, r *Raw)
	}{
		{"desc-loop", func(t *testing.T, f *Frontend, r *Raw) {
			g, _ := r.GPA(f.Alloc(4096))
			r.SetDesc(0, 0, Desc{Addr: g, Len: 16, Flags: DescFNext, Next: 1})
			r.SetDesc(0, 1, Desc{Addr: g + 16, Len: 512, Flags: DescFNext, Next: 0})
			r.PushAvail(0, 0)
			r.Kick(0)
		}},
		{"addr-outside-memory", func(t *testing.T, f *Frontend, r *Raw) {
			g, _ := r.GPA(f.Alloc(4096))
			r.SetDesc(0, 0, Desc{Addr: g, Len: 16, Flags: DescFNext, Next: 1})
			r.SetDesc(0, 1, Desc{Addr: 0xdead_0000_0000, Len: 4096, Flags: DescFNext | DescFWrite, Next: 2})
			r.SetDesc(0, 2, Desc{Addr: g + 16, Len: 1, Flags: DescFWrite})
			r.PushAvail(0, 0)
			r.Kick(0)
		}},
		{"head-out-of-range", func(t *testing.T, f *Frontend, r *Raw) {
			r.PushAvail(0, 999)
			r.Kick(0)
		}},
		{"avail-idx-jump", func(t *testing.T, f *Frontend, r *Raw) {
			r.SetAvailIdx(0, 30000)
			r.Kick(0)
		}},
		{"bad-vring-index-num", func(t *testing.T, f *Frontend, r *Raw) {
			r.Send(vu.SetVringNum, 0, vu.VringState{Index: 1000, Num: 128}.Marshal())
		}},
		{"bad-vring-index-base", func(t *testing.T, f *Frontend, r *Raw) {
			r.Send(vu.GetVringBase, 0, vu.VringState{Index: 1000}.Marshal())
		}},
		{"bad-vring-index-enable", func(t *testing.T, f *Frontend, r *Raw) {
			r.Send(vu.SetVringEnable, 0, vu.VringState{Index: 1000, Num: 1}.Marshal())
		}},
		{"bad-vring-index-kick", func(t *testing.T, f *Frontend, r *Raw) {
			r.Send(vu.SetVringKick, 0, vu.VringState{Index: 1000}.Marshal(), r.MemFD())
		}},
		{"vring-num-not-power-of-two", func(t *testing.T, f *Frontend, r *Raw) {
			r.Send(vu.SetVringNum, 0, vu.VringState{Index: 0, Num: 100}.Marshal())
			r.Send(vu.SetVringNum, 0, vu.VringState{Index: 0, Num: 1 << 20}.Marshal())
		}},
		{"mem-table-overlapping", func(t *testing.T, f *Frontend, r *Raw) {
			reg := r.Regions()[0]
			reg.Size = 1 << 40
			r.Send(vu.AddMemReg, 0, vu.MemRegionMsg{Region: reg}.Marshal(), r.MemFD())
		}},
	}
	for _, req := range []vu.Request{vu.SetVringAddr, vu.SetMemTable, vu.AddMemReg, vu.SetConfig, vu.SetFeatures,
		vu.SetVringNum, vu.SetVringBase, vu.GetVringBase, vu.SetInflightFD} {
		cases = append(cases, struct {
			name string
			do   func(t *testing.T, f *Frontend, r *Raw)
		}{"short-" + req.String(), func(t *testing.T, f *Frontend, r *Raw) { r.Send(req, 0, []byte{1, 2, 3}) }})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := startBackend(t, 1, diskSize)
			f := dial(t, b, Options{Profile: QEMU72})
			tc.do(t, f, f.Raw())
			time.Sleep(50 * time.Millisecond)
			err := f.Raw().Alive()
			t.Logf("after %s the connection is %v", tc.name, map[bool]string{true: "alive", false: fmt.Sprintf("gone (%v)", err)}[err == nil])
			f.Close()
			if why, ok := b.traits.crashes[tc.name]; ok {
				select {
				case <-b.exited:
					b.crashed = true
					t.Skipf("%s is known to die here (%s): %v", b.traits.name, why, b.waitErr)
				case <-time.After(100 * time.Millisecond):
				}
			}
			b.alive(t)
			g := dial(t, b, Options{Profile: QEMU72})
			roundTrip(t, g, b, 0, 0, 1<<20, 4096, 1)
		})
	}
}
