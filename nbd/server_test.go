package nbd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestHandshakeGo(t *testing.T) {
	m := newFull(1 << 20)
	_, sock := startServer(t, ServerOptions{}, &Export{Name: "disk", Description: "a disk", Backend: m, Writable: true, MultiConn: true})
	c := dial(t, "unix", sock)
	if hf := c.greet(FlagCFixedNewstyle | FlagCNoZeroes); hf != FlagFixedNewstyle|FlagNoZeroes {
		t.Fatalf("handshake flags %#x", hf)
	}
	c.negotiateStructured()
	ins, rep, msg := c.info(OptInfo, "disk", InfoName, InfoDescription, InfoBlockSize, 99)
	if rep != RepAck {
		t.Fatalf("NBD_OPT_INFO: %v %s", rep, msg)
	}
	got := map[uint16]Info{}
	for _, in := range ins {
		got[in.Type] = in
	}
	want := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes |
		FlagSendDF | FlagCanMultiConn | FlagSendCache | FlagSendFastZero
	if e := got[InfoExport].Export; e.Size != 1<<20 || e.Flags != want {
		t.Errorf("export info %+v, want size 1 MiB flags %#x", e, want)
	}
	if got[InfoName].Text != "disk" || got[InfoDescription].Text != "a disk" {
		t.Errorf("name/description %q %q", got[InfoName].Text, got[InfoDescription].Text)
	}
	if b := got[InfoBlockSize]; b.MinBlock != 1 || b.PrefBlock != 4096 || b.MaxBlock != 32<<20 {
		t.Errorf("block sizes %+v", b)
	}
	// INFO does not end the handshake; GO does.
	ei := c.goExport("disk")
	if ei.Size != 1<<20 {
		t.Fatalf("GO size %d", ei.Size)
	}
	if r := c.do(Request{Type: CmdFlush}, nil); r.Err != 0 {
		t.Fatalf("flush: %v", r)
	}
	c.disconnect()
}

func TestExportNameOption(t *testing.T) {
	m := newMem(4096)
	_, sock := startServer(t, ServerOptions{}, &Export{Name: "", Backend: m})
	for _, noZeroes := range []bool{false, true} {
		c := dial(t, "unix", sock)
		cf := FlagCFixedNewstyle
		if noZeroes {
			cf |= FlagCNoZeroes
		}
		c.greet(cf)
		c.sendOpt(OptExportName, nil)
		ei, err := ParseExportNameReply(c.read(ExportNameReplySize))
		if err != nil {
			t.Fatal(err)
		}
		if ei.Size != 4096 || ei.Flags != FlagHasFlags|FlagReadOnly|FlagSendFlush|FlagSendCache {
			t.Fatalf("export reply %+v", ei)
		}
		if !noZeroes && !bytes.Equal(c.read(124), make([]byte, 124)) {
			t.Fatal("padding is not zero")
		}
		r := c.do(Request{Type: CmdRead, Offset: 0, Length: 512}, nil)
		if r.Err != 0 || len(r.Data) != 512 {
			t.Fatalf("read: %v", r)
		}
		c.disconnect()
	}
	// An unknown name cannot be refused any other way than by closing.
	c := dial(t, "unix", sock)
	c.greet(FlagCFixedNewstyle)
	c.sendOpt(OptExportName, []byte("nope"))
	c.expectClosed()
}

