package graph

import (
	"path/filepath"
	"strings"
)

// ResolveImageName resolves a file name recorded in an image (a backing
// file, a data file) as QEMU does: a relative plain path is taken
// relative to the directory of the image's file (the node file); protocol
// and json: names, and names in images on other protocols, stay as they
// are.
func ResolveImageName(file *Node, name string) string {
	if strings.HasPrefix(name, "json:") || filepath.IsAbs(name) {
		return name
	}
	if p, _ := ProtocolFor(name); p != nil {
		return name
	}
	// Not Node.Filename: that may walk the child's children under the
	// graph lock, which the graph holds while a format opens.
	base := ""
	if f, ok := file.Instance().(Filenamer); ok {
		base = f.Filename()
	}
	if base == "" || strings.HasPrefix(base, "json:") {
		return name
	}
	if p, _ := ProtocolFor(base); p != nil && p.Name != "file" {
		return name
	}
	return filepath.Join(filepath.Dir(strings.TrimPrefix(base, "file:")), name)
}
