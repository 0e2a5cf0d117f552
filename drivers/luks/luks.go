// Package luks is QEMU's "luks" format driver: a LUKS1 volume in a file
// (header, key slots, then the encrypted payload), as qemu-img and
// cryptsetup make it. The guest sees the payload decrypted; each 512-byte
// sector is encrypted on its own with its sector number (from the start
// of the payload) as the IV input, as QEMU does.
//
// The format itself (header, key slots, ciphers) is package
// blockbackend/drivers/crypto, which qcow2's encryption shares. This
// package maps it onto the graph: options, open, I/O, create, resize,
// info, and key-slot management through amend.
package luks

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// Options is BlockdevOptionsLUKS.
type Options struct {
	File      graph.ChildRef `qapi:"file"`
	KeySecret string         `qapi:"key-secret,optional"`
}

func init() {
	graph.Register(&graph.Driver{
		Name:             "luks",
		NewOptions:       func() any { return &Options{} },
		Open:             open,
		NewCreateOptions: newCreateOptions,
		Create:           create,
		NewAmendOptions:  func() any { return &AmendOptions{} },
		Measure:          measure,
		Probe:            probe,
		// The secret is QEMU's strong option: a node opened with one
		// shows a json: filename.
		StrongOptions: func(o any) map[string]any {
			if s := o.(*Options).KeySecret; s != "" {
				return map[string]any{"key-secret": s}
			}
			return nil
		},
	})
}

func probe(hdr []byte, _ string) int {
	if len(hdr) >= len(crypto.Magic) && string(hdr[:len(crypto.Magic)]) == string(crypto.Magic) {
		return 100
	}
	return 0
}

const sectorSize = crypto.SectorSize

// node is an open LUKS volume.
type node struct {
	file    *graph.Node
	payload int64 // byte offset of the payload in file

	mu     sync.Mutex // guards hdr and mk (amend changes them; I/O does not read them)
	hdr    *crypto.Header
	mk     []byte               // the master key, kept for amend; cleared on Close
	cipher *crypto.SectorCipher // nil when opened with graph's NoIO

	secrets func(id string) ([]byte, error) // the graph's secret objects, for amend

	// writes serialises every write against a read-modify-write of a
	// sector it overlaps (see rangeLock); rmwHook, when set by a test,
	// runs between the read and the write of an RMW.
	writes  rangeLock
	rmwHook func()
}

func readFunc(ctx context.Context, f *graph.Node) crypto.ReadFunc {
	return func(p []byte, off int64) error {
		if off < 0 || off+int64(len(p)) > f.SizeNow() {
			return fmt.Errorf("read [%d,+%d) beyond the end of the file: %w", off, len(p), syscall.EIO)
		}
		return f.ReadAt(ctx, p, off)
	}
}

func writeFunc(ctx context.Context, f *graph.Node) crypto.WriteFunc {
	return func(p []byte, off int64) error { return f.WriteAt(ctx, p, off, 0) }
}

