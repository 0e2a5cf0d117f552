package qcow2

import (
	"context"
	"fmt"
	"math"
	"syscall"
	"time"

	"blockbackend/drivers/crypto"
	"blockbackend/qmp/qapi"
)

// EncryptAmendOptions is QCryptoBlockAmendOptionsLUKS as qcow2's amend
// takes it (qemu-img amend -o encrypt.state=...,encrypt.new-secret=...):
// add a passphrase to a key slot, or erase slots.
type EncryptAmendOptions struct {
	State     string `qapi:"state,optional"` // required: checked with QEMU's message
	NewSecret string `qapi:"new-secret,optional"`
	OldSecret string `qapi:"old-secret,optional"`
	Keyslot   *int64 `qapi:"keyslot,optional"`
	IterTime  *int64 `qapi:"iter-time,optional"`
}

// amendCrypt changes the LUKS key slots of the open image, as QEMU's
// LUKS amend does: new key material is written before the header that
// points at it; slots to erase are marked inactive in the header before
// their material is overwritten, so that a crash leaves the old or the
// new state.
func (img *image) amendCrypt(ctx context.Context, o *EncryptAmendOptions, force bool) error {
	c := img.crypt
	switch {
	case c == nil:
		return amendErr("Can't amend encryption options - encryption not present")
	case c.method != CryptLUKS:
		return amendErr("Only LUKS encryption options can be amended")
	case c.mk == nil:
		return fmt.Errorf("qcow2: amending key slots needs the volume's key (opened for metadata only)")
	}
	if o.State == "" {
		return amendErr("Parameter 'state' is missing")
	}
	if o.Keyslot != nil && (*o.Keyslot < 0 || *o.Keyslot >= crypto.NumKeySlots) {
		return amendErr("Invalid keyslot %d specified, must be between 0 and %d", *o.Keyslot, crypto.NumKeySlots-1)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	base := int64(img.hdr.Crypto.Offset)
	length := int64(img.hdr.Crypto.Length)
	read := func(p []byte, off int64) error {
		if off < 0 || off+int64(len(p)) > length {
			return fmt.Errorf("qcow2: LUKS key material beyond its clusters: %w", syscall.EIO)
		}
		return img.file.ReadAt(ctx, p, base+off)
	}
	write := func(p []byte, off int64) error {
		if off < 0 || off+int64(len(p)) > length {
			return fmt.Errorf("qcow2: LUKS key material beyond its clusters: %w", syscall.EIO)
		}
		return img.file.WriteAt(ctx, p, base+off, 0)
	}
	writeHeader := func(h *crypto.Header) error {
		if err := img.file.WriteAt(ctx, h.Marshal(), base, 0); err != nil {
			return err
		}
		if err := img.file.Flush(ctx); err != nil {
			return err
		}
		*c.hdr = *h
		return nil
	}
	h := *c.hdr
	switch o.State {
	case "active":
		if o.NewSecret == "" {
			return amendErr("'new-secret' is required to activate a keyslot")
		}
		slot := -1
		if o.Keyslot != nil {
			slot = int(*o.Keyslot)
			if h.Slots[slot].Active && !force {
				return amendErr("Refusing to overwrite active keyslot %d - please erase it first", slot)
			}
		} else {
			for i := range h.Slots {
				if !h.Slots[i].Active {
					slot = i
					break
				}
			}
			if slot < 0 {
				return amendErr("Can't add a keyslot - all keyslots are in use")
			}
		}
		it := defaultIterTime * time.Millisecond
		if o.IterTime != nil {
			if *o.IterTime <= 0 || *o.IterTime > math.MaxInt32 {
				return amendErr("Parameter 'iter-time' must be between 1 and %d", math.MaxInt32)
			}
			it = time.Duration(*o.IterTime) * time.Millisecond
		}
		pass, err := c.secrets(o.NewSecret)
		if err != nil {
			return err
		}
		defer clear(pass)
		if h.Slots[slot].Active {
			// force: take the slot away first, so that a crash in the
			// middle leaves it inactive rather than garbled.
			h.Slots[slot].Active = false
			if err := writeHeader(&h); err != nil {
				return err
			}
		}
		if err := h.SetKeySlot(slot, c.mk, pass, it, write); err != nil {
			return amendErr("%s", err.Error())
		}
		if err := img.file.Flush(ctx); err != nil {
			return err
		}
		return writeHeader(&h)
	case "inactive":
		if o.Keyslot == nil && o.OldSecret == "" {
			return amendErr("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given")
		}
		matches := func(i int) (bool, error) {
			if !h.Slots[i].Active {
				return false, nil
			}
			pass, err := c.secrets(o.OldSecret)
			if err != nil {
				return false, err
			}
			defer clear(pass)
			mk, err := h.TrySlot(i, read, pass)
			defer clear(mk)
			return mk != nil, err
		}
		var erase []int
		if o.Keyslot != nil {
			slot := int(*o.Keyslot)
			if !h.Slots[slot].Active {
				return amendErr("Given keyslot %d is already erased (inactive) ", slot)
			}
			if o.OldSecret != "" {
				ok, err := matches(slot)
				if err != nil {
					return err
				}
				if !ok {
					return amendErr("Given keyslot %d doesn't contain the given old password for erase operation", slot)
				}
			}
			erase = []int{slot}
		} else {
			for i := range h.Slots {
				ok, err := matches(i)
				if err != nil {
					return err
				}
				if ok {
					erase = append(erase, i)
				}
			}
			if len(erase) == 0 {
				return amendErr("No keyslots match given (old) password for erase operation")
			}
		}
		active := 0
		for i := range h.Slots {
			if h.Slots[i].Active {
				active++
			}
		}
		if active == len(erase) && !force {
			if o.Keyslot != nil {
				return amendErr("Attempt to erase the only active keyslot %d which will erase all the data in the image irreversibly - refusing operation", erase[0])
			}
			return amendErr("All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation")
		}
		marked := h
		for _, i := range erase {
			marked.Slots[i].Active = false
		}
		if err := writeHeader(&marked); err != nil {
			return err
		}
		for _, i := range erase {
			if err := h.EraseKeySlot(i, write); err != nil {
				return err
			}
		}
		return writeHeader(&h)
	}
	return qapi.Errorf(qapi.GenericError, "Parameter 'state' does not accept value '%s'", o.State)
}
