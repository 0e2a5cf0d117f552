package tests

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

func qcryptOK(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	out, code := runIn(t, dir, name, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit %d\n%s", name, strings.Join(args, " "), code, out)
	}
	return out
}

const qcryptSecret = "secret,id=sec0,data=correct horse"

// TestIntegrationQcow2CryptDaemon: the daemon serves qcow2+LUKS images
// with their secret and refuses legacy AES ones (blockdev-add,
// blockdev-create and --blockdev), saying why and pointing to img
// convert; wrong passphrases fail in QEMU's words.
func TestIntegrationQcow2CryptDaemon(t *testing.T) {
	needTool(t, "qemu-img")
	dir := shortDir(t)
	luks := filepath.Join(dir, "l.qcow2")
	aes := filepath.Join(dir, "a.qcow2")
	qcryptOK(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "--object", qcryptSecret,
		"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", luks, "4M")
	qcryptOK(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "--object", qcryptSecret,
		"-o", "encrypt.format=aes,encrypt.key-secret=sec0", aes, "4M")

	// --blockdev: exit 1, the reason, and the hint on the next line.
	out, code := runIn(t, dir, binary, "--object", qcryptSecret,
		"--blockdev", "driver=qcow2,node-name=n,file.driver=file,file.filename="+aes+",encrypt.format=aes,encrypt.key-secret=sec0")
	if code != 1 || !strings.Contains(out, "Use of AES-CBC encrypted qcow2 images is refused in node 'n'") ||
		!strings.Contains(out, "predictable IVs") || !strings.Contains(out, "\nFor example: blockbackend img convert") {
		t.Errorf("--blockdev with an AES image: exit %d\n%s", code, out)
	}

	sock := filepath.Join(dir, "qmp.sock")
	start(t, sock, "--object", qcryptSecret,
		"--chardev", "socket,id=m,path="+sock+",server=on,wait=off", "--monitor", "chardev=m")
	m := monitor(t, sock)
	run(t, m, "object-add", map[string]any{"qom-type": "secret", "id": "bad", "data": "wrong"})
	file := func(p string) map[string]any { return map[string]any{"driver": "file", "filename": p} }
	for _, c := range []struct {
		args map[string]any
		want string
	}{
		{map[string]any{"driver": "qcow2", "node-name": "a", "file": file(aes), "encrypt": map[string]any{"format": "aes", "key-secret": "sec0"}},
			"Use of AES-CBC encrypted qcow2 images is refused in node 'a'"},
		{map[string]any{"driver": "qcow2", "node-name": "a", "file": file(aes)}, "blockbackend img convert"},
		{map[string]any{"driver": "qcow2", "node-name": "l", "file": file(luks), "encrypt": map[string]any{"format": "luks", "key-secret": "bad"}},
			"Invalid password, cannot unlock any keyslot"},
		{map[string]any{"driver": "qcow2", "node-name": "l", "file": file(luks)}, "Parameter 'encrypt.key-secret' is required for cipher"},
		{map[string]any{"driver": "qcow2", "node-name": "l", "file": file(luks), "encrypt": map[string]any{"format": "luks", "key-secret": "nosuch"}},
			"No secret with id 'nosuch'"},
	} {
		if _, err := runErr(m, "blockdev-add", c.args); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("blockdev-add %v: %v, want %q", c.args, err, c.want)
		}
	}
	run(t, m, "blockdev-add", map[string]any{"driver": "qcow2", "node-name": "l", "file": file(luks),
		"encrypt": map[string]any{"format": "luks", "key-secret": "sec0"}})
	nodes := run(t, m, "query-named-block-nodes", map[string]any{"flat": true}).([]any)
	found := false
	for _, n := range nodes {
		nm := n.(map[string]any)
		if nm["node-name"] == "l" {
			found = true
			if nm["encrypted"] != true {
				t.Errorf("node l not reported encrypted: %v", nm)
			}
		}
	}
	if !found {
		t.Errorf("node l not listed: %v", nodes)
	}
	run(t, m, "blockdev-del", map[string]any{"node-name": "l"})

	// blockdev-create: LUKS works (and qemu-img reads the result), AES
	// is refused.
	newImg := filepath.Join(dir, "new.qcow2")
	qcryptOK(t, dir, "qemu-img", "create", "-q", "-f", "raw", newImg, "0")
	run(t, m, "blockdev-add", map[string]any{"driver": "file", "node-name": "nf", "filename": newImg})
	run(t, m, "blockdev-create", map[string]any{"job-id": "c1", "options": map[string]any{
		"driver": "qcow2", "file": "nf", "size": 1 << 20, "encrypt": map[string]any{"format": "qcow", "key-secret": "sec0"}}})
	if e := waitJob(t, m, "c1"); !strings.Contains(e, "Use of AES-CBC encrypted qcow2 images is refused") {
		t.Errorf("blockdev-create of an AES image: job error %q", e)
	}
	out = qcryptOK(t, dir, "qemu-img", "info", newImg)
	if strings.Contains(out, "encrypted") {
		t.Errorf("blockdev-create made an AES image:\n%s", out)
	}
	run(t, m, "blockdev-create", map[string]any{"job-id": "c2", "options": map[string]any{
		"driver": "qcow2", "file": "nf", "size": 1 << 20, "encrypt": map[string]any{"format": "luks", "key-secret": "sec0", "iter-time": 10}}})
	if e := waitJob(t, m, "c2"); e != "" {
		t.Fatalf("blockdev-create of a LUKS image: %s", e)
	}
	run(t, m, "blockdev-del", map[string]any{"node-name": "nf"})
	qcryptOK(t, dir, "qemu-img", "check", "--object", qcryptSecret, "--image-opts",
		"driver=qcow2,file.filename="+newImg+",encrypt.key-secret=sec0")
}

