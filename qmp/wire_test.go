package qmp

import (
	"encoding/json"
	"strings"
	"testing"

	"blockbackend/qmp/qapi"
)

// split feeds input in one piece and returns each emitted value (encoded
// compactly, without line ending) or error text.
func split(t testing.TB, input string) []string {
	t.Helper()
	var out []string
	var s streamer
	s.feed([]byte(input), func(v any, err error) {
		if err != nil {
			out = append(out, "ERR "+err.Error())
			return
		}
		out = append(out, strings.TrimSuffix(string(encode(v, false)), "\r\n"))
	})
	return out
}

func TestStreamerSplitting(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{`{"a": 1}{"b": 2}`, []string{`{"a": 1}`, `{"b": 2}`}},
		{"  {\"a\":\n[1,2]}\r\n", []string{`{"a": [1, 2]}`}},
		{"1 2\n", []string{"1", "2"}},
		{`{"a": 1`, nil}, // unbalanced: waits
		{`garbage`, nil}, // a keyword ends only with the next byte
		{"garbage\n", []string{"ERR JSON parse error, invalid keyword 'garbage'"}},
		{"}\n", []string{"ERR JSON parse error, expecting value"}},
		{"]\n", []string{"ERR JSON parse error, expecting value"}},
		{`{"a" 1}`, []string{"ERR JSON parse error, missing : in object pair"}},
		{`{"a":}`, []string{"ERR JSON parse error, expecting value"}},
		{`{"execute":"x"]`, []string{"ERR JSON parse error, expected separator in dict"}},
		{"tru\n", []string{"ERR JSON parse error, invalid keyword 'tru'"}},
		{"\x01\n", []string{"ERR JSON parse error, stray '\x01'"}},
		{`{"x": 01}`, []string{"ERR JSON parse error, stray '01'", "ERR JSON parse error, expecting value"}},
		{`{"x": -}`, []string{"ERR JSON parse error, stray '-}'"}},
		{`{"x": 1.}`, []string{"ERR JSON parse error, stray '1.}'"}},
		{`{"x": 1e}`, []string{"ERR JSON parse error, stray '1e}'"}},
		{`{"x": 1e+}`, []string{"ERR JSON parse error, stray '1e+}'"}},
		{`{"x": -a}`, []string{"ERR JSON parse error, stray '-a'", "ERR JSON parse error, expecting value"}},
		{`{"x": 12abc}`, []string{"ERR JSON parse error, expected separator in dict"}},
		{"{\"x\": \"\xff\"}", []string{"ERR JSON parse error, stray '\"\xff'", "ERR JSON parse error, expecting value"}},
		{"{\"x\": \"a\tb\"}", []string{"ERR JSON parse error, stray '\"a\t'", "ERR JSON parse error, expecting value"}},
		{`{,}`, []string{"ERR JSON parse error, expecting value"}},
		{`[}`, []string{"ERR JSON parse error, expecting value"}},
		{`{"a": 1,}`, []string{"ERR JSON parse error, expecting value"}},
		{`{"a": 1, "a": 2}`, []string{"ERR JSON parse error, duplicate key"}},
		{`{1: 2}`, []string{"ERR JSON parse error, key is not a string in object"}},
		{`{"a": 1 "b": 2}`, []string{"ERR JSON parse error, expected separator in dict"}},
		{`[1 2]`, []string{"ERR JSON parse error, expected separator in list"}},
		{`{"a"}`, []string{"ERR JSON parse error, missing : in object pair"}},
		{"True\n", []string{"ERR JSON parse error, stray 'T'"}},
		{"@\n", []string{"ERR JSON parse error, stray '@'"}},
		{`{"x": %d}`, []string{"ERR JSON parse error, stray '%'", "ERR JSON parse error, expecting value"}},
		{`{"x": "\x"}`, []string{"ERR JSON parse error, invalid escape sequence in string"}},
		{`{"x": "\u12"}`, []string{`ERR JSON parse error, \u12" is not a valid Unicode character`}},
		{`{"x": "\u12zz"}`, []string{`ERR JSON parse error, \u12zz is not a valid Unicode character`}},
		{`{"x": "\ud83d"}`, []string{`ERR JSON parse error, \ud83d is not a valid Unicode character`}},
		{`{"x": "\ud83dx"}`, []string{`ERR JSON parse error, \ud83d is not a valid Unicode character`}},
		{`{"x": "\ude00"}`, []string{`ERR JSON parse error, \ude00 is not a valid Unicode character`}},
		{`{"x": "\uffff"}`, []string{`ERR JSON parse error, \uffff is not a valid Unicode character`}},
		{"{\"x\": \"\xef\xbf\xbf\"}", []string{"ERR JSON parse error, invalid UTF-8 sequence in string"}},
		{"{\"x\": \"\xf4\x90\x80\x80\"}", []string{"ERR JSON parse error, invalid UTF-8 sequence in string"}},
		{"{\"x\": \"\xc3\"}", []string{"ERR JSON parse error, invalid UTF-8 sequence in string"}},
		{"{\"x\": \"\xed\xa0\x80\"}", []string{"ERR JSON parse error, invalid UTF-8 sequence in string"}},
		// After an error the lexer skips to a brace, bracket or control
		// character: "garbage" after '@' is not a second error.
		{"@garbage {\"a\": 1}", []string{"ERR JSON parse error, stray '@'", `{"a": 1}`}},
		{`{"execute": "q"} garbage {"execute": "q"}`, []string{`{"execute": "q"}`, "ERR JSON parse error, invalid keyword 'garbage'", `{"execute": "q"}`}},
		{`'single'`, []string{`"single"`}},
		{`{'a': 'x"y'}`, []string{`{"a": "x\"y"}`}},
		{`"\u0000"`, []string{`"\u0000"`}},
		{"\"\xc0\x80\"", []string{`"\u0000"`}},
		{`"\ud83d\ude00\u00e9"`, []string{`"\uD83D\uDE00\u00E9"`}},
		{"\xfe\n", []string{"ERR JSON parse error, stray '\xfe'"}},
		{"null", nil},
		{"null ", []string{"null"}},
	}
	for _, tc := range tests {
		got := split(t, tc.in)
		if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("%q:\n got %q\nwant %q", tc.in, got, tc.want)
		}
	}
}

