package graph

import "log/slog"

// NewCreateContext returns the context a driver's Create needs, for
// callers outside the graph that create images (img create, img convert).
// log may be nil (the graph's logger is used).
func (g *Graph) NewCreateContext(log *slog.Logger) *CreateContext {
	if log == nil {
		log = g.log
	}
	return &CreateContext{g: g, log: log}
}