// waitJob waits for a job to conclude, dismisses it and returns its
// error ("" on success).
func waitJob(t *testing.T, m *goqmp.SocketMonitor, id string) string {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		raw, err := m.Run([]byte(`{"execute":"query-jobs"}`))
		if err != nil {
			t.Fatal(err)
		}
		var r struct {
			Return []struct {
				ID     string `json:"id"`
				Status string `json:"status"`
				Error  string `json:"error"`
			} `json:"return"`
		}
		if err := json.Unmarshal(raw, &r); err != nil {
			t.Fatal(err)
		}
		seen := false
		for _, j := range r.Return {
			if j.ID != id {
				continue
			}
			seen = true
			if j.Status == "concluded" {
				if _, err := m.Run([]byte(`{"execute":"job-dismiss","arguments":{"id":"` + id + `"}}`)); err != nil {
					t.Fatal(err)
				}
				return j.Error
			}
		}
		if !seen {
			t.Fatalf("job %s is gone without concluding", id)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("job %s did not conclude", id)
	return ""
}

// TestIntegrationQcow2CryptImg: data liberation with the image tool: a
// legacy AES image made by qemu-img converts to a LUKS-encrypted qcow2
// that qemu-img compares equal; img info shows qemu-img's encrypt block;
// -c with encryption is refused in qemu-img's words.
func TestIntegrationQcow2CryptImg(t *testing.T) {
	needTool(t, "qemu-img", "qemu-io")
	dir := shortDir(t)
	qcryptOK(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "--object", qcryptSecret,
		"-o", "encrypt.format=aes,encrypt.key-secret=sec0", "a.qcow2", "4M")
	qcryptOK(t, dir, "qemu-io", "--object", qcryptSecret, "--image-opts",
		"driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=sec0",
		"-c", "write -P 0x5a 0 100k", "-c", "write -P 0x11 3000k 5k")
	aesOpts := "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=sec0"
	qcryptOK(t, dir, binary, "img", "convert", "--object", qcryptSecret, "--image-opts", aesOpts,
		"-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "l.qcow2")
	lOpts := "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec0"
	qcryptOK(t, dir, "qemu-img", "check", "--object", qcryptSecret, "--image-opts", lOpts)
	out := qcryptOK(t, dir, "qemu-img", "compare", "--object", qcryptSecret, "--image-opts", aesOpts, lOpts)
	if !strings.Contains(out, "Images are identical") {
		t.Errorf("qemu-img compare: %s", out)
	}
	// To raw too, and our compare agrees.
	qcryptOK(t, dir, binary, "img", "convert", "--object", qcryptSecret, "--image-opts", aesOpts, "-O", "raw", "a.raw")
	qcryptOK(t, dir, binary, "img", "compare", "--object", qcryptSecret, "--image-opts", lOpts, "driver=raw,file.filename=a.raw")

	// img info (with the key given, as our info opens for I/O unless
	// opened for metadata only): qemu-img's encrypt block.
	info := func(name string, args ...string) map[string]any {
		out := qcryptOK(t, dir, name, args...)
		var m map[string]any
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, out)
		}
		return m
	}
	want := info("qemu-img", "info", "--output=json", "l.qcow2")
	got := info(binary, "img", "info", "--output=json", "--object", qcryptSecret, "--image-opts", lOpts)
	enc := func(m map[string]any) string {
		b, _ := json.Marshal(m["format-specific"].(map[string]any)["data"].(map[string]any)["encrypt"])
		return string(b)
	}
	if enc(got) != enc(want) || got["encrypted"] != true {
		t.Errorf("img info encrypt:\n ours %s (encrypted %v)\n qemu %s", enc(got), got["encrypted"], enc(want))
	}

	// -c with encryption.
	want1, got1, wc, gc := runBoth(t, dir, "convert", "-c", "-O", "qcow2", "-o", "encrypt.format=luks", "a.raw", "c.qcow2")
	if want1 != got1 || wc != gc {
		t.Errorf("convert -c with encryption: qemu-img (%d) %q, ours (%d) %q", wc, want1, gc, got1)
	}
}
