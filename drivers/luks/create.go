package luks

import (
	"context"
	"math"
	"time"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// PreallocMode is QAPI's PreallocMode.
type PreallocMode string

// EnumValues lists QEMU's values.
func (PreallocMode) EnumValues() []string { return []string{"off", "metadata", "falloc", "full"} }

// CreateOptions is BlockdevCreateOptionsLUKS (QCryptoBlockCreateOptionsLUKS
// plus file, size and preallocation), with qemu-img 7.2's defaults.
type CreateOptions struct {
	File          graph.ChildRef    `qapi:"file"`
	Size          qapi.Size         `qapi:"size"`
	Preallocation PreallocMode      `qapi:"preallocation,optional"`
	KeySecret     string            `qapi:"key-secret,optional"`
	CipherAlg     crypto.CipherAlg  `qapi:"cipher-alg,optional"`
	CipherMode    crypto.CipherMode `qapi:"cipher-mode,optional"`
	IVGenAlg      crypto.IVGenAlg   `qapi:"ivgen-alg,optional"`
	IVGenHashAlg  crypto.HashAlg    `qapi:"ivgen-hash-alg,optional"`
	HashAlg       crypto.HashAlg    `qapi:"hash-alg,optional"`
	IterTime      *int64            `qapi:"iter-time,optional"`
}

func newCreateOptions() any {
	return &CreateOptions{
		Preallocation: "off",
		CipherAlg:     crypto.AES256,
		CipherMode:    crypto.ModeXTS,
		IVGenAlg:      crypto.IVPlain64,
		HashAlg:       crypto.SHA256,
	}
}

// defaultIterTime is QEMU's iter-time default, in milliseconds.
const defaultIterTime = 2000

func iterTime(ms *int64) (time.Duration, error) {
	if ms == nil {
		return defaultIterTime * time.Millisecond, nil
	}
	if *ms <= 0 || *ms > math.MaxInt32 {
		return 0, qapi.Errorf(qapi.GenericError, "Parameter 'iter-time' must be between 1 and %d", math.MaxInt32)
	}
	return time.Duration(*ms) * time.Millisecond, nil
}

// params resolves the create options into the volume's algorithms.
func (o *CreateOptions) params() (crypto.Params, error) {
	p := crypto.Params{Cipher: o.CipherAlg, Mode: o.CipherMode, IVGen: o.IVGenAlg, Hash: o.HashAlg}
	if p.IVGen == crypto.IVEssiv {
		p.IVGenHash = o.IVGenHashAlg
		if p.IVGenHash == "" {
			p.IVGenHash = crypto.SHA256
		}
	}
	if err := crypto.CheckParams(p); err != nil {
		return p, qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	return p, nil
}

func create(ctx context.Context, cc *graph.CreateContext, o any) error {
	opts := o.(*CreateOptions)
	if opts.File.Options != nil || opts.File.Null {
		return qapi.Errorf(qapi.GenericError, "luks: 'file' must name an existing node (nested options are not built)")
	}
	if opts.Preallocation == "metadata" {
		return qapi.Errorf(qapi.GenericError, "Unsupported preallocation mode: metadata")
	}
	if opts.Size > math.MaxInt64/2 {
		return qapi.Errorf(qapi.GenericError, "Image size must be less than 8 EiB!")
	}
	p, err := opts.params()
	if err != nil {
		return err
	}
	it, err := iterTime(opts.IterTime)
	if err != nil {
		return err
	}
	if opts.KeySecret == "" {
		return qapi.Errorf(qapi.GenericError, "Parameter 'key-secret' is required for cipher")
	}
	f, release, err := cc.OpenRef(ctx, &opts.File, "file")
	if err != nil {
		return err
	}
	defer release()
	pass, err := cc.Secret(opts.KeySecret)
	if err != nil {
		return err
	}
	defer clear(pass)
	payload := crypto.PayloadOffset(p)
	// Room for the key material first; the payload's size and
	// preallocation come last.
	if err := f.Truncate(ctx, payload, true, "off"); err != nil {
		return err
	}
	h, mk, err := crypto.Format(crypto.CreateOptions{Params: p, IterTime: it}, pass, writeFunc(ctx, f))
	if err != nil {
		return qapi.Errorf(qapi.GenericError, "%s", err.Error())
	}
	clear(mk)
	if err := f.WriteAt(ctx, h.Marshal(), 0, 0); err != nil {
		return err
	}
	if err := f.Truncate(ctx, payload+int64(opts.Size), true, string(opts.Preallocation)); err != nil {
		return err
	}
	return f.Flush(ctx)
}

// measure is img measure for luks: the header and key slots, then the
// whole payload (the payload is never sparse to the guest: every sector
// is ciphertext), so required and fully-allocated are equal.
func measure(_ context.Context, o any, size int64, src *graph.Node) (graph.MeasureResult, error) {
	opts := o.(*CreateOptions)
	if opts.KeySecret == "" {
		return graph.MeasureResult{}, qapi.Errorf(qapi.GenericError, "Parameter 'key-secret' is required for cipher")
	}
	p, err := opts.params()
	if err != nil {
		return graph.MeasureResult{}, err
	}
	if src != nil {
		size = src.SizeNow()
	}
	size = (size + sectorSize - 1) &^ (sectorSize - 1)
	n := crypto.PayloadOffset(p) + size
	return graph.MeasureResult{Required: n, FullyAllocated: n, Bitmaps: -1}, nil
}
