package keyval

import (
	"errors"
	"reflect"
	"testing"

	"blockbackend/qmp/qapi"
)

// impliedKeys are the implied keys the command line uses; the fuzzer picks
// one with a byte.
var impliedKeys = []string{"", "driver", "qom-type", "backend", "type", "chardev"}

// FuzzParse checks that Parse never panics, and that whatever it accepts
// survives Format and a second Parse unchanged.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"driver=qcow2,file.driver=file,file.filename=a.qcow2",
		"secret,id=s0,data=x",
		"socket,id=c,path=/tmp/s,,x,server=on,wait=off",
		"server.0.host=a,server.1.host=b",
		"a=1,,2,", "c.0=a,c.2=b", "cache.direct=on,cache=x", "a..b=1", "=x", ",",
	} {
		f.Add(s, uint8(1))
	}
	f.Fuzz(func(t *testing.T, s string, k uint8) {
		implied := impliedKeys[int(k)%len(impliedKeys)]
		m, err := Parse(s, implied)
		if err != nil {
			var qe *qapi.Error
			if !errors.As(err, &qe) {
				t.Fatalf("Parse(%q): error %T is not a *qapi.Error", s, err)
			}
			return
		}
		out := Format(m)
		m2, err := Parse(out, "")
		if err != nil {
			t.Fatalf("Parse(%q) = %v; Format = %q does not parse: %v", s, m, out, err)
		}
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("round trip of %q through %q: %#v != %#v", s, out, m, m2)
		}
	})
}

// FuzzParseJSONFilename checks that json: filenames never panic the parser
// and that a parsed tree is already in crumpled form: Unflatten(Flatten(m))
// gives it back.
func FuzzParseJSONFilename(f *testing.F) {
	for _, s := range []string{
		`json:{"driver":"raw","file.driver":"file","file":{"filename":"/x"}}`,
		`json:{"driver":"quorum","children.0.driver":"file","children.1":{"driver":"file"},"vote-threshold":1}`,
		`json:{"a":[],"b":{},"c":null,"d":1.5e3,"e":true}`,
		`json:{"a":1,"a":2}`, `json:[1]`, `json:{bad`, `json:{"a":1} x`, `/tmp/a.qcow2`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, ok, err := ParseJSONFilename(s)
		if !ok || err != nil {
			return
		}
		back, err := qapi.Unflatten(qapi.Flatten(m))
		if err != nil {
			t.Fatalf("%q: parsed %#v does not unflatten again: %v", s, m, err)
		}
		if !reflect.DeepEqual(m, back) {
			t.Fatalf("%q: %#v != %#v", s, m, back)
		}
	})
}

// FuzzParseOption covers the JSON object path of the command line.
func FuzzParseOption(f *testing.F) {
	for _, s := range []string{
		`{"driver":"null-co","node-name":"n","size":1024}`,
		`{"driver":"null-co","cache":{"direct":true},"l":[1,2,{"x":null}]}`,
		`{"a":1,"a":2}`, `{"a":1},`, `{`, `{"a":"\ud800"}`, "null-co,node-name=n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, isJSON, err := ParseOption(s, "driver")
		if err == nil && m == nil {
			t.Fatalf("%q: nil tree without error (json=%v)", s, isJSON)
		}
	})
}
