package keyval

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// Format writes a tree back in keyval syntax, keys sorted, commas in
// values doubled: Parse(Format(m), "") gives m back for every m that Parse
// returned. Leaves that are not strings are written as keyval would spell
// them (bools on/off, numbers as their text, null as an empty value);
// empty objects and lists have no keyval spelling and are left out.
func Format(m map[string]any) string {
	var parts []string
	formatMap(&parts, "", m)
	return strings.Join(parts, ",")
}

func formatMap(parts *[]string, prefix string, m map[string]any) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		formatValue(parts, prefix+k, m[k])
	}
}

func formatValue(parts *[]string, key string, v any) {
	var s string
	switch t := v.(type) {
	case map[string]any:
		formatMap(parts, key+".", t)
		return
	case []any:
		for i, e := range t {
			formatValue(parts, key+"."+strconv.Itoa(i), e)
		}
		return
	case string:
		s = t
	case bool:
		s = "off"
		if t {
			s = "on"
		}
	case nil:
		s = ""
	case json.Number:
		s = string(t)
	default:
		s = fmt.Sprint(t)
	}
	*parts = append(*parts, key+"="+strings.ReplaceAll(s, ",", ",,"))
}
