package img

import (
	"bytes"

	"blockbackend/internal/zeros"
)

const compareChunk = 1 << 20

// Exit statuses of qemu-img compare.
const (
	cmpSame      = 0
	cmpDiff      = 1
	cmpError     = 2 // opening an image, or another error
	cmpStatusErr = 3 // block status failed
	cmpReadErr   = 4 // reading data failed
)

func (t *Tool) compare(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "hf:F:T:pqsU", long: []string{"help", "object=", "image-opts", "force-share"}})
	if !ok {
		return 1
	}
	var fmt1, fmt2 string
	quiet, strict, share, prog := false, false, false, false
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("compare")
		case "f":
			fmt1 = o.arg
		case "F":
			fmt2 = o.arg
		case "p":
			prog = true
		case "q":
			quiet = true
		case "s":
			strict = true
		case "U", "force-share":
			share = true
		case "T":
		case "object", "image-opts":
			t.imageOpt(o)
		}
	}
	if quiet {
		prog = false
	}
	if len(ops) != 2 {
		return t.usageErr("Expecting two image file names")
	}
	im1, err := t.open(ops[0], openFlags{format: fmt1, forceShare: share})
	if err != nil {
		t.errorf("%s", err)
		return cmpError
	}
	defer im1.close(t.Ctx)
	im2, err := t.open(ops[1], openFlags{format: fmt2, forceShare: share})
	if err != nil {
		t.errorf("%s", err)
		return cmpError
	}
	defer im2.close(t.Ctx)
	n1, n2 := im1.node, im2.node
	size1, size2 := n1.SizeNow(), n2.SizeNow()
	if strict && size1 != size2 {
		t.printf(quiet, "Strict mode: Image size mismatch!\n")
		return cmpDiff
	}
	total := max(size1, size2)
	p := newProgress(t.Stdout, prog)
	pct := func(off int64) {
		if total > 0 {
			p.set(float64(off) * 100 / float64(total))
		}
	}
	buf1, buf2 := make([]byte, compareChunk), make([]byte, compareChunk)
	zc := newZeroCache()
	common := min(size1, size2)
	for off := int64(0); off < common; {
		// Block status for long runs (see convert's statusSpan), reads
		// in chunks.
		e1, err := chainStatus(t.Ctx, n1, off, min(common-off, statusSpan), zc)
		if err != nil {
			return t.cmpStatusFail(p, ops[0])
		}
		e2, err := chainStatus(t.Ctx, n2, off, e1.length, zc)
		if err != nil {
			return t.cmpStatusFail(p, ops[1])
		}
		run := e2.length
		if strict && (e1.present != e2.present || e1.zero != e2.zero || e1.data != e2.data) {
			p.end()
			t.printf(quiet, "Strict mode: Offset %d block status mismatch!\n", off)
			return cmpDiff
		}
		for end := off + run; off < end; {
			n := min(end-off, compareChunk)
			switch {
			case e1.zero && e2.zero:
				n = end - off
			case e1.zero || e2.zero:
				other, name := n2, ops[1]
				if e2.zero {
					other, name = n1, ops[0]
				}
				if err := other.ReadAt(t.Ctx, buf1[:n], off); err != nil {
					return t.cmpFail(p, name, off, err)
				}
				if i := zeros.First(buf1[:n]); i >= 0 {
					return t.mismatch(p, quiet, off+int64(i))
				}
			default:
				if err := n1.ReadAt(t.Ctx, buf1[:n], off); err != nil {
					return t.cmpFail(p, ops[0], off, err)
				}
				if err := n2.ReadAt(t.Ctx, buf2[:n], off); err != nil {
					return t.cmpFail(p, ops[1], off, err)
				}
				if !bytes.Equal(buf1[:n], buf2[:n]) {
					i := 0
					for buf1[i] == buf2[i] {
						i++
					}
					return t.mismatch(p, quiet, off+int64(i))
				}
			}
			off += n
			pct(off)
		}
	}
	if size1 != size2 {
		t.printf(quiet, "Warning: Image size mismatch!\n")
		big, name := n1, ops[0]
		if size2 > size1 {
			big, name = n2, ops[1]
		}
		for off := common; off < total; {
			e, err := chainStatus(t.Ctx, big, off, min(total-off, statusSpan), zc)
			if err != nil {
				return t.cmpStatusFail(p, name)
			}
			for end := off + e.length; off < end; {
				n := min(end-off, compareChunk)
				if e.zero {
					n = end - off
				} else {
					if err := big.ReadAt(t.Ctx, buf1[:n], off); err != nil {
						return t.cmpFail(p, name, off, err)
					}
					if i := zeros.First(buf1[:n]); i >= 0 {
						return t.mismatch(p, quiet, off+int64(i))
					}
				}
				off += n
				pct(off)
			}
		}
	}
	p.done()
	t.printf(quiet, "Images are identical.\n")
	return cmpSame
}

// mismatch reports a difference at the sector holding byte off, as
// qemu-img does.
func (t *Tool) mismatch(p *progress, quiet bool, off int64) int {
	t.printf(quiet, "Content mismatch at offset %d!\n", off&^511)
	p.end()
	return cmpDiff
}

func (t *Tool) cmpFail(p *progress, name string, off int64, err error) int {
	p.end()
	t.errorf("Error while reading offset %d of %s: %s", off, name, ioErrString(err))
	return cmpReadErr
}

func (t *Tool) cmpStatusFail(p *progress, name string) int {
	p.end()
	t.errorf("Sector allocation test failed for %s", name)
	return cmpStatusErr
}
