package img

import (
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"sort"
	"strconv"
	"strings"
)

// qemu-img prints JSON objects from QEMU's QDict, whose iteration order
// comes from a hash of the keys. These lists are the orders observed in
// qemu-img 7.2's output, one per kind of object; an object is printed in
// the order of the list that knows most of its keys.
var keyOrders = [][]string{
	// ImageInfo (info --output=json)
	{"backing-filename-format", "snapshots", "virtual-size", "filename", "cluster-size", "format",
		"actual-size", "format-specific", "full-backing-filename", "encrypted", "backing-filename",
		"dirty-flag", "backing-image"},
	// SnapshotInfo
	{"icount", "vm-clock-nsec", "name", "date-sec", "date-nsec", "vm-clock-sec", "id", "vm-state-size"},
	// ImageInfoSpecificQCow2 and the like
	{"compat", "compression-type", "lazy-refcounts", "bitmaps", "refcount-bits", "data-file",
		"data-file-raw", "encrypt", "corrupt", "extended-l2"},
	// Qcow2BitmapInfo
	{"flags", "name", "granularity"},
	// QCryptoBlockInfoLUKS
	{"ivgen-alg", "hash-alg", "cipher-alg", "uuid", "ivgen-hash-alg", "cipher-mode", "slots", "payload-offset", "master-key-iters"},
	// QCryptoBlockInfo of a qcow2 image's "encrypt" (LUKS: with format)
	{"ivgen-alg", "hash-alg", "cipher-alg", "uuid", "ivgen-hash-alg", "format", "cipher-mode", "slots",
		"payload-offset", "master-key-iters"},
	// QCryptoBlockInfoLUKSSlot
	{"active", "iters", "key-offset", "stripes"},
	// ImageCheck (check --output=json)
	{"image-end-offset", "total-clusters", "corruptions", "check-errors", "leaks",
		"allocated-clusters", "leaks-fixed", "corruptions-fixed", "fragmented-clusters",
		"compressed-clusters", "filename", "format"},
	// BlockMeasureInfo
	{"bitmaps", "required", "fully-allocated"},
	// ImageInfoSpecific
	{"type", "data"},
	// Block options in json: filenames
	{"offset", "driver", "filename", "size", "file", "key-secret"},
}

func orderKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	best, bestN := -1, 0
	for i, l := range keyOrders {
		n := 0
		for _, k := range l {
			if _, ok := m[k]; ok {
				n++
			}
		}
		if n > bestN {
			best, bestN = i, n
		}
	}
	rank := map[string]int{}
	if best >= 0 {
		for i, k := range keyOrders[best] {
			rank[k] = i + 1
		}
	}
	sort.Slice(keys, func(i, j int) bool {
		ri, rj := rank[keys[i]], rank[keys[j]]
		switch {
		case ri != 0 && rj != 0:
			return ri < rj
		case ri != 0:
			return true
		case rj != 0:
			return false
		}
		return keys[i] < keys[j]
	})
	return keys
}

