package keyval

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"blockbackend/qmp/qapi"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in, implied string
		want        map[string]any
	}{
		{"", "", map[string]any{}},
		{"", "driver", map[string]any{}},
		{"a=1", "", map[string]any{"a": "1"}},
		{"a=1,", "", map[string]any{"a": "1"}},
		{"a=", "", map[string]any{"a": ""}},
		{"a=x=y", "", map[string]any{"a": "x=y"}},
		{"a=1,,2", "", map[string]any{"a": "1,2"}},
		{"a=1,,", "", map[string]any{"a": "1,"}},
		{"a=1,,,", "", map[string]any{"a": "1,"}},
		{"a=1,a=2", "", map[string]any{"a": "2"}},
		{"driver=qcow2,file.driver=file,file.filename=a.qcow2", "", map[string]any{
			"driver": "qcow2", "file": map[string]any{"driver": "file", "filename": "a.qcow2"}}},
		{"secret,id=s0,data=x", "qom-type", map[string]any{"qom-type": "secret", "id": "s0", "data": "x"}},
		{"socket,id=c", "backend", map[string]any{"backend": "socket", "id": "c"}},
		{"file,filename=x", "driver", map[string]any{"driver": "file", "filename": "x"}},
		{"null:co,node-name=n", "driver", map[string]any{"driver": "null:co", "node-name": "n"}},
		{"a.b,x=1", "driver", map[string]any{"driver": "a.b", "x": "1"}},
		{"null-co,driver=raw", "driver", map[string]any{"driver": "raw"}},
		{"null-co=,node-name=n", "driver", map[string]any{"null-co": "", "node-name": "n"}},
		{"x", "driver", map[string]any{"driver": "x"}},
		{"server.0.host=a,server.1.host=b,server.1.port=1", "", map[string]any{
			"server": []any{map[string]any{"host": "a"}, map[string]any{"host": "b", "port": "1"}}}},
		{"l.1=b,l.0=a", "", map[string]any{"l": []any{"a", "b"}}},
		{"l.0.0=a,l.0.1=b", "", map[string]any{"l": []any{[]any{"a", "b"}}}},
		{"A_b-c=1", "", map[string]any{"A_b-c": "1"}},
		{"a." + strings.Repeat("b", 127) + "=1", "", map[string]any{"a": map[string]any{strings.Repeat("b", 127): "1"}}},
	}
	for _, tc := range tests {
		got, err := Parse(tc.in, tc.implied)
		if err != nil {
			t.Errorf("Parse(%q, %q): %v", tc.in, tc.implied, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Parse(%q, %q) = %#v, want %#v", tc.in, tc.implied, got, tc.want)
		}
	}
}

