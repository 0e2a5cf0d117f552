package qcow

import (
	"fmt"
	"sync/atomic"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// A minimal version of the daemon's refusal of legacy AES images, kept in
// this file so that it can give way to a shared one (a helper in
// drivers/crypto and a graph-level "opened by the image tool" flag, being
// built for qcow2's encrypt.format=aes): refuseOpen and refuseCreate are
// the one call the driver makes, at open and at create.

// ImageTool is set by the image tool's wiring (`blockbackend img`): only
// then does qcow open or create AES-encrypted images. The daemon leaves
// it false. It is per process, as the tool and the daemon are separate
// runs of the binary.
var ImageTool atomic.Bool

// refuseLegacyAES refuses an AES-encrypted qcow image (node: the node
// being opened, "" at create) outside the image tool, saying why and how
// to convert it.
func refuseLegacyAES(node string) error {
	if ImageTool.Load() {
		return nil
	}
	where := ""
	if node != "" {
		where = fmt.Sprintf(" in node '%s'", node)
	}
	return qapi.Errorf(qapi.GenericError, "Use of AES-CBC encrypted qcow images is refused%s: "+
		"legacy AES encryption uses the passphrase directly as the key and predictable IVs (the sector number), "+
		"so it does not protect the data; convert the image to a LUKS-encrypted one with 'blockbackend img convert' "+
		"(for example: blockbackend img convert --object secret,id=sec0,file=PASSFILE "+
		"--image-opts driver=qcow,file.filename=OLD,encrypt.key-secret=sec0 "+
		"-O luks -o key-secret=sec0 NEW)", where)
}

// refuseOpen is the refusal at open time.
func refuseOpen(oc *graph.OpenContext) error { return refuseLegacyAES(oc.NodeName()) }

// refuseCreate is the refusal of blockdev-create with encrypt.
func refuseCreate(*graph.CreateContext) error { return refuseLegacyAES("") }