// Byte-at-a-time feeding gives the same result as one piece.
func TestStreamerChunking(t *testing.T) {
	in := `{"execute": "a", "id": [1, {"b": "c\"}"}]} garbage {"x": 01} [1,2] 'q' {"y": -3.5e+2}` + "\n"
	whole := split(t, in)
	var bytewise []string
	var s streamer
	for i := 0; i < len(in); i++ {
		s.feed([]byte{in[i]}, func(v any, err error) {
			if err != nil {
				bytewise = append(bytewise, "ERR "+err.Error())
				return
			}
			bytewise = append(bytewise, strings.TrimSuffix(string(encode(v, false)), "\r\n"))
		})
	}
	if strings.Join(whole, "\n") != strings.Join(bytewise, "\n") {
		t.Errorf("whole %q\nbytewise %q", whole, bytewise)
	}
	if len(whole) != 7 {
		t.Errorf("got %d items: %q", len(whole), whole)
	}
}

func TestStreamerLimits(t *testing.T) {
	deep := strings.Repeat("[", maxNesting+1)
	got := split(t, deep)
	if len(got) != 1 || got[0] != "ERR JSON nesting depth limit exceeded" {
		t.Errorf("nesting: %q", got)
	}
	ok := strings.Repeat("[", maxNesting) + strings.Repeat("]", maxNesting)
	if got := split(t, ok); len(got) != 1 || strings.HasPrefix(got[0], "ERR") {
		t.Errorf("nesting at the limit refused: %.80q", got)
	}
}

// Numbers are printed as QEMU prints the QNum it parsed them to.
func TestFormatNumber(t *testing.T) {
	tests := map[string]string{
		"0": "0", "-0": "0", "1500": "1500", "1.50e3": "1500", "2.0": "2",
		"0.1": "0.10000000000000001", "1e100": "1e+100", "-0.0": "-0",
		"18446744073709551615": "18446744073709551615", "18446744073709551616": "1.8446744073709552e+19",
		"-9223372036854775808": "-9223372036854775808", "-9223372036854775809": "-9.2233720368547758e+18",
		"1E5": "100000", "1e-7": "9.9999999999999995e-08", "123456789012": "123456789012",
		"1e400": "inf", "-1e400": "-inf", "1e-400": "0",
	}
	for in, want := range tests {
		if got := formatNumber(in); got != want {
			t.Errorf("formatNumber(%s) = %s, want %s", in, got, want)
		}
	}
}

func TestEncodeStrings(t *testing.T) {
	got := string(encode("a/b\t\x01\x7f\"<>&'\\é\U0001F600\xff", false))
	want := `"a/b\t\u0001\u007F\"<>&'\\\u00E9\uD83D\uDE00\uFFFD"` + "\r\n"
	if got != want {
		t.Errorf("got %s want %s", got, want)
	}
}

// QEMU prints dictionaries in its hash table's order.
func TestEncodeMemberOrder(t *testing.T) {
	v, err := toTree(map[string]any{"return": map[string]any{}, "id": 1})
	if err != nil {
		t.Fatal(err)
	}
	if got := string(encode(v, false)); got != "{\"return\": {}, \"id\": 1}\r\n" {
		t.Errorf("got %q", got)
	}
	type triple struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	}
	v, _ = toTree(triple{7, 2, 22})
	if got := string(encode(v, false)); got != "{\"micro\": 22, \"minor\": 2, \"major\": 7}\r\n" {
		t.Errorf("got %q", got)
	}
	v, _ = toTree(map[string]any{"error": map[string]any{"class": "C", "desc": "D"}, "id": []any{json.Number("1")}})
	if got := string(encode(v, false)); got != "{\"id\": [1], \"error\": {\"class\": \"C\", \"desc\": \"D\"}}\r\n" {
		t.Errorf("got %q", got)
	}
}

func TestEncodePretty(t *testing.T) {
	tree := split(t, `{"return": {}, "id": [1, [], {}, {"a": [2]}]}`)
	if len(tree) != 1 {
		t.Fatal(tree)
	}
	var v any
	var s streamer
	s.feed([]byte(`{"return": {}, "id": [1, [], {}, {"a": [2]}]}`), func(x any, err error) { v = x })
	got := string(encode(v, true))
	want := "{\r\n    \"return\": {\r\n    },\r\n    \"id\": [\r\n        1,\r\n        [\r\n        ],\r\n        {\r\n        },\r\n        {\r\n            \"a\": [\r\n                2\r\n            ]\r\n        }\r\n    ]\r\n}\r\n"
	if got != want {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

func TestQDictBucket(t *testing.T) {
	// Buckets computed from QEMU's observed orders: micro and minor share
	// one, and id sorts between return and error.
	if qapi.QDictBucket("micro") != qapi.QDictBucket("minor") || qapi.QDictBucket("return") >= qapi.QDictBucket("id") || qapi.QDictBucket("id") >= qapi.QDictBucket("error") {
		t.Error("bucket order does not match QEMU's")
	}
}
