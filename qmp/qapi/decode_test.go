package qapi

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

type discardMode string

func (discardMode) EnumValues() []string { return []string{"ignore", "unmap"} }

type cacheOpts struct {
	Direct  bool `qapi:"direct,optional"`
	NoFlush bool `qapi:"no-flush,optional"`
}

type commonOpts struct {
	Driver   string      `qapi:"driver"`
	NodeName string      `qapi:"node-name,optional"`
	Discard  discardMode `qapi:"discard,optional"`
	Cache    cacheOpts   `qapi:"cache,optional"`
	ReadOnly bool        `qapi:"read-only,optional"`
}

type server struct {
	Host string `qapi:"host"`
	Port string `qapi:"port,optional"`
}

// ref is an alternate: a node name, an object, or null.
type ref struct {
	Name string
	Opts map[string]any
	Null bool
}

func (r *ref) UnmarshalQAPI(v any, mode Mode, path string) error {
	switch t := v.(type) {
	case nil:
		r.Null = true
	case string:
		r.Name = t
	case map[string]any:
		r.Opts = t
	default:
		return Errorf(GenericError, "Invalid parameter type for '%s', expected: object", path)
	}
	return nil
}

// allKinds has a member of every supported kind.
type allKinds struct {
	commonOpts
	Size    Size            `qapi:"size,optional"`
	I8      int8            `qapi:"i8,optional"`
	I16     int16           `qapi:"i16,optional"`
	I32     int32           `qapi:"i32,optional"`
	I64     int64           `qapi:"i64,optional"`
	Int     int             `qapi:"int,optional"`
	U8      uint8           `qapi:"u8,optional"`
	U16     uint16          `qapi:"u16,optional"`
	U32     uint32          `qapi:"u32,optional"`
	U64     uint64          `qapi:"u64,optional"`
	F       float64         `qapi:"f,optional"`
	PStr    *string         `qapi:"pstr,optional"`
	PBool   *bool           `qapi:"pbool,optional"`
	Servers []server        `qapi:"server,optional"`
	Strs    []string        `qapi:"strs,optional"`
	Raw     map[string]any  `qapi:"raw,optional"`
	Any     any             `qapi:"any,optional"`
	JSONRaw json.RawMessage `qapi:"jraw,optional"`
	File    ref             `qapi:"file,optional"`
	Backing *ref            `qapi:"backing,optional"`
	Enums   []discardMode   `qapi:"enums,optional"`
	Ints    map[string]int  `qapi:"ints,optional"`
	Ignored string          `qapi:"-"`
	NoTag   string
}

type unionBase struct {
	commonOpts
	Rest map[string]any `qapi:",rest"`
}

func jsonTree(t *testing.T, s string) map[string]any {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(s))
	d.UseNumber()
	var m map[string]any
	if err := d.Decode(&m); err != nil {
		t.Fatalf("bad test JSON %s: %v", s, err)
	}
	return m
}

func TestDecodeJSONBasic(t *testing.T) {
	var o allKinds
	o.Size = 99 // default, kept when absent
	src := jsonTree(t, `{"driver":"qcow2","discard":"unmap","cache":{"direct":true},"read-only":false,
		"i8":-128,"u16":65535,"u64":18446744073709551615,"int":-5,"f":1.5,"pstr":"p","pbool":true,
		"server":[{"host":"a","port":"1"},{"host":"b"}],"strs":["x","y"],"raw":{"k":[1,{"z":null}]},
		"any":[1,"2"],"jraw":{"a":1},"file":"node0","backing":null,"enums":["ignore"],"ints":{"a":1}}`)
	if err := Decode(src, &o, JSON); err != nil {
		t.Fatal(err)
	}
	if o.Driver != "qcow2" || o.Discard != "unmap" || !o.Cache.Direct || o.I8 != -128 || o.U16 != 65535 ||
		o.U64 != 1<<64-1 || o.Int != -5 || o.F != 1.5 || *o.PStr != "p" || !*o.PBool || o.Size != 99 {
		t.Fatalf("decoded %+v", o)
	}
	if len(o.Servers) != 2 || o.Servers[1].Host != "b" || o.Strs[1] != "y" || o.Raw["k"] == nil {
		t.Fatalf("decoded %+v", o)
	}
	if string(o.JSONRaw) != `{"a":1}` || o.File.Name != "node0" || o.Backing == nil || !o.Backing.Null {
		t.Fatalf("decoded %+v", o)
	}
	if o.Ints["a"] != 1 || o.Enums[0] != "ignore" {
		t.Fatalf("decoded %+v", o)
	}
}