// readHeader reads and parses the header of the volume in f.
func readHeader(ctx context.Context, f *graph.Node) (*crypto.Header, error) {
	size := f.SizeNow()
	b := make([]byte, crypto.HeaderSize)
	if size < crypto.HeaderSize {
		return nil, qapi.Errorf(qapi.GenericError, "Volume is not in LUKS format")
	}
	if err := f.ReadAt(ctx, b, 0); err != nil {
		return nil, fmt.Errorf("Unable to read LUKS header: %w", err)
	}
	h, err := crypto.ParseHeader(b, size)
	if err != nil {
		return nil, qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	return h, nil
}

func open(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
	opts := o.(*Options)
	c, err := oc.OpenChild(ctx, "file", &opts.File, graph.RoleImage, false)
	if err != nil {
		return nil, err
	}
	f := c.Node()
	h, err := readHeader(ctx, f)
	if err != nil {
		return nil, err
	}
	if oc.NoIO() {
		// Metadata only (img info): QEMU neither needs nor checks the
		// key then, so neither do we; data I/O gets graph.ErrNoIO.
		n := &node{file: f, payload: int64(h.PayloadOffset) * sectorSize, hdr: h}
		if f.SizeNow() < n.payload {
			return nil, fmt.Errorf("Could not refresh total sector count: %w", syscall.EIO)
		}
		return n, nil
	}
	if opts.KeySecret == "" {
		return nil, qapi.Errorf(qapi.GenericError, "Parameter 'key-secret' is required for cipher")
	}
	pass, err := oc.Secret(opts.KeySecret)
	if err != nil {
		return nil, err
	}
	defer clear(pass)
	mk, _, err := h.Unlock(readFunc(ctx, f), pass)
	if err != nil {
		if errors.Is(err, crypto.ErrInvalidPassword) {
			return nil, qapi.Errorf(qapi.GenericError, "%s", err.Error())
		}
		return nil, err
	}
	sc, err := h.SectorCipher(mk)
	if err != nil {
		clear(mk)
		return nil, err
	}
	n := &node{file: f, payload: int64(h.PayloadOffset) * sectorSize, hdr: h, mk: mk, cipher: sc, secrets: oc.Secret}
	if f.SizeNow() < n.payload {
		n.Close()
		return nil, fmt.Errorf("Could not refresh total sector count: %w", syscall.EIO)
	}
	return n, nil
}

// Size is the payload's size, whole sectors.
func (n *node) Size() (int64, error) {
	s := n.file.SizeNow() - n.payload
	if s < 0 {
		return 0, fmt.Errorf("LUKS payload offset %d beyond the end of the %d-byte file: %w", n.payload, n.file.SizeNow(), syscall.EIO)
	}
	// As QEMU: a partial last sector counts (reading as if the file
	// went on with zeros).
	return (s + sectorSize - 1) &^ (sectorSize - 1), nil
}

// readFile reads the payload bytes at off (from the payload's start); the
// part of a partial last sector beyond the end of the file reads as
// (encrypted) zeros.
func (n *node) readFile(ctx context.Context, b []byte, off int64) error {
	avail := n.file.SizeNow() - n.payload - off
	if avail < int64(len(b)) {
		clear(b[max(avail, 0):])
		b = b[:max(avail, 0)]
	}
	if len(b) == 0 {
		return nil
	}
	return n.file.ReadAt(ctx, b, n.payload+off)
}

// writeFile writes encrypted sectors, first growing the file to whole
// sectors if the last one was partial.
func (n *node) writeFile(ctx context.Context, b []byte, off int64, flags graph.WriteFlags) error {
	if end := n.payload + off + int64(len(b)); end > n.file.SizeNow() {
		if err := n.file.Truncate(ctx, end, false, "off"); err != nil {
			return err
		}
	}
	return n.file.WriteAt(ctx, b, n.payload+off, flags)
}

// chunk bounds the bounce buffer of one step of a large request.
const chunk = 1 << 20

var bufPool = sync.Pool{New: func() any { b := make([]byte, chunk+2*sectorSize); return &b }}

func (n *node) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	if n.cipher == nil {
		return graph.ErrNoIO
	}
	total := int64(0)
	for _, b := range iov {
		total += int64(len(b))
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	vi, vo := 0, 0 // position in iov
	for done := int64(0); done < total; {
		pos := off + done
		start := pos &^ (sectorSize - 1)
		l := min(total-done, chunk)
		end := (pos + l + sectorSize - 1) &^ (sectorSize - 1)
		buf := (*bp)[:end-start]
		if err := n.readFile(ctx, buf, start); err != nil {
			return err
		}
		if err := n.cipher.Decrypt(uint64(start/sectorSize), buf); err != nil {
			return err
		}
		src := buf[pos-start : pos-start+l]
		for len(src) > 0 {
			c := copy(iov[vi][vo:], src)
			src = src[c:]
			vo += c
			if vo == len(iov[vi]) {
				vi, vo = vi+1, 0
			}
		}
		done += l
	}
	return nil
}

func (n *node) WriteV(ctx context.Context, off int64, iov [][]byte, flags graph.WriteFlags) error {
	if n.cipher == nil {
		return graph.ErrNoIO
	}
	total := int64(0)
	for _, b := range iov {
		total += int64(len(b))
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	vi, vo := 0, 0
	for done := int64(0); done < total; {
		pos := off + done
		start := pos &^ (sectorSize - 1)
		l := min(total-done, chunk)
		end := (pos + l + sectorSize - 1) &^ (sectorSize - 1)
		buf := (*bp)[:end-start]
		if err := n.writeChunk(ctx, buf, start, pos, l, iov, &vi, &vo, flags); err != nil {
			return err
		}
		done += l
	}
	return nil
}

// writeChunk writes [pos, pos+l) from iov (from *vi, *vo on) through the
// sector-aligned buffer buf that covers it from start.
func (n *node) writeChunk(ctx context.Context, buf []byte, start, pos, l int64, iov [][]byte, vi, vo *int, flags graph.WriteFlags) error {
	end := start + int64(len(buf))
	headPartial := pos != start
	tailPartial := pos+l != end
	rmw := headPartial || tailPartial
	r, err := n.writes.lock(ctx, start/sectorSize, end/sectorSize, rmw)
	if err != nil {
		return err
	}
	defer n.writes.unlock(r)
	if headPartial {
		if err := n.readSector(ctx, buf[:sectorSize], start); err != nil {
			return err
		}
	}
	if tailPartial && (!headPartial || end-start > sectorSize) {
		if err := n.readSector(ctx, buf[len(buf)-sectorSize:], end-sectorSize); err != nil {
			return err
		}
	}
	if rmw && n.rmwHook != nil {
		n.rmwHook()
	}
	dst := buf[pos-start : pos-start+l]
	for len(dst) > 0 {
		c := copy(dst, iov[*vi][*vo:])
		dst = dst[c:]
		*vo += c
		if *vo == len(iov[*vi]) {
			*vi, *vo = *vi+1, 0
		}
	}
	if err := n.cipher.Encrypt(uint64(start/sectorSize), buf); err != nil {
		return err
	}
	return n.writeFile(ctx, buf, start, flags)
}

func (n *node) readSector(ctx context.Context, b []byte, off int64) error {
	if err := n.readFile(ctx, b, off); err != nil {
		return err
	}
	return n.cipher.Decrypt(uint64(off/sectorSize), b)
}

func (n *node) Flush(ctx context.Context) error { return n.file.Flush(ctx) }

// Truncate resizes the payload to size bytes of file (the node's size is
// that rounded up to whole sectors, as in QEMU); the new part reads as
// whatever the file holds there decrypted, as in QEMU: not zeros.
func (n *node) Truncate(ctx context.Context, size int64, exact bool, prealloc string) error {
	if n.cipher == nil {
		return graph.ErrNoIO
	}
	return n.file.Truncate(ctx, n.payload+size, exact, prealloc)
}

// HasZeroInit is false: a new payload reads as decrypted noise, not
// zeros (img convert must write the zeros it would otherwise skip).
func (n *node) HasZeroInit() bool { return false }

// Encrypted marks the node encrypted in query-named-block-nodes.
func (n *node) Encrypted() bool { return true }

func (n *node) Filename() string { return n.file.Filename() }

func (n *node) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	clear(n.mk)
	n.mk = nil
	return nil
}

// Info is ImageInfoSpecificLUKS (QCryptoBlockInfoLUKS).
func (n *node) Info() map[string]any {
	n.mu.Lock()
	defer n.mu.Unlock()
	return map[string]any{"type": "luks", "data": headerInfo(n.hdr)}
}

func headerInfo(h *crypto.Header) map[string]any {
	p, _ := h.Params()
	slots := make([]map[string]any, 0, crypto.NumKeySlots)
	for _, s := range h.Slots {
		m := map[string]any{"active": s.Active, "key-offset": int64(s.KeyOffset) * sectorSize}
		if s.Active {
			m["iters"] = s.Iterations
			m["stripes"] = s.Stripes
		}
		slots = append(slots, m)
	}
	d := map[string]any{
		"cipher-alg":       string(p.Cipher),
		"cipher-mode":      string(p.Mode),
		"ivgen-alg":        string(p.IVGen),
		"hash-alg":         string(p.Hash),
		"payload-offset":   int64(h.PayloadOffset) * sectorSize,
		"master-key-iters": h.MKDigestIter,
		"uuid":             h.UUID,
		"slots":            slots,
	}
	if p.IVGen == crypto.IVEssiv {
		d["ivgen-hash-alg"] = string(p.IVGenHash)
	}
	return d
}

// PrepareReopen allows blockdev-reopen (read-only on and off): the volume
// stays unlocked with its master key, so a changed key-secret is not
// tried again, as in QEMU.
func (n *node) PrepareReopen(context.Context, any, bool) (func(), func(), error) {
	return func() {}, func() {}, nil
}