func TestOptions(t *testing.T) {
	_, sock := startServer(t, ServerOptions{},
		&Export{Name: "b", Backend: newMem(512)},
		&Export{Name: "a", Description: "first", Backend: newMem(512)})
	c := dial(t, "unix", sock)
	c.greet(FlagCFixedNewstyle)

	c.sendOpt(OptList, nil)
	var names []ServerReply
	for {
		h, d := c.optReply()
		if h.Type == RepAck {
			break
		}
		if h.Type != RepServer {
			t.Fatalf("list: %v", h.Type)
		}
		sr, err := ParseServerReply(d)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, sr)
	}
	if want := []ServerReply{{"a", "first"}, {"b", ""}}; !slices.Equal(names, want) {
		t.Errorf("list %v, want %v", names, want)
	}
	for _, tc := range []struct {
		opt  Opt
		data []byte
		want Rep
	}{
		{OptList, []byte{1}, RepErrInvalid},
		{OptStartTLS, nil, RepErrPolicy},
		{OptStartTLS, []byte{1}, RepErrInvalid},
		{OptPeekExport, nil, RepErrUnsup},
		{OptExtendedHeaders, nil, RepErrUnsup},
		{Opt(0xdeadbeef), []byte("whatever"), RepErrUnsup},
		{OptStructuredReply, []byte{0}, RepErrInvalid},
		{OptGo, []byte{0, 0, 0, 9, 'x'}, RepErrInvalid},                                      // name runs past the data
		{OptInfo, InfoRequest{Name: "a", Infos: []uint16{1}}.Append(nil)[:8], RepErrInvalid}, // info list cut
		{OptGo, InfoRequest{Name: "zz"}.Append(nil), RepErrUnknown},
		{OptSetMetaContext, MetaContextRequest{Name: "a"}.Append(nil), RepErrInvalid}, // before structured replies
		{OptListMetaContext, MetaContextRequest{Name: "zz"}.Append(nil), RepErrUnknown},
		{OptListMetaContext, []byte{0, 0, 0, 1, 'a', 0, 0, 0, 5, 0, 0, 0, 1}, RepErrInvalid},
	} {
		rep, msg := c.simpleOpt(tc.opt, tc.data)
		if rep != tc.want {
			t.Errorf("%v %x: got %v (%s), want %v", tc.opt, tc.data, rep, msg, tc.want)
		}
		if rep.IsError() && msg == "" {
			t.Errorf("%v: error reply without a message", tc.opt)
		}
	}
	// The connection survived all of that.
	c.negotiateStructured()
	if ms, rep := c.metaContext(OptListMetaContext, "a"); rep != RepAck || len(ms) != 1 || ms[0].Name != MetaContextBaseAllocation {
		t.Errorf("list meta (all): %v %v", ms, rep)
	}
	if ms, rep := c.metaContext(OptListMetaContext, "a", "base:", "qemu:dirty-bitmap:x"); rep != RepAck || len(ms) != 1 {
		t.Errorf("list meta base: %v %v", ms, rep)
	}
	if ms, rep := c.metaContext(OptSetMetaContext, "a", "base:", "x-foo:bar"); rep != RepAck || len(ms) != 0 {
		t.Errorf("set meta with nothing selectable: %v %v", ms, rep)
	}
	if ms, rep := c.metaContext(OptSetMetaContext, "a", "base:allocation"); rep != RepAck || len(ms) != 1 || ms[0].ID == 0 {
		t.Errorf("set meta: %v %v", ms, rep)
	}
	c.sendOpt(OptAbort, nil)
	if h, _ := c.optReply(); h.Type != RepAck {
		t.Errorf("abort: %v", h.Type)
	}
	c.expectClosed()
}

func TestHostileHandshake(t *testing.T) {
	_, sock := startServer(t, ServerOptions{}, &Export{Name: "a", Backend: newMem(512)})
	t.Run("client flags", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.greet(1 << 7)
		c.expectClosed()
	})
	t.Run("option magic", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.greet(FlagCFixedNewstyle)
		c.send(make([]byte, 16))
		c.expectClosed()
	})
	t.Run("too big, discarded", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.greet(FlagCFixedNewstyle)
		c.sendOpt(OptGo, make([]byte, 100<<10))
		if h, _ := c.optReply(); h.Type != RepErrTooBig {
			t.Fatalf("got %v", h.Type)
		}
		c.goExport("a")
	})
	t.Run("huge length", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.greet(FlagCFixedNewstyle)
		c.send(OptionHeader{Option: OptGo, Length: 0xffffffff}.Append(nil))
		c.expectClosed()
	})
	t.Run("long export name", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.greet(FlagCFixedNewstyle)
		if rep, _ := c.simpleOpt(OptGo, InfoRequest{Name: strings.Repeat("x", 5000)}.Append(nil)); rep != RepErrInvalid {
			t.Fatalf("got %v", rep)
		}
		c.send(OptionHeader{Option: OptExportName, Length: MaxOptionLength + 1}.Append(nil))
		c.expectClosed()
	})
	t.Run("meta query count", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.greet(FlagCFixedNewstyle)
		c.negotiateStructured()
		// 4 billion queries claimed in a few bytes: must not allocate for them.
		if rep, _ := c.simpleOpt(OptSetMetaContext, []byte{0, 0, 0, 1, 'a', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}); rep != RepErrInvalid {
			t.Fatalf("got %v", rep)
		}
	})
	t.Run("eof mid option", func(t *testing.T) {
		c := dial(t, "unix", sock)
		c.greet(FlagCFixedNewstyle)
		c.send(OptionHeader{Option: OptGo, Length: 100}.Append(nil))
		c.send([]byte{0, 0})
		c.nc.(*net.UnixConn).CloseWrite()
		c.expectClosed()
	})
}

