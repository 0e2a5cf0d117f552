package nbd

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// Fuzz targets. Seeds live in testdata/fuzz/FuzzXxx/ (regenerate them with
// NBD_GEN_SEEDS=1 go test -run TestGenerateFuzzSeeds ./nbd/).

// fuzzServe feeds raw client bytes to a fresh server over a pipe and
// checks that the connection ends, with every goroutine of it, in time.
func fuzzServe(t *testing.T, input []byte) {
	s := NewServer(ServerOptions{HandshakeTimeout: 2 * time.Second, DrainTimeout: time.Second})
	defer s.Close()
	f := newFull(1 << 20)
	for _, e := range []*Export{
		{Name: "a", Backend: f, Writable: true, MultiConn: true},
		{Name: "", Backend: newMem(64 << 10)},
		{Name: "b", Backend: f, Writable: true, MinBlock: 512, PrefBlock: 4096, MaxBlock: 64 << 10},
	} {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	srv, cli := net.Pipe()
	done := make(chan struct{})
	go func() {
		_ = s.ServeConn(srv)
		close(done)
	}()
	drained := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, cli)
		close(drained)
	}()
	_, _ = cli.Write(input)
	cli.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("connection did not end within 10 s of the client closing")
	}
	<-drained
}

// handshakePrefix negotiates structured replies and base:allocation, then
// enters transmission on export "a".
func handshakePrefix(export string) []byte {
	b := be.AppendUint32(nil, FlagCFixedNewstyle|FlagCNoZeroes)
	b = OptionHeader{Option: OptStructuredReply}.Append(b)
	meta := MetaContextRequest{Name: export, Queries: []string{MetaContextBaseAllocation}}.Append(nil)
	b = OptionHeader{Option: OptSetMetaContext, Length: uint32(len(meta))}.Append(b)
	b = append(b, meta...)
	g := InfoRequest{Name: export, Infos: []uint16{InfoBlockSize}}.Append(nil)
	b = OptionHeader{Option: OptGo, Length: uint32(len(g))}.Append(b)
	return append(b, g...)
}

// FuzzServer: arbitrary client bytes after the greeting.
func FuzzServer(f *testing.F) {
	f.Add(handshakePrefix("a"))
	f.Add(append(be.AppendUint32(nil, 3), OptionHeader{Option: OptList}.Append(nil)...))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzServe(t, data) })
}

// FuzzTransmission: arbitrary requests after a valid handshake.
func FuzzTransmission(f *testing.F) {
	f.Add(Request{Type: CmdRead, Length: 512}.Append(nil), false)
	f.Add(append(Request{Type: CmdWrite, Offset: 4096, Length: 4}.Append(nil), 1, 2, 3, 4), true)
	f.Fuzz(func(t *testing.T, data []byte, minBlockExport bool) {
		exp := "a"
		if minBlockExport {
			exp = "b"
		}
		fuzzServe(t, append(handshakePrefix(exp), data...))
	})
}

// roundTrip checks that a parsed value encodes back to something that
// parses to the same value.
func roundTrip[T any](t *testing.T, v T, app func(T) []byte, parse func([]byte) (T, error)) {
	t.Helper()
	w, err := parse(app(v))
	if err != nil {
		t.Fatalf("re-parse of %+v: %v", v, err)
	}
	if !reflect.DeepEqual(v, w) {
		t.Fatalf("round trip: %+v became %+v", v, w)
	}
}

// FuzzOptionDecoders: the decoders of client option data.
func FuzzOptionDecoders(f *testing.F) {
	f.Add(InfoRequest{Name: "x", Infos: []uint16{3}}.Append(nil))
	f.Add(MetaContextRequest{Name: "x", Queries: []string{"base:allocation"}}.Append(nil))
	f.Add(OptionHeader{Option: OptGo, Length: 9}.Append(nil))
	f.Fuzz(func(t *testing.T, data []byte) {
		if r, err := ParseInfoRequest(data); err == nil {
			roundTrip(t, r, func(r InfoRequest) []byte { return r.Append(nil) }, ParseInfoRequest)
		}
		if r, err := ParseMetaContextRequest(data); err == nil {
			roundTrip(t, r, func(r MetaContextRequest) []byte { return r.Append(nil) }, ParseMetaContextRequest)
		}
		if len(data) >= OptionHeaderSize {
			if h, err := ParseOptionHeader(data[:OptionHeaderSize]); err == nil {
				roundTrip(t, h, func(h OptionHeader) []byte { return h.Append(nil) }, ParseOptionHeader)
			}
		}
	})
}

