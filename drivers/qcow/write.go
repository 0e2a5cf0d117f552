package qcow

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"syscall"

	"github.com/klauspost/compress/flate"

	"blockbackend/graph"
)

// deflateWindow is the window QEMU inflates compressed clusters with
// (raw deflate, 4 KiB): back-references must not reach further.
const deflateWindow = 4096

func (img *image) WriteV(ctx context.Context, off int64, iov [][]byte, flags graph.WriteFlags) error {
	if img.keyErr != nil {
		return img.keyErr
	}
	c := iovCursor{iov: append([][]byte(nil), iov...)}
	total := iovLen(iov)
	for done := int64(0); done < total; {
		pos := off + done
		m, err := img.lookup(ctx, pos, total-done)
		if err != nil {
			return err
		}
		if m.kind == kindData && img.cipher == nil {
			// In place: a plain cluster never moves.
			if err := img.file.WriteV(ctx, m.host, c.next(m.length), flags); err != nil {
				return err
			}
			done += m.length
			continue
		}
		// One cluster at a time, under alloc.
		l := min(total-done, img.cs-pos&(img.cs-1))
		if err := img.writeCluster(ctx, pos, c.next(l), flags); err != nil {
			return err
		}
		done += l
	}
	return nil
}

// writeCluster writes src (within one cluster) at pos: in place for an
// allocated plain cluster (encrypting the sectors it touches), else into
// a new cluster that keeps the rest of the old contents (the backing
// node's, a compressed cluster's, or zeros).
func (img *image) writeCluster(ctx context.Context, pos int64, src [][]byte, flags graph.WriteFlags) error {
	img.alloc.Lock()
	defer img.alloc.Unlock()
	n := iovLen(src)
	m, err := img.lookup(ctx, pos, n)
	if err != nil {
		return err
	}
	if m.kind == kindData {
		if img.cipher == nil {
			return img.file.WriteV(ctx, m.host, src, flags)
		}
		// Read-modify-write of whole sectors.
		head := pos & (sectorSize - 1)
		l := (head + n + sectorSize - 1) &^ (sectorSize - 1)
		buf := make([]byte, l)
		if head != 0 || l != n {
			if err := img.readHost(ctx, buf, m.host-head); err != nil {
				return err
			}
			if err := img.cipher.Decrypt(uint64((pos-head)/sectorSize), buf); err != nil {
				return err
			}
		}
		copy(buf[head:], gather(src))
		if err := img.cipher.Encrypt(uint64((pos-head)/sectorSize), buf); err != nil {
			return err
		}
		return img.file.WriteV(ctx, m.host-head, [][]byte{buf}, flags)
	}
	// A new cluster: its old contents, then the new bytes.
	cstart := pos &^ (img.cs - 1)
	full := make([]byte, img.cs)
	in := pos - cstart
	if in != 0 || n != img.cs {
		old := mapping{kind: m.kind, entry: m.entry, length: img.cs}
		if err := img.readRun(ctx, cstart, old, [][]byte{full}); err != nil {
			return err
		}
	}
	copy(full[in:], gather(src))
	return img.writeNewCluster(ctx, cstart, full, flags)
}

// writeNewCluster writes the whole cluster data at guest offset cstart to
// a newly allocated host cluster and maps it. The caller holds alloc.
func (img *image) writeNewCluster(ctx context.Context, cstart int64, data []byte, flags graph.WriteFlags) error {
	if img.cipher != nil {
		if err := img.cipher.Encrypt(uint64(cstart/sectorSize), data); err != nil {
			return err
		}
	}
	l2off, err := img.l2For(ctx, cstart, flags)
	if err != nil {
		return err
	}
	host, err := img.allocate(ctx, img.cs, img.cs)
	if err != nil {
		return err
	}
	if err := img.file.WriteV(ctx, host, [][]byte{data}, flags); err != nil {
		return err
	}
	return img.setEntry(ctx, cstart, l2off, uint64(host), flags)
}

// allocate grows the file by n bytes at its end rounded up to align and
// returns where they start. The caller holds alloc.
func (img *image) allocate(ctx context.Context, n, align int64) (int64, error) {
	end := img.file.SizeNow()
	at := (end + align - 1) &^ (align - 1)
	if at+n < at {
		return 0, fmt.Errorf("qcow: image file too large: %w", syscall.EFBIG)
	}
	if err := img.file.Truncate(ctx, at+n, false, "off"); err != nil {
		return 0, fmt.Errorf("qcow: growing the image file: %w", err)
	}
	return at, nil
}

// l2For returns the host offset of the L2 table that maps the guest
// cluster at cstart, allocating it (zeroed, at a cluster boundary at the
// end of the file) when there is none, as qemu-img does before it
// allocates the cluster itself. The caller holds alloc.
func (img *image) l2For(ctx context.Context, cstart int64, flags graph.WriteFlags) (int64, error) {
	i := (cstart >> img.hdr.ClusterBits) >> img.hdr.L2Bits
	img.meta.Lock()
	if i >= img.l1Len {
		img.meta.Unlock()
		return 0, fmt.Errorf("qcow: cluster beyond the L1 table: %w", syscall.EIO)
	}
	l2off := int64(img.l1EntryLocked(i))
	img.meta.Unlock()
	if l2off != 0 {
		return l2off, nil
	}
	off, err := img.allocate(ctx, img.hdr.L2Bytes(), img.cs)
	if err != nil {
		return 0, err
	}
	// The file grew with zeros: the new table is empty already.
	var ebuf [8]byte
	be.PutUint64(ebuf[:], uint64(off))
	if err := img.writeL1(ctx, i, ebuf[:], flags); err != nil {
		return 0, err
	}
	img.meta.Lock()
	if i >= int64(len(img.l1)) {
		img.l1 = append(img.l1, make([]uint64, i+1-int64(len(img.l1)))...)
	}
	img.l1[i] = uint64(off)
	img.l2[i] = make([]uint64, img.hdr.L2Entries())
	img.meta.Unlock()
	return off, nil
}

