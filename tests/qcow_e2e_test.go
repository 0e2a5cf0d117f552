package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestQcowAESDaemonRefusesToolConverts: the daemon refuses a qcow image
// with legacy AES encryption (saying why and how to convert it), and the
// image tool converts it to a LUKS image that qemu-img reads with the
// same data.
func TestQcowAESDaemonRefusesToolConverts(t *testing.T) {
	needTool(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	aes := filepath.Join(dir, "old.qcow")
	pass := filepath.Join(dir, "pass")
	if err := os.WriteFile(pass, []byte("hunter2"), 0o600); err != nil {
		t.Fatal(err)
	}
	obj := "secret,id=sec0,file=" + pass
	if out, err := cmdOut("qemu-img", "create", "-q", "-f", "qcow", "--object", obj,
		"-o", "encrypt.format=aes,encrypt.key-secret=sec0", aes, "4M"); err != nil {
		t.Fatal(out)
	}
	aesOpts := "driver=qcow,file.filename=" + aes + ",encrypt.key-secret=sec0"
	if out, err := cmdOut("qemu-io", "--object", obj, "--image-opts", "-c", "write -P 0x3c 4096 1M", aesOpts); err != nil {
		t.Fatal(out)
	}

	cmd := exec.Command(binary, "--object", obj, "--blockdev", "driver=qcow,node-name=q,file.driver=file,file.filename="+aes+",encrypt.key-secret=sec0")
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("daemon with an AES qcow image: %v\n%s", err, out)
	}
	for _, want := range []string{"Use of AES-CBC encrypted qcow images is refused in node 'q'", "predictable IVs", "blockbackend img convert"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("daemon's refusal lacks %q:\n%s", want, out)
		}
	}

	luks := filepath.Join(dir, "new.luks")
	if out, err := cmdOut(binary, "img", "convert", "--object", obj, "--image-opts", aesOpts,
		"-O", "luks", "-o", "key-secret=sec0,iter-time=10", luks); err != nil {
		t.Fatalf("img convert: %v\n%s", err, out)
	}
	if out, err := cmdOut("qemu-img", "compare", "--object", obj, "--image-opts", aesOpts,
		"driver=luks,file.filename="+luks+",key-secret=sec0"); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
}
