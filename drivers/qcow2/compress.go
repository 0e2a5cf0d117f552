package qcow2

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"syscall"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"

	"blockbackend/graph"
)

// deflateWindow is the window QEMU inflates compressed clusters with
// (raw deflate, 4 KiB window): back-references must not reach further.
const deflateWindow = 4096

var zstdEncoders = sync.Pool{New: func() any {
	// Entropy-coding all literals keeps data with few repeats but a
	// skewed alphabet (text, base64) from being stored raw: without it
	// such clusters came out uncompressed where QEMU's zstd shrinks them.
	e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false),
		zstd.WithAllLitEntropyCompression(true))
	if err != nil {
		return nil
	}
	return e
}}

// compress returns data compressed with the image's compression type, or
// nil when it is not smaller than a cluster (QEMU then writes the cluster
// uncompressed).
func (img *image) compress(data []byte) ([]byte, error) {
	var out []byte
	switch img.compression {
	case CompressionZlib:
		var err error
		if out, err = deflate(data, false); err != nil {
			return nil, err
		}
		if int64(len(out)) > img.cs*7/8 {
			// The 4 KiB-window compressor gives up on data with few
			// repeats but a skewed alphabet (text, base64), storing it;
			// Huffman coding alone still shrinks such data, as QEMU's
			// zlib does (its default level tries both).
			h, err := deflate(data, true)
			if err != nil {
				return nil, err
			}
			if len(h) < len(out) {
				out = h
			}
		}
	case CompressionZstd:
		e, _ := zstdEncoders.Get().(*zstd.Encoder)
		if e == nil {
			return nil, fmt.Errorf("qcow2: zstd encoder unavailable")
		}
		out = e.EncodeAll(data, nil)
		zstdEncoders.Put(e)
	default:
		return nil, fmt.Errorf("qcow2: unknown compression type %d", img.compression)
	}
	if int64(len(out)) >= img.cs {
		return nil, nil
	}
	return out, nil
}

// deflate compresses data as raw deflate whose back-references stay
// within QEMU's 4 KiB window; huffman uses no back-references at all.
func deflate(data []byte, huffman bool) ([]byte, error) {
	var buf bytes.Buffer
	var w *flate.Writer
	var err error
	if huffman {
		w, err = flate.NewWriter(&buf, flate.HuffmanOnly)
	} else {
		w, err = flate.NewWriterWindow(&buf, deflateWindow)
	}
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(data); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteCompressed writes one whole guest cluster compressed (img convert
// -c). off is cluster aligned; data is a cluster, or less for the last
// cluster of the image (the rest reads as zeros). Data that does not
// compress is written as a normal cluster, as QEMU does.
func (img *image) WriteCompressed(ctx context.Context, off int64, data []byte) error {
	if off%img.cs != 0 || int64(len(data)) > img.cs {
		return fmt.Errorf("qcow2: compressed writes must be whole clusters: %w", syscall.EINVAL)
	}
	if img.extData {
		return fmt.Errorf("Compression is not supported with an external data file: %w", graph.ErrNotSupported)
	}
	if err := img.cryptRefusesCompression(); err != nil {
		return err
	}
	full := data
	if int64(len(data)) < img.cs {
		full = make([]byte, img.cs)
		copy(full, data)
	}
	comp, err := img.compress(full)
	if err != nil {
		return err
	}
	if comp == nil {
		return img.WriteV(ctx, off, [][]byte{data}, 0)
	}
	img.resize.RLock()
	defer img.resize.RUnlock()
	c := off / img.cs
	for {
		img.meta.Lock()
		if w := img.inflight[c]; w != nil {
			img.meta.Unlock()
			if err := waitFor(ctx, w); err != nil {
				return err
			}
			continue
		}
		break
	}
	seq := img.startReqLocked()
	defer img.endReq(seq)
	if err := img.beginWriteLocked(ctx); err != nil {
		img.meta.Unlock()
		return err
	}
	// The L2 table first, as in QEMU (see planWriteLocked): a missing
	// table is allocated before the compressed data's bytes.
	if _, _, _, err := img.l2ForWriteLocked(ctx, off); err != nil {
		img.meta.Unlock()
		return err
	}
	host, err := img.allocBytesLocked(ctx, int64(len(comp)))
	if err != nil {
		img.meta.Unlock()
		return err
	}
	w := &inflightAlloc{done: make(chan struct{})}
	img.inflight[c] = w
	img.meta.Unlock()

	werr := img.file.WriteV(ctx, host, [][]byte{comp}, 0)

	img.meta.Lock()
	defer img.meta.Unlock()
	defer func() {
		delete(img.inflight, c)
		close(w.done)
	}()
	if werr != nil {
		return werr
	}
	ne, err := img.geo.MakeCompressed(host, int64(len(comp)))
	if err != nil {
		return err
	}
	s, idx, soff, err := img.l2ForWriteLocked(ctx, off)
	if err != nil {
		return err
	}
	old := img.geo.GetL2(s, idx)
	img.geo.SetL2(s, idx, ne)
	img.l2c.markDirty(soff)
	// The same entry value may have described other data before its
	// bytes were freed (by us or by an offline operation): forget it.
	img.dcMu.Lock()
	for i := range img.dc {
		if img.dc[i].entry == ne.Entry {
			img.dc[i] = decompressedCluster{}
		}
	}
	img.dcMu.Unlock()
	if old.Compressed() || old.Offset() != 0 {
		img.releaseEntryLocked(old, discardOther)
	}
	return nil
}

// allocBytesLocked finds room for n bytes of compressed data right after
// the last compressed write: in the rest of its cluster (one more
// reference to it) and, when the data runs over, in the clusters that
// follow if they are free (compressed data may cross host cluster
// boundaries, so that images pack as tightly as QEMU's). Otherwise it
// starts at newly allocated clusters.
func (img *image) allocBytesLocked(ctx context.Context, n int64) (int64, error) {
	if cur := img.compCursor; cur != 0 {
		first := cur / img.cs
		last := (cur + n - 1) / img.cs
		rc, err := img.refcountLocked(ctx, first)
		if err != nil {
			return 0, err
		}
		ok := rc > 0 && rc < img.geo.MaxRefcount()
		for k := first + 1; ok && k <= last; k++ {
			free, err := img.freeClusterLocked(ctx, k)
			if err != nil {
				return 0, err
			}
			ok = free
		}
		if ok {
			if last > first {
				if err := img.takeLocked(ctx, first+1, last-first); err != nil {
					return 0, err
				}
				if img.freeHint == first+1 {
					img.freeHint = last + 1
				}
			}
			if err := img.addRefLocked(ctx, cur, 1, +1); err != nil {
				return 0, err
			}
			img.advanceCursor(cur + n)
			return cur, nil
		}
	}
	clusters := (n + img.cs - 1) / img.cs
	host, err := img.allocLocked(ctx, clusters)
	if err != nil {
		return 0, err
	}
	img.advanceCursor(host + n)
	return host, nil
}

func (img *image) advanceCursor(end int64) {
	if end%img.cs == 0 {
		img.compCursor = 0
		return
	}
	img.compCursor = end
}