func TestHandshakeTimeout(t *testing.T) {
	_, sock := startServer(t, ServerOptions{HandshakeTimeout: 200 * time.Millisecond}, &Export{Name: "a", Backend: newMem(512)})
	c := dial(t, "unix", sock)
	c.read(GreetingSize)
	start := time.Now()
	c.expectClosed()
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("closed after %v", d)
	}
	// A client that finished its handshake is not subject to it.
	c = dial(t, "unix", sock)
	c.connect("a", false, false)
	time.Sleep(400 * time.Millisecond)
	if r := c.do(Request{Type: CmdRead, Length: 512}, nil); r.Err != 0 {
		t.Fatal(r)
	}
}

func TestReadWrite(t *testing.T) {
	for _, structured := range []bool{false, true} {
		m := newMem(1 << 20)
		_, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: m, Writable: true})
		c := dial(t, "unix", sock)
		c.connect("d", structured, false)
		data := pattern(64<<10, 3)
		if r := c.do(Request{Type: CmdWrite, Offset: 4096, Length: uint32(len(data))}, data); r.Err != 0 {
			t.Fatal(r)
		}
		if r := c.do(Request{Type: CmdWrite, Flags: CmdFlagFUA, Offset: 0, Length: 1}, []byte{9}); r.Err != 0 || m.fuas.Load() != 1 {
			t.Fatal(r, m.fuas.Load())
		}
		r := c.do(Request{Type: CmdRead, Offset: 4096, Length: uint32(len(data))}, nil)
		if r.Err != 0 || !bytes.Equal(r.Data, data) {
			t.Fatalf("structured=%v: read back %v", structured, r)
		}
		if !bytes.Equal(m.snapshot()[4096:4096+len(data)], data) {
			t.Fatal("backend does not hold the data")
		}
		if structured {
			r = c.do(Request{Type: CmdRead, Flags: CmdFlagDF, Offset: 0, Length: 1 << 20}, nil)
			if r.Err != 0 || len(r.Chunks) != 1 {
				t.Fatalf("DF read: %v chunks %d", r, len(r.Chunks))
			}
		}
		// Zero-length requests are odd but legal.
		if r := c.do(Request{Type: CmdRead, Offset: 0, Length: 0}, nil); r.Err != 0 {
			t.Fatal(r)
		}
		if r := c.do(Request{Type: CmdWrite, Offset: 1 << 20, Length: 0}, nil); r.Err != 0 {
			t.Fatal(r)
		}
		if r := c.do(Request{Type: CmdFlush}, nil); r.Err != 0 || m.flushes.Load() != 1 {
			t.Fatal(r)
		}
		if r := c.do(Request{Type: CmdCache, Offset: 0, Length: 4096}, nil); r.Err != 0 {
			t.Fatal(r)
		}
		c.disconnect()
	}
}

