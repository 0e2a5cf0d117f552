package vhostuser

import (
	"net"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"blockbackend/vhostuser/virtq"
)

// nullDevice is a device with a config space and no I/O, for driving the
// Server's message handling.
type nullDevice struct{}

func (nullDevice) Features() uint64 { return 1 << 9 }
func (nullDevice) NumQueues() int   { return 2 }
func (nullDevice) ReadConfig(dst []byte) int {
	for i := range min(len(dst), 60) {
		dst[i] = byte(i)
	}
	return 60
}
func (nullDevice) WriteConfig(uint32, []byte) error    { return nil }
func (nullDevice) Handle(int, *virtq.Chain) (w uint32) { return 0 }

func serveNull(t testing.TB) (*Server, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := Serve(l, nullDevice{}, nil)
	t.Cleanup(func() { srv.Close() })
	return srv, sock
}

func dialConn(t testing.TB, sock string) *Conn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	return NewConn(c.(*net.UnixConn))
}

// alive checks that the server answers GET_FEATURES on a new connection.
func alive(t testing.TB, sock string) {
	t.Helper()
	c := dialConn(t, sock)
	defer c.Close()
	c.UnixConn().SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Write(uint32(GetFeatures), 0, nil); err != nil {
		t.Fatal(err)
	}
	m, err := c.Read()
	if err != nil {
		t.Fatalf("server gone: %v", err)
	}
	if v, err := ParseU64(m.Payload); err != nil || v&(1<<FProtocolFeatures) == 0 {
		t.Fatalf("GET_FEATURES answered %#x %v", v, err)
	}
}

func TestServerNegotiation(t *testing.T) {
	_, sock := serveNull(t)
	c := dialConn(t, sock)
	defer c.Close()
	call := func(req Request, payload []byte, flags uint32) Message {
		t.Helper()
		if err := c.Write(uint32(req), flags, payload); err != nil {
			t.Fatal(err)
		}
		m, err := c.Read()
		if err != nil {
			t.Fatalf("%v: %v", req, err)
		}
		return m
	}
	m := call(GetProtocolFeatures, nil, 0)
	if v, _ := ParseU64(m.Payload); v != protocolFeatures {
		t.Fatalf("protocol features %#x", v)
	}
	// A QEMU 2.12-like frontend acks only what it knows, and the rest
	// must work without REPLY_ACK or the newer messages.
	if err := c.Write(uint32(SetProtocolFeatures), 0, U64(1<<ProtoMQ|1<<ProtoConfig)); err != nil {
		t.Fatal(err)
	}
	if v, _ := ParseU64(call(GetQueueNum, nil, 0).Payload); v != 2 {
		t.Fatalf("queue num %d", v)
	}
	m = call(GetConfig, Config{Size: 36, Data: make([]byte, 36)}.Marshal(), 0)
	if cf, err := ParseConfig(m.Payload); err != nil || cf.Size != 36 || cf.Data[35] != 35 {
		t.Fatalf("config %+v %v", cf, err)
	}
	// need_reply without REPLY_ACK negotiated gets no reply: the next
	// answer is the GET_FEATURES one.
	if err := c.Write(uint32(SetOwner), FlagNeedReply, nil); err != nil {
		t.Fatal(err)
	}
	if m := call(GetFeatures, nil, 0); m.Request() != GetFeatures {
		t.Fatalf("got %v", m.Request())
	}
}

// FuzzServerMessages sends arbitrary message sequences to a Server: it
// must never crash, and a new frontend must be served afterwards.
func FuzzServerMessages(f *testing.F) {
	f.Add([]byte{byte(SetOwner), 0, byte(SetVringNum), 8, 0, 0, 0, 0, 128, 0, 0, 0})
	f.Add([]byte{byte(SetMemTable), 40, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{byte(SetVringKick), 8, 0, 0, 0, 0, 0, 0, 0, 0, byte(SetVringEnable), 8, 0, 0, 0, 0, 1, 0, 0, 0})
	f.Add([]byte{byte(GetInflightFD), 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 128, 0, 0, 0, 0, 0})
	_, sock := serveNull(f)
	memfd, err := unix.MemfdCreate("fuzz", unix.MFD_CLOEXEC)
	if err != nil {
		f.Fatal(err)
	}
	unix.Ftruncate(memfd, 1<<16)
	f.Fuzz(func(t *testing.T, in []byte) {
		c := dialConn(t, sock)
		// The replies are not read: once they fill the socket the server
		// stops reading, and a write without a deadline would wait for
		// ever.
		c.UnixConn().SetWriteDeadline(time.Now().Add(2 * time.Second))
		for len(in) >= 2 {
			req, n := Request(in[0]), int(in[1])
			in = in[2:]
			n = min(n, len(in))
			payload := in[:n]
			in = in[n:]
			var fds []int
			switch req {
			case SetMemTable, AddMemReg, SetVringKick, SetVringCall, SetVringErr, SetInflightFD, SetLogBase, SetBackendReqFD:
				fds = []int{memfd}
			}
			if c.Write(uint32(req), FlagNeedReply, payload, fds...) != nil {
				break
			}
		}
		c.Close()
		start := time.Now()
		alive(t, sock)
		if d := time.Since(start); d > time.Second {
			t.Fatalf("the server took %v to serve the next frontend", d)
		}
	})
}
