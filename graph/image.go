package graph

import (
	"context"
	"fmt"

	"blockbackend/qmp/keyval"
	"blockbackend/qmp/qapi"
)

// probeBytes is how much of an image format probing reads.
const probeBytes = 2048

// RawProbeWarning is QEMU's warning when probing guessed raw.
func RawProbeWarning(filename string) string {
	return fmt.Sprintf("WARNING: Image format was not specified for '%s' and probing guessed raw.\n"+
		"         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n"+
		"         Specify the 'raw' format explicitly to remove the restrictions.", filename)
}

// ImageOptions says how to open an image by filename.
type ImageOptions struct {
	// Format is the format driver; empty means probe.
	Format string
	// ReadOnly opens every node read-only; ForceShare also shares all.
	ReadOnly, ForceShare bool
	// Extra options merged into the format node's options (dotted keys
	// already nested), as qemu-img's --image-opts / -o would add.
	Extra map[string]any
	// Warn receives warnings meant for a person (the raw probing warning).
	Warn func(string)
	// NoIO opens every node for metadata only (OpenContext.NoIO): what
	// qemu-img info and create -b's backing check do.
	NoIO bool
}

// OpenImage opens an image the way qemu-img and -drive do: a filename that
// is a plain path, a "proto:..." name for a protocol driver, or
// "json:{...}" options; the format is given or probed.
func (g *Graph) OpenImage(ctx context.Context, filename string, o ImageOptions) (*Node, error) {
	if m, ok, err := keyval.ParseJSONFilename(filename); ok {
		if err != nil {
			return nil, err
		}
		if _, has := m["driver"]; !has && o.Format != "" {
			m["driver"] = o.Format
		}
		if _, has := m["driver"]; has {
			return g.openImageOpts(ctx, m, qapi.JSON, o)
		}
		// Protocol options only: open them, then probe the format over them.
		return g.openProbed(ctx, m, qapi.JSON, filename, o)
	}
	proto, err := ProtocolFor(filename)
	if err != nil {
		return nil, qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	pname := "file"
	if proto != nil {
		pname = proto.Name
	}
	popts := map[string]any{"driver": pname, "filename": filename}
	if o.Format == "" {
		return g.openProbed(ctx, popts, qapi.JSON, filename, o)
	}
	if d := Lookup(o.Format); d != nil && d.Protocol {
		return g.openImageOpts(ctx, popts, qapi.JSON, o)
	}
	return g.openImageOpts(ctx, map[string]any{"driver": o.Format, "file": popts}, qapi.JSON, o)
}

func (g *Graph) applyImageOptions(m map[string]any, o ImageOptions) {
	if o.ReadOnly {
		m["read-only"] = true
	}
	if o.ForceShare {
		m["force-share"] = true
	}
	if o.Extra != nil {
		qapi.Merge(m, o.Extra)
	}
}

func (g *Graph) openImageOpts(ctx context.Context, m map[string]any, mode qapi.Mode, o ImageOptions) (*Node, error) {
	m = qapi.Clone(m)
	g.applyImageOptions(m, o)
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.openNodeLocked(ctx, m, mode, &openTxn{noIO: o.NoIO})
}

// openProbed opens the protocol node, reads its first bytes and opens the
// best-scoring format over it.
func (g *Graph) openProbed(ctx context.Context, popts map[string]any, mode qapi.Mode, filename string, o ImageOptions) (*Node, error) {
	popts = qapi.Clone(popts)
	g.applyImageOptions(popts, ImageOptions{ReadOnly: o.ReadOnly, ForceShare: o.ForceShare})
	g.mu.Lock()
	defer g.mu.Unlock()
	proto, err := g.openNodeLocked(ctx, popts, mode, &openTxn{noIO: o.NoIO})
	if err != nil {
		return nil, err
	}
	hdr := make([]byte, min(probeBytes, max(proto.SizeNow(), 0)))
	if len(hdr) > 0 {
		if err := proto.ReadV(ctx, 0, [][]byte{hdr}); err != nil {
			_ = g.closeNodeLocked(proto)
			return nil, fmt.Errorf("Could not read image for determining its format: %w", err)
		}
	}
	drv, _ := ProbeFormat(hdr, filename)
	if drv == nil {
		_ = g.closeNodeLocked(proto)
		return nil, qapi.Errorf(qapi.GenericError, "Could not determine image format: no format driver claims '%s'", filename)
	}
	m := map[string]any{"driver": drv.Name, "file": proto.name}
	g.applyImageOptions(m, o)
	fmtNode, err := g.openNodeLocked(ctx, m, qapi.JSON, &openTxn{probed: drv.Name == "raw", noIO: o.NoIO})
	if err != nil {
		_ = g.closeNodeLocked(proto)
		return nil, err
	}
	if drv.Name == "raw" && o.Warn != nil {
		o.Warn(RawProbeWarning(filename))
	}
	return fmtNode, nil
}
