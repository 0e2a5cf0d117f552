package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// readCPIO is a minimal newc reader for the tests: names, modes, data.
func readCPIO(t *testing.T, b []byte) map[string][2]any {
	t.Helper()
	out := map[string][2]any{}
	pad := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if len(b)-off < 110 || string(b[off:off+6]) != "070701" {
			t.Fatalf("bad header at %d", off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
		mode, size, nameLen := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+nameLen-1])
		off = pad(off + 110 + nameLen)
		data := b[off : off+size]
		off = pad(off + size)
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out[name] = [2]any{mode, string(data)}
	}
}

func TestCPIO(t *testing.T) {
	var buf bytes.Buffer
	w := &cpioWriter{w: &buf}
	w.Dir("/dev")
	w.CharDev("dev/console", 5, 1)
	w.File("init", 0o755, []byte("hello"))
	w.File("a/b", 0o644, []byte("1234"))
	w.Symlink("bin/sh", "busybox")
	w.File("empty", 0o600, nil)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", buf.Len())
	}
	got := readCPIO(t, buf.Bytes())
	want := map[string][2]any{
		"dev":         {0o40755, ""},
		"dev/console": {0o20600, ""},
		"init":        {0o100755, "hello"},
		"a/b":         {0o100644, "1234"},
		"bin/sh":      {0o120777, "busybox"},
		"empty":       {0o100600, ""},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %v\nwant %v", got, want)
	}
}

func TestPattern(t *testing.T) {
	big := make([]byte, 4096)
	Pattern(7, 1000, big)
	for _, c := range [][2]int{{0, 4096}, {1, 9}, {3, 4000}, {8, 16}, {4095, 4096}} {
		part := make([]byte, c[1]-c[0])
		Pattern(7, 1000+int64(c[0]), part)
		if !bytes.Equal(part, big[c[0]:c[1]]) {
			t.Errorf("Pattern at %d..%d differs from the same bytes of a larger fill", c[0], c[1])
		}
	}
	other := make([]byte, 4096)
	Pattern(8, 1000, other)
	if bytes.Equal(big, other) {
		t.Error("seeds 7 and 8 give the same bytes")
	}
	Pattern(7, 1008, other)
	if !bytes.Equal(big[8:], other[:4088]) {
		t.Error("Pattern depends on where the buffer starts, not only on the disk offset")
	}
	if err := CheckPattern(bytes.NewReader(append(make([]byte, 1000), big...)), 7, 1000, 4096); err != nil {
		t.Error(err)
	}
	bad := append(make([]byte, 1000), big...)
	bad[3000] ^= 1
	if err := CheckPattern(bytes.NewReader(bad), 7, 1000, 4096); !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "offset 3000") {
		t.Errorf("corrupted byte: %v", err)
	}
	if err := CheckZero(bytes.NewReader(make([]byte, 10)), 2, 8); err != nil {
		t.Error(err)
	}
}

func TestParseCommand(t *testing.T) {
	c, err := ParseCommand("  write off=4K len=1M seed=3 dev=vdb ")
	if err != nil || c.Op != "write" || c.Args["dev"] != "vdb" {
		t.Fatalf("%+v %v", c, err)
	}
	if n, err := c.Int("off", 0); n != 4096 || err != nil {
		t.Errorf("off: %d %v", n, err)
	}
	if n, err := c.Int("len", 0); n != 1<<20 || err != nil {
		t.Errorf("len: %d %v", n, err)
	}
	if n, err := c.Int("absent", 5); n != 5 || err != nil {
		t.Errorf("absent: %d %v", n, err)
	}
	for _, bad := range []string{"write off", "write =1", "write a=1 a=2"} {
		if _, err := ParseCommand(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
	if c, err := ParseCommand("sh echo a=b | wc"); err != nil || c.Rest != "echo a=b | wc" {
		t.Errorf("sh: %+v %v", c, err)
	}
	if c, err := ParseCommand("# comment"); err != nil || c.Op != "" {
		t.Errorf("comment: %+v %v", c, err)
	}
	for _, bad := range []string{"-1", "1T", "K", "99999999999G"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q): no error", bad)
		}
	}
}

func TestParseLine(t *testing.T) {
	r := Result{Op: "info", Line: 3, OK: true, Size: 1 << 26, Queues: 2}
	got, ok := ParseLine("[   1.0] noise " + r.String() + "\r")
	if !ok || got.Op != "info" || got.Size != 1<<26 || got.Queues != 2 || got.Line != 3 {
		t.Errorf("%+v %v", got, ok)
	}
	for _, l := range []string{"", "AGENT ", "AGENT {", `AGENT {"op":""}`, "random kernel line"} {
		if _, ok := ParseLine(l); ok {
			t.Errorf("%q parsed", l)
		}
	}
}

func TestParseAptShow(t *testing.T) {
	out := "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\n" +
		"Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n more\n\n" +
		"Package: busybox-static\nVersion: 1:1.35.0-4+deb12u1+b1\n\n"
	k, kv, bb := parseAptShow(out)
	if k != "linux-image-6.1.0-56-cloud-amd64" || kv != "6.1.192-2" || bb != "1:1.35.0-4+deb12u1+b1" {
		t.Errorf("%q %q %q", k, kv, bb)
	}
}

func FuzzParseLine(f *testing.F) {
	f.Add(`AGENT {"op":"info","ok":true,"size":67108864}`)
	f.Add("[    2.8] reboot: Power down")
	f.Fuzz(func(t *testing.T, s string) {
		if r, ok := ParseLine(s); ok && r.Op == "" {
			t.Error("parsed a report without an operation")
		}
	})
}

func FuzzParseCommand(f *testing.F) {
	f.Add("write off=4K len=1M seed=3")
	f.Add("loop secs=5 qd=4 blocks=512")
	f.Add("sh cat /proc/partitions")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseCommand(s)
		if err != nil {
			return
		}
		for k := range c.Args {
			_, _ = c.Int(k, 0)
		}
	})
}

// TestIntegrationBoot builds the kit and boots a guest without disks.
func TestIntegrationBoot(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a guest kit and boots it under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	t0 := time.Now()
	kit, err := Build(ctx, DefaultCacheDir())
	if errors.Is(err, ErrUnavailable) {
		t.Skipf("guest kit unavailable (needs apt-get download, dpkg-deb, go): %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kit built in %v: kernel %s, modules %v", time.Since(t0), kit.Release, kit.Modules)
	vm, err := Boot(ctx, kit, BootOptions{Script: []string{"sh uname -r", "sleep secs=0", "bogus"}})
	if errors.Is(err, ErrUnavailable) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	res, err := vm.Wait()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("agent ready %v after QEMU started", vm.BootTime())
	if r, ok := Find(res, 1); !ok || !r.OK || strings.TrimSpace(r.Output) != kit.Release {
		t.Errorf("uname: %+v", r)
	}
	if r, ok := Find(res, 3); !ok || r.OK || !strings.Contains(r.Err, "unknown operation") {
		t.Errorf("bogus: %+v", r)
	}
	if bad := Failed(res); len(bad) != 1 {
		t.Errorf("failed reports: %+v", bad)
	}
}
