package frontend

import (
	"errors"
	"fmt"
	"io"
	"net"

	vu "blockbackend/vhostuser"

	"golang.org/x/sys/unix"
)

// serveBackend answers the backend's requests on the channel handed over
// with SET_BACKEND_REQ_FD until it closes.
func (f *Frontend) serveBackend(c *vu.Conn) {
	defer f.backendWG.Done()
	for {
		m, err := c.Read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				f.setBackendErr(fmt.Errorf("frontend: backend channel: %w", err))
			}
			return
		}
		reply, err := f.handleBackend(&m)
		m.CloseFDs()
		if err != nil {
			f.setBackendErr(err)
		}
		if m.Flags&vu.FlagNeedReply != 0 {
			if werr := c.Write(m.Header.Request, vu.FlagReply, vu.U64(reply)); werr != nil {
				return
			}
		}
	}
}

func (f *Frontend) setBackendErr(err error) {
	f.bmu.Lock()
	defer f.bmu.Unlock()
	if f.backendErr == nil {
		f.backendErr = err
	}
}

// handleBackend acts on one backend message and returns the u64 to
// answer if a reply is wanted (0 success). It never takes f.mu: the
// control path may be waiting for the backend while holding it.
func (f *Frontend) handleBackend(m *vu.Message) (uint64, error) {
	switch vu.BackendRequest(m.Header.Request) {
	case vu.BackendConfigChangeMsg:
		select {
		case f.configChanged <- struct{}{}:
		default:
		}
		return 0, nil
	case vu.BackendVringCall, vu.BackendVringErr:
		// In-band notifications: treat a call as if it came through the
		// eventfd.
		s, err := vu.ParseVringState(m.Payload)
		if err != nil {
			return 1, fmt.Errorf("frontend: backend message %d: %w", m.Header.Request, err)
		}
		if int(s.Index) >= len(f.queues) {
			return 1, fmt.Errorf("frontend: backend message %d for queue %d of %d", m.Header.Request, s.Index, len(f.queues))
		}
		if vu.BackendRequest(m.Header.Request) == vu.BackendVringCall {
			q := f.queues[s.Index]
			q.mu.Lock()
			if q.callFD >= 0 {
				unix.Write(q.callFD, q.kickBuf[:])
			}
			q.mu.Unlock()
		}
		return 0, nil
	case vu.BackendVringHostNotifierMsg:
		// u64 index and flags, size, offset; we keep no host notifiers
		// (the fd, if any, is closed by the caller) and say so.
		if len(m.Payload) < 24 {
			return 1, fmt.Errorf("frontend: host notifier message: %w", vu.ErrShortPayload)
		}
		return 1, nil
	default:
		return 1, fmt.Errorf("frontend: unsupported backend message %d", m.Header.Request)
	}
}