// setEntry points the L2 entry of the guest cluster at cstart, in the
// table at l2off, at e. The caller holds alloc; the data the entry maps
// is written.
func (img *image) setEntry(ctx context.Context, cstart, l2off int64, e uint64, flags graph.WriteFlags) error {
	gc := cstart >> img.hdr.ClusterBits
	i := gc >> img.hdr.L2Bits
	k := gc & (img.hdr.L2Entries() - 1)
	var ebuf [8]byte
	be.PutUint64(ebuf[:], e)
	if err := img.file.WriteV(ctx, l2off+k*8, [][]byte{ebuf[:]}, flags); err != nil {
		return err
	}
	img.meta.Lock()
	if t, ok := img.l2[i]; ok {
		t[k] = e
	}
	img.meta.Unlock()
	return nil
}

// writeL1 writes L1 entry i. qemu-img's tables lie inside the file
// (rounded up to 512 bytes); one that runs past its end is corrupt, and
// is not grown into (its offset may be anything).
func (img *image) writeL1(ctx context.Context, i int64, ebuf []byte, flags graph.WriteFlags) error {
	at := img.l1Off + i*8
	if at+8 > img.file.SizeNow() {
		return fmt.Errorf("qcow: L1 entry %d at %#x beyond the end of the file: %w", i, at, syscall.EIO)
	}
	return img.file.WriteV(ctx, at, [][]byte{ebuf}, flags)
}

// compress returns data as raw deflate that QEMU can inflate (4 KiB
// window), or nil when that is not smaller than a cluster. The windowed
// encoder stores data it finds few matches in; Huffman coding alone (no
// back-references at all) is tried then, and the smaller one kept.
func (img *image) compress(data []byte) ([]byte, error) {
	out, err := deflate(&windowDeflaters, data, func(w *bytes.Buffer) (*flate.Writer, error) {
		return flate.NewWriterWindow(w, deflateWindow)
	})
	if err != nil {
		return nil, err
	}
	if len(out) >= len(data)*7/8 {
		huff, err := deflate(&huffmanDeflaters, data, func(w *bytes.Buffer) (*flate.Writer, error) {
			return flate.NewWriter(w, flate.HuffmanOnly)
		})
		if err != nil {
			return nil, err
		}
		if len(huff) < len(out) {
			out = huff
		}
	}
	if int64(len(out)) >= img.cs {
		return nil, nil
	}
	return out, nil
}

// Deflate writers (and their large tables) kept between clusters.
var windowDeflaters, huffmanDeflaters sync.Pool

func deflate(pool *sync.Pool, data []byte, mk func(*bytes.Buffer) (*flate.Writer, error)) ([]byte, error) {
	var buf bytes.Buffer
	w, _ := pool.Get().(*flate.Writer)
	if w == nil {
		var err error
		if w, err = mk(&buf); err != nil {
			return nil, err
		}
	} else {
		w.Reset(&buf)
	}
	defer pool.Put(w)
	if _, err := w.Write(data); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteCompressed writes one whole guest cluster compressed (img convert
// -c), packed at the next 512-byte boundary of the file as qemu-img does.
// Data that does not compress, encrypted images and clusters that are
// already allocated are written as normal clusters.
func (img *image) WriteCompressed(ctx context.Context, off int64, data []byte) error {
	if off%img.cs != 0 || int64(len(data)) > img.cs {
		return fmt.Errorf("qcow: compressed writes must be whole clusters: %w", syscall.EINVAL)
	}
	if img.keyErr != nil {
		return img.keyErr
	}
	full := data
	if int64(len(data)) < img.cs {
		full = make([]byte, img.cs)
		copy(full, data)
	}
	var comp []byte
	if img.cipher == nil {
		var err error
		if comp, err = img.compress(full); err != nil {
			return err
		}
	}
	img.alloc.Lock()
	m, err := img.lookup(ctx, off, img.cs)
	if err != nil {
		img.alloc.Unlock()
		return err
	}
	if comp == nil || m.kind == kindData {
		img.alloc.Unlock()
		return img.WriteV(ctx, off, [][]byte{data}, 0)
	}
	defer img.alloc.Unlock()
	l2off, err := img.l2For(ctx, off, 0)
	if err != nil {
		return err
	}
	host, err := img.allocate(ctx, int64(len(comp)), sectorSize)
	if err != nil {
		return err
	}
	if err := img.file.WriteV(ctx, host, [][]byte{comp}, 0); err != nil {
		return err
	}
	if host >= 1<<(63-uint(img.hdr.ClusterBits)) {
		return fmt.Errorf("qcow: compressed cluster offset %#x too large for an L2 entry: %w", host, syscall.EFBIG)
	}
	return img.setEntry(ctx, off, l2off, CompressedEntry(host, int64(len(comp)), img.hdr.ClusterBits), 0)
}
