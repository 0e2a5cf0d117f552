package qapi

import (
	"reflect"
	"strings"
	"sync"
)

// Member describes one QAPI member of a struct type, as read from its
// `qapi` tags, with embedded (base) structs already flattened.
type Member struct {
	// Name is the member's QAPI name ("node-name").
	Name string
	// Optional is set by the "optional" tag option.
	Optional bool
	// Type is the Go type of the field.
	Type reflect.Type
	// Index is the field's index sequence, for reflect.Value.FieldByIndex.
	Index []int
}

// typeInfo is what the decoder needs to know about a struct type.
type typeInfo struct {
	members []Member
	byName  map[string]int
	rest    []int // index of the ",rest" field, nil if none
}

var typeCache sync.Map // reflect.Type → *typeInfo

// Members returns the QAPI members of struct type t (or of the struct a
// pointer type points to), in declaration order with embedded bases
// expanded where they are declared. A name declared at a shallower depth
// hides the same name in an embedded base, as Go's field promotion does.
// The ",rest" field is not a member (see HasRest). Non-struct types have no
// members.
func Members(t reflect.Type) []Member {
	ti := infoOf(t)
	if ti == nil {
		return nil
	}
	out := make([]Member, len(ti.members))
	for i, m := range ti.members {
		m.Index = append([]int(nil), m.Index...)
		out[i] = m
	}
	return out
}

// HasRest reports whether struct type t collects unknown members in a
// `qapi:",rest"` field (a flat union's base), i.e. whether it accepts
// members that Members does not list.
func HasRest(t reflect.Type) bool {
	ti := infoOf(t)
	return ti != nil && ti.rest != nil
}

func infoOf(t reflect.Type) *typeInfo {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	if v, ok := typeCache.Load(t); ok {
		return v.(*typeInfo)
	}
	ti := buildInfo(t)
	v, _ := typeCache.LoadOrStore(t, ti)
	return v.(*typeInfo)
}

type candidate struct {
	m     Member
	depth int
}

func buildInfo(t reflect.Type) *typeInfo {
	ti := &typeInfo{byName: map[string]int{}}
	var cands []candidate
	restDepth := -1
	var walk func(t reflect.Type, prefix []int, depth int, seen map[reflect.Type]bool)
	walk = func(t reflect.Type, prefix []int, depth int, seen map[reflect.Type]bool) {
		if seen[t] {
			return // a cycle through embedded pointers: Go forbids it for values, be safe anyway
		}
		seen[t] = true
		defer delete(seen, t)
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			idx := append(append([]int(nil), prefix...), i)
			tag, hasTag := f.Tag.Lookup("qapi")
			if tag == "-" {
				continue
			}
			if !hasTag {
				// Only untagged embedded structs are members: they are the
				// QAPI base whose members are flattened into ours.
				if f.Anonymous {
					ft := f.Type
					if ft.Kind() == reflect.Pointer {
						ft = ft.Elem()
					}
					if ft.Kind() == reflect.Struct {
						walk(ft, idx, depth+1, seen)
					}
				}
				continue
			}
			if !f.IsExported() {
				continue
			}
			name, opts, _ := strings.Cut(tag, ",")
			optional, rest := false, false
			for _, o := range strings.Split(opts, ",") {
				switch o {
				case "optional":
					optional = true
				case "rest":
					rest = true
				}
			}
			if rest {
				if f.Type == reflect.TypeOf(map[string]any(nil)) && (restDepth < 0 || depth < restDepth) {
					ti.rest, restDepth = idx, depth
				}
				continue
			}
			if name == "" {
				continue
			}
			cands = append(cands, candidate{Member{Name: name, Optional: optional, Type: f.Type, Index: idx}, depth})
		}
	}
	walk(t, nil, 0, map[reflect.Type]bool{})
	minDepth := map[string]int{}
	for _, c := range cands {
		if d, ok := minDepth[c.m.Name]; !ok || c.depth < d {
			minDepth[c.m.Name] = c.depth
		}
	}
	for _, c := range cands {
		if _, dup := ti.byName[c.m.Name]; dup || c.depth != minDepth[c.m.Name] {
			continue
		}
		ti.byName[c.m.Name] = len(ti.members)
		ti.members = append(ti.members, c.m)
	}
	return ti
}
