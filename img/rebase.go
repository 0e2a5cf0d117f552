package img

import (
	"bytes"
	"path/filepath"
	"strings"
	"syscall"

	"blockbackend/graph"
)

const rebaseChunk = 1 << 20

func (t *Tool) rebase(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "hf:F:b:upt:T:qU", long: []string{"help", "object=", "image-opts", "force-share"}})
	if !ok {
		return 1
	}
	var format, backing, backingFmt string
	hasBacking := false
	unsafe, prog, quiet, share := false, false, false, false
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("rebase")
		case "f":
			format = o.arg
		case "F":
			backingFmt = o.arg
		case "b":
			backing, hasBacking = o.arg, true
		case "u":
			unsafe = true
		case "p":
			prog = true
		case "q":
			quiet = true
		case "U", "force-share":
			share = true
		case "t", "T":
		case "object", "image-opts":
			t.imageOpt(o)
		}
	}
	if quiet {
		prog = false
	}
	if len(ops) != 1 {
		return t.usageErr("Expecting one image file name")
	}
	if !hasBacking && !unsafe {
		return t.usageErr("Must specify backing file (-b) or use unsafe mode (-u)")
	}
	filename := ops[0]
	im, err := t.open(filename, openFlags{format: format, writable: true, noBacking: unsafe})
	if err != nil {
		return t.errorf("%s", err)
	}
	defer im.close(t.Ctx)
	changeErr := func(err error) int {
		return t.errorf("Could not change the backing file to '%s': %s", backing, errString(err))
	}
	bc, ok := im.node.Instance().(graph.BackingChanger)
	if !ok {
		return changeErr(syscall.ENOTSUP)
	}
	if !unsafe {
		var newNode *graph.Node
		if backing != "" {
			g, err := t.newGraph()
			if err != nil {
				return t.errorf("%s", errText(err))
			}
			defer g.Close()
			path := backing
			if !filepath.IsAbs(backing) && !strings.Contains(backing, ":") {
				path = filepath.Join(filepath.Dir(filename), backing)
			}
			newNode, err = g.OpenImage(t.Ctx, path, graph.ImageOptions{Format: backingFmt, ReadOnly: true, ForceShare: share})
			if err != nil {
				return t.errorf("Could not open new backing file '%s': %s", backing, errText(err))
			}
			if backingFmt == "" {
				return t.errorf("Could not change the backing file to '%s': backing format must be specified", backing)
			}
		}
		p := newProgress(t.Stdout, prog)
		if err := t.rebaseCopy(im.node, newNode, p); err != nil {
			p.end()
			return t.errorf("%s", err)
		}
		p.set(100)
		defer p.done()
	} else if backing != "" && backingFmt == "" {
		return t.errorf("Could not change the backing file to '%s': backing format must be specified", backing)
	}
	if err := bc.ChangeBackingFile(t.Ctx, backing, backingFmt); err != nil {
		return changeErr(err)
	}
	if err := im.close(t.Ctx); err != nil {
		return t.errorf("%s", errText(err))
	}
	return 0
}

// rebaseCopy makes top independent of its old backing chain where the
// new one differs: every range top does not allocate itself is read
// through top (from the old chain) and from the new backing node, and
// written into top where the two differ.
func (t *Tool) rebaseCopy(top, newBacking *graph.Node, p *progress) error {
	size := top.SizeNow()
	var newSize int64
	if newBacking != nil {
		newSize = newBacking.SizeNow()
	}
	oldBuf, newBuf := make([]byte, rebaseChunk), make([]byte, rebaseChunk)
	for off := int64(0); off < size; {
		e, err := chainStatus(t.Ctx, top, off, min(size-off, statusSpan), nil) // top is written meanwhile
		if err != nil {
			return err
		}
		if e.depth == 0 && e.present {
			off += e.length
			continue
		}
		for end := off + e.length; off < end; {
			n := min(end-off, rebaseChunk)
			if err := t.rebaseChunk(top, newBacking, newSize, off, oldBuf[:n], newBuf[:n]); err != nil {
				return err
			}
			off += n
			p.set(float64(off) * 100 / float64(size))
		}
	}
	return nil
}

// rebaseChunk copies into top the sectors of [off, off+len(old)) where
// what top reads now (through its old backing chain) differs from the new
// backing file.
func (t *Tool) rebaseChunk(top, newBacking *graph.Node, newSize, off int64, old, nb []byte) error {
	n := int64(len(old))
	if err := top.ReadAt(t.Ctx, old, off); err != nil {
		return err
	}
	clear(nb)
	if off < newSize {
		if err := newBacking.ReadAt(t.Ctx, nb[:min(n, newSize-off)], off); err != nil {
			return err
		}
	}
	const sector = 512
	for i := int64(0); i < n; {
		j := i
		for j < n && !bytes.Equal(old[j:min(j+sector, n)], nb[j:min(j+sector, n)]) {
			j += sector
		}
		j = min(j, n)
		if j > i {
			if err := top.WriteAt(t.Ctx, old[i:j], off+i, 0); err != nil {
				return err
			}
			i = j
			continue
		}
		i += sector
	}
	return nil
}