func TestRequestErrors(t *testing.T) {
	for _, structured := range []bool{false, true} {
		m := newMem(4 << 20)
		_, sock := startServer(t, ServerOptions{},
			&Export{Name: "rw", Backend: m, Writable: true, MaxBlock: 1 << 20},
			&Export{Name: "ro", Backend: newFull(1 << 20)})
		c := dial(t, "unix", sock)
		c.connect("rw", structured, false)
		big := make([]byte, 2<<20)
		for _, tc := range []struct {
			r       Request
			payload []byte
			want    Errno
		}{
			{Request{Type: CmdRead, Offset: 4<<20 - 1, Length: 2}, nil, EINVAL},
			{Request{Type: CmdRead, Offset: 1 << 62, Length: 1}, nil, EINVAL},
			{Request{Type: CmdRead, Offset: ^uint64(0), Length: 1}, nil, EINVAL},
			{Request{Type: CmdWrite, Offset: 4<<20 - 1, Length: 2}, []byte{1, 2}, ENOSPC},
			{Request{Type: CmdWriteZeroes, Offset: 4 << 20, Length: 1}, nil, ENOSPC},
			{Request{Type: CmdRead, Offset: 0, Length: 2 << 20}, nil, EINVAL},    // over the max block
			{Request{Type: CmdWrite, Offset: 0, Length: 2 << 20}, big, EINVAL},   // payload read and dropped
			{Request{Type: CmdTrim, Offset: 0, Length: 512}, nil, EINVAL},        // backend cannot trim
			{Request{Type: CmdBlockStatus, Offset: 0, Length: 512}, nil, EINVAL}, // no meta context
			{Request{Type: Cmd(99), Offset: 0, Length: 0}, nil, EINVAL},          // unknown command
			{Request{Type: CmdResize, Offset: 0, Length: 0}, nil, EINVAL},        // not built
			{Request{Type: CmdRead, Flags: 1 << 9, Length: 1}, nil, EINVAL},      // unknown flag
			{Request{Type: CmdWrite, Flags: CmdFlagNoHole, Length: 1}, []byte{0}, EINVAL},
			{Request{Type: CmdWriteZeroes, Flags: CmdFlagFastZero, Length: 512}, nil, ENOTSUP}, // memCore cannot zero fast
		} {
			if tc.r.Type == CmdRead && tc.r.Flags&CmdFlagDF != 0 && !structured {
				continue
			}
			r := c.do(tc.r, tc.payload)
			if r.Err != tc.want {
				t.Errorf("structured=%v %v %+v: got %v (%q), want %v", structured, tc.r.Type, tc.r, r.Err, r.Msg, tc.want)
			}
			if structured && r.Msg == "" {
				t.Errorf("%v: structured error without message", tc.r.Type)
			}
		}
		if !bytes.Equal(m.snapshot(), make([]byte, 4<<20)) {
			t.Error("a failed request changed the export")
		}
		if structured {
			// DF was not offered without structured replies.
			if r := c.do(Request{Type: CmdRead, Flags: CmdFlagDF, Length: 1}, nil); r.Err != 0 {
				t.Errorf("DF read: %v", r)
			}
		} else if r := c.do(Request{Type: CmdRead, Flags: CmdFlagDF, Length: 1}, nil); r.Err != EINVAL {
			t.Errorf("DF read without structured replies: %v", r)
		}
		c.disconnect()

		ro := dial(t, "unix", sock)
		if ei := ro.connect("ro", structured, false); ei.Flags&FlagReadOnly == 0 || ei.Flags&(FlagSendTrim|FlagSendWriteZeroes|FlagSendFUA) != 0 {
			t.Errorf("read-only flags %#x", ei.Flags)
		}
		for _, r := range []Request{
			{Type: CmdWrite, Length: 3},
			{Type: CmdTrim, Length: 512},
			{Type: CmdWriteZeroes, Length: 512},
		} {
			var p []byte
			if r.Type == CmdWrite {
				p = []byte{1, 2, 3}
			}
			if rep := ro.do(r, p); rep.Err != EPERM {
				t.Errorf("read-only %v: %v", r.Type, rep)
			}
		}
		if r := ro.do(Request{Type: CmdRead, Length: 512}, nil); r.Err != 0 {
			t.Error(r)
		}
		ro.disconnect()
	}
}

