package img

import (
	"fmt"
	"io"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"blockbackend/qmp/qapi"
)

// qemu-img's -o options are QemuOpts ("name=value,...", ",," for a
// comma) with qemu-img's spellings (cluster_size). A driver's create
// options struct has QAPI's member names (cluster-size). This file maps
// one onto the other, generically: '_' becomes '-', "compat" becomes
// QAPI's "version" when the struct has that instead, and each option
// goes to the format's struct when it has the member, else to the
// protocol's (nocow, extent_size_hint), else it is qemu-img's
// "Invalid parameter".

// kv is one -o item.
type kv struct{ key, val string }

// parseOptList splits a QemuOpts string. A bare "name" means name=on.
func parseOptList(s string) []kv {
	var out []kv
	var cur strings.Builder
	var items []string
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			items = append(items, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	items = append(items, cur.String())
	for _, it := range items {
		if it == "" {
			continue
		}
		k, v, ok := strings.Cut(it, "=")
		if !ok {
			v = "on"
		}
		out = append(out, kv{k, v})
	}
	return out
}

// isHelpOpt reports whether the option list asks for help ("help", "?").
func isHelpOpt(s string) bool {
	for _, it := range parseOptList(s) {
		if (it.key == "help" || it.key == "?") && it.val == "on" {
			return true
		}
	}
	return false
}

// qapiName maps a qemu-img option name onto a QAPI member name.
func qapiName(k string) string {
	top, rest, nested := strings.Cut(k, ".")
	top = strings.ReplaceAll(top, "_", "-")
	if nested {
		return top + "." + rest
	}
	return top
}

// imgName maps a QAPI member name onto qemu-img's spelling.
func imgName(k string) string {
	top, rest, nested := strings.Cut(k, ".")
	top = strings.ReplaceAll(top, "-", "_")
	if nested {
		return top + "." + rest
	}
	return top
}

// member finds the QAPI member called name in the struct type of v.
func member(v any, name string) (qapi.Member, bool) {
	if v == nil {
		return qapi.Member{}, false
	}
	for _, m := range qapi.Members(reflect.TypeOf(v)) {
		if m.Name == name {
			return m, true
		}
	}
	return qapi.Member{}, false
}

// optTarget is one struct options are decoded into.
type optTarget struct {
	opts  any            // the driver's fresh options struct
	tree  map[string]any // what will be decoded into it
	order []string       // qemu-img names given, in order
}

func newTarget(opts any) *optTarget {
	if opts == nil {
		return nil
	}
	return &optTarget{opts: opts, tree: map[string]any{}}
}

func (ot *optTarget) has(name string) bool {
	if ot == nil {
		return false
	}
	_, ok := member(ot.opts, name)
	return ok
}

func (ot *optTarget) set(qname, val string) {
	parts := strings.Split(qname, ".")
	m := ot.tree
	for _, p := range parts[:len(parts)-1] {
		sub, _ := m[p].(map[string]any)
		if sub == nil {
			sub = map[string]any{}
			m[p] = sub
		}
		m = sub
	}
	m[parts[len(parts)-1]] = val
}

// route assigns each -o item to the format's or the protocol's options.
// skip names options the caller handles itself.
func route(items []kv, format, proto *optTarget) (err error) {
	for _, it := range items {
		q := qapiName(it.key)
		top, _, _ := strings.Cut(q, ".")
		val := it.val
		switch {
		case top == "file" || top == "filename":
			return fmt.Errorf("Invalid parameter '%s'", it.key)
		case q == "compat" && !format.has("compat") && format.has("version"):
			// qemu-img's compat=0.10|1.1 is QAPI's version=v2|v3.
			switch val {
			case "0.10":
				val = "v2"
			case "1.1":
				val = "v3"
			}
			format.set("version", val)
			format.order = append(format.order, it.key)
			continue
		}
		switch {
		case format.has(top):
			format.set(q, val)
			format.order = append(format.order, it.key)
		case proto.has(top):
			proto.set(q, val)
			proto.order = append(proto.order, it.key)
		default:
			return fmt.Errorf("Invalid parameter '%s'", it.key)
		}
	}
	return nil
}

// helpLine is one "name=<type> - description" line of -o help.
type helpLine struct{ name, typ, desc string }

// optDescs are qemu-img's descriptions by option name (presentation only;
// the options themselves come from the drivers' structs).
var optDescs = map[string]string{
	"backing_file":           "File name of a base image",
	"backing_fmt":            "Image format of the base image",
	"cluster_size":           "qcow2 cluster size",
	"compat":                 "Compatibility level (v2 [0.10] or v3 [1.1])",
	"compression_type":       "Compression method used for image cluster compression",
	"data_file":              "File name of an external data file",
	"data_file_raw":          "The external data file must stay valid as a raw image",
	"encrypt.cipher-alg":     "Name of encryption cipher algorithm",
	"encrypt.cipher-mode":    "Name of encryption cipher mode",
	"encrypt.format":         "Encrypt the image, format choices: 'aes', 'luks'",
	"encrypt.hash-alg":       "Name of encryption hash algorithm",
	"encrypt.iter-time":      "Time to spend in PBKDF in milliseconds",
	"encrypt.ivgen-alg":      "Name of IV generator algorithm",
	"encrypt.ivgen-hash-alg": "Name of IV generator hash algorithm",
	"encrypt.key-secret":     "ID of secret providing qcow AES key or LUKS passphrase",
	"encryption":             "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
	"extended_l2":            "Extended L2 tables",
	"extent_size_hint":       "Extent size hint for the image file, 0 to disable",
	"lazy_refcounts":         "Postpone refcount updates",
	"nocow":                  "Turn off copy-on-write (valid only on btrfs)",
	"preallocation":          "Preallocation mode (allowed values: %s)",
	"refcount_bits":          "Width of a reference count entry in bits",
	"size":                   "Virtual disk size",
	// LUKS keeps QAPI's dashes in qemu-img's names.
	"cipher-alg":     "Name of encryption cipher algorithm",
	"cipher-mode":    "Name of encryption cipher mode",
	"hash-alg":       "Name of encryption hash algorithm",
	"iter-time":      "Time to spend in PBKDF in milliseconds",
	"ivgen-alg":      "Name of IV generator algorithm",
	"ivgen-hash-alg": "Name of IV generator hash algorithm",
	"key-secret":     "ID of the secret that provides the keyslot passphrase",
	"keyslot":        "Select a single keyslot to modify explicitly",
	"new-secret":     "New secret to set in the matching keyslots. Empty string to erase",
	"old-secret":     "Select all keyslots that match this password",
	"state":          "Select new state of affected keyslots (active/inactive)",
}

var (
	sizeType  = reflect.TypeOf(qapi.Size(0))
	enumIface = reflect.TypeOf((*qapi.Enum)(nil)).Elem()
)

func typeName(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch {
	case t == sizeType:
		return "size"
	case t.Kind() == reflect.Bool:
		return "bool (on/off)"
	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Uint64:
		return "num"
	}
	return "str"
}

func enumValues(t reflect.Type) []string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Implements(enumIface) {
		return reflect.Zero(t).Interface().(qapi.Enum).EnumValues()
	}
	return nil
}

