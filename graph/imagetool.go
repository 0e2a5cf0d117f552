package graph

// The image tool (`blockbackend img`) and the daemon share the graph, but
// a few things are allowed only to the tool: reading and writing images
// with legacy AES encryption (qcow, qcow2 encrypt.format=aes), for data
// liberation. Graph.ImageTool says which one owns the graph; it is false
// (the daemon's stricter rules) unless the image tool sets it.

// ImageTool reports that the node is opened by the image tool, not the
// daemon (see Graph.ImageTool).
func (oc *OpenContext) ImageTool() bool { return oc.g.ImageTool }

// ImageTool reports that the image is created by the image tool (img
// create, img convert), not by blockdev-create in the daemon.
func (cc *CreateContext) ImageTool() bool { return cc.g.ImageTool }
