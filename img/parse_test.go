package img

import (
	"bytes"
	"reflect"
	"testing"
)

func TestSizeToStr(t *testing.T) {
	for _, c := range []struct {
		v    int64
		want string
	}{
		{0, "0 B"}, {999, "999 B"}, {1000, "0.977 KiB"}, {4096, "4 KiB"}, {200704, "196 KiB"},
		{348160, "340 KiB"}, {1 << 20, "1 MiB"}, {2747000, "2.62 MiB"}, {1 << 30, "1 GiB"},
		{1023 << 20, "0.999 GiB"}, {1 << 62, "4 EiB"},
	} {
		if got := sizeToStr(c.v); got != c.want {
			t.Errorf("sizeToStr(%d) = %q, want %q", c.v, got, c.want)
		}
	}
}

func TestGetopt(t *testing.T) {
	var out, errb bytes.Buffer
	tl := &Tool{Prog: "qemu-img", Stdout: &out, Stderr: &errb}
	spec := optSpec{short: "f:qU", long: []string{"output=", "backing-chain", "force-share"}}
	opts, ops, ok := tl.getopt([]string{"a", "-qUfraw", "--outp", "json", "b", "--backing", "--", "-c"}, spec)
	want := []opt{{"q", ""}, {"U", ""}, {"f", "raw"}, {"output", "json"}, {"backing-chain", ""}}
	if !ok || !reflect.DeepEqual(opts, want) || !reflect.DeepEqual(ops, []string{"a", "b", "-c"}) {
		t.Errorf("got %v %v %v", opts, ops, ok)
	}
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"-z"}, "qemu-img: unrecognized option '-z'\n"},
		{[]string{"--bogus"}, "qemu-img: unrecognized option '--bogus'\n"},
		{[]string{"-f"}, "qemu-img: missing argument for option '-f'\n"},
		{[]string{"--output"}, "qemu-img: missing argument for option '--output'\n"},
		{[]string{"--force-share=x"}, "qemu-img: unrecognized option '--force-share=x'\n"},
	} {
		errb.Reset()
		if _, _, ok := tl.getopt(c.args, spec); ok || errb.String() != c.msg+"Try 'qemu-img --help' for more information\n" {
			t.Errorf("%q: ok=%v, %q", c.args, ok, errb.String())
		}
	}
}

func TestParseOptList(t *testing.T) {
	got := parseOptList("a=1,,2,nocow,b=x,,,c=")
	want := []kv{{"a", "1,2"}, {"nocow", "on"}, {"b", "x,"}, {"c", ""}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q", got)
	}
	if !isHelpOpt("cluster_size=4k,help") || !isHelpOpt("?") || isHelpOpt("helper=1") {
		t.Errorf("isHelpOpt")
	}
	if qapiName("cluster_size") != "cluster-size" || qapiName("encrypt.key-secret") != "encrypt.key-secret" ||
		imgName("lazy-refcounts") != "lazy_refcounts" {
		t.Errorf("name mapping")
	}
}

func TestWriteJSON(t *testing.T) {
	var b bytes.Buffer
	writeJSON(&b, map[string]any{
		"dirty-flag": false, "virtual-size": int64(5), "format": "raw", "zzz": []any{}, "snapshots": []any{map[string]any{"id": "1", "name": "a\"b"}},
	})
	want := `{
    "snapshots": [
        {
            "name": "a\"b",
            "id": "1"
        }
    ],
    "virtual-size": 5,
    "format": "raw",
    "dirty-flag": false,
    "zzz": [
    ]
}
`
	if b.String() != want {
		t.Errorf("got\n%s", b.String())
	}
}

// TestLUKSInfoOrder: the order qemu-img 7.2 prints a LUKS image's facts in.
func TestLUKSInfoOrder(t *testing.T) {
	var b bytes.Buffer
	dumpHuman(&b, map[string]any{
		"cipher-alg": "aes-256", "cipher-mode": "xts", "hash-alg": "sha256", "ivgen-alg": "plain64",
		"master-key-iters": 11073, "payload-offset": 2068480, "uuid": "u",
		"slots": []any{map[string]any{"active": true, "iters": 44521, "key-offset": 4096, "stripes": 4000},
			map[string]any{"active": false, "key-offset": 262144}},
	}, 1)
	want := `    ivgen alg: plain64
    hash alg: sha256
    cipher alg: aes-256
    uuid: u
    cipher mode: xts
    slots:
        [0]:
            active: true
            iters: 44521
            key offset: 4096
            stripes: 4000
        [1]:
            active: false
            key offset: 262144
    payload offset: 2068480
    master key iters: 11073
`
	if b.String() != want {
		t.Errorf("got\n%s", b.String())
	}
}