// collectHelp lists the options of a create options struct, skipping the
// members qemu-img does not offer (file, filename) and mapping names.
func collectHelp(opts any, lines map[string]helpLine) {
	if opts == nil {
		return
	}
	var walk func(t reflect.Type, prefix string)
	walk = func(t reflect.Type, prefix string) {
		for _, m := range qapi.Members(t) {
			if prefix == "" && (m.Name == "file" || m.Name == "filename") {
				continue
			}
			ft := m.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			name := prefix + m.Name
			if prefix == "" {
				name = imgName(m.Name)
				if m.Name == "version" {
					name = "compat"
				}
				if _, dashed := optDescs[m.Name]; dashed {
					name = m.Name // an option qemu-img spells with dashes
				}
			}
			if ft.Kind() == reflect.Struct && ft != sizeType && len(qapi.Members(ft)) > 0 && !qapi.HasRest(ft) {
				walk(ft, name+".")
				continue
			}
			if _, dup := lines[name]; dup {
				continue
			}
			desc := optDescs[name]
			if strings.Contains(desc, "%s") {
				desc = fmt.Sprintf(desc, strings.Join(enumValues(m.Type), ", "))
			}
			lines[name] = helpLine{name, typeName(m.Type), desc}
		}
	}
	walk(reflect.TypeOf(opts), "")
}