func TestHostileTransmission(t *testing.T) {
	m := newMem(1 << 20)
	s, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: m, Writable: true})
	for _, tc := range []struct {
		name string
		send func(c *testClient)
	}{
		{"bad magic", func(c *testClient) { c.send(make([]byte, RequestSize)) }},
		{"extended header magic", func(c *testClient) {
			b := Request{Type: CmdRead, Length: 1}.Append(nil)
			be.PutUint32(b, MagicExtendedRequest)
			c.send(b)
		}},
		{"huge write", func(c *testClient) { c.send(Request{Type: CmdWrite, Length: MaxPayload + 1}.Append(nil)) }},
		{"write cut short", func(c *testClient) {
			c.send(Request{Type: CmdWrite, Length: 4096}.Append(nil))
			c.send(make([]byte, 100))
			c.nc.(*net.UnixConn).CloseWrite()
		}},
		{"header cut short", func(c *testClient) {
			c.send(Request{Type: CmdRead, Length: 1}.Append(nil)[:10])
			c.nc.(*net.UnixConn).CloseWrite()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, "unix", sock)
			c.connect("d", true, false)
			tc.send(c)
			c.expectClosed()
		})
	}
	// Disconnecting with requests in flight leaks nothing: the server
	// forgets the client.
	c := dial(t, "unix", sock)
	c.connect("d", false, false)
	for range 8 {
		c.submit(Request{Type: CmdRead, Length: 1 << 20}, nil)
	}
	c.nc.Close()
	waitFor(t, func() bool { return s.Clients("d") == 0 })
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10 s")
		}
	}
}

func TestWriteZeroesAndTrim(t *testing.T) {
	for _, full := range []bool{false, true} {
		var bk Backend
		var core *memCore
		var f *memFull
		if full {
			f = newFull(4 << 20)
			bk, core = f, f.memCore
		} else {
			core = newMem(4 << 20)
			bk = core
		}
		_, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: bk, Writable: true})
		c := dial(t, "unix", sock)
		ei := c.connect("d", true, false)
		if got := ei.Flags&FlagSendTrim != 0; got != full {
			t.Errorf("full=%v: trim offered=%v", full, got)
		}
		data := bytes.Repeat([]byte{0xab}, 4<<20)
		if r := c.do(Request{Type: CmdWrite, Length: 4 << 20}, data); r.Err != 0 {
			t.Fatal(r)
		}
		// 3 MiB spans several of the fallback's 1 MiB zero buffers.
		if r := c.do(Request{Type: CmdWriteZeroes, Flags: CmdFlagFUA | CmdFlagNoHole, Offset: 4096, Length: 3 << 20}, nil); r.Err != 0 {
			t.Fatal(r)
		}
		snap := core.snapshot()
		if !bytes.Equal(snap[4096:4096+3<<20], make([]byte, 3<<20)) || snap[4095] != 0xab || snap[4096+3<<20] != 0xab {
			t.Fatal("write zeroes wrote the wrong range")
		}
		if full {
			if f.lastUnmap.Load() {
				t.Error("NO_HOLE did not reach the backend")
			}
			if core.flushes.Load() == 0 {
				t.Error("FUA write zeroes did not flush")
			}
			if r := c.do(Request{Type: CmdWriteZeroes, Flags: CmdFlagFastZero, Offset: 0, Length: 4096}, nil); r.Err != 0 || !f.lastUnmap.Load() {
				t.Errorf("fast zero: %v", r)
			}
			f.fastOK = false // only this goroutine runs requests now
			if r := c.do(Request{Type: CmdWriteZeroes, Flags: CmdFlagFastZero, Offset: 0, Length: 4096}, nil); r.Err != ENOTSUP {
				t.Errorf("slow fast zero: %v", r)
			}
			// Without FAST_ZERO an ENOTSUP from the backend falls back to writes.
			if r := c.do(Request{Type: CmdWriteZeroes, Offset: 0, Length: 4096}, nil); r.Err != 0 {
				t.Errorf("fallback zero: %v", r)
			}
			if r := c.do(Request{Type: CmdTrim, Flags: CmdFlagFUA, Offset: 1 << 20, Length: 1 << 20}, nil); r.Err != 0 || f.discards.Load() != 1 {
				t.Errorf("trim: %v", r)
			}
		} else if r := c.do(Request{Type: CmdWriteZeroes, Flags: CmdFlagFastZero, Length: 4096}, nil); r.Err != ENOTSUP {
			t.Errorf("fast zero without ZeroWriter: %v", r)
		}
		c.disconnect()
	}
}