// The wording is what qemu-storage-daemon 7.2 prints for the same input.
func TestParseErrors(t *testing.T) {
	tests := []struct{ in, implied, want string }{
		{"null-co,node-name=n,x", "driver", "Expected '=' after parameter 'x'"},
		{"node-name=n,null-co", "driver", "Expected '=' after parameter 'null-co'"},
		{"a=1,b", "", "Expected '=' after parameter 'b'"},
		{"a", "", "Expected '=' after parameter 'a'"},
		{"null-co,,node-name=n", "driver", "Invalid parameter ''"},
		{",", "", "Invalid parameter ''"},
		{",node-name=n", "driver", "Invalid parameter ''"},
		{"=x,node-name=n", "driver", "Invalid parameter ''"},
		{"a..b=1", "", "Invalid parameter 'a..b'"},
		{".a=1", "", "Invalid parameter '.a'"},
		{"a.=1", "", "Invalid parameter 'a.'"},
		{"0=x", "", "Invalid parameter '0'"},
		{"_a=x", "", "Invalid parameter '_a'"},
		{"-a=x", "", "Invalid parameter '-a'"},
		{"a.0b=x", "", "Invalid parameter 'a.0b'"},
		{"a.-b=x", "", "Invalid parameter 'a.-b'"},
		{"a:b=c,node-name=n", "driver", "Invalid parameter 'a:b'"},
		{"a b=x", "", "Invalid parameter 'a b'"},
		{"a€=x", "", "Invalid parameter 'a€'"},
		{strings.Repeat("a", 128) + "=x", "", "Parameter '" + strings.Repeat("a", 128) + "' is too long"},
		{"a." + strings.Repeat("a", 128) + "=x", "", "Parameter fragment '" + strings.Repeat("a", 128) + "' is too long"},
		{"cache.direct=on,cache=x", "", "Parameters 'cache.*' used inconsistently"},
		{"cache=x,cache.direct=on", "", "Parameters 'cache.*' used inconsistently"},
		{"c.0=a,c.0.x=b", "", "Parameters 'c.0.*' used inconsistently"},
		{"c.0=a,c.x=b", "", "Parameters 'c.*' used inconsistently"},
		{"c.0=a,c.1=b,c=x", "", "Parameters 'c.*' used inconsistently"},
		{"c.0=a,c.2=b", "", "Parameter 'c.1' missing"},
		{"a.1=x", "", "Parameter 'a.0' missing"},
		{"c.00=a,c.0=b", "", "Parameter 'c.1' missing"},
		{"c.99999999999999999999999=a", "", "Parameter 'c.0' missing"},
	}
	for _, tc := range tests {
		_, err := Parse(tc.in, tc.implied)
		if err == nil {
			t.Errorf("Parse(%q, %q): no error, want %q", tc.in, tc.implied, tc.want)
			continue
		}
		var qe *qapi.Error
		if !errors.As(err, &qe) || qe.Class != qapi.GenericError {
			t.Errorf("Parse(%q): %T is not a *qapi.Error", tc.in, err)
		}
		if err.Error() != tc.want {
			t.Errorf("Parse(%q, %q):\n got %q\nwant %q", tc.in, tc.implied, err.Error(), tc.want)
		}
	}
}

func TestFormatRoundTrip(t *testing.T) {
	for _, s := range []string{
		"driver=qcow2,file.driver=file,file.filename=a,,b.qcow2",
		"server.0.host=a,server.1.host=b,x=,y=1,,",
		"l.0.0=a,l.0.1=b,l.1.z==",
	} {
		m, err := Parse(s, "")
		if err != nil {
			t.Fatal(err)
		}
		f := Format(m)
		m2, err := Parse(f, "")
		if err != nil {
			t.Fatalf("reparse %q: %v", f, err)
		}
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("%q → %q: %v != %v", s, f, m, m2)
		}
	}
	if got := Format(map[string]any{"b": true, "n": json.Number("5"), "z": nil, "e": map[string]any{}}); got != "b=on,n=5,z=" {
		t.Fatalf("Format typed leaves = %q", got)
	}
}

func TestParseOption(t *testing.T) {
	m, isJSON, err := ParseOption(`{"driver":"null-co","size":1024,"cache.direct":true,"l":[1,{"a":null}]}`, "driver")
	if err != nil || !isJSON {
		t.Fatalf("json: %v %v", isJSON, err)
	}
	want := map[string]any{"driver": "null-co", "size": json.Number("1024"), "cache.direct": true,
		"l": []any{json.Number("1"), map[string]any{"a": nil}}}
	if !reflect.DeepEqual(m, want) {
		t.Fatalf("got %#v", m)
	}
	m, isJSON, err = ParseOption("null-co,size=1k", "driver")
	if err != nil || isJSON || m["driver"] != "null-co" || m["size"] != "1k" {
		t.Fatalf("keyval: %v %v %v", m, isJSON, err)
	}
	// A leading space means keyval, as in QEMU.
	if _, isJSON, _ := ParseOption(` {"a":1}`, ""); isJSON {
		t.Fatal("leading space taken as JSON")
	}
	for in, want := range map[string]string{
		`{"driver":"null-co","node-name":"n", "driver":"bogus"}`: "JSON parse error, duplicate key",
		`{"driver":"null-co"},`:                                  "Expecting at most one JSON value",
		`{"a":1} x`:                                              "Expecting at most one JSON value",
		`{bad`:                                                   "JSON parse error, invalid character 'b'…",
		`{"a":`:                                                  "JSON parse error, unexpected end of input",
		`{`:                                                      "JSON parse error, unexpected end of input",
		strings.Repeat("[", 2000):                                "",
		`{"a":` + strings.Repeat("[", 2000) + strings.Repeat("]", 2000) + `}`: "JSON parse error, too many nested data structures",
	} {
		if !strings.HasPrefix(in, "{") {
			in = "{\"x\":" + in + "}"
			want = "JSON parse error, too many nested data structures"
		}
		_, _, err := ParseOption(in, "")
		if !errMatches(err, want) {
			t.Errorf("ParseOption(%.40q) error %v, want %q", in, err, want)
		}
	}
}

