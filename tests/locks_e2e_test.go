package tests

import (
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func exportArgs(dir, img string, extra string) []string {
	return []string{
		"--blockdev", "driver=file,node-name=f,filename=" + img,
		"--blockdev", "driver=raw,node-name=r,file=f",
		"--nbd-server", "addr.type=unix,addr.path=" + filepath.Join(dir, "nbd.sock"),
		"--export", "type=nbd,id=e0,node-name=r,writable=on" + extra,
		"--qmp", filepath.Join(dir, "qmp.sock"),
	}
}

func waitLocks(t *testing.T, img string, want []int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := lockBytes(t, img)
		if reflect.DeepEqual(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("lock bytes on %s: %v, want %v", img, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestIntegrationLocksWeHold: while we serve an image writable, QEMU's
// tools see our locks.
func TestIntegrationLocksWeHold(t *testing.T) {
	needTool(t, "qemu-io", "qemu-img")
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 8<<20)
	p := start(t, filepath.Join(dir, "qmp.sock"), exportArgs(dir, img, "")...)

	// Like a QEMU virtio-blk device without share-rw: consistent-read and
	// write held, write unshared; NBD cannot announce a resize, so resize
	// is unshared too (as qemu-storage-daemon's NBD export).
	waitLocks(t, img, []int{100, 101, 201, 203})
	out, err := cmdOut("qemu-io", "-f", "raw", "-c", "write 0 512", img)
	if err == nil || !strings.Contains(out, `Failed to get "write" lock`) || !strings.Contains(out, "Is another process using the image ["+img+"]?") {
		t.Errorf("qemu-io write while we hold the image: %v\n%s", err, out)
	}
	if out, err := cmdOut("qemu-img", "info", "-U", img); err != nil {
		t.Errorf("qemu-img info -U: %v\n%s", err, out)
	}
	p.stop(t)
	waitLocks(t, img, []int{})

	// share-rw=on: another writer may join.
	start(t, filepath.Join(dir, "qmp.sock"), exportArgs(dir, img, ",share-rw=on")...)
	waitLocks(t, img, []int{100, 101, 203})
	if out, err := cmdOut("qemu-io", "-f", "raw", "-c", "write 0 512", img); err != nil {
		t.Errorf("qemu-io write with share-rw=on: %v\n%s", err, out)
	}
}

// holdWithQemuIO starts qemu-io on img and keeps it open (reading commands
// from a pipe) until the test ends.
func holdWithQemuIO(t *testing.T, img string) {
	t.Helper()
	cmd := exec.Command("qemu-io", "-f", "raw", img)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
		}
	})
	// qemu-io (like qemu-storage-daemon's exports) holds consistent-read
	// and write and shares everything: bytes 100 and 101.
	waitLocks(t, img, []int{100, 101})
}

// TestIntegrationLocksTheyHold: while qemu-io holds the image writable, a
// writable export of ours fails with QEMU's message, and a read-only
// force-share node succeeds.
func TestIntegrationLocksTheyHold(t *testing.T) {
	needTool(t, "qemu-io")
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 8<<20)
	holdWithQemuIO(t, img)

	sock := filepath.Join(dir, "qmp.sock")
	start(t, sock, "--nbd-server", "addr.type=unix,addr.path="+filepath.Join(dir, "nbd.sock"), "--qmp", sock)
	m := monitor(t, sock)
	// A node nobody uses holds no permission, so it takes no lock (QEMU
	// does the same).
	run(t, m, "blockdev-add", map[string]any{"driver": "raw", "node-name": "r",
		"file": map[string]any{"driver": "file", "filename": img}})
	_, err := runErr(m, "block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "r", "writable": true})
	if err == nil || err.Error() != `Failed to get shared "write" lock` {
		t.Fatalf("writable export while qemu-io writes: %v", err)
	}
	// Nothing was left half-done: the node has no users, no locks of ours.
	waitLocks(t, img, []int{100, 101})
	run(t, m, "blockdev-add", map[string]any{"driver": "raw", "node-name": "ro", "read-only": true, "force-share": true,
		"file": map[string]any{"driver": "file", "filename": img}})
	run(t, m, "block-export-add", map[string]any{"type": "nbd", "id": "e1", "node-name": "ro"})

	// The same refusal on the command line: exit 1 with the hint.
	out, err := cmdOut(binary, exportArgs(shortDir(t), img, "")...)
	if err == nil || !strings.Contains(out, `Failed to get shared "write" lock`) {
		t.Errorf("command-line export while qemu-io writes: %v\n%s", err, out)
	}
}

// TestIntegrationLocksAgainstQSD: qemu-storage-daemon exporting the image
// writable blocks our writable export, and the other way round.
func TestIntegrationLocksAgainstQSD(t *testing.T) {
	needTool(t, "qemu-storage-daemon")
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 8<<20)
	qsd := exec.Command("qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=f,filename="+img,
		"--nbd-server", "addr.type=unix,addr.path="+filepath.Join(dir, "qsd-nbd.sock"),
		"--export", "type=nbd,id=e,node-name=f,writable=on")
	if err := qsd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qsd.Process.Kill(); qsd.Wait() })
	waitLocks(t, img, []int{100, 101, 203})
	out, err := cmdOut(binary, exportArgs(dir, img, "")...)
	if err == nil || !strings.Contains(out, `Failed to get shared "write" lock`) {
		t.Errorf("our export while qsd writes: %v\n%s", err, out)
	}
	qsd.Process.Kill()
	qsd.Wait()
	waitLocks(t, img, []int{})

	start(t, filepath.Join(dir, "qmp.sock"), exportArgs(dir, img, "")...)
	out, err = cmdOut("qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=f,filename="+img,
		"--nbd-server", "addr.type=unix,addr.path="+filepath.Join(dir, "qsd2.sock"),
		"--export", "type=nbd,id=e,node-name=f,writable=on")
	if err == nil || !strings.Contains(out, `Failed to get "write" lock`) {
		t.Errorf("qsd export while we write: %v\n%s", err, out)
	}
}

// TestIntegrationLocksBetweenOurs: two of our nodes on one image, in one
// process and in two processes.
func TestIntegrationLocksBetweenOurs(t *testing.T) {
	dir := shortDir(t)
	img := makeImage(t, dir, "a.img", 8<<20)
	start(t, filepath.Join(dir, "qmp.sock"), exportArgs(dir, img, "")...)
	m := monitor(t, filepath.Join(dir, "qmp.sock"))
	run(t, m, "blockdev-add", map[string]any{"driver": "raw", "node-name": "r2",
		"file": map[string]any{"driver": "file", "filename": img}})
	_, err := runErr(m, "block-export-add", map[string]any{"type": "nbd", "id": "e2", "node-name": "r2", "writable": true})
	if err == nil || err.Error() != `Failed to get "write" lock` {
		t.Errorf("second writable export in one process: %v", err)
	}
	// Read-only with force-share: allowed.
	run(t, m, "blockdev-add", map[string]any{"driver": "raw", "node-name": "r3", "read-only": true, "force-share": true,
		"file": map[string]any{"driver": "file", "filename": img}})
	run(t, m, "block-export-add", map[string]any{"type": "nbd", "id": "e3", "node-name": "r3"})

	dir2 := shortDir(t)
	out, err := cmdOut(binary, exportArgs(dir2, img, "")...)
	if err == nil || !strings.Contains(out, `Failed to get "write" lock`) {
		t.Errorf("second process: %v\n%s", err, out)
	}
}