func TestBlockStatus(t *testing.T) {
	f := newFull(1 << 20) // 16 grains of 64 KiB, all holes
	ctx := context.Background()
	_ = f.WriteV(ctx, 2*memGrain, [][]byte{make([]byte, 2*memGrain)}, false)
	_ = f.WriteV(ctx, 8*memGrain, [][]byte{{1}}, false)
	_, sock := startServer(t, ServerOptions{},
		&Export{Name: "d", Backend: f},
		&Export{Name: "plain", Backend: newMem(1 << 20)},
		&Export{Name: "aligned", Backend: f, MinBlock: 4096, PrefBlock: 4096, MaxBlock: 1 << 20})

	c := dial(t, "unix", sock)
	c.connect("d", true, true)
	r := c.do(Request{Type: CmdBlockStatus, Offset: 0, Length: 1 << 20}, nil)
	hz := StateHole | StateZero
	want := []Extent{
		{2 * memGrain, hz}, {2 * memGrain, 0}, {4 * memGrain, hz}, {memGrain, 0}, {7 * memGrain, hz},
	}
	if r.Err != 0 || !slices.Equal(r.Extents, want) || r.CtxID != metaContextID {
		t.Fatalf("block status %v, want %v", r, want)
	}
	r = c.do(Request{Type: CmdBlockStatus, Flags: CmdFlagReqOne, Offset: 100, Length: 1000}, nil)
	if !slices.Equal(r.Extents, []Extent{{1000, hz}}) {
		t.Errorf("REQ_ONE: %v", r)
	}
	if r := c.do(Request{Type: CmdBlockStatus, Offset: 1 << 20, Length: 1}, nil); r.Err != EINVAL {
		t.Errorf("beyond the end: %v", r)
	}
	c.disconnect()

	// Without a BlockStatuser everything is data.
	c = dial(t, "unix", sock)
	c.connect("plain", true, true)
	if r := c.do(Request{Type: CmdBlockStatus, Offset: 0, Length: 1 << 20}, nil); !slices.Equal(r.Extents, []Extent{{1 << 20, 0}}) {
		t.Errorf("plain: %v", r)
	}
	c.disconnect()

	// Contexts set for another export do not carry over to GO.
	c = dial(t, "unix", sock)
	c.greet(FlagCFixedNewstyle)
	c.negotiateStructured()
	c.metaContext(OptSetMetaContext, "plain", MetaContextBaseAllocation)
	c.goExport("d")
	if r := c.do(Request{Type: CmdBlockStatus, Length: 512}, nil); r.Err != EINVAL {
		t.Errorf("meta of another export: %v", r)
	}
	c.disconnect()
}

func TestMinBlockSize(t *testing.T) {
	f := newFull(1 << 20)
	_ = f.WriteV(context.Background(), 0, [][]byte{{1}}, false)
	_, sock := startServer(t, ServerOptions{}, &Export{Name: "a", Backend: f, Writable: true, MinBlock: 512, PrefBlock: 4096, MaxBlock: 1 << 20})
	c := dial(t, "unix", sock)
	c.greet(FlagCFixedNewstyle)
	ins, rep, _ := c.info(OptGo, "a")
	if rep != RepErrBlockSizeReqd || len(ins) != 1 || ins[0].MinBlock != 512 {
		t.Fatalf("GO without block sizes: %v %v", ins, rep)
	}
	c.goExport("a", InfoBlockSize)
	if r := c.do(Request{Type: CmdRead, Offset: 1, Length: 512}, nil); r.Err != EINVAL {
		t.Errorf("unaligned read: %v", r)
	}
	if r := c.do(Request{Type: CmdWrite, Offset: 512, Length: 100}, make([]byte, 100)); r.Err != EINVAL {
		t.Errorf("unaligned write: %v", r)
	}
	if r := c.do(Request{Type: CmdRead, Offset: 512, Length: 1024}, nil); r.Err != 0 {
		t.Errorf("aligned read: %v", r)
	}
	c.disconnect()

	c = dial(t, "unix", sock)
	c.greet(FlagCFixedNewstyle)
	c.sendOpt(OptExportName, []byte("a"))
	c.expectClosed()
}

