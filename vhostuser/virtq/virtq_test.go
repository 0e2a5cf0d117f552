package virtq

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// guest is a memfd-backed "guest memory" of one region at guest address
// gpaBase, mapped by the test (the driver's view) and by Map (ours).
type guest struct {
	mem  []byte // the driver's mapping
	m    *Memory
	user uint64 // the frontend "user address" of byte 0
}

const gpaBase = 0x100000

func newGuest(t testing.TB, size int) *guest {
	t.Helper()
	fd, err := unix.MemfdCreate("virtq-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	b, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	dup, _ := unix.Dup(fd)
	unix.Close(fd)
	g := &guest{mem: b, user: 0x7f0000000000}
	g.m, err = Map([]Region{{GuestAddr: gpaBase, Size: uint64(size), UserAddr: g.user, FD: dup}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.m.Close(); unix.Munmap(b) })
	return g
}

// Layout of the test rings: descriptors at 0, avail/driver area at 0x1000,
// used/device area at 0x2000, buffers from 0x10000.
const (
	offDesc  = 0
	offAvail = 0x1000
	offUsed  = 0x2000
	offBuf   = 0x10000
)

func (g *guest) cfg(size uint16, packed bool) Config {
	return Config{Size: size, Desc: g.user + offDesc, Avail: g.user + offAvail, Used: g.user + offUsed,
		Packed: packed, Indirect: true, EventIdx: true, MaxChain: 64}
}

func (g *guest) setDesc(i int, addr uint64, n uint32, flags, next uint16) {
	d := g.mem[offDesc+16*i:]
	binary.LittleEndian.PutUint64(d, addr)
	binary.LittleEndian.PutUint32(d[8:], n)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

func (g *guest) pushAvail(size uint16, head uint16) {
	idx := binary.LittleEndian.Uint16(g.mem[offAvail+2:])
	binary.LittleEndian.PutUint16(g.mem[offAvail+4+2*int(idx%size):], head)
	binary.LittleEndian.PutUint16(g.mem[offAvail+2:], idx+1)
}

func (g *guest) usedIdx() uint16 { return binary.LittleEndian.Uint16(g.mem[offUsed+2:]) }

func (g *guest) usedElem(size, i uint16) (id, n uint32) {
	e := g.mem[offUsed+4+8*int(i%size):]
	return binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])
}

// blkRequest lays out a 3-descriptor request (header, data, status) at
// descriptors d..d+2 with buffers at off.
func (g *guest) blkRequest(d int, off uint64, data uint32, write bool) {
	var wf uint16 = descWrite
	if write {
		wf = 0
	}
	g.setDesc(d, gpaBase+off, 16, descNext, uint16(d+1))
	g.setDesc(d+1, gpaBase+off+16, data, descNext|wf, uint16(d+2))
	g.setDesc(d+2, gpaBase+off+16+uint64(data), 1, descWrite, 0)
}