// writeOptHelp prints qemu-img's "Supported options:" list.
func writeOptHelp(w io.Writer, formatOpts, protoOpts any) {
	lines := map[string]helpLine{}
	collectHelp(formatOpts, lines)
	collectHelp(protoOpts, lines)
	names := make([]string, 0, len(lines))
	for n := range lines {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(w, "Supported options:")
	for _, n := range names {
		l := lines[n]
		left := fmt.Sprintf("%s=<%s>", l.name, l.typ)
		if l.desc == "" {
			fmt.Fprintf(w, "  %s\n", left)
			continue
		}
		fmt.Fprintf(w, "  %-22s - %s\n", left, l.desc)
	}
}

// fieldValue returns the value of QAPI member qname (dotted) of opts as
// qemu-img prints it, and whether it is set.
func fieldValue(opts any, qname string) (string, bool) {
	v := reflect.ValueOf(opts)
	for _, part := range strings.Split(qname, ".") {
		for v.Kind() == reflect.Pointer {
			if v.IsNil() {
				return "", false
			}
			v = v.Elem()
		}
		if v.Kind() != reflect.Struct {
			return "", false
		}
		m, ok := member(v.Addr().Interface(), part)
		if !ok {
			return "", false
		}
		v = v.FieldByIndex(m.Index)
	}
	for v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return "", false
		}
		v = v.Elem()
	}
	switch v.Kind() {
	case reflect.Bool:
		if v.Bool() {
			return "on", true
		}
		return "off", true
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return strconv.FormatInt(v.Int(), 10), true
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return strconv.FormatUint(v.Uint(), 10), true
	case reflect.String:
		return v.String(), v.String() != ""
	}
	return "", false
}

// formattingOrder is the order in which qemu-img 7.2 lists create options
// in its "Formatting ..." line, as observed.
var formattingOrder = []string{
	"encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
	"encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time",
	"cluster_size", "extended_l2", "preallocation", "compression_type", "size", "compat",
	"backing_file", "backing_fmt", "data_file", "data_file_raw",
	"lazy_refcounts", "refcount_bits", "nocow", "extent_size_hint",
}

// shownDefaults are the options qemu-img lists even when not given
// (their defaults), when the format has them.
var shownDefaults = map[string]bool{
	"cluster_size": true, "extended_l2": true, "compression_type": true,
	"lazy_refcounts": true, "refcount_bits": true,
}

// formattingOrderFlat is the order for formats without clusters (raw,
// luks), where the format's own options come first and preallocation
// after nocow.
var formattingOrderFlat = []string{"size", "backing_file", "backing_fmt",
	"key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time",
	"nocow", "preallocation", "extent_size_hint"}

func orderRank(name string, flat bool) int {
	order := formattingOrder
	if flat {
		order = formattingOrderFlat
	}
	for i, o := range order {
		if o == name || strings.HasSuffix(o, ".") && strings.HasPrefix(name, o) {
			return i
		}
	}
	return len(order)
}

// formattingLine is qemu-img's "Formatting 'f', fmt=F a=b ..." text.
// With raw, user-given options show as given (their decoding failed).
func formattingLine(filename, fmtName string, size int64, format, proto *optTarget, given map[string]string, raw bool) string {
	type item struct {
		name, val string
		rank, seq int
	}
	var items []item
	seen := map[string]bool{}
	flat := format == nil || !format.has("cluster-size")
	add := func(name, val string) {
		if seen[name] {
			return
		}
		seen[name] = true
		items = append(items, item{name, val, orderRank(name, flat), len(items)})
	}
	add("size", strconv.FormatInt(size, 10))
	for _, ot := range []*optTarget{format, proto} {
		if ot == nil {
			continue
		}
		for _, name := range ot.order {
			q := qapiName(name)
			if name == "compat" && !ot.has("compat") {
				add(name, given[name])
				continue
			}
			if v, ok := fieldValue(ot.opts, q); ok && !raw {
				add(name, v)
			} else {
				add(name, given[name])
			}
		}
	}
	if format != nil {
		for name := range shownDefaults {
			if v, ok := fieldValue(format.opts, qapiName(name)); ok {
				add(name, v)
			}
		}
	}
	sort.SliceStable(items, func(i, j int) bool {
		if items[i].rank != items[j].rank {
			return items[i].rank < items[j].rank
		}
		return items[i].seq < items[j].seq
	})
	var sb strings.Builder
	fmt.Fprintf(&sb, "Formatting '%s', fmt=%s", filename, fmtName)
	for _, it := range items {
		fmt.Fprintf(&sb, " %s=%s", it.name, it.val)
	}
	return sb.String()
}
