package qapi

import (
	"encoding/json"
	"reflect"
	"testing"
)

func TestFlattenUnflatten(t *testing.T) {
	nested := map[string]any{
		"driver": "qcow2",
		"file":   map[string]any{"driver": "file", "filename": "a"},
		"server": []any{map[string]any{"host": "a"}, map[string]any{"host": "b", "port": json.Number("1")}},
		"l":      []any{[]any{"x"}},
		"empty":  map[string]any{},
		"none":   []any{},
		"null":   nil,
	}
	flat := Flatten(nested)
	want := map[string]any{
		"driver": "qcow2", "file.driver": "file", "file.filename": "a",
		"server.0.host": "a", "server.1.host": "b", "server.1.port": json.Number("1"),
		"l.0.0": "x", "empty": map[string]any{}, "none": []any{}, "null": nil,
	}
	if !reflect.DeepEqual(flat, want) {
		t.Fatalf("Flatten = %#v", flat)
	}
	back, err := Unflatten(flat)
	if err != nil || !reflect.DeepEqual(back, nested) {
		t.Fatalf("Unflatten = %#v, %v", back, err)
	}
	// Partly nested input; the nested object wins over a dotted key.
	back, err = Unflatten(map[string]any{"file.driver": "file", "file": map[string]any{"driver": "null-co", "x": "1"}})
	if err != nil || !reflect.DeepEqual(back, map[string]any{"file": map[string]any{"driver": "null-co", "x": "1"}}) {
		t.Fatalf("Unflatten = %#v, %v", back, err)
	}
	for in, want := range map[string]map[string]any{
		"Parameters 'a.*' used inconsistently":   {"a": "x", "a.b": "y"},
		"Parameters 'a.b.*' used inconsistently": {"a.b": "x", "a.b.c": "y"},
		"Parameters 'e.*' used inconsistently":   {"e": map[string]any{}, "e.x": "y"},
		"Parameters 'l.*' used inconsistently":   {"l.0": "x", "l.y": "y"},
		"Parameter 'l.1' missing":                {"l.0": "x", "l.2": "y"},
	} {
		if _, err := Unflatten(want); err == nil || err.Error() != in {
			t.Errorf("Unflatten(%v) error %v, want %q", want, err, in)
		}
	}
	// The top level stays an object even with index keys.
	if m, err := Unflatten(map[string]any{"0": "x"}); err != nil || m["0"] != "x" {
		t.Fatalf("%v %v", m, err)
	}
}

func TestMergeClone(t *testing.T) {
	src := map[string]any{"a": "1", "c": map[string]any{"x": "1", "y": "2"}, "l": []any{"p"}}
	dst := map[string]any{"a": "0", "c": map[string]any{"x": "0"}}
	Merge(dst, src)
	want := map[string]any{"a": "0", "c": map[string]any{"x": "0", "y": "2"}, "l": []any{"p"}}
	if !reflect.DeepEqual(dst, want) {
		t.Fatalf("Merge = %#v", dst)
	}
	dst["l"].([]any)[0] = "changed"
	if src["l"].([]any)[0] != "p" {
		t.Fatal("Merge aliased src")
	}
	c := Clone(src)
	c["c"].(map[string]any)["x"] = "changed"
	if src["c"].(map[string]any)["x"] != "1" || !reflect.DeepEqual(Clone(nil), map[string]any(nil)) {
		t.Fatal("Clone aliased")
	}
	Merge(nil, src) // no panic
}

type baseA struct {
	Driver string `qapi:"driver"`
	Shadow string `qapi:"shadow,optional"`
}

type withBase struct {
	baseA
	*PtrBase
	Shadow int            `qapi:"shadow"`
	Own    *bool          `qapi:"own,optional"`
	Skip   string         `qapi:"-"`
	NoTag  string         // not a member
	Rest   map[string]any `qapi:",rest"`
}

type PtrBase struct {
	Extra string `qapi:"extra,optional"`
}

func TestMembers(t *testing.T) {
	ms := Members(reflect.TypeOf(&withBase{}))
	var names []string
	for _, m := range ms {
		names = append(names, m.Name)
	}
	if !reflect.DeepEqual(names, []string{"driver", "extra", "shadow", "own"}) {
		t.Fatalf("names %v", names)
	}
	if ms[2].Type.Kind() != reflect.Int || ms[2].Optional || !ms[3].Optional || ms[1].Index[0] != 1 {
		t.Fatalf("%+v", ms)
	}
	if !HasRest(reflect.TypeOf(withBase{})) || HasRest(reflect.TypeOf(baseA{})) || Members(reflect.TypeOf(1)) != nil {
		t.Fatal("HasRest / non-struct")
	}
	var w withBase
	if err := Decode(map[string]any{"driver": "d", "shadow": json.Number("3"), "extra": "e", "zz": "1"}, &w, JSON); err != nil {
		t.Fatal(err)
	}
	if w.Driver != "d" || w.Shadow != 3 || w.PtrBase == nil || w.Extra != "e" || w.Rest["zz"] != "1" {
		t.Fatalf("%+v", w)
	}
}
