package qapi

import "testing"

func TestCompactJSON(t *testing.T) {
	// json: filenames as qemu-storage-daemon 7.2 printed them.
	for _, c := range []struct {
		v    any
		want string
	}{
		{map[string]any{"driver": "raw", "offset": int64(512), "size": int64(1024),
			"file": map[string]any{"driver": "file", "filename": "/tmp/r.raw"}},
			`{"offset": 512, "driver": "raw", "size": 1024, "file": {"driver": "file", "filename": "/tmp/r.raw"}}`},
		{map[string]any{"driver": "qcow2", "encrypt.key-secret": "s", "backing": nil,
			"file": map[string]any{"driver": "file", "filename": "/a b/\"q\".qcow2"}},
			`{"backing": null, "encrypt.key-secret": "s", "driver": "qcow2", "file": {"driver": "file", "filename": "/a b/\"q\".qcow2"}}`},
		{map[string]any{"driver": "luks", "key-secret": "s", "file": map[string]any{"driver": "file", "filename": "/l"}},
			`{"driver": "luks", "file": {"driver": "file", "filename": "/l"}, "key-secret": "s"}`},
	} {
		if got := CompactJSON(c.v); got != c.want {
			t.Errorf("got  %s\nwant %s", got, c.want)
		}
	}
}