// normalize turns structs and typed values into the generic tree
// (map[string]any, []any, scalars) via encoding/json.
func normalize(v any) any {
	switch v.(type) {
	case nil, string, bool, int, int64, uint64, json.Number, float64, map[string]any, []any:
		return v
	}
	rv := reflect.ValueOf(v)
	if rv.Kind() == reflect.Slice {
		out := make([]any, rv.Len())
		for i := range out {
			out[i] = rv.Index(i).Interface()
		}
		return out
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	var x any
	d := json.NewDecoder(strings.NewReader(string(b)))
	d.UseNumber()
	if d.Decode(&x) != nil {
		return fmt.Sprint(v)
	}
	return x
}

// writeJSON prints v as QEMU's pretty JSON printer does (4-space indent).
func writeJSON(w io.Writer, v any) {
	var sb strings.Builder
	encodeJSON(&sb, v, 0)
	sb.WriteString("\n")
	io.WriteString(w, sb.String())
}

func encodeJSON(sb *strings.Builder, v any, depth int) {
	ind := strings.Repeat("    ", depth)
	switch x := normalize(v).(type) {
	case map[string]any:
		if len(x) == 0 {
			sb.WriteString("{\n" + ind + "}")
			return
		}
		sb.WriteString("{\n")
		for i, k := range orderKeys(x) {
			if i > 0 {
				sb.WriteString(",\n")
			}
			sb.WriteString(ind + "    " + quote(k) + ": ")
			encodeJSON(sb, x[k], depth+1)
		}
		sb.WriteString("\n" + ind + "}")
	case []any:
		if len(x) == 0 {
			sb.WriteString("[\n" + ind + "]")
			return
		}
		sb.WriteString("[\n")
		for i, e := range x {
			if i > 0 {
				sb.WriteString(",\n")
			}
			sb.WriteString(ind + "    ")
			encodeJSON(sb, e, depth+1)
		}
		sb.WriteString("\n" + ind + "]")
	default:
		sb.WriteString(scalar(x, true))
	}
}

func quote(s string) string {
	var sb strings.Builder
	sb.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			sb.WriteString(`\"`)
		case r == '\\':
			sb.WriteString(`\\`)
		case r == '\n':
			sb.WriteString(`\n`)
		case r == '\t':
			sb.WriteString(`\t`)
		case r == '\r':
			sb.WriteString(`\r`)
		case r == '\b':
			sb.WriteString(`\b`)
		case r == '\f':
			sb.WriteString(`\f`)
		case r < 0x20 || r > 0x7e:
			if r > 0xffff {
				r1, r2 := utf16Pair(r)
				fmt.Fprintf(&sb, `\u%04X\u%04X`, r1, r2)
			} else {
				fmt.Fprintf(&sb, `\u%04X`, r)
			}
		default:
			sb.WriteRune(r)
		}
	}
	sb.WriteByte('"')
	return sb.String()
}

func utf16Pair(r rune) (rune, rune) {
	r -= 0x10000
	return 0xd800 + (r>>10)&0x3ff, 0xdc00 + r&0x3ff
}

func scalar(v any, jsonQuote bool) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case string:
		if jsonQuote {
			return quote(x)
		}
		return x
	case bool:
		return strconv.FormatBool(x)
	case float64:
		if x == float64(int64(x)) {
			return strconv.FormatInt(int64(x), 10)
		}
		return strconv.FormatFloat(x, 'g', 17, 64)
	}
	return fmt.Sprint(v)
}

// dumpHuman prints a tree as qemu-img's human output does for
// "Format specific information": keys with '-' shown as ' ', nested
// objects and lists indented by four spaces, list items as "[i]:".
func dumpHuman(w io.Writer, v any, indent int) {
	ind := strings.Repeat(" ", indent*4)
	switch x := normalize(v).(type) {
	case map[string]any:
		for _, k := range orderKeys(x) {
			name := strings.ReplaceAll(k, "-", " ")
			dumpItem(w, ind, name, x[k], indent)
		}
	case []any:
		for i, e := range x {
			dumpItem(w, ind, fmt.Sprintf("[%d]", i), e, indent)
		}
	default:
		fmt.Fprintf(w, "%s%s\n", ind, scalar(x, false))
	}
}

func dumpItem(w io.Writer, ind, name string, v any, indent int) {
	switch nv := normalize(v).(type) {
	case map[string]any, []any:
		fmt.Fprintf(w, "%s%s:\n", ind, name)
		dumpHuman(w, nv, indent+1)
	default:
		fmt.Fprintf(w, "%s%s: %s\n", ind, name, scalar(nv, false))
	}
}

// compactJSON is QEMU's one-line JSON (json: filenames): ", " and ": "
// between members.
func compactJSON(v any) string {
	var sb strings.Builder
	var enc func(v any)
	enc = func(v any) {
		switch x := normalize(v).(type) {
		case map[string]any:
			sb.WriteString("{")
			for i, k := range orderKeys(x) {
				if i > 0 {
					sb.WriteString(", ")
				}
				sb.WriteString(quote(k) + ": ")
				enc(x[k])
			}
			sb.WriteString("}")
		case []any:
			sb.WriteString("[")
			for i, e := range x {
				if i > 0 {
					sb.WriteString(", ")
				}
				enc(e)
			}
			sb.WriteString("]")
		default:
			sb.WriteString(scalar(x, true))
		}
	}
	enc(v)
	return sb.String()
}
