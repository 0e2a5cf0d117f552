// Package crypto is the block encryption that the luks format driver and
// qcow2's encrypt.format=luks share: the LUKS1 header and its key slots
// (written from the "LUKS1 On-Disk Format Specification", version 1.2.3),
// the anti-forensic splitter, PBKDF2 with iteration-time calibration, and
// sector ciphers with QEMU's names for algorithms, modes and IV generators
// (QAPI's QCryptoCipherAlgorithm, QCryptoCipherMode, QCryptoIVGenAlgorithm,
// QCryptoHashAlgorithm).
//
// It knows nothing of nodes or files: the header is parsed from bytes and
// key material is read and written through small function types, so that
// a header at the start of a file (luks) and one inside a qcow2 image
// both fit.
//
// Key material (master keys, passphrase-derived keys) lives in byte slices
// that are cleared when no longer needed. Go cannot wipe the copies a
// cipher's key schedule holds or that the garbage collector has moved;
// that is as far as wiping goes here.
package crypto