func TestDecodeKeyvalBasic(t *testing.T) {
	var o allKinds
	src := map[string]any{
		"driver": "file", "read-only": "on", "cache": map[string]any{"direct": "yes", "no-flush": "off"},
		"size": "1.5G", "i32": "-0x10", "u8": "255", "f": "2.5", "pbool": "false",
		"server": []any{map[string]any{"host": "h"}}, "file": map[string]any{"driver": "file"},
		"u64": "-1", "int": "010",
	}
	if err := Decode(src, &o, Keyval); err != nil {
		t.Fatal(err)
	}
	if !o.ReadOnly || !o.Cache.Direct || o.Cache.NoFlush || o.Size != 3<<29 || o.I32 != -16 || o.U8 != 255 ||
		o.F != 2.5 || *o.PBool || o.Servers[0].Host != "h" || o.File.Opts["driver"] != "file" ||
		o.U64 != 1<<64-1 || o.Int != 8 {
		t.Fatalf("decoded %+v", o)
	}
	// Typed values merged in by code are accepted in keyval mode.
	o = allKinds{}
	src = map[string]any{"driver": "x", "read-only": true, "size": json.Number("512"), "i16": 7, "f": 1.0}
	if err := Decode(src, &o, Keyval); err != nil {
		t.Fatal(err)
	}
	if !o.ReadOnly || o.Size != 512 || o.I16 != 7 {
		t.Fatalf("decoded %+v", o)
	}
}

func TestDecodeRest(t *testing.T) {
	var u unionBase
	src := map[string]any{"driver": "qcow2", "node-name": "n", "file": "f", "backing": nil}
	if err := Decode(src, &u, JSON); err != nil {
		t.Fatal(err)
	}
	if u.Driver != "qcow2" || u.NodeName != "n" || !reflect.DeepEqual(u.Rest, map[string]any{"file": "f", "backing": nil}) {
		t.Fatalf("decoded %+v", u)
	}
	u = unionBase{}
	if err := Decode(map[string]any{"driver": "raw"}, &u, JSON); err != nil || u.Rest == nil {
		t.Fatalf("rest %v, err %v", u.Rest, err)
	}
}

