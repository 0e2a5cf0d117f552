package qcow

import (
	"blockbackend/drivers/crypto"
	"blockbackend/graph"
)

// The daemon's refusal of qcow's legacy AES images, with the graph's
// "opened by the image tool" flag and the refusal shared with qcow2's
// encrypt.format=aes (crypto.LegacyAESRefusal: why, and how to convert).
// refuseOpen and refuseCreate are the one call the driver makes, at open
// and at blockdev-create.

// refuseOpen refuses an AES image outside the image tool.
func refuseOpen(oc *graph.OpenContext) error {
	if oc.ImageTool() {
		return nil
	}
	return crypto.LegacyAESRefusal("qcow", oc.NodeName())
}

// refuseCreate refuses to create an AES image outside the image tool.
func refuseCreate(cc *graph.CreateContext, node string) error {
	if cc.ImageTool() {
		return nil
	}
	return crypto.LegacyAESRefusal("qcow", node)
}