func TestParseJSONFilename(t *testing.T) {
	if _, ok, err := ParseJSONFilename("/tmp/a.qcow2"); ok || err != nil {
		t.Fatal("plain filename taken as json:")
	}
	m, ok, err := ParseJSONFilename(`json:{"driver":"raw","file.driver":"file","file":{"filename":"/x"},"children.0.a":1,"children.1":{"b":2},"e":[]}`)
	if !ok || err != nil {
		t.Fatal(ok, err)
	}
	want := map[string]any{"driver": "raw", "file": map[string]any{"driver": "file", "filename": "/x"},
		"children": []any{map[string]any{"a": json.Number("1")}, map[string]any{"b": json.Number("2")}}, "e": []any{}}
	if !reflect.DeepEqual(m, want) {
		t.Fatalf("got %#v", m)
	}
	// The nested object wins over a dotted key, whatever the order (QEMU 7.2).
	for _, s := range []string{
		`json:{"file":{"driver":"null-co"},"file.driver":"file"}`,
		`json:{"file.driver":"file","file":{"driver":"null-co"}}`,
	} {
		m, _, err := ParseJSONFilename(s)
		if err != nil || m["file"].(map[string]any)["driver"] != "null-co" {
			t.Fatalf("%s: %v %v", s, m, err)
		}
	}
	for in, want := range map[string]string{
		`json:[1]`:                       "Invalid JSON object given",
		`json:"x"`:                       "Invalid JSON object given",
		`json:{bad`:                      "Could not parse the JSON options: JSON parse error, invalid character 'b'…",
		`json:{"a":1} x`:                 "Could not parse the JSON options: Expecting at most one JSON value",
		`json:{"a":1,"a":2}`:             "Could not parse the JSON options: JSON parse error, duplicate key",
		`json:{"file":"x","file.a":"y"}`: "Parameters 'file.*' used inconsistently",
		`json:{"c":{"1":"x"}}`:           "Parameter 'c.0' missing",
		`json:`:                          "Could not parse the JSON options: JSON parse error, unexpected end of input",
	} {
		_, ok, err := ParseJSONFilename(in)
		if !ok || !errMatches(err, want) {
			t.Errorf("ParseJSONFilename(%q) = %v, %v; want %q", in, ok, err, want)
		}
	}
}

// TestDecodeParsed runs the whole path: keyval text → tree → struct.
func TestDecodeParsed(t *testing.T) {
	type file struct {
		Driver   string `qapi:"driver"`
		Filename string `qapi:"filename"`
	}
	type opts struct {
		Driver   string    `qapi:"driver"`
		ReadOnly bool      `qapi:"read-only,optional"`
		Size     qapi.Size `qapi:"size,optional"`
		File     file      `qapi:"file"`
	}
	m, isJSON, err := ParseOption("qcow2,read-only=on,size=1.5G,file.driver=file,file.filename=a,,b", "driver")
	if err != nil {
		t.Fatal(err)
	}
	mode := qapi.Keyval
	if isJSON {
		mode = qapi.JSON
	}
	var o opts
	if err := qapi.Decode(m, &o, mode); err != nil {
		t.Fatal(err)
	}
	if o.Driver != "qcow2" || !o.ReadOnly || o.Size != 3<<29 || o.File.Filename != "a,b" {
		t.Fatalf("%+v", o)
	}
	m, _, _ = ParseOption("qcow2,file.driver=file", "driver")
	if err := qapi.Decode(m, &o, qapi.Keyval); err == nil || err.Error() != "Parameter 'file.filename' is missing" {
		t.Fatalf("err %v", err)
	}
}

// errMatches compares an error's text with want; a want ending in "…" is a
// prefix (the rest is Go's JSON error text, which changes between releases).
func errMatches(err error, want string) bool {
	if err == nil {
		return false
	}
	if p, ok := strings.CutSuffix(want, "…"); ok {
		return strings.HasPrefix(err.Error(), p)
	}
	return err.Error() == want
}
