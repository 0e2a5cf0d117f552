package vhostuser

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func socketPair(t testing.TB) (*Conn, *Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(fd int) *Conn {
		f := os.NewFile(uintptr(fd), "sp")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		return NewConn(c.(*net.UnixConn))
	}
	a, b := mk(fds[0]), mk(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func TestPayloadRoundTrip(t *testing.T) {
	va := VringAddr{Index: 1, Flags: 1, Desc: 2, Used: 3, Avail: 4, Log: 5}
	if got, err := ParseVringAddr(va.Marshal()); err != nil || got != va {
		t.Fatalf("vring addr: %+v %v", got, err)
	}
	vs := VringState{7, 65535}
	if got, err := ParseVringState(vs.Marshal()); err != nil || got != vs {
		t.Fatalf("vring state: %+v %v", got, err)
	}
	mt := MemTable{Regions: []MemRegion{{1, 2, 3, 4}, {5, 6, 7, 8}}}
	if b := mt.Marshal(); len(b) != 8+2*32 {
		t.Fatalf("mem table size %d", len(b))
	} else if got, err := ParseMemTable(b); err != nil || len(got.Regions) != 2 || got.Regions[1] != mt.Regions[1] {
		t.Fatalf("mem table: %+v %v", got, err)
	}
	mr := MemRegionMsg{MemRegion{9, 10, 11, 12}}
	if got, err := ParseMemRegionMsg(mr.Marshal()); err != nil || got != mr {
		t.Fatalf("region: %+v %v", got, err)
	}
	cf := Config{Offset: 0, Size: 4, Data: []byte{1, 2, 3, 4}}
	if got, err := ParseConfig(cf.Marshal()); err != nil || !bytes.Equal(got.Data, cf.Data) {
		t.Fatalf("config: %+v %v", got, err)
	}
	in := Inflight{MmapSize: 4096, NumQueues: 2, QueueSize: 128}
	if b := in.Marshal(); len(b) != 24 {
		t.Fatalf("inflight size %d", len(b))
	} else if got, err := ParseInflight(b); err != nil || got != in {
		t.Fatalf("inflight: %+v %v", got, err)
	}
	if _, err := ParseMemTable(U64(9)); err == nil {
		t.Fatal("9 regions accepted")
	}
	if _, err := ParseConfig(Config{Size: 300}.Marshal()[:12]); err == nil {
		t.Fatal("oversized config accepted")
	}
	if _, err := ParseVringAddr(make([]byte, 39)); !errors.Is(err, ErrShortPayload) {
		t.Fatalf("short payload: %v", err)
	}
}

func TestConnFDsAndFraming(t *testing.T) {
	a, b := socketPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := a.Write(uint32(SetVringKick), FlagNeedReply, U64(1), int(r.Fd())); err != nil {
		t.Fatal(err)
	}
	if err := a.Write(uint32(GetFeatures), 0, nil); err != nil {
		t.Fatal(err)
	}
	m, err := b.Read()
	if err != nil {
		t.Fatal(err)
	}
	if m.Request() != SetVringKick || !m.NeedReply() || len(m.FDs) != 1 {
		t.Fatalf("got %v need=%v fds=%v", m.Request(), m.NeedReply(), m.FDs)
	}
	m.CloseFDs()
	m, err = b.Read()
	if err != nil || m.Request() != GetFeatures || len(m.Payload) != 0 {
		t.Fatalf("second message: %v %v", m.Request(), err)
	}
	// A wrong version is fatal for the stream.
	raw := make([]byte, HeaderSize)
	le.PutUint32(raw, 1)
	le.PutUint32(raw[4:], 2)
	if _, err := a.UnixConn().Write(raw); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Read(); err == nil {
		t.Fatal("version 2 accepted")
	}
}

// FuzzConnRead feeds arbitrary bytes to the message reader and the payload
// parsers: errors are fine, panics and hangs are not.
func FuzzConnRead(f *testing.F) {
	f.Add(append(le.AppendUint32(le.AppendUint32(le.AppendUint32(nil, 5), 1), 8), U64(1)...))
	f.Add(append(le.AppendUint32(le.AppendUint32(le.AppendUint32(nil, 24), 1), 20), make([]byte, 20)...))
	f.Add(append(le.AppendUint32(le.AppendUint32(le.AppendUint32(nil, 9), 1), 40), VringAddr{}.Marshal()...))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := socketPair(t)
		go func() {
			_, _ = a.UnixConn().Write(data)
			a.UnixConn().CloseWrite()
		}()
		for {
			m, err := b.Read()
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && err.Error() == "" {
					t.Fatal("empty error")
				}
				return
			}
			if len(m.Payload) != int(m.Size) {
				t.Fatalf("payload %d bytes for size %d", len(m.Payload), m.Size)
			}
			p := m.Payload
			_, _ = ParseU64(p)
			_, _ = ParseVringState(p)
			_, _ = ParseVringAddr(p)
			_, _ = ParseMemTable(p)
			_, _ = ParseMemRegionMsg(p)
			if c, err := ParseConfig(p); err == nil && len(c.Data) != int(c.Size) {
				t.Fatal("config data size mismatch")
			}
			_, _ = ParseInflight(p)
			_, _ = ParseLog(p)
			m.CloseFDs()
		}
	})
}
