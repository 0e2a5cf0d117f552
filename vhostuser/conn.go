package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"golang.org/x/sys/unix"
)

// Message is one message read from a Conn.
type Message struct {
	Header
	// Payload is valid until the next Read on the same Conn.
	Payload []byte
	// FDs passed with the message. The receiver owns them and must close
	// those it does not keep.
	FDs []int
}

// Request returns the header's request number as a frontend request.
func (m *Message) Request() Request { return Request(m.Header.Request) }

// NeedReply reports whether the sender asked for a REPLY_ACK.
func (m *Message) NeedReply() bool { return m.Flags&FlagNeedReply != 0 }

// CloseFDs closes every fd of m and forgets them.
func (m *Message) CloseFDs() {
	for _, fd := range m.FDs {
		unix.Close(fd)
	}
	m.FDs = nil
}

// Conn is one end of a vhost-user socket (the frontend channel or the
// backend channel). Reads are meant for one goroutine; writes are
// serialised so that replies and backend-initiated messages do not
// interleave.
type Conn struct {
	c       *net.UnixConn
	hdr     [HeaderSize]byte
	oob     []byte
	payload []byte
	wmu     sync.Mutex
}

// NewConn wraps a connected unix stream socket.
func NewConn(c *net.UnixConn) *Conn {
	return &Conn{c: c, oob: make([]byte, unix.CmsgSpace(4*MaxFDs*2)), payload: make([]byte, MaxPayload)}
}

// UnixConn returns the underlying socket.
func (c *Conn) UnixConn() *net.UnixConn { return c.c }

// Read reads the next message. A malformed header (wrong version, payload
// over MaxPayload) is an error after which the connection is unusable:
// the stream can no longer be framed. More than MaxFDs descriptors are
// closed and reported as an error.
func (c *Conn) Read() (Message, error) {
	var m Message
	got := 0
	for got < HeaderSize {
		n, oobn, flags, _, err := c.c.ReadMsgUnix(c.hdr[got:], c.oob)
		if oobn > 0 {
			fds, perr := parseRights(c.oob[:oobn])
			m.FDs = append(m.FDs, fds...)
			if perr != nil {
				m.CloseFDs()
				return Message{}, perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			m.CloseFDs()
			return Message{}, errors.New("vhost-user: control data truncated (too many file descriptors)")
		}
		if n == 0 && err == nil {
			err = io.EOF
		}
		if err != nil {
			m.CloseFDs()
			if got > 0 && errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return Message{}, err
		}
		got += n
	}
	m.Header = Header{le.Uint32(c.hdr[:]), le.Uint32(c.hdr[4:]), le.Uint32(c.hdr[8:])}
	if m.Flags&versionMask != FlagVersion {
		m.CloseFDs()
		return Message{}, fmt.Errorf("vhost-user: unsupported protocol version %d in %v", m.Flags&versionMask, Request(m.Header.Request))
	}
	if m.Size > MaxPayload {
		m.CloseFDs()
		return Message{}, fmt.Errorf("vhost-user: %v payload of %d bytes exceeds %d", Request(m.Header.Request), m.Size, MaxPayload)
	}
	if len(m.FDs) > MaxFDs {
		m.CloseFDs()
		return Message{}, fmt.Errorf("vhost-user: %v carries more than %d file descriptors", Request(m.Header.Request), MaxFDs)
	}
	m.Payload = c.payload[:m.Size]
	if _, err := io.ReadFull(c.c, m.Payload); err != nil {
		m.CloseFDs()
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Message{}, err
	}
	return m, nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("vhost-user: bad control message: %w", err)
	}
	var fds []int
	for i := range msgs {
		f, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		fds = append(fds, f...)
	}
	return fds, nil
}

// Write sends one message; fds travel with its first byte.
func (c *Conn) Write(req uint32, flags uint32, payload []byte, fds ...int) error {
	b := make([]byte, HeaderSize, HeaderSize+len(payload))
	le.PutUint32(b, req)
	le.PutUint32(b[4:], flags|FlagVersion)
	le.PutUint32(b[8:], uint32(len(payload)))
	b = append(b, payload...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	n, _, err := c.c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n < len(b) {
		_, err = c.c.Write(b[n:])
	}
	return err
}

// Reply answers m with payload, setting the reply flag.
func (c *Conn) Reply(m *Message, payload []byte, fds ...int) error {
	return c.Write(m.Header.Request, FlagReply, payload, fds...)
}

// Close closes the socket.
func (c *Conn) Close() error { return c.c.Close() }
