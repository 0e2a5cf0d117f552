package luks

import (
	"context"
	"fmt"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// KeyslotState is QCryptoBlockLUKSKeyslotState.
type KeyslotState string

// EnumValues lists QEMU's values.
func (KeyslotState) EnumValues() []string { return []string{"active", "inactive"} }

// AmendOptions is QCryptoBlockAmendOptionsLUKS (img amend -o,
// x-blockdev-amend with driver=luks).
type AmendOptions struct {
	State     KeyslotState `qapi:"state"`
	NewSecret string       `qapi:"new-secret,optional"`
	OldSecret string       `qapi:"old-secret,optional"`
	Keyslot   *int64       `qapi:"keyslot,optional"`
	IterTime  *int64       `qapi:"iter-time,optional"`
	Secret    string       `qapi:"secret,optional"`
}

var _ graph.Amender = (*node)(nil)

// Amend adds a passphrase to a key slot or erases slots, as QEMU's LUKS
// amend does. The new key material is written before the header that
// points at it; an erased slot is marked inactive in the header before its
// material is overwritten, so a crash leaves either the old or the new
// state readable.
func (n *node) Amend(ctx context.Context, o any, force bool) error {
	opts := o.(*AmendOptions)
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.mk == nil {
		return graph.ErrNoIO
	}
	if opts.Keyslot != nil && (*opts.Keyslot < 0 || *opts.Keyslot >= crypto.NumKeySlots) {
		return qapi.Errorf(qapi.GenericError, "Invalid keyslot %d specified, must be between 0 and %d", *opts.Keyslot, crypto.NumKeySlots-1)
	}
	// A working copy: the header in memory changes only when one is on
	// disk (writeHeader), so a failure at any step leaves the two alike.
	h := *n.hdr
	read, write := readFunc(ctx, n.file), writeFunc(ctx, n.file)
	if opts.Secret != "" {
		// The secret that unlocks the volume: the master key is already
		// known, but QEMU checks it, so do we.
		pass, err := n.secretFor(opts.Secret)
		if err != nil {
			return err
		}
		mk, _, err := h.Unlock(read, pass)
		clear(pass)
		if err != nil {
			return qapi.Errorf(qapi.GenericError, "%s", err.Error())
		}
		clear(mk)
	}
	switch opts.State {
	case "active":
		if opts.NewSecret == "" {
			return qapi.Errorf(qapi.GenericError, "'new-secret' is required to activate a keyslot")
		}
		slot := -1
		if opts.Keyslot != nil {
			slot = int(*opts.Keyslot)
			if h.Slots[slot].Active && !force {
				return qapi.Errorf(qapi.GenericError, "Refusing to overwrite active keyslot %d - please erase it first", slot)
			}
		} else {
			for i := range h.Slots {
				if !h.Slots[i].Active {
					slot = i
					break
				}
			}
			if slot < 0 {
				return qapi.Errorf(qapi.GenericError, "Can't add a keyslot - all keyslots are in use")
			}
		}
		it, err := iterTime(opts.IterTime)
		if err != nil {
			return err
		}
		pass, err := n.secretFor(opts.NewSecret)
		if err != nil {
			return err
		}
		defer clear(pass)
		// Compute the new slot (PBKDF2, split, encrypt) in the copy
		// first, its key material held back: a failure there changes
		// nothing on disk or in memory.
		var material []byte
		var materialOff int64
		newH := h
		if err := newH.SetKeySlot(slot, n.mk, pass, it, func(p []byte, off int64) error {
			material, materialOff = append([]byte(nil), p...), off
			return nil
		}); err != nil {
			return qapi.Errorf(qapi.GenericError, "%s", err.Error())
		}
		defer clear(material)
		if h.Slots[slot].Active {
			// force: take the slot away first, so that a crash while
			// its material is overwritten leaves it inactive rather
			// than active and garbled. From here on, each header on
			// disk becomes the one in memory as soon as it is written.
			h.Slots[slot].Active = false
			if err := n.writeHeader(ctx, &h); err != nil {
				return err
			}
		}
		if err := write(material, materialOff); err != nil {
			return err
		}
		if err := n.file.Flush(ctx); err != nil {
			return err
		}
		if err := n.writeHeader(ctx, &newH); err != nil {
			return err
		}
		h = newH
	case "inactive":
		if opts.Keyslot == nil && opts.OldSecret == "" {
			return qapi.Errorf(qapi.GenericError, "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given")
		}
		var erase []int
		if opts.Keyslot != nil {
			slot := int(*opts.Keyslot)
			if !h.Slots[slot].Active {
				return qapi.Errorf(qapi.GenericError, "Given keyslot %d is already erased (inactive) ", slot)
			}
			if opts.OldSecret != "" {
				ok, err := n.slotMatches(&h, slot, opts.OldSecret, read)
				if err != nil {
					return err
				}
				if !ok {
					return qapi.Errorf(qapi.GenericError, "Given keyslot %d doesn't contain the given old password for erase operation", slot)
				}
			}
			erase = []int{slot}
		} else {
			for i := range h.Slots {
				ok, err := n.slotMatches(&h, i, opts.OldSecret, read)
				if err != nil {
					return err
				}
				if ok {
					erase = append(erase, i)
				}
			}
			if len(erase) == 0 {
				return qapi.Errorf(qapi.GenericError, "No keyslots match given (old) password for erase operation")
			}
		}
		active := 0
		for i := range h.Slots {
			if h.Slots[i].Active {
				active++
			}
		}
		if active == len(erase) && !force {
			if opts.Keyslot != nil {
				return qapi.Errorf(qapi.GenericError, "Attempt to erase the only active keyslot %d which will erase all the data in the image irreversibly - refusing operation", erase[0])
			}
			return qapi.Errorf(qapi.GenericError, "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation")
		}
		marked := h
		for _, i := range erase {
			marked.Slots[i].Active = false
		}
		if err := n.writeHeader(ctx, &marked); err != nil {
			return err
		}
		for _, i := range erase {
			if err := h.EraseKeySlot(i, write); err != nil {
				return err
			}
		}
		if err := n.writeHeader(ctx, &h); err != nil {
			return err
		}
	default:
		return qapi.Errorf(qapi.GenericError, "Parameter 'state' does not accept value '%s'", opts.State)
	}
	return nil
}

// writeHeader writes h and flushes it. Once the write has succeeded, h
// is what the file reads back, so it becomes the header in memory too,
// even if the flush then fails: after a failure at any step of an amend
// memory and file agree. A failed write leaves memory as it was (and the
// file, unless the storage wrote part of the header before failing).
// n.mu is held.
func (n *node) writeHeader(ctx context.Context, h *crypto.Header) error {
	if err := n.file.WriteAt(ctx, h.Marshal(), 0, 0); err != nil {
		return err
	}
	*n.hdr = *h
	return n.file.Flush(ctx)
}

func (n *node) secretFor(id string) ([]byte, error) {
	if n.secrets == nil {
		return nil, fmt.Errorf("no secret objects")
	}
	return n.secrets(id)
}

// slotMatches reports whether secret id opens slot i.
func (n *node) slotMatches(h *crypto.Header, i int, id string, read crypto.ReadFunc) (bool, error) {
	if !h.Slots[i].Active {
		return false, nil
	}
	pass, err := n.secretFor(id)
	if err != nil {
		return false, err
	}
	defer clear(pass)
	mk, err := h.TrySlot(i, read, pass)
	if err != nil {
		return false, err
	}
	defer clear(mk)
	return mk != nil, nil
}
