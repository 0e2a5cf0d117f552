package img

import (
	"bytes"
	"os"
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

// img convert -O luks writes the source's zeros: a new LUKS payload
// reads as noise, so skipping them (as for a new raw or qcow2 target)
// left garbage where the source read as zeros.
func TestConvertToLUKSKeepsZeros(t *testing.T) {
	dir := t.TempDir()
	src, dst, back := filepath.Join(dir, "s.raw"), filepath.Join(dir, "d.luks"), filepath.Join(dir, "b.raw")
	data := make([]byte, 4<<20)
	for i := 1 << 20; i < 1<<20+65536; i++ {
		data[i] = 0x5a
	}
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	obj := "secret,id=s,data=x"
	var errb bytes.Buffer
	if code := Main([]string{"convert", "-f", "raw", "-O", "luks", "-o", "key-secret=s,iter-time=10", "--object", obj, src, dst}, &bytes.Buffer{}, &errb); code != 0 {
		t.Fatalf("convert to luks: %d %s", code, errb.String())
	}
	if code := Main([]string{"convert", "-O", "raw", "--object", obj, "--image-opts", "driver=luks,key-secret=s,file.filename=" + dst, back}, &bytes.Buffer{}, &errb); code != 0 {
		t.Fatalf("convert back: %d %s", code, errb.String())
	}
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		i := 0
		for i < len(got) && i < len(data) && got[i] == data[i] {
			i++
		}
		t.Fatalf("the round trip through luks differs from byte %d (len %d)", i, len(got))
	}
}
