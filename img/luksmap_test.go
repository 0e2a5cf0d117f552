package img

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	_ "blockbackend/drivers/luks"
)

// img map on a LUKS image, as qemu-img 7.2 answers: the payload has no
// offset in a file (a format without block status), so JSON has no
// "offset" and the human form stops with the encrypted-clusters error.
func TestMapLUKSHasNoOffset(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "t.luks")
	obj := "secret,id=s,data=x"
	run := func(args ...string) (string, string, int) {
		var out, errb bytes.Buffer
		code := Main(args, &out, &errb)
		return out.String(), errb.String(), code
	}
	if _, e, code := run("create", "-q", "-f", "luks", "--object", obj, "-o", "key-secret=s,iter-time=10", img, "1M"); code != 0 {
		t.Fatalf("create: %d %s", code, e)
	}
	opts := "driver=luks,key-secret=s,file.filename=" + img
	out, e, code := run("map", "--output=json", "--object", obj, "--image-opts", opts)
	want := `[{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true}]` + "\n"
	if code != 0 || out != want {
		t.Errorf("map json: %d %q %q, want %q", code, out, e, want)
	}
	out, e, code = run("map", "--object", obj, "--image-opts", opts)
	if code != 1 || strings.Count(out, "\n") != 1 || e != "qemu-img: File contains external, encrypted or compressed clusters.\n" {
		t.Errorf("map human: %d %q %q", code, out, e)
	}
}