func TestSplitPopPush(t *testing.T) {
	g := newGuest(t, 1<<20)
	const size = 8
	q, err := New(g.m, g.cfg(size, false))
	if err != nil {
		t.Fatal(err)
	}
	var c Chain
	if ok, err := q.Pop(&c); ok || err != nil {
		t.Fatalf("empty ring popped %v %v", ok, err)
	}
	copy(g.mem[offBuf+16:], "hello")
	g.blkRequest(0, offBuf, 512, true)
	g.pushAvail(size, 0)
	if ok, err := q.Pop(&c); !ok || err != nil {
		t.Fatalf("pop: %v %v", ok, err)
	}
	if c.Err != nil || !c.TailOK || c.OutLen != 16+512 || c.InLen != 1 || len(c.Out) != 2 || !bytes.HasPrefix(c.Out[1], []byte("hello")) {
		t.Fatalf("chain %+v", c)
	}
	c.In[0][0] = 0
	// Event index: the driver asks for a call at used index 0.
	binary.LittleEndian.PutUint16(g.mem[offAvail+4+2*size:], 0)
	if !q.Push(&c, 1) {
		t.Error("no notification though used_event was passed")
	}
	if g.usedIdx() != 1 {
		t.Fatalf("used idx %d", g.usedIdx())
	}
	if id, n := g.usedElem(size, 0); id != 0 || n != 1 {
		t.Fatalf("used elem %d %d", id, n)
	}
	// A second request with the event left at 0: no call.
	g.blkRequest(3, offBuf+0x1000, 4096, false)
	g.pushAvail(size, 3)
	if ok, _ := q.Pop(&c); !ok || c.InLen != 4097 || c.Head != 3 {
		t.Fatalf("second pop %+v", c)
	}
	if q.Push(&c, 4097) {
		t.Error("notified although used_event says not yet")
	}
	if q.EnableNotify() {
		t.Error("EnableNotify sees work on an empty ring")
	}
	if ev := binary.LittleEndian.Uint16(g.mem[offUsed+4+8*size:]); ev != 2 {
		t.Errorf("avail_event %d, want 2", ev)
	}
	if q.Base() != 2 {
		t.Errorf("base %d", q.Base())
	}
}

func TestSplitIndirectAndHostile(t *testing.T) {
	g := newGuest(t, 1<<20)
	const size = 16
	q, err := New(g.m, g.cfg(size, false))
	if err != nil {
		t.Fatal(err)
	}
	// An indirect table of three descriptors at offBuf+0x8000.
	tbl := g.mem[offBuf+0x8000:]
	put := func(i int, addr uint64, n uint32, flags, next uint16) {
		binary.LittleEndian.PutUint64(tbl[16*i:], addr)
		binary.LittleEndian.PutUint32(tbl[16*i+8:], n)
		binary.LittleEndian.PutUint16(tbl[16*i+12:], flags)
		binary.LittleEndian.PutUint16(tbl[16*i+14:], next)
	}
	put(0, gpaBase+offBuf, 16, descNext, 1)
	put(1, gpaBase+offBuf+16, 4096, descNext|descWrite, 2)
	put(2, gpaBase+offBuf+16+4096, 1, descWrite, 0)
	g.setDesc(0, gpaBase+offBuf+0x8000, 48, descIndirect, 0)
	g.pushAvail(size, 0)
	var c Chain
	if ok, err := q.Pop(&c); !ok || err != nil || c.Err != nil || c.InLen != 4097 || !c.TailOK {
		t.Fatalf("indirect: %v %v %+v", ok, err, c)
	}
	q.Push(&c, 1)

	cases := []struct {
		name   string
		setup  func()
		tailOK bool
	}{
		{"loop", func() {
			g.setDesc(1, gpaBase+offBuf, 16, descNext, 2)
			g.setDesc(2, gpaBase+offBuf, 16, descNext, 1)
		}, false},
		{"next-out-of-range", func() {
			g.setDesc(1, gpaBase+offBuf, 16, descNext, 999)
		}, false},
		{"outside-memory", func() {
			g.setDesc(1, gpaBase+offBuf, 16, descNext, 2)
			g.setDesc(2, 0xdead00000000, 4096, descNext|descWrite, 3)
			g.setDesc(3, gpaBase+offBuf+16, 1, descWrite, 0)
		}, true},
		{"overflowing-length", func() {
			g.setDesc(1, gpaBase+offBuf, 16, descNext, 2)
			g.setDesc(2, ^uint64(0)-10, 4096, descNext|descWrite, 3)
			g.setDesc(3, gpaBase+offBuf+16, 1, descWrite, 0)
		}, true},
		{"read-after-write", func() {
			g.setDesc(1, gpaBase+offBuf, 16, descNext|descWrite, 2)
			g.setDesc(2, gpaBase+offBuf+16, 1, 0, 0)
		}, false},
		{"nested-indirect", func() {
			put(0, gpaBase+offBuf+0x8000, 48, descIndirect, 0)
			g.setDesc(1, gpaBase+offBuf+0x8000, 48, descIndirect, 0)
		}, false},
		{"indirect-loop", func() {
			put(0, gpaBase+offBuf, 16, descNext, 1)
			put(1, gpaBase+offBuf, 16, descNext, 0)
			g.setDesc(1, gpaBase+offBuf+0x8000, 32, descIndirect, 0)
		}, false},
		{"indirect-bad-size", func() {
			g.setDesc(1, gpaBase+offBuf+0x8000, 47, descIndirect, 0)
		}, false},
	}
	for _, tc := range cases {
		tc.setup()
		g.pushAvail(size, 1)
		ok, err := q.Pop(&c)
		if !ok || err != nil {
			t.Fatalf("%s: pop %v %v", tc.name, ok, err)
		}
		if c.Err == nil || c.TailOK != tc.tailOK {
			t.Errorf("%s: err %v tailOK %v", tc.name, c.Err, c.TailOK)
		}
		q.Push(&c, 0)
	}
	// A head out of range breaks the ring.
	g.pushAvail(size, 99)
	if _, err := q.Pop(&c); !errors.Is(err, errRing) {
		t.Errorf("head out of range: %v", err)
	}
}

