package qcow2

import "blockbackend/qmp/qapi"

// QMPAmendOptions is BlockdevAmendOptionsQcow2, what x-blockdev-amend
// takes for qcow2: only the encryption's key slots. The other qcow2
// amendments (compat, refcount bits, size, ...) are qemu-img amend's -o
// options (AmendOptions) and not QMP's, as in QEMU 7.2.
type QMPAmendOptions struct {
	Encrypt *QMPEncryptAmend `qapi:"encrypt,optional"`
}

// CryptoFormat is QCryptoBlockFormat.
type CryptoFormat string

// EnumValues lists QEMU's values.
func (CryptoFormat) EnumValues() []string { return []string{"qcow", "luks"} }

// KeyslotState is QCryptoBlockLUKSKeyslotState.
type KeyslotState string

// EnumValues lists QEMU's values.
func (KeyslotState) EnumValues() []string { return []string{"active", "inactive"} }

// QMPEncryptAmend is QCryptoBlockAmendOptions, a union on format whose
// luks variant is QCryptoBlockAmendOptionsLUKS and whose qcow variant is
// empty.
type QMPEncryptAmend struct {
	Format CryptoFormat `qapi:"format"`
	// The luks variant's members (decoded by UnmarshalQAPI).
	State     KeyslotState `qapi:"state,optional"`
	NewSecret string       `qapi:"new-secret,optional"`
	OldSecret string       `qapi:"old-secret,optional"`
	Keyslot   *int64       `qapi:"keyslot,optional"`
	IterTime  *int64       `qapi:"iter-time,optional"`
}

type cryptoUnionHead struct {
	Format CryptoFormat   `qapi:"format"`
	Rest   map[string]any `qapi:",rest"`
}

type luksAmendVariant struct {
	State     KeyslotState `qapi:"state"`
	NewSecret string       `qapi:"new-secret,optional"`
	OldSecret string       `qapi:"old-secret,optional"`
	Keyslot   *int64       `qapi:"keyslot,optional"`
	IterTime  *int64       `qapi:"iter-time,optional"`
}

type emptyCryptoVariant struct{}

// UnmarshalQAPI decodes the union: the discriminator first, then the
// members of its variant only, with QEMU's messages.
func (e *QMPEncryptAmend) UnmarshalQAPI(v any, mode qapi.Mode, path string) error {
	var h cryptoUnionHead
	if err := qapi.DecodeValue(v, &h, mode, path); err != nil {
		return err
	}
	e.Format = h.Format
	if h.Format != "luks" {
		return qapi.DecodeValue(h.Rest, &emptyCryptoVariant{}, mode, path)
	}
	var l luksAmendVariant
	if err := qapi.DecodeValue(h.Rest, &l, mode, path); err != nil {
		return err
	}
	e.State, e.NewSecret, e.OldSecret, e.Keyslot, e.IterTime = l.State, l.NewSecret, l.OldSecret, l.Keyslot, l.IterTime
	return nil
}

// amendOptions turns x-blockdev-amend's options into qemu-img amend's.
func (o *QMPAmendOptions) amendOptions() (*AmendOptions, error) {
	out := &AmendOptions{}
	if o.Encrypt == nil {
		return out, nil
	}
	if o.Encrypt.Format != "luks" {
		return nil, qapi.Errorf(qapi.GenericError, "Amend can't be used to change the qcow2 encryption format")
	}
	out.Encrypt = &EncryptAmendOptions{
		State: string(o.Encrypt.State), NewSecret: o.Encrypt.NewSecret, OldSecret: o.Encrypt.OldSecret,
		Keyslot: o.Encrypt.Keyslot, IterTime: o.Encrypt.IterTime,
	}
	return out, nil
}