// gatedMem blocks reads and writes until released, counting arrivals.
func gatedMem(size int) (*memCore, *atomic.Int64, chan struct{}) {
	m := newMem(size)
	var arrived atomic.Int64
	release := make(chan struct{})
	m.gate = func(ctx context.Context) error {
		arrived.Add(1)
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return m, &arrived, release
}

func TestConcurrentRequests(t *testing.T) {
	m, arrived, release := gatedMem(1 << 20)
	_, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: m, Writable: true})
	c := dial(t, "unix", sock)
	c.connect("d", true, false)
	const n = 20
	for i := range n {
		c.submit(Request{Type: CmdRead, Offset: uint64(i) * 4096, Length: 4096}, nil)
	}
	// All n reach the backend at once: they run concurrently.
	waitFor(t, func() bool { return arrived.Load() == n })
	close(release)
	seen := map[uint64]bool{}
	for range n {
		r := c.recv()
		if r.Err != 0 || seen[r.Handle] {
			t.Fatal(r)
		}
		seen[r.Handle] = true
	}
	c.disconnect()
}

func TestInFlightBound(t *testing.T) {
	m, arrived, release := gatedMem(1 << 20)
	_, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: m, Writable: true})
	c := dial(t, "unix", sock)
	c.connect("d", false, false)
	for range MaxInFlight + 10 {
		c.submit(Request{Type: CmdRead, Length: 512}, nil)
	}
	waitFor(t, func() bool { return arrived.Load() == MaxInFlight })
	time.Sleep(50 * time.Millisecond)
	if got := arrived.Load(); got != MaxInFlight {
		t.Fatalf("%d requests in flight, want %d", got, MaxInFlight)
	}
	close(release)
	for range MaxInFlight + 10 {
		if r := c.recv(); r.Err != 0 {
			t.Fatal(r)
		}
	}
	c.disconnect()
}

func TestRemoveExport(t *testing.T) {
	t.Run("safe", func(t *testing.T) {
		m, arrived, release := gatedMem(1 << 20)
		s, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: m, Writable: true})
		c := dial(t, "unix", sock)
		c.connect("d", false, false)
		data := pattern(4096, 1)
		c.submit(Request{Type: CmdWrite, Length: 4096}, data)
		waitFor(t, func() bool { return arrived.Load() == 1 })
		if s.Clients("d") != 1 {
			t.Fatalf("clients %d", s.Clients("d"))
		}
		removed := make(chan error)
		go func() { removed <- s.RemoveExport("d", false) }()
		select {
		case err := <-removed:
			t.Fatalf("RemoveExport returned with a request in flight: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		close(release)
		if err := <-removed; err != nil {
			t.Fatal(err)
		}
		// The in-flight write completed and was answered before the close.
		if r := c.recv(); r.Err != 0 {
			t.Fatal(r)
		}
		c.expectClosed()
		if !bytes.Equal(m.snapshot()[:4096], data) {
			t.Fatal("write lost")
		}
		if len(s.Exports()) != 0 {
			t.Fatal(s.Exports())
		}
		// New clients cannot find it.
		c = dial(t, "unix", sock)
		c.greet(FlagCFixedNewstyle)
		if _, rep, _ := c.info(OptGo, "d"); rep != RepErrUnknown {
			t.Fatal(rep)
		}
	})
	t.Run("hard", func(t *testing.T) {
		m, arrived, _ := gatedMem(1 << 20)
		s, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: m})
		c := dial(t, "unix", sock)
		c.connect("d", false, false)
		c.submit(Request{Type: CmdRead, Length: 4096}, nil)
		waitFor(t, func() bool { return arrived.Load() == 1 })
		if err := s.RemoveExport("d", true); err != nil {
			t.Fatal(err)
		}
		c.expectClosed()
	})
	t.Run("handshake clients unaffected", func(t *testing.T) {
		s, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: newMem(512)}, &Export{Name: "e", Backend: newMem(512)})
		c := dial(t, "unix", sock)
		c.greet(FlagCFixedNewstyle)
		if err := s.RemoveExport("d", false); err != nil {
			t.Fatal(err)
		}
		c.goExport("e")
		c.disconnect()
	})
}

