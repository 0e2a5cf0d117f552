package qapi_test

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"blockbackend/qmp/keyval"
	"blockbackend/qmp/qapi"
)

type fuzzEnum string

func (fuzzEnum) EnumValues() []string { return []string{"ignore", "unmap", "off", "on"} }

type fuzzAlt struct {
	name string
	obj  map[string]any
	null bool
}

func (a *fuzzAlt) UnmarshalQAPI(v any, mode qapi.Mode, path string) error {
	switch t := v.(type) {
	case nil:
		a.null = true
	case string:
		a.name = t
	case map[string]any:
		a.obj = t
	default:
		return qapi.Errorf(qapi.GenericError, "Invalid parameter type for '%s', expected: object", path)
	}
	return nil
}

type fuzzBase struct {
	Driver   string   `qapi:"driver"`
	NodeName string   `qapi:"node-name,optional"`
	Discard  fuzzEnum `qapi:"discard,optional"`
}

type fuzzServer struct {
	Host string  `qapi:"host"`
	Port *uint16 `qapi:"port,optional"`
}

// fuzzOpts has a member of every kind the decoder supports.
type fuzzOpts struct {
	fuzzBase
	Cache struct {
		Direct  bool `qapi:"direct,optional"`
		NoFlush bool `qapi:"no-flush,optional"`
	} `qapi:"cache,optional"`
	Size    qapi.Size           `qapi:"size,optional"`
	I8      int8                `qapi:"i8,optional"`
	I32     int32               `qapi:"i32,optional"`
	I64     int64               `qapi:"i64,optional"`
	U32     uint32              `qapi:"u32,optional"`
	U64     uint64              `qapi:"u64,optional"`
	F       float64             `qapi:"f,optional"`
	F32     float32             `qapi:"f32,optional"`
	PStr    *string             `qapi:"pstr,optional"`
	PSize   *qapi.Size          `qapi:"psize,optional"`
	Server  []fuzzServer        `qapi:"server,optional"`
	Enums   []fuzzEnum          `qapi:"enums,optional"`
	Raw     map[string]any      `qapi:"raw,optional"`
	Ints    map[string]int      `qapi:"ints,optional"`
	Any     any                 `qapi:"any,optional"`
	JRaw    json.RawMessage     `qapi:"jraw,optional"`
	File    fuzzAlt             `qapi:"file,optional"`
	Backing *fuzzAlt            `qapi:"backing,optional"`
	Nested  *fuzzOpts           `qapi:"nested,optional"`
	Lists   [][]string          `qapi:"lists,optional"`
	Named   map[string]fuzzEnum `qapi:"named,optional"`
}

type fuzzUnion struct {
	fuzzBase
	Rest map[string]any `qapi:",rest"`
}

// FuzzDecode feeds JSON objects and keyval strings through the decoder
// into a struct with every supported kind: it must never panic, and every
// error must be a GenericError *qapi.Error.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"driver":"qcow2","discard":"unmap","cache":{"direct":true},"size":1073741824,"server":[{"host":"a","port":1}]}`,
		`{"driver":"x","i8":300,"u32":-1,"f":1e400,"f32":1e300,"backing":null,"file":{"driver":"file"},"nested":{"driver":"y"}}`,
		`{"driver":"x","raw":{"a":[1,{}]},"ints":{"a":1,"b":"2"},"jraw":[1,"x",null],"lists":[["a"],[]],"named":{"x":"on"}}`,
		"driver=qcow2,discard=unmap,cache.direct=on,size=1.5G,server.0.host=a,server.0.port=0x10",
		"qcow2,i8=-129,u32=-1,f=inf,f32=1e39,backing=,file.driver=file,nested.driver=y,nested.size=1k",
		"x,lists.0.0=a,lists.1.0=b,enums.0=ignore,named.a=on,psize=16E,pstr=,,",
		"driver=x,read-only.x=on,size.0=1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, isJSON, err := keyval.ParseOption(s, "driver")
		if err != nil {
			return
		}
		mode := qapi.Keyval
		if isJSON {
			mode = qapi.JSON
		}
		check := func(err error) {
			if err == nil {
				return
			}
			var qe *qapi.Error
			if !errors.As(err, &qe) || qe.Class != qapi.GenericError || qe.Desc == "" {
				t.Fatalf("%q: error %T %v", s, err, err)
			}
			if strings.HasPrefix(qe.Desc, "qapi:") {
				t.Fatalf("%q: programming error reported: %v", s, err)
			}
		}
		var o fuzzOpts
		check(qapi.Decode(qapi.Clone(m), &o, mode))
		var u fuzzUnion
		if err := qapi.Decode(m, &u, mode); err == nil {
			if u.Rest == nil {
				t.Fatalf("%q: nil rest", s)
			}
			for k := range u.Rest {
				if k == "driver" || k == "node-name" || k == "discard" {
					t.Fatalf("%q: member %q in rest", s, k)
				}
			}
		} else {
			check(err)
		}
		// The tree helpers must cope with whatever a parser produced.
		if back, err := qapi.Unflatten(qapi.Flatten(m)); err == nil && !isJSON {
			if !reflect.DeepEqual(back, m) {
				t.Fatalf("%q: keyval tree changed by Flatten/Unflatten: %#v != %#v", s, m, back)
			}
		}
		c := qapi.Clone(m)
		qapi.Merge(c, m)
		if !reflect.DeepEqual(c, m) {
			t.Fatalf("%q: Merge with itself changed the tree", s)
		}
	})
}

// FuzzParseSize checks qemu_strtosz-style parsing for panics and for
// agreement with plain integer parsing where the two overlap.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"512", "1.5G", "64k", "0x200", " 4k", "+5", "-0", "16E", "15.9999E", "1.", ".5k", "0x3k", "1e", "0.5"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := qapi.ParseSize(s)
		if err != nil {
			return
		}
		var d qapi.Size
		if err := qapi.DecodeValue(s, &d, qapi.Keyval, "size"); err != nil || uint64(d) != v {
			t.Fatalf("%q: ParseSize %d, DecodeValue %d %v", s, v, d, err)
		}
	})
}

// FuzzUnflatten checks that Unflatten never panics on a JSON object and
// that its result is stable under Flatten and Unflatten.
func FuzzUnflatten(f *testing.F) {
	for _, s := range []string{
		`{"a.b":1,"a.c":{"d":2},"l.0":1,"l.1":2}`, `{"a":1,"a.b":2}`, `{"l.1":1}`, `{"l.0":1,"l.x":2}`,
		`{"":1,"a.":2,".b":3}`, `{"a":{"0":{},"1":[]}}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d := json.NewDecoder(strings.NewReader(s))
		d.UseNumber()
		var m map[string]any
		if d.Decode(&m) != nil || m == nil {
			return
		}
		u, err := qapi.Unflatten(m)
		if err != nil {
			return
		}
		u2, err := qapi.Unflatten(qapi.Flatten(u))
		if err != nil || !reflect.DeepEqual(u, u2) {
			t.Fatalf("%q: %#v → %#v, %v", s, u, u2, err)
		}
	})
}
