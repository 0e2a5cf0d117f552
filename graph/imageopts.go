package graph

import (
	"context"

	"blockbackend/qmp/qapi"
)

// OpenImageOptions opens an image given as block options rather than a
// filename (qemu-img's --image-opts: "driver=qcow2,file.filename=x"),
// with o's read-only, force-share and extra options applied; mode says
// how the options were written. As QEMU does for such options, a "file"
// child given by filename alone gets the protocol driver that claims the
// filename, and options without a driver have their format probed over
// the "file" child.
func (g *Graph) OpenImageOptions(ctx context.Context, opts map[string]any, mode qapi.Mode, o ImageOptions) (*Node, error) {
	opts = qapi.Clone(opts)
	if err := fillFileDrivers(opts); err != nil {
		return nil, err
	}
	if _, ok := opts["driver"]; ok {
		return g.openImageOpts(ctx, opts, mode, o)
	}
	file, ok := opts["file"].(map[string]any)
	if !ok || len(opts) != 1 {
		return nil, qapi.Errorf(qapi.GenericError, "Parameter 'driver' is missing")
	}
	name, _ := file["filename"].(string)
	return g.openProbed(ctx, file, mode, name, o)
}

// fillFileDrivers gives each nested "file" map that has a filename but
// no driver the protocol driver for that filename.
func fillFileDrivers(m map[string]any) error {
	f, ok := m["file"].(map[string]any)
	if !ok {
		return nil
	}
	if _, has := f["driver"]; !has {
		if name, ok := f["filename"].(string); ok {
			d, err := ProtocolFor(name)
			if err != nil {
				return qapi.Errorf(qapi.GenericError, "%s", err.Error())
			}
			f["driver"] = "file"
			if d != nil {
				f["driver"] = d.Name
			}
		}
	}
	return fillFileDrivers(f)
}
