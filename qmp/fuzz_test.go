package qmp

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"
)

// The seed corpora are testdata/fuzz/FuzzStreamer and
// testdata/fuzz/FuzzServerInput (raw QMP input: negotiation, garbage,
// odd ids and strings, oob, deep nesting), which go test reads itself.

func feedAll(in []byte, chunk int) []string {
	var out []string
	var s streamer
	emit := func(v any, err error) {
		if err != nil {
			out = append(out, "ERR "+err.Error())
			return
		}
		out = append(out, string(encode(v, false)))
	}
	if chunk <= 0 {
		s.feed(in, emit)
	} else {
		for i := 0; i < len(in); i += chunk {
			s.feed(in[i:min(i+chunk, len(in))], emit)
		}
	}
	return out
}

// FuzzStreamer: splitting does not depend on how the input is chunked,
// and what we print parses back to the same print.
func FuzzStreamer(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		whole := feedAll(in, 0)
		if got := feedAll(in, 1); strings.Join(got, "\n") != strings.Join(whole, "\n") {
			t.Fatalf("bytewise differs:\n%q\n%q", whole, got)
		}
		if got := feedAll(in, 7); strings.Join(got, "\n") != strings.Join(whole, "\n") {
			t.Fatalf("7-byte chunks differ:\n%q\n%q", whole, got)
		}
		for _, w := range whole {
			if strings.HasPrefix(w, "ERR ") || strings.Contains(w, "inf") || strings.Contains(w, "nan") {
				continue
			}
			// Reprinting may reorder members that share a hash bucket
			// (QEMU's printer does the same), so compare values.
			again := feedAll([]byte(w), 0)
			if len(again) != 1 || !sameJSON(again[0], w) {
				t.Fatalf("reprint of %q gave %q", w, again)
			}
			if !json.Valid([]byte(w)) {
				t.Fatalf("printed invalid JSON %q", w)
			}
		}
	})
}

// FuzzServerInput feeds arbitrary bytes to a monitor: no panic, every
// reply is one line, and the monitor still answers afterwards.
func FuzzServerInput(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		s := NewServer(ServerOptions{})
		defer s.Close()
		a, b := net.Pipe()
		defer b.Close()
		go s.ServeConn(a)
		lines := make(chan string, 64)
		go func() {
			defer close(lines)
			r := bufio.NewReader(b)
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				lines <- l
			}
		}()
		const probe = `{"execute": "query-version", "id": "fuzz-probe"}`
		go func() {
			b.Write(in)
			// 0xFF resets QEMU's lexer wherever it is; newline ends a
			// pending token.
			b.Write([]byte("\xff\n" + probe))
		}()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatal("connection closed before the probe was answered")
				}
				if !strings.HasSuffix(l, "\r\n") || strings.Count(l, "\n") != 1 {
					t.Fatalf("reply not one line: %q", l)
				}
				body := strings.TrimSuffix(l, "\r\n")
				if !json.Valid([]byte(body)) && !strings.Contains(body, "inf") && !strings.Contains(body, "nan") {
					t.Fatalf("invalid JSON reply %q", body)
				}
				if bytes.Contains([]byte(body), []byte(`"id": "fuzz-probe"`)) {
					return
				}
			case <-deadline:
				t.Fatal("monitor unresponsive")
			}
		}
	})
}

func sameJSON(a, b string) bool {
	var x, y any
	if json.Unmarshal([]byte(a), &x) != nil || json.Unmarshal([]byte(b), &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}