// FuzzRequestDecoder: the transmission request header.
func FuzzRequestDecoder(f *testing.F) {
	f.Add(Request{Type: CmdBlockStatus, Flags: CmdFlagReqOne, Handle: 7, Offset: 1 << 40, Length: 512}.Append(nil))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseRequest(data)
		if err != nil {
			return
		}
		roundTrip(t, r, func(r Request) []byte { return r.Append(nil) }, ParseRequest)
	})
}

// FuzzReplyDecoders: what a client (drivers/nbd) parses from a server.
func FuzzReplyDecoders(f *testing.F) {
	f.Add(Info{Type: InfoBlockSize, MinBlock: 1, PrefBlock: 4096, MaxBlock: 1 << 25}.Append(nil))
	f.Add(AppendBlockStatus(nil, 1, []Extent{{512, 3}, {4096, 0}}))
	f.Add(ErrorChunk{Error: EIO, Message: "boom", Offset: 9}.Append(nil, ReplyTypeErrorOffset))
	f.Fuzz(func(t *testing.T, data []byte) {
		if i, err := ParseInfo(data); err == nil && i.Type <= InfoBlockSize {
			roundTrip(t, i, func(i Info) []byte { return i.Append(nil) }, ParseInfo)
		}
		if r, err := ParseServerReply(data); err == nil {
			roundTrip(t, r, func(r ServerReply) []byte { return r.Append(nil) }, ParseServerReply)
		}
		if r, err := ParseMetaContextReply(data); err == nil {
			roundTrip(t, r, func(r MetaContextReply) []byte { return r.Append(nil) }, ParseMetaContextReply)
		}
		for _, ty := range []ReplyType{ReplyTypeError, ReplyTypeErrorOffset} {
			if c, err := ParseErrorChunk(ty, data); err == nil && len(c.Message) <= MaxStringLength {
				roundTrip(t, c, func(c ErrorChunk) []byte { return c.Append(nil, ty) },
					func(b []byte) (ErrorChunk, error) { return ParseErrorChunk(ty, b) })
			}
		}
		if id, ext, err := ParseBlockStatus(data); err == nil {
			id2, ext2, err := ParseBlockStatus(AppendBlockStatus(nil, id, ext))
			if err != nil || id2 != id || !reflect.DeepEqual(ext, ext2) {
				t.Fatalf("block status round trip: %v %v %v", id2, ext2, err)
			}
		}
		if h, err := ParseOffsetHole(data); err == nil {
			roundTrip(t, h, func(h OffsetHole) []byte { return h.Append(nil) }, ParseOffsetHole)
		}
		for _, n := range []int{GreetingSize, OptionReplyHeaderSize, ExportNameReplySize, SimpleReplySize, ChunkHeaderSize} {
			if len(data) < n {
				continue
			}
			p := data[:n]
			_, _ = ParseGreeting(p)
			if h, err := ParseOptionReplyHeader(p); err == nil {
				roundTrip(t, h, func(h OptionReplyHeader) []byte { return h.Append(nil) }, ParseOptionReplyHeader)
			}
			if e, err := ParseExportNameReply(p); err == nil {
				roundTrip(t, e, func(e ExportInfo) []byte { return AppendExportNameReply(nil, e, true) }, ParseExportNameReply)
			}
			if r, err := ParseSimpleReply(p); err == nil {
				roundTrip(t, r, func(r SimpleReply) []byte { return r.Append(nil) }, ParseSimpleReply)
			}
			if h, err := ParseChunkHeader(p); err == nil {
				roundTrip(t, h, func(h ChunkHeader) []byte { return h.Append(nil) }, ParseChunkHeader)
			}
		}
	})
}