func TestDecodeErrors(t *testing.T) {
	tests := []struct {
		mode Mode
		src  string // JSON; in keyval mode its string leaves are the keyval values
		want string
	}{
		{JSON, `{}`, "Parameter 'driver' is missing"},
		{Keyval, `{}`, "Parameter 'driver' is missing"},
		{JSON, `{"driver":"d","server":[{"port":"1"}]}`, "Parameter 'server[0].host' is missing"},
		{JSON, `{"driver":"d","bogus":1}`, "Parameter 'bogus' is unexpected"},
		{Keyval, `{"driver":"d","bogus":"1"}`, "Parameter 'bogus' is unexpected"},
		{JSON, `{"driver":"d","cache":{"direct":true,"x":1}}`, "Parameter 'cache.x' is unexpected"},
		{Keyval, `{"driver":"d","cache":{"x":"1"}}`, "Parameter 'cache.x' is unexpected"},
		{JSON, `{"driver":"d","server":[{"host":"h","x":1}]}`, "Parameter 'server[0].x' is unexpected"},
		{JSON, `{"driver":"d","i64":"1"}`, "Invalid parameter type for 'i64', expected: integer"},
		{JSON, `{"driver":"d","i64":1.0}`, "Invalid parameter type for 'i64', expected: integer"},
		{JSON, `{"driver":"d","i64":18446744073709551615}`, "Invalid parameter type for 'i64', expected: integer"},
		{JSON, `{"driver":"d","size":"1"}`, "Parameter 'size' expects uint64"},
		{JSON, `{"driver":"d","size":1.5}`, "Parameter 'size' expects uint64"},
		{JSON, `{"driver":"d","u32":"1"}`, "Parameter 'u32' expects uint64"},
		{JSON, `{"driver":"d","u32":-1}`, "Parameter 'u32' expects uint32_t"},
		{JSON, `{"driver":"d","u32":4294967296}`, "Parameter 'u32' expects uint32_t"},
		{JSON, `{"driver":"d","i8":128}`, "Parameter 'i8' expects int8_t"},
		{JSON, `{"driver":"d","i16":-32769}`, "Parameter 'i16' expects int16_t"},
		{JSON, `{"driver":"d","read-only":"on"}`, "Invalid parameter type for 'read-only', expected: boolean"},
		{JSON, `{"driver":5}`, "Invalid parameter type for 'driver', expected: string"},
		{JSON, `{"driver":null}`, "Invalid parameter type for 'driver', expected: string"},
		{JSON, `{"driver":"d","f":"1"}`, "Invalid parameter type for 'f', expected: number"},
		{JSON, `{"driver":"d","cache":5}`, "Invalid parameter type for 'cache', expected: object"},
		{JSON, `{"driver":"d","server":{}}`, "Invalid parameter type for 'server', expected: array"},
		{JSON, `{"driver":"d","strs":[1]}`, "Invalid parameter type for 'strs[0]', expected: string"},
		{JSON, `{"driver":"d","raw":[]}`, "Invalid parameter type for 'raw', expected: object"},
		{JSON, `{"driver":"d","discard":"bogus"}`, "Parameter 'discard' does not accept value 'bogus'"},
		{Keyval, `{"driver":"d","discard":"bogus"}`, "Parameter 'discard' does not accept value 'bogus'"},
		{JSON, `{"driver":"d","discard":1}`, "Invalid parameter type for 'discard', expected: string"},
		{Keyval, `{"driver":"d","read-only":"bogus"}`, "Parameter 'read-only' expects 'on' or 'off'"},
		{Keyval, `{"driver":"d","read-only":""}`, "Parameter 'read-only' expects 'on' or 'off'"},
		{Keyval, `{"driver":"d","cache":{"direct":"x"}}`, "Parameter 'cache.direct' expects 'on' or 'off'"},
		{Keyval, `{"driver":"d","read-only":{"x":"on"}}`, "Parameters 'read-only.*' are unexpected"},
		{Keyval, `{"driver":"d","i64":["1"]}`, "Parameters 'i64.*' are unexpected"},
		{Keyval, `{"driver":"d","cache":"x"}`, "Invalid parameter type for 'cache', expected: object"},
		{Keyval, `{"driver":"d","i64":"x"}`, "Parameter 'i64' expects integer"},
		{Keyval, `{"driver":"d","i64":"1.5"}`, "Parameter 'i64' expects integer"},
		{Keyval, `{"driver":"d","i64":"08"}`, "Parameter 'i64' expects integer"},
		{Keyval, `{"driver":"d","i64":"99999999999999999999"}`, "Parameter 'i64' expects integer"},
		{Keyval, `{"driver":"d","u64":"99999999999999999999"}`, "Parameter 'u64' expects integer"},
		{Keyval, `{"driver":"d","u16":"-1"}`, "Parameter 'u16' expects uint16_t"},
		{Keyval, `{"driver":"d","u16":"70000"}`, "Parameter 'u16' expects uint16_t"},
		{Keyval, `{"driver":"d","i32":"0x80000000"}`, "Parameter 'i32' expects int32_t"},
		{Keyval, `{"driver":"d","f":"x"}`, "Parameter 'f' expects number"},
		{Keyval, `{"driver":"d","size":"x"}`, "Parameter 'size' expects size"},
		{Keyval, `{"driver":"d","size":"-1"}`, "Parameter 'size' expects size"},
		{Keyval, `{"driver":"d","size":"16E"}`, "Parameter 'size' expects size"},
		{Keyval, `{"driver":"d","server":[{"host":{"a":"b"}}]}`, "Parameters 'server[0].host.*' are unexpected"},
		{JSON, `{"driver":"d","file":1}`, "Invalid parameter type for 'file', expected: object"},
	}
	for _, tc := range tests {
		var o allKinds
		err := Decode(jsonTree(t, tc.src), &o, tc.mode)
		if err == nil {
			t.Errorf("%v %s: no error, want %q", tc.mode, tc.src, tc.want)
			continue
		}
		var qe *Error
		if !errors.As(err, &qe) || qe.Class != GenericError {
			t.Errorf("%v %s: error %T %v is not a GenericError *Error", tc.mode, tc.src, err, err)
		}
		if err.Error() != tc.want {
			t.Errorf("%v %s:\n got %q\nwant %q", tc.mode, tc.src, err.Error(), tc.want)
		}
	}
}

func TestDecodeBadDst(t *testing.T) {
	var s string
	if err := Decode(map[string]any{}, &s, JSON); err == nil {
		t.Error("Decode into *string succeeded")
	}
	if err := Decode(map[string]any{}, allKinds{}, JSON); err == nil {
		t.Error("Decode into a non-pointer succeeded")
	}
	var ch struct {
		C chan int `qapi:"c"`
	}
	if err := Decode(map[string]any{"c": "x"}, &ch, JSON); err == nil {
		t.Error("Decode into a chan succeeded")
	}
}

func TestDecodeValue(t *testing.T) {
	var l []server
	err := DecodeValue([]any{map[string]any{"host": "a"}, map[string]any{}}, &l, JSON, "addr")
	if err == nil || err.Error() != "Parameter 'addr[1].host' is missing" {
		t.Fatalf("err %v", err)
	}
	var sz Size
	if err := DecodeValue("64k", &sz, Keyval, "size"); err != nil || sz != 65536 {
		t.Fatalf("size %d err %v", sz, err)
	}
}
