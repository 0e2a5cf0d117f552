package qapi

import (
	"sort"
	"strconv"
	"strings"
)

// Clone returns a deep copy of m: nested map[string]any and []any are
// copied, other values (strings, numbers, bools) are shared.
func Clone(m map[string]any) map[string]any {
	if m == nil {
		return nil
	}
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = cloneValue(v)
	}
	return out
}

func cloneValue(v any) any {
	switch t := v.(type) {
	case map[string]any:
		return Clone(t)
	case []any:
		if t == nil {
			return t
		}
		l := make([]any, len(t))
		for i, e := range t {
			l[i] = cloneValue(e)
		}
		return l
	}
	return v
}

// Merge fills dst with the members of src that dst lacks, recursively
// where both hold an object: options given explicitly win over defaults.
// Values copied from src are cloned, so dst never aliases src.
func Merge(dst, src map[string]any) {
	if dst == nil {
		return
	}
	for k, sv := range src {
		dv, ok := dst[k]
		if !ok {
			dst[k] = cloneValue(sv)
			continue
		}
		dm, dok := dv.(map[string]any)
		sm, sok := sv.(map[string]any)
		if dok && sok {
			Merge(dm, sm)
		}
	}
}

// Flatten turns a nested tree into one level with dotted keys, as QEMU's
// qdict_flatten does: {"file": {"driver": "file"}} → {"file.driver":
// "file"}; list elements are numbered: {"server": [{"host": "a"}]} →
// {"server.0.host": "a"}. Empty objects and lists are kept as values so
// that Unflatten gives them back. Where a dotted key of m and a flattened
// nested member name the same key, the nested member wins (QEMU 7.2 does
// so for json: filenames, whatever the order).
func Flatten(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	flattenInto(out, "", m)
	return out
}

func flattenInto(out map[string]any, prefix string, m map[string]any) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	// Scalars first, then containers, so that containers override.
	for _, k := range keys {
		if !isContainer(m[k]) {
			out[prefix+k] = m[k]
		}
	}
	for _, k := range keys {
		if isContainer(m[k]) {
			flattenValue(out, prefix+k, m[k])
		}
	}
}

func isContainer(v any) bool {
	switch t := v.(type) {
	case map[string]any:
		return len(t) > 0
	case []any:
		return len(t) > 0
	}
	return false
}

func flattenValue(out map[string]any, key string, v any) {
	switch t := v.(type) {
	case map[string]any:
		if len(t) > 0 {
			flattenInto(out, key+".", t)
			return
		}
	case []any:
		if len(t) > 0 {
			lm := make(map[string]any, len(t))
			for i, e := range t {
				lm[strconv.Itoa(i)] = e
			}
			flattenInto(out, key+".", lm)
			return
		}
	}
	out[key] = v
}

// Unflatten is the inverse of Flatten (QEMU's qdict_crumple): dotted keys
// become nested objects, and an object whose keys are all decimal indices
// 0..n-1 becomes a list. Values that are already objects are merged in
// (flat := Flatten(flat) first), so partly nested input works. A key used
// both as a value and as the prefix of other keys, a mix of index and
// name keys, and a gap in the indices are errors worded as QEMU's keyval
// parser words them.
func Unflatten(flat map[string]any) (map[string]any, error) {
	f := Flatten(flat)
	keys := make([]string, 0, len(f))
	for k := range f {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	root := map[string]any{}
	for _, k := range keys {
		parts := strings.Split(k, ".")
		cur := root
		for i, p := range parts[:len(parts)-1] {
			next, exists := cur[p]
			if !exists {
				nm := map[string]any{}
				cur[p] = nm
				cur = nm
				continue
			}
			nm, ok := next.(map[string]any)
			if !ok || (len(nm) == 0 && isEmptyLeaf(f, parts[:i+1])) {
				return nil, errorf("Parameters '%s.*' used inconsistently", strings.Join(parts[:i+1], "."))
			}
			cur = nm
		}
		last := parts[len(parts)-1]
		if _, exists := cur[last]; exists {
			return nil, errorf("Parameters '%s.*' used inconsistently", k)
		}
		cur[last] = f[k]
	}
	out, err := Listify(root, "")
	if err != nil {
		return nil, err
	}
	return out.(map[string]any), nil
}

// isEmptyLeaf reports whether the key made of parts holds an empty object
// or list as a value of its own (and so cannot also be a prefix).
func isEmptyLeaf(f map[string]any, parts []string) bool {
	_, ok := f[strings.Join(parts, ".")]
	return ok
}

// Listify turns, recursively, every object of m whose keys are all
// decimal indices into a list, as QEMU's keyval parser does after parsing
// ("server.0.host=a,server.1.host=b"). path is the dotted name of m, for
// errors: "Parameters 'x.*' used inconsistently" for a mix of index and
// name keys, "Parameter 'x.1' missing" for a gap. The maps of m are
// modified in place; the result is m or a list.
func Listify(m map[string]any, path string) (any, error) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if sub, ok := m[k].(map[string]any); ok && len(sub) > 0 {
			v, err := Listify(sub, join(path, k))
			if err != nil {
				return nil, err
			}
			m[k] = v
		}
	}
	if len(m) == 0 || path == "" {
		return m, nil
	}
	indices := 0
	for _, k := range keys {
		if isIndex(k) {
			indices++
		}
	}
	if indices == 0 {
		return m, nil
	}
	if indices != len(m) {
		return nil, errorf("Parameters '%s.*' used inconsistently", path)
	}
	l := make([]any, len(m))
	set := make([]bool, len(m))
	for _, k := range keys {
		i, err := strconv.Atoi(k)
		if err != nil || i < 0 || i >= len(l) || set[i] {
			continue // out of range or a duplicate ("0" and "00"): a gap shows below
		}
		l[i], set[i] = m[k], true
	}
	for i, ok := range set {
		if !ok {
			return nil, errorf("Parameter '%s.%d' missing", path, i)
		}
	}
	return l, nil
}

func isIndex(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if k[i] < '0' || k[i] > '9' {
			return false
		}
	}
	return true
}
