package img

import (
	"fmt"
	"io"
	"sync"
)

// progress prints qemu-img's progress indicator: "    (12.34/100%)\r",
// each time the value has moved by at least one percent, and a newline
// at the end.
type progress struct {
	w       io.Writer
	enabled bool
	mu      sync.Mutex
	last    float64
	printed bool
}

func newProgress(w io.Writer, enabled bool) *progress {
	p := &progress{w: w, enabled: enabled, last: -1}
	p.set(0)
	return p
}

func (p *progress) emit(v float64) {
	fmt.Fprintf(p.w, "    (%3.2f/100%%)\r", v)
	p.last, p.printed = v, true
}

// set reports the progress in percent.
func (p *progress) set(v float64) {
	if p == nil || !p.enabled {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if v > 100 {
		v = 100
	}
	if v-p.last >= 1 || !p.printed || (v == 100 && p.last < 100) {
		p.emit(v)
	}
}

// done prints the final 100% twice, as qemu-img does (once as the last
// step, once on finishing), then the newline.
func (p *progress) done() {
	if p == nil || !p.enabled {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.last < 100 {
		p.emit(100)
	}
	p.emit(100)
	fmt.Fprint(p.w, "\n")
}

// end finishes without claiming 100% (an interrupted operation).
func (p *progress) end() {
	if p == nil || !p.enabled {
		return
	}
	fmt.Fprint(p.w, "\n")
}
