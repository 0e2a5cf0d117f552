package tests

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/internal/qemutest"
	"blockbackend/tests/guest"
)

// TestIntegrationGuestQcow2: the basic guest I/O of TestIntegrationGuestBasicIO
// on a qcow2 image, alone, over a backing file that holds a pattern of
// its own, and encrypted with LUKS (encrypt.format=luks, the passphrase a
// secret object): the guest reads the backing data through the overlay
// where it has not written, its writes land in the overlay only, and
// qemu-img check finds the overlay clean afterwards (and, encrypted,
// reads the guest's data with the secret).
func TestIntegrationGuestQcow2(t *testing.T) {
	kit := needGuest(t)
	for _, name := range []string{"alone", "backing", "luks"} {
		t.Run(name, func(t *testing.T) {
			forBackends(t, func(t *testing.T, kind backendKind) {
				guestQcow2(t, kit, kind, name == "backing", name == "luks")
			})
		})
	}
}

// guestSecret is the LUKS passphrase of the encrypted guest image.
const guestSecret = "secret,id=sec0,data=guest passphrase"

func guestQcow2(t *testing.T, kit *guest.Kit, kind backendKind, withBacking, luks bool) {
	dir := shortDir(t)
	img := filepath.Join(dir, "a.qcow2")
	base := filepath.Join(dir, "base.img")
	const baseSeed = 40
	// The backing image holds one pattern over its first 8 MiB (a raw
	// file the guest never writes to).
	baseSpan := span{0, 8 << 20, baseSeed}
	if withBacking {
		f, err := os.Create(base)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, baseSpan.n)
		guest.Pattern(baseSpan.seed, baseSpan.off, buf)
		if _, err := f.WriteAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(guestImageSize); err != nil {
			t.Fatal(err)
		}
		f.Close()
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", img)
	} else if luks {
		// iter-time 200: qemu-img's PBKDF2 calibration fails on a busy
		// machine with much less.
		qemuImg(t, "create", "-q", "-f", "qcow2", "--object", guestSecret,
			"-o", "cluster_size=65536,encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=200", img, fmt.Sprint(guestImageSize))
	} else {
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, fmt.Sprint(guestImageSize))
	}
	eo := exportOpts{format: "qcow2"}
	imgArgs := []string{img} // how qemu-img opens it after the guest
	if luks {
		eo.formatOpts = "encrypt.format=luks,encrypt.key-secret=sec0"
		eo.objects = []string{guestSecret}
		imgArgs = []string{"--object", guestSecret, "--image-opts", "driver=qcow2,file.filename=" + img + ",encrypt.key-secret=sec0"}
	}
	b := startBackend(t, kind, dir, img, eo)
	spans := []span{
		{0, 512, 1}, // inside the backing pattern: a partial cluster copied on write
		{4096, 4096, 3},
		{65536 + 512, 65536, 4}, // across a cluster boundary
		{1<<20 + 512, 1 << 20, 5},
		{(48 << 20) - 4096, 8192, 7},
	}
	const zr = 16 << 20
	script := []string{"info"}
	for _, s := range spans {
		script = append(script, guest.Write(s.off, s.n, s.seed))
	}
	script = append(script, "flush", "dropcaches")
	for _, s := range spans {
		script = append(script, guest.Read(s.off, s.n, s.seed, false))
	}
	script = append(script,
		guest.Write(zr, 256<<10, 8),
		fmt.Sprintf("zero off=%d len=%d", zr+64<<10, 64<<10),
		fmt.Sprintf("discard off=%d len=%d", zr+192<<10, 64<<10),
		"flush", "dropcaches",
		fmt.Sprintf("readzero off=%d len=%d", zr+64<<10, 64<<10),
		guest.Read(zr, 64<<10, 8, false),
		guest.Read(zr+128<<10, 64<<10, 8, true),
		fmt.Sprintf("readzero off=%d len=%d", 32<<20, 1<<20),
	)
	if withBacking {
		// Untouched backing data, read through the overlay: the 512 bytes
		// after the first write, in the same cluster, and a whole cluster.
		script = append(script,
			guest.Read(512, 3584, baseSeed, false),
			guest.Read(3<<20, 64<<10, baseSeed, false))
	}
	res := runGuest(t, kit, guest.BootOptions{Sockets: []string{b.sock}, Script: script})
	if info := result(t, res, 1); info.Size != guestImageSize || info.RO {
		t.Errorf("guest sees size %d, ro %v; want %d, rw", info.Size, info.RO, guestImageSize)
	}
	b.p.stop(t)

	if out, err := exec.Command("qemu-img", append([]string{"check"}, imgArgs...)...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check after the guest: %v\n%s", err, out)
	}
	raw := filepath.Join(dir, "flat.raw")
	qemuImg(t, append(append([]string{"convert"}, imgArgs...), "-O", "raw", raw)...)
	spans = append(spans, span{zr, 64 << 10, 8}, span{zr + 128<<10, 64 << 10, 8})
	if withBacking {
		spans = append(spans, span{512, 3584, baseSeed}, span{3 << 20, 64 << 10, baseSeed})
	}
	checkImage(t, raw, spans, [][2]int64{{zr + 64<<10, 64 << 10}, {32 << 20, 1 << 20}})
	if withBacking {
		// The guest's writes went to the overlay: the backing file still
		// holds its pattern where the guest wrote.
		checkImage(t, base, []span{baseSpan}, nil)
	}
}

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := qemutest.CombinedOutput(func() *exec.Cmd { return exec.Command("qemu-img", args...) }); err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