func TestRegistry(t *testing.T) {
	s := NewServer(ServerOptions{})
	if err := s.AddExport(&Export{Name: "x", Backend: newMem(512)}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(&Export{Name: "x", Backend: newMem(512)}); !errors.Is(err, ErrExportExists) {
		t.Fatalf("duplicate: %v", err)
	}
	if err := s.RemoveExport("y", false); !errors.Is(err, ErrExportNotFound) {
		t.Fatalf("remove missing: %v", err)
	}
	for _, e := range []*Export{
		{Name: "b1", Backend: newMem(512), MinBlock: 3},
		{Name: "b2", Backend: newMem(512), MinBlock: 128 << 10},
		{Name: "b3", Backend: newMem(512), PrefBlock: 256},
		{Name: "b4", Backend: newMem(512), MinBlock: 512, MaxBlock: 1000},
		{Name: "b5", Backend: newMem(512), MaxBlock: 64 << 20},
		{Name: "b6", Backend: nil},
		{Name: strings.Repeat("n", 5000), Backend: newMem(512)},
		{Name: "nul\x00", Backend: newMem(512)},
	} {
		if err := s.AddExport(e); err == nil {
			t.Errorf("AddExport(%.20q, min %d pref %d max %d) accepted", e.Name, e.MinBlock, e.PrefBlock, e.MaxBlock)
		}
	}
	if err := s.AddExport(&Export{Name: "a", Backend: newMem(512)}); err != nil {
		t.Fatal(err)
	}
	if got := s.Exports(); !slices.Equal(got, []string{"a", "x"}) {
		t.Fatal(got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := s.Serve(l); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
}

func TestMaxConnections(t *testing.T) {
	_, sock := startServer(t, ServerOptions{MaxConnections: 1}, &Export{Name: "d", Backend: newMem(512)})
	c1 := dial(t, "unix", sock)
	c1.connect("d", false, false)
	c2 := dial(t, "unix", sock) // sits in the backlog
	got := make(chan error, 1)
	go func() {
		b := make([]byte, GreetingSize)
		if _, err := io.ReadFull(c2.br, b); err != nil {
			got <- err
			return
		}
		_, err := ParseGreeting(b)
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("second client greeted while the first is connected: %v", err)
	case <-time.After(150 * time.Millisecond):
	}
	c1.disconnect()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

func TestCloseWithClients(t *testing.T) {
	m, arrived, release := gatedMem(1 << 20)
	s, sock := startServer(t, ServerOptions{}, &Export{Name: "d", Backend: m})
	c := dial(t, "unix", sock)
	c.connect("d", true, false)
	idle := dial(t, "unix", sock)
	idle.greet(FlagCFixedNewstyle)
	c.submit(Request{Type: CmdRead, Length: 4096}, nil)
	waitFor(t, func() bool { return arrived.Load() == 1 })
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	if r := c.recv(); r.Err != 0 {
		t.Fatal(r)
	}
	c.expectClosed()
	idle.expectClosed()
}

func TestTCP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(ServerOptions{})
	m := newFull(1 << 20)
	if err := s.AddExport(&Export{Name: "t", Backend: m, Writable: true}); err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	c := dial(t, "tcp", l.Addr().String())
	c.connect("t", true, true)
	data := pattern(8192, 5)
	if r := c.do(Request{Type: CmdWrite, Offset: 8192, Length: 8192}, data); r.Err != 0 {
		t.Fatal(r)
	}
	if r := c.do(Request{Type: CmdRead, Offset: 8192, Length: 8192}, nil); !bytes.Equal(r.Data, data) {
		t.Fatal(r)
	}
	c.disconnect()
}

func TestServeConnPipe(t *testing.T) {
	s := NewServer(ServerOptions{})
	defer s.Close()
	if err := s.AddExport(&Export{Name: "p", Backend: newMem(4096)}); err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	done := make(chan error)
	go func() { done <- s.ServeConn(a) }()
	c := &testClient{t: t, nc: b, br: bufio.NewReader(b), pending: map[uint64]Request{}, partial: map[uint64]*reply{}}
	c.connect("p", false, false)
	if r := c.do(Request{Type: CmdRead, Length: 4096}, nil); r.Err != 0 {
		t.Fatal(r)
	}
	c.send(Request{Type: CmdDisc}.Append(nil))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
