package qcow2

import (
	"bytes"
	"context"
	"fmt"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// Persistent dirty bitmaps (qcow2.txt "Bitmaps": the bitmaps extension,
// "Bitmap directory", "Bitmap table", "Bitmap data").
//
// The bitmaps themselves live in the graph (graph.DirtyBitmap), which
// sets their bits on every write, write-zeroes and discard of the node.
// This file loads the stored ones when the image opens and stores the
// persistent ones when it closes, as QEMU does:
//
//   - On a read-write open every bitmap that is not in use gets the
//     in_use flag on disk (the directory is rewritten in place and
//     flushed) before the open returns, so before any guest write; a
//     process killed while the image is open leaves them in use.
//   - A bitmap found in use is inconsistent: it is kept (directory entry
//     and clusters) but never used; it can only be removed.
//   - On close (and reopen read-only) the bitmaps are stored: a bitmap
//     whose bits did not change keeps its table and data clusters; a
//     changed one gets new ones (written, refcounts made stable, then
//     the header points at a new directory) and the old ones are freed
//     afterwards, so that a crash leaves leaks at most. The flags become
//     auto (when enabled) without in_use, and autoclear bit 0 stays set.
//   - A read-only open loads the bitmaps read-only and writes nothing.
//
// Directory entries this implementation cannot use (another type, extra
// data that is not extra_data_compatible, a granularity out of range)
// are kept as they are.

const (
	bmeInUse         uint32 = 1 << 0
	bmeAuto          uint32 = 1 << 1
	bmeExtraDataComp uint32 = 1 << 2
	bmeTypeDirty            = 1

	bmMinGranBits = 9
	bmMaxGranBits = 31
	// bmTableOffsetMask is bits 9-55 of a bitmap table entry.
	bmTableOffsetMask uint64 = 0x00fffffffffffe00
	// bmMaxDirectory is QEMU's limit on the directory size.
	bmMaxDirectory = 64 << 20
	// bmMaxTableSize bounds a bitmap table (entries), as QEMU does.
	bmMaxTableSize = 0x8000000
)

// bitmapDirEntry is one entry of the bitmap directory.
type bitmapDirEntry struct {
	TableOffset int64
	TableSize   uint32
	Flags       uint32
	Type        uint8
	GranBits    uint8
	Name        string
	Extra       []byte
}

// usable reports whether this implementation can load the bitmap.
func (e *bitmapDirEntry) usable() bool {
	return e.Type == bmeTypeDirty && (len(e.Extra) == 0 || e.Flags&bmeExtraDataComp != 0)
}

// constraintsErr checks what QEMU refuses to open an image for (an
// empty or too long name, a granularity out of range, an unaligned
// bitmap table), with its message.
func (e *bitmapDirEntry) constraintsErr(cs int64) error {
	if e.Name == "" || len(e.Name) > graph.MaxBitmapName || e.GranBits < bmMinGranBits || e.GranBits > bmMaxGranBits ||
		e.TableOffset%cs != 0 || e.TableSize > bmMaxTableSize {
		return qapi.Errorf(qapi.GenericError, "Bitmap '%s' doesn't satisfy the constraints", e.Name)
	}
	return nil
}

// parseBitmapDirectory parses n entries of a bitmap directory.
func parseBitmapDirectory(dir []byte, n uint32, at int64) ([]bitmapDirEntry, error) {
	var out []bitmapDirEntry
	p := 0
	for i := uint32(0); i < n; i++ {
		if p+24 > len(dir) {
			return nil, formatErr(at, "Bitmap directory entry exceeds the directory")
		}
		nameSize := int(be.Uint16(dir[p+18:]))
		extra := int(be.Uint32(dir[p+20:]))
		if extra > len(dir) {
			return nil, formatErr(at, "Bitmap directory entry exceeds the directory")
		}
		end := p + 24 + extra + nameSize
		if end > len(dir) {
			return nil, formatErr(at, "Bitmap directory entry exceeds the directory")
		}
		e := bitmapDirEntry{
			TableOffset: int64(be.Uint64(dir[p:])),
			TableSize:   be.Uint32(dir[p+8:]),
			Flags:       be.Uint32(dir[p+12:]),
			Type:        dir[p+16],
			GranBits:    dir[p+17],
			Extra:       append([]byte(nil), dir[p+24:p+24+extra]...),
			Name:        string(dir[p+24+extra : end]),
		}
		out = append(out, e)
		p = (end + 7) &^ 7
	}
	return out, nil
}

// marshalBitmapDirectory is the inverse of parseBitmapDirectory.
func marshalBitmapDirectory(es []bitmapDirEntry) []byte {
	var out []byte
	for _, e := range es {
		n := (24 + len(e.Extra) + len(e.Name) + 7) &^ 7
		b := make([]byte, n)
		be.PutUint64(b[0:], uint64(e.TableOffset))
		be.PutUint32(b[8:], e.TableSize)
		be.PutUint32(b[12:], e.Flags)
		b[16] = e.Type
		b[17] = e.GranBits
		be.PutUint16(b[18:], uint16(len(e.Name)))
		be.PutUint32(b[20:], uint32(len(e.Extra)))
		copy(b[24:], e.Extra)
		copy(b[24+len(e.Extra):], e.Name)
		out = append(out, b...)
	}
	return out
}

// bitmapState is the image's view of its stored bitmaps. Guarded by
// image.meta.
type bitmapState struct {
	// managed: the directory was loaded (or there was none) and the image
	// is version 3: this implementation keeps the extension consistent,
	// and autoclear bit 0 stays set.
	managed bool
	// stale: an extension was present without autoclear bit 0; it is
	// replaced (not freed: its clusters were not counted) when bitmaps
	// are stored.
	stale bool
	// entries mirror the directory on disk.
	entries []bitmapDirEntry
}

var _ graph.BitmapStore = (*image)(nil)

// bitmapsAutoclear is the autoclear bit the first write keeps.
func (img *image) bitmapsAutoclear() uint64 {
	if img.bm.managed && img.hdr.Bitmaps != nil {
		return AutoclearBitmaps
	}
	return 0
}

// loadBitmaps reads the bitmap directory and attaches the bitmaps to the
// node; on a writable image it marks them in use. Called at the end of
// open.
func (img *image) loadBitmaps(ctx context.Context) error {
	h := img.hdr
	if h.Version < 3 {
		if h.Bitmaps != nil {
			img.log.Warn("This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent")
		}
		return nil
	}
	img.bm.managed = true
	ext := h.Bitmaps
	if ext == nil {
		return nil
	}
	if h.AutoclearFeatures&AutoclearBitmaps == 0 {
		img.log.Warn("a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent")
		img.bm.stale = true
		return nil
	}
	if ext.NbBitmaps == 0 {
		return nil
	}
	fsize := img.file.SizeNow()
	cs := img.cs
	if ext.NbBitmaps > MaxBitmaps || ext.DirectorySize > bmMaxDirectory || int64(ext.DirectoryOffset)%cs != 0 {
		return qapi.Errorf(qapi.GenericError, "qcow2: invalid bitmaps extension (directory at %#x, %d bytes, %d bitmaps)",
			ext.DirectoryOffset, ext.DirectorySize, ext.NbBitmaps)
	}
	if !inFile(ext.DirectoryOffset, ext.DirectorySize, fsize) {
		// QEMU reads zeros there, and so finds a bitmap without a name.
		return qapi.Errorf(qapi.GenericError, "Bitmap '' doesn't satisfy the constraints")
	}
	dir := make([]byte, ext.DirectorySize)
	if err := img.file.ReadV(ctx, int64(ext.DirectoryOffset), [][]byte{dir}); err != nil {
		return fmt.Errorf("qcow2: reading the bitmap directory: %w", err)
	}
	es, err := parseBitmapDirectory(dir, ext.NbBitmaps, int64(ext.DirectoryOffset))
	if err != nil {
		return qapi.Errorf(qapi.GenericError, "qcow2: %v", err)
	}
	size := img.size.Load()
	for i := range es {
		e := &es[i]
		if err := e.constraintsErr(cs); err != nil {
			return err
		}
		if !e.usable() {
			continue
		}
		if graph.BitmapBytes(1<<e.GranBits, size) > graph.MaxBitmapBytes {
			return qapi.Errorf(qapi.GenericError, "qcow2: bitmap '%s' is too large to load (granularity %d over %d bytes)", e.Name, int64(1)<<e.GranBits, size)
		}
		spec := graph.BitmapSpec{
			Name: e.Name, Granularity: 1 << e.GranBits, Enabled: e.Flags&bmeAuto != 0,
			ReadOnly: img.readOnly, Inconsistent: e.Flags&bmeInUse != 0,
		}
		if !spec.Inconsistent {
			if spec.Data, err = img.readBitmapData(ctx, e, size, fsize); err != nil {
				return err
			}
		}
		img.gnode.AddLoadedBitmap(spec, size)
	}
	img.bm.entries = es
	if img.readOnly {
		return nil
	}
	return img.markBitmapsInUse(ctx)
}

// reloadBitmapsLocked reads the directory again after an offline
// operation (amend may have dropped the bitmaps with a downgrade to
// version 2); the bitmaps in the graph stay as they are.
func (img *image) reloadBitmapsLocked(ctx context.Context) error {
	h := img.hdr
	img.bm = bitmapState{managed: h.Version >= 3}
	ext := h.Bitmaps
	switch {
	case !img.bm.managed || ext == nil || ext.NbBitmaps == 0:
	case h.AutoclearFeatures&AutoclearBitmaps == 0:
		img.bm.stale = true
	default:
		if ext.DirectorySize > bmMaxDirectory || !inFile(ext.DirectoryOffset, ext.DirectorySize, img.file.SizeNow()) {
			img.bm.managed = false
			return fmt.Errorf("qcow2: invalid bitmaps extension after reload")
		}
		dir := make([]byte, ext.DirectorySize)
		if err := img.file.ReadV(ctx, int64(ext.DirectoryOffset), [][]byte{dir}); err != nil {
			img.bm.managed = false
			return fmt.Errorf("qcow2: reading the bitmap directory: %w", err)
		}
		es, err := parseBitmapDirectory(dir, ext.NbBitmaps, int64(ext.DirectoryOffset))
		if err != nil {
			img.bm.managed = false
			return err
		}
		img.bm.entries = es
	}
	return nil
}

// sameLayout reports whether directory a differs from b in flags only.
func sameLayout(a, b []bitmapDirEntry) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if x.TableOffset != y.TableOffset || x.TableSize != y.TableSize || x.Type != y.Type ||
			x.GranBits != y.GranBits || x.Name != y.Name || !bytes.Equal(x.Extra, y.Extra) {
			return false
		}
	}
	return true
}

