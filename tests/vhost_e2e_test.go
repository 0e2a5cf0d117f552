package tests

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func vhostArgs(dir, img, extra string) []string {
	return []string{
		"--blockdev", "driver=file,node-name=f,filename=" + img,
		"--export", "type=vhost-user-blk,id=v0,node-name=f,writable=on,addr.type=unix,addr.path=" + filepath.Join(dir, "vhost.sock") + extra,
		"--qmp", filepath.Join(dir, "qmp.sock"),
	}
}

// TestIntegrationVhostLocks: the vhost-user-blk export protects the image
// like a QEMU virtio-blk device: without share-rw, other writers are kept
// out; with it, they may join. Resize stays shared because the device can
// tell the guest about a new size.
func TestIntegrationVhostLocks(t *testing.T) {
	needTool(t, "qemu-io")
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 8<<20)
	p := start(t, filepath.Join(dir, "vhost.sock"), vhostArgs(dir, img, "")...)
	waitLocks(t, img, []int{100, 101, 201})
	out, err := cmdOut("qemu-io", "-f", "raw", "-c", "write 0 512", img)
	if err == nil || !strings.Contains(out, `Failed to get "write" lock`) {
		t.Errorf("qemu-io write while we export the image: %v\n%s", err, out)
	}
	p.stop(t)
	waitLocks(t, img, []int{})

	start(t, filepath.Join(dir, "vhost.sock"), vhostArgs(dir, img, ",share-rw=on")...)
	waitLocks(t, img, []int{100, 101})
	if out, err := cmdOut("qemu-io", "-f", "raw", "-c", "write 0 512", img); err != nil {
		t.Errorf("qemu-io write with share-rw=on: %v\n%s", err, out)
	}
}

// TestIntegrationVhostTheyHold: a QEMU process writing the image keeps our
// writable export out, with QEMU's message.
func TestIntegrationVhostTheyHold(t *testing.T) {
	needTool(t, "qemu-io")
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 8<<20)
	holdWithQemuIO(t, img)
	out, err := cmdOut(binary, vhostArgs(dir, img, "")...)
	if err == nil || !strings.Contains(out, `Failed to get shared "write" lock`) {
		t.Errorf("vhost-user-blk export while qemu-io writes: %v\n%s", err, out)
	}
}

// TestIntegrationVhostQMP: block-export-add/del and query-block-exports for
// the vhost-user-blk type, with qemu-storage-daemon's option errors.
func TestIntegrationVhostQMP(t *testing.T) {
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 8<<20)
	sock := filepath.Join(dir, "qmp.sock")
	start(t, sock, "--blockdev", "driver=file,node-name=f,filename="+img, "--qmp", sock)
	m := monitor(t, sock)
	vs := filepath.Join(dir, "v.sock")
	addr := map[string]any{"type": "unix", "path": vs}
	for _, tc := range []struct {
		args map[string]any
		want string
	}{
		{map[string]any{"num-queues": 0}, "num-queues must be greater than 0"},
		{map[string]any{"logical-block-size": 1000}, "Property v0.logical-block-size doesn't take value '1000', it's not a power of 2"},
		{map[string]any{"logical-block-size": 256}, "Property v0.logical-block-size doesn't take value 256 (minimum: 512, maximum: 2097152)"},
		{map[string]any{"addr": map[string]any{"type": "inet", "host": "127.0.0.1", "port": "1"}}, "Only socket address types 'unix' and 'fd' are supported"},
	} {
		args := map[string]any{"type": "vhost-user-blk", "id": "v0", "node-name": "f", "addr": addr}
		for k, v := range tc.args {
			args[k] = v
		}
		if _, err := runErr(m, "block-export-add", args); err == nil || err.Error() != tc.want {
			t.Errorf("block-export-add %v: %v, want %q", tc.args, err, tc.want)
		}
	}
	run(t, m, "block-export-add", map[string]any{"type": "vhost-user-blk", "id": "v0", "node-name": "f", "addr": addr, "num-queues": 2, "logical-block-size": 4096})
	got := run(t, m, "query-block-exports", nil).([]any)
	if len(got) != 1 || got[0].(map[string]any)["type"] != "vhost-user-blk" {
		t.Fatalf("query-block-exports: %v", got)
	}
	m2 := monitor(t, sock)
	events, err := m2.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	run(t, m, "block-export-del", map[string]any{"id": "v0"})
	select {
	case ev := <-events:
		if ev.Event != "BLOCK_EXPORT_DELETED" || ev.Data["id"] != "v0" {
			t.Fatalf("event: %+v", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no BLOCK_EXPORT_DELETED event")
	}
	if _, err := os.Stat(vs); !os.IsNotExist(err) {
		t.Errorf("socket %s still there after block-export-del: %v", vs, err)
	}
	run(t, m, "blockdev-del", map[string]any{"node-name": "f"})
}
