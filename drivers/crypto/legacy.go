package crypto

import "fmt"

// LegacyAESError refuses an image encrypted with the legacy AES-CBC of
// qcow and qcow2 (encrypt.format=aes, crypt_method 1) in the daemon.
// That scheme encrypts each sector with AES-128-CBC keyed by the
// passphrase's bytes themselves (no key derivation, no salt) and with the
// sector number as the IV (predictable IVs: equal plaintext at the same
// place gives equal ciphertext, and chosen-plaintext attacks work), so
// QEMU no longer runs such images in its system emulators. blockbackend
// reads and writes them only in the image tool (`blockbackend img`), so
// that their data can be converted to a LUKS-encrypted image.
//
// Drivers refuse with it when the graph is not the image tool's:
//
//	if !oc.ImageTool() {
//		return nil, crypto.LegacyAESRefusal("qcow2", oc.NodeName())
//	}
//
// Error() is one line, QMP's description; Hint() is the advice that the
// daemon prints on the next line at start-up (as for QEMU's hints).
type LegacyAESError struct {
	Format string // "qcow" or "qcow2"
	Node   string // the node being opened or created
}

func (e *LegacyAESError) Error() string {
	return fmt.Sprintf("Use of AES-CBC encrypted %s images is refused in node '%s': "+
		"legacy AES encryption uses the passphrase directly as the key and predictable IVs (the sector number), "+
		"so it does not protect the data; "+
		"convert the image to a LUKS-encrypted one with 'blockbackend img convert'", e.Format, e.Node)
}

// Hint says how to convert the image.
func (e *LegacyAESError) Hint() string {
	return "For example: blockbackend img convert --object secret,id=sec0,file=PASSFILE " +
		"--image-opts driver=" + e.Format + ",file.filename=OLD,encrypt.format=aes,encrypt.key-secret=sec0 " +
		"-O qcow2 -o encrypt.format=luks,encrypt.key-secret=sec0 NEW"
}

// LegacyAESRefusal is the error a daemon gives for a legacy AES image
// of format (qcow, qcow2) in node.
func LegacyAESRefusal(format, node string) error {
	return &LegacyAESError{Format: format, Node: node}
}