// writeDirectoryInPlace rewrites the directory where it is (same layout,
// other flags) and flushes.
func (img *image) writeDirectoryInPlace(ctx context.Context, es []bitmapDirEntry) error {
	if err := img.clearUnknownAutoclearLocked(ctx); err != nil {
		return err
	}
	buf := marshalBitmapDirectory(es)
	if err := img.file.WriteV(ctx, int64(img.hdr.Bitmaps.DirectoryOffset), [][]byte{buf}, 0); err != nil {
		return fmt.Errorf("qcow2: writing the bitmap directory: %w", err)
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	img.bm.entries = es
	return nil
}

// clearUnknownAutoclearLocked clears the autoclear bits this
// implementation does not maintain before it changes the image
// (qcow2.txt: "An implementation may only write to an image with unknown
// auto-clear features if it clears the respective bits from this field
// first"), as the first guest write does.
func (img *image) clearUnknownAutoclearLocked(ctx context.Context) error {
	h := *img.hdr
	h.AutoclearFeatures &= AutoclearDataFileRaw | img.bitmapsAutoclear()
	if h.AutoclearFeatures == img.hdr.AutoclearFeatures {
		return nil
	}
	if err := img.writeHeaderLocked(ctx, &h); err != nil {
		return err
	}
	return img.file.Flush(ctx)
}

// markBitmapsInUse sets in_use on every usable bitmap on disk (directory
// rewritten in place: only flag words change) and flushes.
func (img *image) markBitmapsInUse(ctx context.Context) error {
	changed := false
	for i := range img.bm.entries {
		e := &img.bm.entries[i]
		if e.usable() && e.Flags&bmeInUse == 0 {
			e.Flags |= bmeInUse
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return img.writeDirectoryInPlace(ctx, img.bm.entries)
}

// readBitmapData reads a bitmap's table and data.
func (img *image) readBitmapData(ctx context.Context, e *bitmapDirEntry, size, fsize int64) ([]byte, error) {
	cs := img.cs
	gran := int64(1) << e.GranBits
	nbytes := ((size+gran-1)/gran + 7) / 8
	want := (nbytes + cs - 1) / cs
	// QEMU's message for every bitmap that cannot be read; what is wrong
	// goes with the wrapped error (not in the message, as in QEMU's).
	bad := func(what string) error {
		return &qapi.Error{Class: qapi.GenericError, Desc: fmt.Sprintf("Could not read bitmap '%s' from image: Invalid argument", e.Name),
			Err: &FormatError{Offset: e.TableOffset, Msg: what}}
	}
	if int64(e.TableSize) != want || e.TableSize > bmMaxTableSize {
		return nil, bad(fmt.Sprintf("bitmap table has %d entries, the image needs %d", e.TableSize, want))
	}
	if e.TableSize == 0 {
		return nil, nil
	}
	if e.TableOffset%cs != 0 || !inFile(uint64(e.TableOffset), uint64(e.TableSize)*8, fsize) {
		return nil, bad(fmt.Sprintf("bitmap table at %#x is outside the image file", e.TableOffset))
	}
	tbl, err := img.readTable(ctx, e.TableOffset, int(e.TableSize))
	if err != nil {
		return nil, err
	}
	data := make([]byte, nbytes)
	for i, t := range tbl {
		chunk := data[int64(i)*cs : min(int64(i+1)*cs, nbytes)]
		off := int64(t & bmTableOffsetMask)
		switch {
		case off == 0 && t&1 != 0:
			for j := range chunk {
				chunk[j] = 0xff
			}
		case off == 0:
		case t&^bmTableOffsetMask != 0 || !inFile(uint64(off), uint64(cs), fsize):
			return nil, bad(fmt.Sprintf("invalid bitmap table entry %#x", t))
		default:
			if err := img.file.ReadV(ctx, off, [][]byte{chunk}); err != nil {
				return nil, fmt.Errorf("qcow2: reading bitmap '%s': %w", e.Name, err)
			}
		}
	}
	return data, nil
}

// bitmapInfo is ImageInfoSpecificQCow2's "bitmaps" (Qcow2BitmapInfo), or
// nil when the image has no consistent bitmaps extension.
func (img *image) bitmapInfoLocked() []any {
	if !img.bm.managed || img.bm.stale || img.hdr.Bitmaps == nil {
		return nil
	}
	out := make([]any, 0, len(img.bm.entries))
	for _, e := range img.bm.entries {
		flags := []any{}
		if e.Flags&bmeInUse != 0 {
			flags = append(flags, "in-use")
		}
		if e.Flags&bmeAuto != 0 {
			flags = append(flags, "auto")
		}
		out = append(out, map[string]any{"flags": flags, "name": e.Name, "granularity": int64(1) << e.GranBits})
	}
	return out
}

// CanStoreBitmap checks a new persistent bitmap (block-dirty-bitmap-add
// with persistent), with QEMU's messages.
func (img *image) CanStoreBitmap(name string, granularity int64) error {
	img.meta.Lock()
	defer img.meta.Unlock()
	if !img.v3 {
		return qapi.Errorf(qapi.GenericError, "Cannot store dirty bitmaps in qcow2 v2 files")
	}
	if len(name) > graph.MaxBitmapName {
		return qapi.Errorf(qapi.GenericError, "Name length exceeds maximum (%d characters)", graph.MaxBitmapName)
	}
	if i := img.findEntryLocked(name); i >= 0 && !img.bm.entries[i].usable() {
		// Only entries this implementation cannot load get here: the
		// others are bitmaps of the node, refused before.
		return qapi.Errorf(qapi.GenericError, "Bitmap with the same name is already stored")
	}
	n := 0
	for _, b := range img.gnode.Bitmaps() {
		if b.Persistent() && img.findEntryLocked(b.Name()) < 0 {
			n++
		}
	}
	if len(img.bm.entries)+n >= MaxBitmaps {
		return qapi.Errorf(qapi.GenericError, "Maximum number of persistent bitmaps is already reached")
	}
	return nil
}

func (img *image) findEntryLocked(name string) int {
	for i, e := range img.bm.entries {
		if e.Name == name {
			return i
		}
	}
	return -1
}

// RemoveStoredBitmap removes a bitmap from the image (block-dirty-bitmap-
// remove of a persistent bitmap): a new directory without it, then its
// clusters are freed.
func (img *image) RemoveStoredBitmap(ctx context.Context, name string) error {
	img.meta.Lock()
	defer img.meta.Unlock()
	i := img.findEntryLocked(name)
	if i < 0 || !img.bm.managed {
		return nil
	}
	if img.readOnly {
		return qapi.Errorf(qapi.GenericError, "Bitmap '%s' is readonly and cannot be modified", name)
	}
	if img.corrupt {
		return fmt.Errorf("qcow2: image is marked corrupt: cannot remove bitmap '%s'", name)
	}
	old := img.bm.entries[i]
	es := append(append([]bitmapDirEntry(nil), img.bm.entries[:i]...), img.bm.entries[i+1:]...)
	if err := img.writeDirectoryLocked(ctx, es); err != nil {
		return qapi.Errorf(qapi.GenericError, "Failed to remove bitmap '%s' from the image: %v", name, err)
	}
	if err := img.freeBitmapClustersLocked(ctx, &old); err != nil {
		return err
	}
	return img.syncLocked(ctx, false)
}

// freeBitmapClustersLocked queues the frees of a bitmap's table and data
// (the directory no longer pointing at them is stable).
func (img *image) freeBitmapClustersLocked(ctx context.Context, e *bitmapDirEntry) error {
	if e.TableSize == 0 || e.TableOffset == 0 {
		return nil
	}
	tbl, err := img.readTable(ctx, e.TableOffset, int(e.TableSize))
	if err != nil {
		return err
	}
	for _, t := range tbl {
		if off := int64(t & bmTableOffsetMask); off != 0 {
			img.queueFreeLocked(off, img.cs, discardOther)
		}
	}
	img.queueFreeLocked(e.TableOffset, int64(e.TableSize)*8, discardOther)
	return nil
}

// writeDirectoryLocked writes es as a new directory in new clusters,
// makes their refcounts stable, points the header at it (or drops the
// extension when es is empty) and queues the free of the old directory.
func (img *image) writeDirectoryLocked(ctx context.Context, es []bitmapDirEntry) error {
	h := *img.hdr
	h.AutoclearFeatures &= AutoclearDataFileRaw | AutoclearBitmaps
	oldExt := img.hdr.Bitmaps
	if len(es) == 0 {
		h.Bitmaps = nil
		h.AutoclearFeatures &^= AutoclearBitmaps
	} else {
		buf := marshalBitmapDirectory(es)
		if len(buf) > bmMaxDirectory {
			return fmt.Errorf("qcow2: the bitmap directory would exceed %d bytes", bmMaxDirectory)
		}
		off, err := img.allocLocked(ctx, clustersFor(int64(len(buf)), img.cs))
		if err != nil {
			return err
		}
		if err := img.file.WriteV(ctx, off, [][]byte{buf}, 0); err != nil {
			return fmt.Errorf("qcow2: writing the bitmap directory: %w", err)
		}
		h.Bitmaps = &BitmapsExt{NbBitmaps: uint32(len(es)), DirectorySize: uint64(len(buf)), DirectoryOffset: uint64(off)}
		h.AutoclearFeatures |= AutoclearBitmaps
	}
	// New clusters and their refcounts stable before the header points
	// at them.
	if _, err := img.rbc.flush(ctx); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	if err := img.writeHeaderLocked(ctx, &h); err != nil {
		return err
	}
	if err := img.file.Flush(ctx); err != nil {
		return err
	}
	if oldExt != nil && !img.bm.stale && oldExt.DirectorySize > 0 {
		img.queueFreeLocked(int64(oldExt.DirectoryOffset), int64(oldExt.DirectorySize), discardOther)
	}
	img.bm.stale = false
	img.bm.entries = es
	return nil
}

// writeBitmapLocked writes a bitmap's data and table into new clusters
// and returns the table's offset and size. All-zero clusters are not
// allocated (table entry 0).
func (img *image) writeBitmapLocked(ctx context.Context, data []byte) (int64, uint32, error) {
	cs := img.cs
	n := clustersFor(int64(len(data)), cs)
	if n == 0 {
		return 0, 0, nil
	}
	tbl := make([]uint64, n)
	for i := range tbl {
		chunk := data[int64(i)*cs : min(int64(i+1)*cs, int64(len(data)))]
		zero := true
		for _, c := range chunk {
			if c != 0 {
				zero = false
				break
			}
		}
		if zero {
			continue
		}
		off, err := img.allocLocked(ctx, 1)
		if err != nil {
			return 0, 0, err
		}
		buf := chunk
		if int64(len(chunk)) < cs {
			buf = make([]byte, cs)
			copy(buf, chunk)
		}
		if err := img.file.WriteV(ctx, off, [][]byte{buf}, 0); err != nil {
			return 0, 0, fmt.Errorf("qcow2: writing bitmap data: %w", err)
		}
		tbl[i] = uint64(off)
	}
	toff, err := img.allocLocked(ctx, clustersFor(n*8, cs))
	if err != nil {
		return 0, 0, err
	}
	buf := make([]byte, clustersFor(n*8, cs)*cs)
	for i, t := range tbl {
		be.PutUint64(buf[i*8:], t)
	}
	if err := img.file.WriteV(ctx, toff, [][]byte{buf}, 0); err != nil {
		return 0, 0, fmt.Errorf("qcow2: writing a bitmap table: %w", err)
	}
	return toff, uint32(n), nil
}

// storeBitmapsLocked stores the node's persistent bitmaps (close, reopen
// read-only): see the file comment.
func (img *image) storeBitmapsLocked(ctx context.Context) error {
	if !img.bm.managed || img.readOnly || img.corrupt || img.hdr.Version < 3 {
		return nil
	}
	bms := img.gnode.Bitmaps()
	byName := map[string]*graph.DirtyBitmap{}
	for _, b := range bms {
		if b.Persistent() {
			// A resize by amend does not pass through the graph.
			b.Resize(img.size.Load())
			byName[b.Name()] = b
		}
	}
	if len(byName) == 0 && len(img.bm.entries) == 0 {
		return nil
	}
	es := make([]bitmapDirEntry, 0, len(img.bm.entries)+len(byName))
	var stored []*graph.DirtyBitmap
	var freed []bitmapDirEntry
	seen := map[string]bool{}
	store := func(e bitmapDirEntry, b *graph.DirtyBitmap) (bitmapDirEntry, error) {
		st := b.State()
		if st.Modified || e.Name == "" {
			off, n, err := img.writeBitmapLocked(ctx, b.Data())
			if err != nil {
				return e, err
			}
			if e.Name != "" {
				freed = append(freed, e)
			}
			e.TableOffset, e.TableSize = off, n
		}
		// Extra data of an extra_data_compatible bitmap "must be left as
		// is" (qcow2.txt "Bitmap directory"), with its flag.
		e.Name, e.Type = b.Name(), bmeTypeDirty
		e.GranBits = uint8(log2(b.Granularity()))
		e.Flags &= bmeExtraDataComp
		if st.Enabled {
			e.Flags |= bmeAuto
		}
		stored = append(stored, b)
		return e, nil
	}
	for _, e := range img.bm.entries {
		b := byName[e.Name]
		seen[e.Name] = true
		if b == nil || !e.usable() || b.State().Inconsistent {
			es = append(es, e) // kept as it is
			continue
		}
		ne, err := store(e, b)
		if err != nil {
			return err
		}
		es = append(es, ne)
	}
	// New bitmaps, newest first, as QEMU stores them.
	for i := len(bms) - 1; i >= 0; i-- {
		b := bms[i]
		if !b.Persistent() || seen[b.Name()] {
			continue
		}
		ne, err := store(bitmapDirEntry{}, b)
		if err != nil {
			return err
		}
		es = append(es, ne)
	}
	if len(es) == 0 || len(stored) == 0 {
		return nil // nothing to store: every entry stays as it is
	}
	if len(freed) == 0 && sameLayout(es, img.bm.entries) {
		// Only flags change (in_use cleared, auto): in place, as the
		// open set them. A flags word never straddles a sector.
		if err := img.writeDirectoryInPlace(ctx, es); err != nil {
			return err
		}
		for _, b := range stored {
			b.ClearModified()
		}
		return nil
	}
	if err := img.writeDirectoryLocked(ctx, es); err != nil {
		return err
	}
	for i := range freed {
		if err := img.freeBitmapClustersLocked(ctx, &freed[i]); err != nil {
			return err
		}
	}
	for _, b := range stored {
		b.ClearModified()
	}
	return nil
}

// reopenBitmapsLocked follows a reopen: read-only makes the bitmaps
// read-only (they were stored by closeMetadataLocked); read-write marks
// them in use again and writable.
func (img *image) reopenBitmapsLocked(ctx context.Context, readOnly bool) error {
	if !img.bm.managed {
		return nil
	}
	for _, b := range img.gnode.Bitmaps() {
		if b.Persistent() {
			b.SetReadOnly(readOnly)
		}
	}
	if readOnly || img.hdr.Bitmaps == nil || img.bm.stale {
		return nil
	}
	return img.markBitmapsInUse(ctx)
}

func log2(x int64) int {
	n := 0
	for x > 1 {
		x >>= 1
		n++
	}
	return n
}
