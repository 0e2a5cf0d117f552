package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// testClient is a minimal NBD client built on the codec, for driving the
// server with both good and malformed input.
type testClient struct {
	t          testing.TB
	nc         net.Conn
	br         *bufio.Reader
	structured bool
	pending    map[uint64]Request
	partial    map[uint64]*reply
	next       uint64
}

type reply struct {
	Handle  uint64
	Err     Errno
	Msg     string
	Data    []byte
	Extents []Extent
	CtxID   uint32
	Chunks  []ChunkHeader
}

// startServer serves the exports on a fresh UNIX socket; cleanup closes it.
func startServer(t testing.TB, opts ServerOptions, exports ...*Export) (*Server, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdt")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(opts)
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; !errors.Is(err, net.ErrClosed) {
			t.Errorf("Serve returned %v, want net.ErrClosed", err)
		}
		os.RemoveAll(dir)
	})
	return s, sock
}

func dial(t testing.TB, network, addr string) *testClient {
	t.Helper()
	nc, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return &testClient{t: t, nc: nc, br: bufio.NewReader(nc), pending: map[uint64]Request{}, partial: map[uint64]*reply{}}
}

func (c *testClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (c *testClient) send(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// expectClosed checks that the server closes the connection (EOF or reset
// with nothing more to read).
func (c *testClient) expectClosed() {
	c.t.Helper()
	_ = c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c.br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("server did not close the connection (read %d bytes)", len(b))
	}
	if len(b) != 0 {
		c.t.Fatalf("read %d unexpected bytes before close", len(b))
	}
}

// greet reads the greeting and sends client flags.
func (c *testClient) greet(cflags uint32) uint16 {
	c.t.Helper()
	hf, err := ParseGreeting(c.read(GreetingSize))
	if err != nil {
		c.t.Fatal(err)
	}
	c.send(be.AppendUint32(nil, cflags))
	return hf
}

func (c *testClient) sendOpt(opt Opt, data []byte) {
	c.t.Helper()
	c.send(append(OptionHeader{Option: opt, Length: uint32(len(data))}.Append(nil), data...))
}

func (c *testClient) optReply() (OptionReplyHeader, []byte) {
	c.t.Helper()
	h, err := ParseOptionReplyHeader(c.read(OptionReplyHeaderSize))
	if err != nil {
		c.t.Fatal(err)
	}
	return h, c.read(int(h.Length))
}

// simpleOpt sends an option expecting one reply.
func (c *testClient) simpleOpt(opt Opt, data []byte) (Rep, string) {
	c.t.Helper()
	c.sendOpt(opt, data)
	h, d := c.optReply()
	if h.Option != opt {
		c.t.Fatalf("reply to %v names %v", opt, h.Option)
	}
	return h.Type, string(d)
}

func (c *testClient) negotiateStructured() {
	c.t.Helper()
	if r, _ := c.simpleOpt(OptStructuredReply, nil); r != RepAck {
		c.t.Fatalf("structured reply: %v", r)
	}
	c.structured = true
}

// info sends NBD_OPT_INFO or _GO and collects the replies up to the final one.
func (c *testClient) info(opt Opt, name string, infos ...uint16) ([]Info, Rep, string) {
	c.t.Helper()
	c.sendOpt(opt, InfoRequest{Name: name, Infos: infos}.Append(nil))
	var out []Info
	for {
		h, d := c.optReply()
		if h.Type != RepInfo {
			return out, h.Type, string(d)
		}
		in, err := ParseInfo(d)
		if err != nil {
			c.t.Fatal(err)
		}
		out = append(out, in)
	}
}

// goExport enters transmission and returns the export's info.
func (c *testClient) goExport(name string, infos ...uint16) ExportInfo {
	c.t.Helper()
	ins, rep, msg := c.info(OptGo, name, infos...)
	if rep != RepAck {
		c.t.Fatalf("NBD_OPT_GO %q: %v %s", name, rep, msg)
	}
	for _, in := range ins {
		if in.Type == InfoExport {
			return in.Export
		}
	}
	c.t.Fatal("no NBD_INFO_EXPORT")
	return ExportInfo{}
}

func (c *testClient) metaContext(opt Opt, name string, queries ...string) ([]MetaContextReply, Rep) {
	c.t.Helper()
	c.sendOpt(opt, MetaContextRequest{Name: name, Queries: queries}.Append(nil))
	var out []MetaContextReply
	for {
		h, d := c.optReply()
		if h.Type != RepMetaContext {
			return out, h.Type
		}
		m, err := ParseMetaContextReply(d)
		if err != nil {
			c.t.Fatal(err)
		}
		out = append(out, m)
	}
}

// connect does the usual handshake: fixed newstyle, no zeroes, optionally
// structured replies and base:allocation, then GO with block sizes.
func (c *testClient) connect(name string, structured, meta bool) ExportInfo {
	c.t.Helper()
	c.greet(FlagCFixedNewstyle | FlagCNoZeroes)
	if structured {
		c.negotiateStructured()
	}
	if meta {
		ms, rep := c.metaContext(OptSetMetaContext, name, MetaContextBaseAllocation)
		if rep != RepAck || len(ms) != 1 {
			c.t.Fatalf("set meta context: %v %v", ms, rep)
		}
	}
	return c.goExport(name, InfoBlockSize, InfoName, InfoDescription)
}

// submit sends a request and returns its handle.
func (c *testClient) submit(r Request, payload []byte) uint64 {
	c.t.Helper()
	c.next++
	r.Handle = c.next
	c.pending[r.Handle] = r
	c.send(append(r.Append(nil), payload...))
	return r.Handle
}

// recv reads replies until one is complete.
func (c *testClient) recv() reply {
	c.t.Helper()
	for {
		hdr := c.read(4)
		switch m := be.Uint32(hdr); m {
		case MagicSimpleReply:
			sr, err := ParseSimpleReply(append(hdr, c.read(SimpleReplySize-4)...))
			if err != nil {
				c.t.Fatal(err)
			}
			req, ok := c.pending[sr.Handle]
			if !ok {
				c.t.Fatalf("reply for unknown handle %d", sr.Handle)
			}
			delete(c.pending, sr.Handle)
			r := reply{Handle: sr.Handle, Err: sr.Error}
			if req.Type == CmdRead && sr.Error == 0 {
				if c.structured {
					c.t.Fatalf("simple reply to a read with structured replies")
				}
				r.Data = c.read(int(req.Length))
			}
			return r
		case MagicStructuredReply:
			ch, err := ParseChunkHeader(append(hdr, c.read(ChunkHeaderSize-4)...))
			if err != nil {
				c.t.Fatal(err)
			}
			if !c.structured {
				c.t.Fatalf("structured chunk without negotiation")
			}
			req, ok := c.pending[ch.Handle]
			if !ok {
				c.t.Fatalf("chunk for unknown handle %d", ch.Handle)
			}
			r := c.partial[ch.Handle]
			if r == nil {
				r = &reply{Handle: ch.Handle}
				c.partial[ch.Handle] = r
			}
			r.Chunks = append(r.Chunks, ch)
			p := c.read(int(ch.Length))
			switch {
			case ch.Type == ReplyTypeNone:
				if len(p) != 0 || ch.Flags&ReplyFlagDone == 0 {
					c.t.Fatalf("bad NONE chunk %+v", ch)
				}
			case ch.Type == ReplyTypeOffsetData:
				if len(p) < 9 {
					c.t.Fatalf("offset data of %d bytes", len(p))
				}
				off := be.Uint64(p)
				if off < req.Offset || off+uint64(len(p)-8) > req.Offset+uint64(req.Length) {
					c.t.Fatalf("data chunk [%d,+%d) outside request", off, len(p)-8)
				}
				if r.Data == nil {
					r.Data = make([]byte, req.Length)
				}
				copy(r.Data[off-req.Offset:], p[8:])
			case ch.Type == ReplyTypeBlockStatus:
				r.CtxID, r.Extents, err = ParseBlockStatus(p)
				if err != nil {
					c.t.Fatal(err)
				}
			case ch.Type.IsError():
				ec, err := ParseErrorChunk(ch.Type, p)
				if err != nil {
					c.t.Fatal(err)
				}
				r.Err, r.Msg = ec.Error, ec.Message
			default:
				c.t.Fatalf("unexpected chunk type %d", ch.Type)
			}
			if ch.Flags&ReplyFlagDone != 0 {
				delete(c.partial, ch.Handle)
				delete(c.pending, ch.Handle)
				return *r
			}
		default:
			c.t.Fatalf("bad reply magic %#x", m)
		}
	}
}

// do submits one request and waits for its reply.
func (c *testClient) do(r Request, payload []byte) reply {
	c.t.Helper()
	h := c.submit(r, payload)
	rep := c.recv()
	if rep.Handle != h {
		c.t.Fatalf("reply handle %d, want %d", rep.Handle, h)
	}
	return rep
}

func (c *testClient) disconnect() {
	c.t.Helper()
	c.send(Request{Type: CmdDisc}.Append(nil))
	c.expectClosed()
}

func (r reply) String() string {
	return fmt.Sprintf("reply{handle %d err %v %q data %d extents %v}", r.Handle, r.Err, r.Msg, len(r.Data), r.Extents)
}
