package qcow

import (
	"context"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

var _ graph.Reopener = (*image)(nil)

// PrepareReopen changes read-only. The key given at open stays (the
// graph does not reopen with a changed encrypt); an AES image opened
// for metadata only, without its key, cannot become writable. Nothing is cached
// that a switch to read-only must write back: every table update is
// written through.
func (img *image) PrepareReopen(ctx context.Context, o any, readOnly bool) (func(), func(), error) {
	opts := o.(*Options)
	c, keyErr := img.cipher, img.keyErr
	if opts.Encrypt != nil {
		enc, err := opts.encryption()
		if err != nil {
			return nil, nil, err
		}
		if c, keyErr, err = img.cipherFor(enc, false); err != nil {
			return nil, nil, err
		}
	}
	if keyErr != nil && !readOnly {
		return nil, nil, qapi.Errorf(qapi.GenericError, "Parameter 'encrypt.key-secret' is required for cipher")
	}
	commit := func() {
		img.readOnly = readOnly
		img.cipher, img.keyErr = c, keyErr
	}
	return commit, func() {}, nil
}
