package img

import (
	"path/filepath"
	"testing"

	_ "blockbackend/drivers/luks"
	_ "blockbackend/drivers/qcow2"
	"blockbackend/internal/qemutest"
)

// qemu-img opens images for info (and create -b opens the backing file)
// without I/O (BDRV_O_NO_IO): a LUKS image then needs no secret, and a
// wrong or missing one is not noticed. Every other command needs the key.
// One image made by qemu-img is copied into both directories, so that
// the header (uuid, iterations) and the output are the same byte for
// byte.
func TestInteropLUKSInfoWithoutKey(t *testing.T) {
	needQEMU(t, "qemu-img")
	src := t.TempDir()
	qemuCreateLUKS(t, src, "a.luks", "4M", "")
	qemuCreateLUKS(t, src, "e.luks", "1M", ",cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha512")
	if r := runTool(t, src, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.luks", "-F", "luks", "top.qcow2"); r.code != 0 {
		t.Fatalf("qemu-img create: %+v", r)
	}
	cp := "cp " + filepath.Join(src, "a.luks") + " " + filepath.Join(src, "e.luks") + " " + filepath.Join(src, "top.qcow2") + " ."
	good := "driver=luks,key-secret=s0,file.filename=a.luks"
	runScript(t, []step{
		s("sh", cp),
		s("img", "info", "a.luks"),
		s("img", "info", "--output=json", "a.luks"),
		s("img", "info", "-f", "luks", "e.luks"),
		s("img", "info", "--output=json", "e.luks"),
		s("img", "info", "--image-opts", "driver=luks,key-secret=nonexistent,file.filename=a.luks"),
		s("img", "info", "--object", "secret,id=s0,data=wrong", "--image-opts", good),
		s("img", "info", "--output=json", "--object", "secret,id=s0,data=abc", "--image-opts", good),
		// create -b reads the backing file's size without its key (the
		// images differ in their allocation: info looks at qemu-img's).
		s("img", "create", "-f", "qcow2", "-b", "a.luks", "-F", "luks", "new.qcow2"),
		// The backing chain is opened without I/O too.
		s("img", "info", "--backing-chain", "top.qcow2"),
		s("img", "info", "--backing-chain", "--output=json", "top.qcow2"),
		// These read or write data: the key is required.
		s("img", "check", "a.luks"),
		s("img", "map", "a.luks"),
		s("img", "compare", "a.luks", "a.luks"),
		s("img", "measure", "-O", "raw", "a.luks"),
		s("img", "convert", "-O", "raw", "a.luks", "x.raw"),
		s("img", "amend", "-o", "size=8M", "a.luks"),
		s("img", "resize", "a.luks", "8M"),
		s("img", "info", "--backing-chain", "top.qcow2"),
		s("img", "compare", "--object", "secret,id=s0,data=wrong", "--image-opts", good, good),
	})
}

// qemuCreateLUKS makes a LUKS image with qemu-img (secret s0 = "abc"),
// retrying when a loaded machine makes its PBKDF calibration fail with
// "Unable to get accurate CPU usage".
func qemuCreateLUKS(t *testing.T, dir, name, size, opts string) {
	t.Helper()
	var r result
	qemutest.Retry(func() (string, bool) {
		r = runTool(t, dir, "qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s0,data=abc",
			"-o", "key-secret=s0,iter-time=10"+opts, name, size)
		return r.stderr, r.code != 0
	})
	if r.code != 0 {
		t.Fatalf("qemu-img create %s: %+v", name, r)
	}
}
