package tests

import (
	"context"
	"path/filepath"
	"testing"

	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// TestQcow2CreateErrors: invalid qcow2 create options fail with the
// words of qemu-storage-daemon 7.2's blockdev-create (each one observed
// with qsd), before anything is written.
func TestQcow2CreateErrors(t *testing.T) {
	needDriver(t, "qcow2")
	ctx := context.Background()
	dir := t.TempDir()
	g := graph.New(nil)
	defer bbClose(t, g)
	for _, f := range []struct{ node, path string }{{"f", "x.qcow2"}, {"df", "x.data"}} {
		p := filepath.Join(dir, f.path)
		if err := bbCreateWith(ctx, g, "file", map[string]any{"filename": p, "size": 0}); err != nil {
			t.Fatal(err)
		}
		if _, err := g.Add(ctx, map[string]any{"driver": "file", "node-name": f.node, "filename": p}, qapi.JSON); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		opts map[string]any
		want string
	}{
		{map[string]any{"version": "v2", "refcount-bits": 8}, "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"},
		{map[string]any{"version": "v2", "lazy-refcounts": true}, "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{map[string]any{"version": "v2", "compression-type": "zstd"}, "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{map[string]any{"version": "v2", "extended-l2": true}, "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{map[string]any{"version": "v2", "data-file": "df"}, "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
		{map[string]any{"extended-l2": true, "cluster-size": 8192}, "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"},
		{map[string]any{"cluster-size": 1000}, "Cluster size must be a power of two between 512 and 2048k"},
		{map[string]any{"cluster-size": 256}, "Cluster size must be a power of two between 512 and 2048k"},
		{map[string]any{"cluster-size": 4 * mib}, "Cluster size must be a power of two between 512 and 2048k"},
		{map[string]any{"refcount-bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"},
		{map[string]any{"refcount-bits": 128}, "Refcount width must be a power of two and may not exceed 64 bits"},
		{map[string]any{"data-file-raw": true}, "data-file-raw requires data-file"},
		{map[string]any{"backing-fmt": "qcow2"}, "Backing format cannot be used without backing file"},
		{map[string]any{"size": 4*mib + 1}, "Image size must be a multiple of 512 bytes"},
		{map[string]any{"backing-file": "base.qcow2", "preallocation": "metadata"}, "Backing file and preallocation can only be used at the same time if extended_l2 is on"},
		{map[string]any{"data-file": "df", "data-file-raw": true, "backing-file": "b.qcow2"}, "Backing file and data-file-raw cannot be used at the same time"},
		{map[string]any{"preallocation": "bogus"}, "Parameter 'preallocation' does not accept value 'bogus'"},
		// QEMU looks the node up as a device or a node name
		// (graph.CreateContext.LookupNode words it as FindNode does).
		{map[string]any{"data-file": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"},
		{map[string]any{"file": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"},
	} {
		opts := map[string]any{"file": "f", "size": 4 * mib}
		for k, v := range tc.opts {
			opts[k] = v
		}
		err := bbCreateWith(ctx, g, "qcow2", opts)
		if err == nil || err.Error() != tc.want {
			t.Errorf("create %v: %v, want %q", tc.opts, err, tc.want)
		}
	}
}
