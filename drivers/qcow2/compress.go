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
	e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(false))
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
		var buf bytes.Buffer
		w, err := flate.NewWriterWindow(&buf, deflateWindow)
		if err != nil {
			return nil, err
		}
		if _, err := w.Write(data); err != nil {
			return nil, err
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
		out = buf.Bytes()
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

// allocBytesLocked finds room for n bytes of compressed data: in the
// cluster the last compressed write left room in (one more reference to
// it), or at the start of newly allocated clusters.
func (img *image) allocBytesLocked(ctx context.Context, n int64) (int64, error) {
	if cur := img.compCursor; cur != 0 && cur%img.cs+n <= img.cs {
		rc, err := img.refcountLocked(ctx, cur/img.cs)
		if err != nil {
			return 0, err
		}
		if rc > 0 && rc < img.geo.MaxRefcount() {
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
