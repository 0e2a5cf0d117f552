package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseHeader feeds corrupted images to the header and snapshot table
// parsers: they must return an error or a header whose encoding parses
// again, never panic or read outside the file (bytes.Reader would fail).
func FuzzParseHeader(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.qcow2"))
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		h, err := ParseHeader(r, int64(len(b)))
		if err != nil {
			return
		}
		_, _, _ = ParseSnapshotTable(r, int64(len(b)), h.SnapshotsOffset, h.NbSnapshots, h.ClusterBits)
		enc := h.Marshal()
		if int64(len(enc)) > h.ClusterSize() {
			return
		}
		img := append([]byte(nil), b...)
		copy(img, enc)
		if _, err := ParseHeader(bytes.NewReader(img), int64(len(img))); err != nil {
			t.Fatalf("re-encoded header does not parse: %v", err)
		}
	})
}