// packed driver helpers: the test writes descriptors with the avail wrap.
type packedDriver struct {
	g    *guest
	size uint16
	next uint16
	wrap bool
}

func (p *packedDriver) add(addr uint64, n uint32, flags, id uint16) {
	d := p.g.mem[offDesc+16*int(p.next):]
	binary.LittleEndian.PutUint64(d, addr)
	binary.LittleEndian.PutUint32(d[8:], n)
	binary.LittleEndian.PutUint16(d[12:], id)
	f := flags
	if p.wrap {
		f |= descAvail
	} else {
		f |= descUsed
	}
	binary.LittleEndian.PutUint16(d[14:], f)
	p.next++
	if p.next == p.size {
		p.next, p.wrap = 0, !p.wrap
	}
}

func (p *packedDriver) request(off uint64, id uint16) {
	p.add(gpaBase+off, 16, descNext, id)
	p.add(gpaBase+off+16, 512, descNext|descWrite, id)
	p.add(gpaBase+off+16+512, 1, descWrite, id)
}

func TestPackedPopPush(t *testing.T) {
	g := newGuest(t, 1<<20)
	const size = 8
	cfg := g.cfg(size, true)
	cfg.Base = 0x8000 | 0x8000<<16
	q, err := New(g.m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := &packedDriver{g: g, size: size, wrap: true}
	var c Chain
	if ok, _ := q.Pop(&c); ok {
		t.Fatal("empty packed ring popped")
	}
	// Two requests of three descriptors, completed out of order: the
	// used descriptors go in order of completion.
	p.request(offBuf, 10)
	p.request(offBuf+0x1000, 11)
	var cs [3]Chain
	for i := range 2 {
		if ok, err := q.Pop(&cs[i]); !ok || err != nil || cs[i].Head != 10+uint16(i) || cs[i].InLen != 513 || cs[i].Err != nil {
			t.Fatalf("pop %d: %v %v %+v", i, ok, err, cs[i])
		}
	}
	if ok, _ := q.Pop(&c); ok {
		t.Fatal("popped past the available descriptors")
	}
	q.Push(&cs[1], 513)
	q.Push(&cs[0], 1)
	d0 := g.mem[offDesc:]
	if id, fl := binary.LittleEndian.Uint16(d0[12:]), binary.LittleEndian.Uint16(d0[14:]); id != 11 || fl&(descAvail|descUsed) != descAvail|descUsed {
		t.Fatalf("first used descriptor id %d flags %#x", id, fl)
	}
	if id := binary.LittleEndian.Uint16(g.mem[offDesc+48+12:]); id != 10 {
		t.Fatalf("second used descriptor id %d", id)
	}
	// A third request wraps around the 8-entry ring.
	p.request(offBuf+0x2000, 12)
	if ok, err := q.Pop(&cs[2]); !ok || err != nil || cs[2].Head != 12 || cs[2].Err != nil {
		t.Fatalf("pop across the wrap: %v %v %+v", ok, err, cs[2])
	}
	q.Push(&cs[2], 1)
	// 9 descriptors used: position 1, wrap counters flipped to 0.
	if b := q.Base(); b != 1|1<<16 {
		t.Fatalf("base %#x", b)
	}
}

func TestInflightSplitResubmit(t *testing.T) {
	g := newGuest(t, 1<<20)
	const size = 8
	region := make([]byte, InflightQueueSize(size, false))
	InitInflight(region, size, false)
	cfg := g.cfg(size, false)
	cfg.Inflight = region
	q, err := New(g.m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		g.blkRequest(3*i, offBuf+0x1000*uint64(i), 512, true)
		g.pushAvail(size, uint16(3*i))
	}
	var a, b Chain
	q.Pop(&a)
	q.Pop(&b)
	q.Push(&b, 1) // the second completes; the first is "in flight" at the crash
	// A third request was made available but not popped.
	g.blkRequest(6, offBuf+0x3000, 512, true)
	g.pushAvail(size, 6)

	// The new backend: the frontend's base is stale (0) after a crash.
	cfg.Base = 0
	q2, err := New(g.m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var c Chain
	if ok, err := q2.Resubmit(&c); !ok || err != nil || c.Head != 0 {
		t.Fatalf("resubmit: %v %v head %d", ok, err, c.Head)
	}
	if ok, _ := q2.Resubmit(&c); ok {
		t.Fatal("resubmitted a completed request")
	}
	var d Chain
	if ok, _ := q2.Pop(&d); !ok || d.Head != 6 {
		t.Fatalf("pop after resubmit: %v head %d", ok, d.Head)
	}
	q2.Push(&c, 1)
	q2.Push(&d, 1)
	if g.usedIdx() != 3 {
		t.Fatalf("used idx %d", g.usedIdx())
	}
}

func TestInflightPackedResubmit(t *testing.T) {
	g := newGuest(t, 1<<20)
	const size = 8
	region := make([]byte, InflightQueueSize(size, true))
	InitInflight(region, size, true)
	cfg := g.cfg(size, true)
	cfg.Base = 0x8000 | 0x8000<<16
	cfg.Inflight = region
	q, err := New(g.m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := &packedDriver{g: g, size: size, wrap: true}
	p.request(offBuf, 1)
	p.request(offBuf+0x1000, 2)
	var a, b Chain
	q.Pop(&a)
	q.Pop(&b)
	q.Push(&b, 1)
	// The driver reuses the slots of request 2 for request 3, which
	// overwrites the ring while request 1 is still in flight.
	p.request(offBuf+0x2000, 3)

	cfg.Base = 0
	q2, err := New(g.m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var c Chain
	if ok, err := q2.Resubmit(&c); !ok || err != nil || c.Head != 1 || c.InLen != 513 || c.Err != nil {
		t.Fatalf("resubmit: %v %v %+v", ok, err, c)
	}
	g.mem[offBuf] = 0x5a
	if c.Out[0][0] != 0x5a {
		t.Error("resubmitted request points elsewhere")
	}
	if ok, _ := q2.Resubmit(&c); ok {
		t.Fatal("resubmitted a completed request")
	}
	var d Chain
	if ok, err := q2.Pop(&d); !ok || err != nil || d.Head != 3 {
		t.Fatalf("pop after resubmit: %v %v head %d", ok, err, d.Head)
	}
}

func TestMemoryAddRemoveAndLog(t *testing.T) {
	g := newGuest(t, 1<<20)
	fd, _ := unix.MemfdCreate("r2", unix.MFD_CLOEXEC)
	unix.Ftruncate(fd, 1<<16)
	m2, err := g.m.Add(Region{GuestAddr: gpaBase + 1<<20, Size: 1 << 16, UserAddr: 0x10000000, FD: fd})
	if err != nil {
		t.Fatal(err)
	}
	// A buffer across the two adjacent regions comes back in two pieces.
	iov, err := m2.AppendIOV(nil, gpaBase+1<<20-100, 200)
	if err != nil || len(iov) != 2 || len(iov[0]) != 100 || len(iov[1]) != 100 {
		t.Fatalf("iov %v %v", len(iov), err)
	}
	fd2, _ := unix.MemfdCreate("r3", unix.MFD_CLOEXEC)
	if _, err := m2.Add(Region{GuestAddr: gpaBase, Size: 4096, UserAddr: 0x20000000, FD: fd2}); err == nil {
		t.Error("overlapping region accepted")
	}
	m3, err := m2.Remove(Region{GuestAddr: gpaBase + 1<<20, Size: 1 << 16, UserAddr: 0x10000000, FD: -1})
	if err != nil {
		t.Fatal(err)
	}
	m2.Close()
	// m3 still reaches the first region after m2's Close.
	if b, err := m3.Guest(gpaBase, 4); err != nil || len(b) != 4 {
		t.Fatal(err)
	}
	m3.Close()
	if _, err := g.m.Guest(gpaBase+1<<20, 1); !errors.Is(err, ErrBadAddress) {
		t.Error("address past the region accepted")
	}

	bm := make([]byte, 64)
	l := NewDirtyLog(bm)
	l.Mark(4096*9, 4096*2)  // pages 9 and 10
	l.Mark(1<<40, 1)        // beyond the bitmap: ignored
	l.Mark(^uint64(0)-5, 5) // overflow: ignored
	if bm[1] != 0b110 {
		t.Errorf("log byte 1 %08b", bm[1])
	}
}

// FuzzPop feeds arbitrary ring contents (descriptor table, avail ring,
// indirect tables) to Pop and Push: no panic, no access outside guest
// memory, errors for what is wrong.
func FuzzPop(f *testing.F) {
	f.Add(false, []byte{}, []byte{})
	f.Add(true, []byte{0, 0, 1, 0, 0, 0}, make([]byte, 256))
	g := newGuest(f, 1<<20)
	f.Fuzz(func(t *testing.T, packed bool, avail, desc []byte) {
		clear(g.mem[:offBuf])
		copy(g.mem[offDesc:offDesc+16*16], desc)
		copy(g.mem[offAvail:offAvail+64], avail)
		if len(desc) > 256 {
			copy(g.mem[offBuf:offBuf+0x1000], desc[256:])
		}
		cfg := g.cfg(16, packed)
		cfg.Base = uint32(len(avail)) * 0x9001
		q, err := New(g.m, cfg)
		if err != nil {
			return
		}
		var c Chain
		for range 40 {
			ok, err := q.Pop(&c)
			if err != nil || !ok {
				return
			}
			for _, b := range c.In {
				clear(b)
			}
			q.Push(&c, uint32(c.InLen))
		}
	})
}

// Complete then one Notify decides for the whole batch, as the event
// index test does over a range: the driver's event anywhere in the batch
// asks for one notification, an event past it for none, and a Notify
// without completions never notifies.
func TestNotifyBatch(t *testing.T) {
	t.Run("split", func(t *testing.T) {
		g := newGuest(t, 1<<20)
		const size = 8
		q, err := New(g.m, g.cfg(size, false))
		if err != nil {
			t.Fatal(err)
		}
		usedEvent := func(v uint16) { binary.LittleEndian.PutUint16(g.mem[offAvail+4+2*size:], v) }
		pop4 := func() [4]Chain {
			var cs [4]Chain
			for i := range cs {
				g.blkRequest(0, offBuf, 512, false)
				g.pushAvail(size, 0)
				if ok, err := q.Pop(&cs[i]); !ok || err != nil {
					t.Fatalf("pop %d: %v %v", i, ok, err)
				}
			}
			return cs
		}
		if q.Notify() {
			t.Fatal("notified without completions")
		}
		// used_event 2: the batch moves used idx 0 -> 4, past it.
		usedEvent(2)
		cs := pop4()
		for i := range cs {
			q.Complete(&cs[i], 1)
		}
		if g.usedIdx() != 4 {
			t.Fatalf("used idx %d", g.usedIdx())
		}
		if !q.Notify() {
			t.Error("no notification though the batch passed used_event")
		}
		if q.Notify() {
			t.Error("a second Notify without completions notified")
		}
		// used_event 9: the batch 4 -> 8 stops short of it.
		usedEvent(9)
		cs = pop4()
		for i := range cs {
			q.Complete(&cs[i], 1)
		}
		if q.Notify() {
			t.Error("notified before used_event")
		}
		// Without event index: VIRTQ_AVAIL_F_NO_INTERRUPT decides.
		cfg := g.cfg(size, false)
		cfg.EventIdx, cfg.Base = false, 8
		if q, err = New(g.m, cfg); err != nil {
			t.Fatal(err)
		}
		binary.LittleEndian.PutUint16(g.mem[offAvail:], availFNoInterupt)
		cs = pop4()
		for i := range cs {
			q.Complete(&cs[i], 1)
		}
		if q.Notify() {
			t.Error("notified with VIRTQ_AVAIL_F_NO_INTERRUPT set")
		}
		binary.LittleEndian.PutUint16(g.mem[offAvail:], 0)
		cs = pop4()
		for i := range cs[:2] {
			q.Complete(&cs[i], 1)
		}
		if !q.Notify() {
			t.Error("no notification with interrupts on")
		}
	})
	t.Run("packed", func(t *testing.T) {
		g := newGuest(t, 1<<20)
		const size = 8
		cfg := g.cfg(size, true)
		cfg.Base = 0x8000 | 0x8000<<16
		q, err := New(g.m, cfg)
		if err != nil {
			t.Fatal(err)
		}
		p := &packedDriver{g: g, size: size, wrap: true}
		// Driver event: descriptor offset off with wrap counter wrap.
		event := func(off uint16, wrap bool) {
			if wrap {
				off |= 0x8000
			}
			binary.LittleEndian.PutUint32(g.mem[offAvail:], uint32(off)|eventDesc<<16)
		}
		pop2 := func() [2]Chain {
			var cs [2]Chain
			for i := range cs {
				p.request(offBuf, uint16(i))
				if ok, err := q.Pop(&cs[i]); !ok || err != nil {
					t.Fatalf("pop %d: %v %v", i, ok, err)
				}
			}
			return cs
		}
		// Two 3-descriptor requests: used position 0 -> 6 (wrap 1).
		event(3, true)
		cs := pop2()
		q.Complete(&cs[0], 1)
		q.Complete(&cs[1], 1)
		if !q.Notify() {
			t.Error("no notification though the batch passed the event")
		}
		// 6 -> 12, that is 4 with the wrap counter flipped to 0: an
		// event at 2 of the new lap is passed, one at 5 is not.
		event(5, false)
		cs = pop2()
		q.Complete(&cs[0], 1)
		q.Complete(&cs[1], 1)
		if q.Notify() {
			t.Error("notified before the event")
		}
		event(2, false)
		cs = pop2()
		q.Complete(&cs[0], 1)
		q.Complete(&cs[1], 1)
		// 4 of lap 0 -> 2 of the next lap: the event at 2 of lap 0 was
		// passed by the previous batch, not by this one.
		if q.Notify() {
			t.Error("notified for an event behind the batch")
		}
		binary.LittleEndian.PutUint32(g.mem[offAvail:], eventDisable<<16)
		cs = pop2()
		q.Complete(&cs[0], 1)
		q.Complete(&cs[1], 1)
		if q.Notify() {
			t.Error("notified with notifications disabled")
		}
	})
}
