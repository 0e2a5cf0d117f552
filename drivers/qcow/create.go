package qcow

import (
	"context"
	"fmt"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// CryptoFormat is QCryptoBlockFormat, the "format" of
// QCryptoBlockCreateOptions.
type CryptoFormat string

// EnumValues lists QEMU's values.
func (CryptoFormat) EnumValues() []string { return []string{"qcow", "luks"} }

// CreateEncryption is QCryptoBlockCreateOptions as qcow takes it: format
// "qcow" (the legacy AES) with its key-secret.
type CreateEncryption struct {
	Format    CryptoFormat `qapi:"format"`
	KeySecret string       `qapi:"key-secret,optional"`
	// QCryptoBlockCreateOptionsLUKS's members, for the union's other
	// branch: accepted so that qcow can give QEMU's refusal.
	CipherAlg    string `qapi:"cipher-alg,optional"`
	CipherMode   string `qapi:"cipher-mode,optional"`
	IVGenAlg     string `qapi:"ivgen-alg,optional"`
	IVGenHashAlg string `qapi:"ivgen-hash-alg,optional"`
	HashAlg      string `qapi:"hash-alg,optional"`
	IterTime     *int64 `qapi:"iter-time,optional"`
}

// CreateOptions is BlockdevCreateOptionsQcow (blockdev-create).
type CreateOptions struct {
	File        graph.ChildRef    `qapi:"file"`
	Size        qapi.Size         `qapi:"size"`
	BackingFile string            `qapi:"backing-file,optional"`
	Encrypt     *CreateEncryption `qapi:"encrypt,optional"`
}

// ImageEncryption is qemu-img's encrypt.* for qcow.
type ImageEncryption struct {
	Format    string `qapi:"format,optional"`
	KeySecret string `qapi:"key-secret,optional"`
}

// ImageCreateOptions are qemu-img create's options for qcow
// (backing_file, backing_fmt, encryption, encrypt.format,
// encrypt.key-secret, size), mapped onto CreateOptions as QEMU does.
type ImageCreateOptions struct {
	File        graph.ChildRef   `qapi:"file"`
	Size        qapi.Size        `qapi:"size"`
	BackingFile string           `qapi:"backing-file,optional"`
	BackingFmt  string           `qapi:"backing-fmt,optional"`
	Encryption  *bool            `qapi:"encryption,optional"`
	Encrypt     *ImageEncryption `qapi:"encrypt,optional"`
}

// imageCreate turns qemu-img's options into BlockdevCreateOptionsQcow,
// with qemu-img 7.2's messages.
func imageCreate(ctx context.Context, cc *graph.CreateContext, o any) error {
	io := o.(*ImageCreateOptions)
	co := &CreateOptions{File: io.File, Size: io.Size, BackingFile: io.BackingFile}
	e := func(f string, a ...any) error { return qapi.Errorf(qapi.GenericError, f, a...) }
	format, secret := "", ""
	if io.Encrypt != nil {
		format, secret = io.Encrypt.Format, io.Encrypt.KeySecret
	}
	if io.Encryption != nil {
		if format != "" {
			return e("'encrypt.format' and its alias 'encryption' can't be used at the same time")
		}
		if *io.Encryption {
			format = "aes"
		}
	}
	switch format {
	case "":
		if secret != "" {
			return e("Parameter 'encrypt.format' is missing")
		}
	case "aes":
		co.Encrypt = &CreateEncryption{Format: "qcow", KeySecret: secret}
	case "luks":
		return e("Unsupported encryption format")
	default:
		return e("Parameter 'format' does not accept value '%s'", format)
	}
	return create(ctx, cc, co)
}

// create formats the node named by opts.File (blockdev-create
// driver=qcow, img create) as qemu-img 7.2 does: the header, the backing
// file name after it, the L1 table after that (8-byte aligned), the file
// as long as the L1 table's end rounded up to 512 bytes. Images with a
// backing file get 512-byte clusters and 4096-entry L2 tables, others
// 4 KiB clusters and 512-entry L2 tables.
func create(ctx context.Context, cc *graph.CreateContext, o any) error {
	opts := o.(*CreateOptions)
	e := func(f string, a ...any) error { return qapi.Errorf(qapi.GenericError, f, a...) }
	if opts.File.Null || opts.File.Options != nil {
		return e("'file' must name an existing block node for blockdev-create")
	}
	h := &Header{Version: 1, Size: uint64(opts.Size), ClusterBits: 12, L2Bits: 9}
	file, err := cc.LookupNode(opts.File.Ref)
	if err != nil {
		return err
	}
	if opts.Encrypt != nil {
		if opts.Encrypt.Format != "qcow" {
			return e("Unsupported encryption format")
		}
		if err := refuseCreate(cc, file.Name()); err != nil {
			return err
		}
		if opts.Encrypt.KeySecret == "" {
			return e("Parameter 'encrypt.key-secret' is required for cipher")
		}
		pass, err := cc.Secret(opts.Encrypt.KeySecret)
		if err != nil {
			return err
		}
		clear(pass)
		h.CryptMethod = CryptAES
	}
	if opts.Size == 0 {
		return e("Image size is too small, cannot be zero length")
	}
	if opts.Size%sectorSize != 0 {
		return e("Image size must be a multiple of 512 bytes")
	}
	if len(opts.BackingFile) > MaxBackingFileSize {
		return e("Backing file name too long")
	}
	off := int64(HeaderSize)
	if opts.BackingFile != "" {
		h.BackingFileOffset = uint64(off)
		h.BackingFileSize = uint32(len(opts.BackingFile))
		h.ClusterBits, h.L2Bits = 9, 12
		off += int64(len(opts.BackingFile))
		h.BackingFile = opts.BackingFile
	}
	off = (off + 7) &^ 7
	h.L1TableOffset = uint64(off)
	l1 := h.L1Entries()
	if l1 < 0 {
		return e("Image too large")
	}
	// qemu-img writes the L1 table rounded up to 512 bytes.
	end := off + (l1*8+sectorSize-1)&^(sectorSize-1)
	if err := file.Truncate(ctx, 0, true, "off"); err != nil {
		return fmt.Errorf("Could not resize image: %w", err)
	}
	if err := file.Truncate(ctx, end, true, "off"); err != nil {
		return fmt.Errorf("Could not resize image: %w", err)
	}
	buf := append(h.Marshal(), opts.BackingFile...)
	if err := file.WriteV(ctx, 0, [][]byte{buf}, 0); err != nil {
		return fmt.Errorf("Could not write qcow header: %w", err)
	}
	return file.Flush(ctx)
}