// TestGenerateFuzzSeeds writes the seed corpora (run by hand).
func TestGenerateFuzzSeeds(t *testing.T) {
	if os.Getenv("NBD_GEN_SEEDS") == "" {
		t.Skip("set NBD_GEN_SEEDS=1 to rewrite testdata/fuzz seeds")
	}
	write := func(target, name string, vals ...any) {
		dir := filepath.Join("testdata", "fuzz", target)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		s := "go test fuzz v1\n"
		for _, v := range vals {
			switch v := v.(type) {
			case []byte:
				s += fmt.Sprintf("[]byte(%q)\n", v)
			case bool:
				s += fmt.Sprintf("bool(%v)\n", v)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cf := be.AppendUint32(nil, FlagCFixedNewstyle|FlagCNoZeroes)
	opt := func(o Opt, data []byte) []byte {
		return append(OptionHeader{Option: o, Length: uint32(len(data))}.Append(nil), data...)
	}
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	write("FuzzServer", "go", handshakePrefix("a"))
	write("FuzzServer", "export-name", cat(cf, opt(OptExportName, []byte("a")), Request{Type: CmdRead, Length: 4096}.Append(nil)))
	write("FuzzServer", "list-info", cat(cf, opt(OptList, nil), opt(OptInfo, InfoRequest{Name: "b", Infos: []uint16{0, 1, 2, 3}}.Append(nil)), opt(OptAbort, nil)))
	write("FuzzServer", "meta-list", cat(cf, opt(OptStructuredReply, nil), opt(OptListMetaContext, MetaContextRequest{Name: "a", Queries: []string{"base:", "qemu:dirty-bitmap:x"}}.Append(nil))))
	write("FuzzServer", "misc", cat(cf, opt(OptStartTLS, nil), opt(Opt(77), []byte("zz")), opt(OptGo, InfoRequest{Name: "nope"}.Append(nil)), opt(OptGo, InfoRequest{Name: "b"}.Append(nil))))
	write("FuzzServer", "too-big", cat(cf, OptionHeader{Option: OptGo, Length: MaxOptionLength + 1}.Append(nil)))

	req := func(r Request, p ...byte) []byte { return append(r.Append(nil), p...) }
	write("FuzzTransmission", "rw", cat(
		req(Request{Type: CmdWrite, Flags: CmdFlagFUA, Offset: 512, Length: 8}, 1, 2, 3, 4, 5, 6, 7, 8),
		req(Request{Type: CmdRead, Flags: CmdFlagDF, Offset: 0, Length: 1024}),
		req(Request{Type: CmdFlush}),
		req(Request{Type: CmdDisc})), false)
	write("FuzzTransmission", "zero-trim-status", cat(
		req(Request{Type: CmdWriteZeroes, Flags: CmdFlagNoHole | CmdFlagFastZero, Offset: 0, Length: 65536}),
		req(Request{Type: CmdTrim, Offset: 65536, Length: 65536}),
		req(Request{Type: CmdBlockStatus, Offset: 0, Length: 1 << 20}),
		req(Request{Type: CmdBlockStatus, Flags: CmdFlagReqOne, Offset: 512, Length: 512}),
		req(Request{Type: CmdCache, Offset: 0, Length: 4096})), false)
	write("FuzzTransmission", "aligned", cat(
		req(Request{Type: CmdRead, Offset: 1, Length: 512}),
		req(Request{Type: CmdWrite, Offset: 512, Length: 2}, 9, 9),
		req(Request{Type: CmdBlockStatus, Offset: 4096, Length: 8192})), true)
	write("FuzzTransmission", "bad", cat(
		req(Request{Type: Cmd(42), Length: 4}),
		req(Request{Type: CmdRead, Offset: 1 << 63, Length: 1 << 31}),
		req(Request{Type: CmdWrite, Length: MaxPayload + 1})), false)

	write("FuzzOptionDecoders", "info", InfoRequest{Name: "export", Infos: []uint16{0, 1, 2, 3}}.Append(nil))
	write("FuzzOptionDecoders", "meta", MetaContextRequest{Name: "e", Queries: []string{"base:", "base:allocation", "qemu:dirty-bitmap:b"}}.Append(nil))
	write("FuzzOptionDecoders", "meta-count", []byte{0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff})
	write("FuzzOptionDecoders", "header", OptionHeader{Option: OptSetMetaContext, Length: 40}.Append(nil))

	write("FuzzRequestDecoder", "read", Request{Type: CmdRead, Handle: 1, Offset: 4096, Length: 4096}.Append(nil))
	write("FuzzRequestDecoder", "ext", []byte{0x21, 0xe4, 0x1c, 0x71, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})

	write("FuzzReplyDecoders", "info-export", Info{Type: InfoExport, Export: ExportInfo{Size: 1 << 30, Flags: 0xded}}.Append(nil))
	write("FuzzReplyDecoders", "server", ServerReply{Name: "disk", Description: "desc"}.Append(nil))
	write("FuzzReplyDecoders", "meta", MetaContextReply{ID: 1, Name: MetaContextBaseAllocation}.Append(nil))
	write("FuzzReplyDecoders", "block-status", AppendBlockStatus(nil, 1, []Extent{{65536, 3}, {4096, 0}, {1, 2}}))
	write("FuzzReplyDecoders", "error", ErrorChunk{Error: EINVAL, Message: "bad"}.Append(nil, ReplyTypeError))
	write("FuzzReplyDecoders", "chunk", ChunkHeader{Flags: ReplyFlagDone, Type: ReplyTypeOffsetData, Handle: 3, Length: 520}.Append(nil))
	write("FuzzReplyDecoders", "greeting", AppendGreeting(nil, 3))
}
