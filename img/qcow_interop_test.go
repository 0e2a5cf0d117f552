package img

import (
	"testing"

	_ "blockbackend/drivers/qcow"
)

// TestInteropQcow: img create, info, map, check, compare, convert on
// qcow (version 1) images, side by side with qemu-img 7.2.
func TestInteropQcow(t *testing.T) {
	obj := "secret,id=s0,data=abc"
	runScript(t, []step{
		s("img", "create", "-f", "qcow", "a.qcow", "10M"),
		s("img", "create", "-f", "qcow", "odd.qcow", "3000001"),
		s("img", "create", "-f", "qcow", "z.qcow", "0"),
		s("img", "create", "-f", "raw", "base.raw", "10M"),
		s("io", "-f", "raw", "-c", "write -P 0xaa 0 10M", "base.raw"),
		s("img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", "ov.qcow"),
		s("img", "create", "-f", "qcow", "-o", "cluster_size=4k", "x.qcow", "1M"),
		s("img", "create", "-f", "qcow", "--object", obj, "-o", "encryption=on,encrypt.key-secret=s0", "e.qcow", "1M"),
		s("img", "create", "-f", "qcow", "--object", obj, "-o", "encrypt.format=aes,encrypt.key-secret=s0", "e2.qcow", "1M"),
		s("img", "create", "-f", "qcow", "-o", "encryption=on", "x.qcow", "1M"),
		s("img", "create", "-f", "qcow", "--object", obj, "-o", "encrypt.format=luks,encrypt.key-secret=s0", "x.qcow", "1M"),
		s("img", "create", "-f", "qcow", "--object", obj, "-o", "encrypt.key-secret=s0", "x.qcow", "1M"),
		// info before anything is written: the disk size of a written
		// image depends on how the file system fragments it (ext4 adds
		// an extent block past four extents), whoever wrote it.
		s("img", "info", "a.qcow"),
		s("img", "info", "--output=json", "a.qcow"),
		s("img", "info", "odd.qcow"),
		s("img", "info", "ov.qcow"),
		s("img", "info", "--backing-chain", "ov.qcow"),
		s("img", "info", "--output=json", "ov.qcow"),
		s("img", "info", "e.qcow"),
		s("img", "info", "--output=json", "e.qcow"),
		s("io", "-f", "qcow", "-c", "write -P 0x11 512 1024", "-c", "write -P 0x22 1M 64k", "a.qcow"),
		s("io", "-f", "qcow", "-c", "write -P 0x33 1000 3000", "ov.qcow"),
		s("io", "--object", obj, "--image-opts", "-c", "write -P 0x44 0 5000", "driver=qcow,file.filename=e.qcow,encrypt.key-secret=s0"),
		s("img", "map", "a.qcow"),
		s("img", "map", "--output=json", "a.qcow"),
		s("img", "map", "--output=json", "ov.qcow"),
		s("img", "check", "a.qcow"),
		s("img", "resize", "a.qcow", "20M"),
		s("img", "compare", "a.qcow", "ov.qcow"),
		s("img", "compare", "-f", "qcow", "-F", "raw", "ov.qcow", "base.raw"),
		s("img", "convert", "-O", "raw", "a.qcow", "a.raw"),
		s("img", "compare", "a.qcow", "a.raw"),
		s("img", "convert", "--object", obj, "--image-opts", "driver=qcow,file.filename=e.qcow,encrypt.key-secret=s0", "-O", "raw", "e.raw"),
		s("img", "compare", "--object", obj, "--image-opts", "driver=qcow,file.filename=e.qcow,encrypt.key-secret=s0", "driver=raw,file.filename=e.raw"),
		s("img", "convert", "-O", "qcow", "ov.qcow", "flat.qcow"),
		s("img", "compare", "flat.qcow", "ov.qcow"),
		s("img", "convert", "--object", obj, "-O", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=s0", "a.raw", "enc2.qcow"),
		s("img", "compare", "--object", obj, "--image-opts", "driver=qcow,file.filename=enc2.qcow,encrypt.key-secret=s0", "driver=raw,file.filename=a.raw"),
	})
}
