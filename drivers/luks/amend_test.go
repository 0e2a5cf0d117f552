package luks

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/qmp/qapi"
)

// TestAmendKeySlots adds and erases passphrases with QEMU's amend options
// and messages; qemu-img and cryptsetup agree with the result.
func TestAmendKeySlots(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.luks")
	g := newGraph(t)
	createLUKS(t, g, img, 1<<20, nil)
	n, err := openLUKS(t, g, "l", img, "s", false)
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(1<<20, 5)
	if err := n.WriteAt(ctx, data, 0, 0); err != nil {
		t.Fatal(err)
	}
	do := func(opts map[string]any, force bool) error {
		o := map[string]any{"driver": "luks"}
		for k, v := range opts {
			o[k] = v
		}
		run, release, err := g.PrepareAmend("j", "l", o, force, qapi.JSON, "options")
		if err != nil {
			return err
		}
		defer release()
		return run(ctx)
	}
	for _, tc := range []struct {
		opts map[string]any
		want string
	}{
		{map[string]any{"state": "active"}, "'new-secret' is required to activate a keyslot"},
		{map[string]any{"state": "active", "new-secret": "n", "keyslot": 0}, "Refusing to overwrite active keyslot 0 - please erase it first"},
		{map[string]any{"state": "active", "new-secret": "n", "keyslot": 9}, "Invalid keyslot 9 specified, must be between 0 and 7"},
		{map[string]any{"state": "inactive"}, "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given"},
		{map[string]any{"state": "inactive", "keyslot": 5}, "Given keyslot 5 is already erased (inactive) "},
		{map[string]any{"state": "inactive", "old-secret": "w"}, "No keyslots match given (old) password for erase operation"},
		{map[string]any{"state": "inactive", "keyslot": 0}, "Attempt to erase the only active keyslot 0 which will erase all the data in the image irreversibly - refusing operation"},
		{map[string]any{"state": "active", "new-secret": "n", "secret": "w"}, "Invalid password, cannot unlock any keyslot"},
		{map[string]any{"state": "inactive", "old-secret": "s"}, "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation"},
	} {
		if err := do(tc.opts, false); err == nil || err.Error() != tc.want {
			t.Errorf("amend %v: %v, want %q", tc.opts, err, tc.want)
		}
	}
	// Add "new secret" in slot 3, then erase slot 0 by its passphrase.
	if err := do(map[string]any{"state": "active", "new-secret": "n", "keyslot": 3, "iter-time": 10, "secret": "s"}, false); err != nil {
		t.Fatal(err)
	}
	if err := do(map[string]any{"state": "inactive", "old-secret": "s"}, false); err != nil {
		t.Fatal(err)
	}
	info := n.Instance().(*node).Info()["data"].(map[string]any)
	slots := info["slots"].([]map[string]any)
	if slots[0]["active"] != false || slots[3]["active"] != true {
		t.Fatalf("slots after amend: %v", slots)
	}
	if err := g.Delete(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	if _, err := openLUKS(t, g, "old", img, "s", true); err == nil {
		t.Fatal("the erased passphrase still opens the image")
	}
	m, err := openLUKS(t, g, "new", img, "n", true)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := m.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if string(got) != string(data) {
		t.Fatal("data changed by amend")
	}
	if err := g.Delete(ctx, "new"); err != nil {
		t.Fatal(err)
	}
	out, err := qemuTool(t, "qemu-io", "--object", "secret,id=n,data=new secret", "--image-opts",
		"driver=luks,key-secret=n,file.filename="+img, "-c", "read -q 0 512")
	if err != nil {
		t.Fatalf("qemu-io with the new passphrase: %v\n%s", err, out)
	}
	cmd := exec.Command(cryptsetup(t), "open", "--test-passphrase", "--key-slot", "3", "--key-file", "-", img)
	cmd.Stdin = strings.NewReader("new secret")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup: %v\n%s", err, out)
	}
}
