package qapi

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"
)

// Mode says how the tree being decoded was written, which decides how
// scalars are read.
type Mode int

const (
	// JSON: the tree came from JSON (QMP arguments, a JSON --blockdev, a
	// json: filename). Scalars must have their JSON type; numbers are
	// json.Number (decode with UseNumber).
	JSON Mode = iota
	// Keyval: the tree came from the dotted-key syntax. Scalars are strings
	// and are converted as QEMU's keyval input visitor does. Values of the
	// proper Go type (bool, json.Number, float64, the int kinds) are
	// accepted too, so that options built by code can be merged in.
	Keyval
)

func (m Mode) String() string {
	switch m {
	case JSON:
		return "json"
	case Keyval:
		return "keyval"
	}
	return "mode(" + strconv.Itoa(int(m)) + ")"
}

// Unmarshaler is implemented by types that decode themselves: QAPI
// alternates (a node name or an options object, or null). v is the raw
// subtree (nil for JSON null), path the member's full dotted name for error
// messages.
type Unmarshaler interface {
	UnmarshalQAPI(v any, mode Mode, path string) error
}

// Enum is implemented by string-kind named types whose values are one of a
// fixed list: QAPI enums.
type Enum interface {
	EnumValues() []string
}

var (
	unmarshalerType = reflect.TypeOf((*Unmarshaler)(nil)).Elem()
	enumType        = reflect.TypeOf((*Enum)(nil)).Elem()
	rawMessageType  = reflect.TypeOf(json.RawMessage(nil))
	sizeType        = reflect.TypeOf(Size(0))
	mapAnyType      = reflect.TypeOf(map[string]any(nil))
)

// Decode decodes src into the struct dst points to, strictly: a required
// member that is absent, a member that dst does not have (unless dst has a
// `qapi:",rest"` field) and a value of the wrong type are errors, worded as
// QEMU words them. Optional members that are absent keep whatever dst held,
// which is how callers give defaults. Every error is an *Error of class
// GenericError.
//
// Struct tags: `qapi:"name"` (required), `qapi:"name,optional"`, `qapi:"-"`
// (not a member), `qapi:",rest"` on a map[string]any field (collects
// unknown members: a flat union's base). An untagged embedded struct is a
// QAPI base: its members are ours. Untagged named fields are not members.
//
// Decode does not copy: map[string]any, []any and any members alias src.
func Decode(src map[string]any, dst any, mode Mode) error {
	rv := reflect.ValueOf(dst)
	if rv.Kind() != reflect.Pointer || rv.IsNil() || rv.Elem().Kind() != reflect.Struct {
		return errorf("qapi: Decode needs a non-nil pointer to a struct, not %T", dst)
	}
	if src == nil {
		src = map[string]any{}
	}
	d := decoder{mode: mode}
	return d.value(src, rv.Elem(), "")
}

// DecodeValue decodes one value v into what dst points to (any supported
// type). path is the member's full name, used in error messages; "" for
// the top level.
func DecodeValue(v any, dst any, mode Mode, path string) error {
	rv := reflect.ValueOf(dst)
	if rv.Kind() != reflect.Pointer || rv.IsNil() {
		return errorf("qapi: DecodeValue needs a non-nil pointer, not %T", dst)
	}
	d := decoder{mode: mode}
	return d.value(v, rv.Elem(), path)
}

type decoder struct {
	mode Mode
}

// join builds QEMU's full member name: "file.filename".
func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

// shortName is the last member name of a path: QEMU names enum members by
// their own name only.
func shortName(path string) string {
	if i := strings.LastIndexByte(path, '.'); i >= 0 {
		return path[i+1:]
	}
	return path
}

func typeError(path, expected string) *Error {
	return errorf("Invalid parameter type for '%s', expected: %s", path, expected)
}

func (d *decoder) structValue(src map[string]any, dst reflect.Value, path string) error {
	ti := infoOf(dst.Type())
	for _, m := range ti.members {
		v, ok := src[m.Name]
		if !ok {
			if !m.Optional {
				return errorf("Parameter '%s' is missing", join(path, m.Name))
			}
			continue
		}
		f, err := fieldByIndexAlloc(dst, m.Index)
		if err != nil {
			return err
		}
		if err := d.value(v, f, join(path, m.Name)); err != nil {
			return err
		}
	}
	var unknown []string
	for k := range src {
		if _, ok := ti.byName[k]; !ok {
			unknown = append(unknown, k)
		}
	}
	if ti.rest != nil {
		f, err := fieldByIndexAlloc(dst, ti.rest)
		if err != nil {
			return err
		}
		rest := make(map[string]any, len(unknown))
		for _, k := range unknown {
			rest[k] = src[k]
		}
		f.Set(reflect.ValueOf(rest))
		return nil
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return errorf("Parameter '%s' is unexpected", join(path, unknown[0]))
	}
	return nil
}

// fieldByIndexAlloc is FieldByIndex that allocates nil embedded pointers.
func fieldByIndexAlloc(v reflect.Value, index []int) (reflect.Value, error) {
	for i, x := range index {
		if i > 0 && v.Kind() == reflect.Pointer {
			if v.IsNil() {
				if !v.CanSet() {
					return reflect.Value{}, errorf("qapi: cannot allocate embedded %s", v.Type())
				}
				v.Set(reflect.New(v.Type().Elem()))
			}
			v = v.Elem()
		}
		v = v.Field(x)
	}
	return v, nil
}

// value decodes v into dst, which must be settable.
func (d *decoder) value(v any, dst reflect.Value, path string) error {
	t := dst.Type()
	if dst.CanAddr() && reflect.PointerTo(t).Implements(unmarshalerType) {
		return dst.Addr().Interface().(Unmarshaler).UnmarshalQAPI(v, d.mode, path)
	}
	if t == rawMessageType {
		b, err := json.Marshal(v)
		if err != nil {
			return errorf("Parameter '%s' cannot be encoded as JSON: %w", path, err)
		}
		dst.SetBytes(b)
		return nil
	}
	if t == sizeType {
		u, err := d.uint(v, path, true)
		if err != nil {
			return err
		}
		dst.SetUint(u)
		return nil
	}
	switch t.Kind() {
	case reflect.Pointer:
		nv := reflect.New(t.Elem())
		if err := d.value(v, nv.Elem(), path); err != nil {
			return err
		}
		dst.Set(nv)
		return nil
	case reflect.Interface:
		if t.NumMethod() != 0 {
			return errorf("qapi: unsupported Go type %s for '%s'", t, path)
		}
		if v == nil {
			dst.SetZero()
		} else {
			dst.Set(reflect.ValueOf(v))
		}
		return nil
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return typeError(path, "object")
		}
		return d.structValue(m, dst, path)
	case reflect.Map:
		return d.mapValue(v, dst, path)
	case reflect.Slice:
		l, ok := v.([]any)
		if !ok {
			return typeError(path, "array")
		}
		s := reflect.MakeSlice(t, len(l), len(l))
		for i, e := range l {
			if err := d.value(e, s.Index(i), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		dst.Set(s)
		return nil
	case reflect.String:
		s, err := d.str(v, path)
		if err != nil {
			return err
		}
		if t.Implements(enumType) {
			if !validEnum(dst, s) {
				return errorf("Parameter '%s' does not accept value '%s'", shortName(path), s)
			}
		}
		dst.SetString(s)
		return nil
	case reflect.Bool:
		b, err := d.boolean(v, path)
		if err != nil {
			return err
		}
		dst.SetBool(b)
		return nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n, err := d.int(v, path)
		if err != nil {
			return err
		}
		if dst.OverflowInt(n) {
			return errorf("Parameter '%s' expects %s", path, cTypeName(t))
		}
		dst.SetInt(n)
		return nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		n, err := d.uint(v, path, false)
		if err != nil {
			return err
		}
		if dst.OverflowUint(n) {
			return errorf("Parameter '%s' expects %s", path, cTypeName(t))
		}
		dst.SetUint(n)
		return nil
	case reflect.Float32, reflect.Float64:
		f, err := d.float(v, path)
		if err != nil {
			return err
		}
		if t.Kind() == reflect.Float32 && math.Abs(f) > math.MaxFloat32 && !math.IsInf(f, 0) {
			return errorf("Parameter '%s' expects number", path)
		}
		dst.SetFloat(f)
		return nil
	}
	return errorf("qapi: unsupported Go type %s for '%s'", t, path)
}

func validEnum(dst reflect.Value, s string) bool {
	e := dst.Interface().(Enum)
	for _, ok := range e.EnumValues() {
		if s == ok {
			return true
		}
	}
	return false
}

// cTypeName is how QEMU names an integer member's type when the value is
// out of range ("Parameter 'num-queues' expects uint16_t").
func cTypeName(t reflect.Type) string {
	if t.Kind() >= reflect.Uint && t.Kind() <= reflect.Uintptr {
		if t.Bits() == 64 {
			return "uint64"
		}
		return fmt.Sprintf("uint%d_t", t.Bits())
	}
	if t.Bits() == 64 {
		return "int64"
	}
	return fmt.Sprintf("int%d_t", t.Bits())
}

func (d *decoder) mapValue(v any, dst reflect.Value, path string) error {
	t := dst.Type()
	if t.Key().Kind() != reflect.String {
		return errorf("qapi: unsupported Go type %s for '%s'", t, path)
	}
	m, ok := v.(map[string]any)
	if !ok {
		return typeError(path, "object")
	}
	if t == mapAnyType {
		dst.Set(reflect.ValueOf(m))
		return nil
	}
	out := reflect.MakeMapWithSize(t, len(m))
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys) // the first error is the same every time
	for _, k := range keys {
		e := reflect.New(t.Elem()).Elem()
		if err := d.value(m[k], e, join(path, k)); err != nil {
			return err
		}
		out.SetMapIndex(reflect.ValueOf(k).Convert(t.Key()), e)
	}
	dst.Set(out)
	return nil
}

// keyvalScalar returns the string of a keyval scalar. A map or list where
// a scalar belongs means keys below this one that nobody expects.
func (d *decoder) keyvalNonScalar(v any, path string) *Error {
	switch v.(type) {
	case map[string]any, []any:
		return errorf("Parameters '%s.*' are unexpected", path)
	}
	return nil
}

func (d *decoder) str(v any, path string) (string, error) {
	if s, ok := v.(string); ok {
		return s, nil
	}
	if _, isNum := v.(json.Number); !isNum && reflect.ValueOf(v).Kind() == reflect.String {
		rv := reflect.ValueOf(v)
		return rv.String(), nil // a named string type (an enum value) put in by code
	}
	if d.mode == Keyval {
		if err := d.keyvalNonScalar(v, path); err != nil {
			return "", err
		}
	}
	return "", typeError(path, "string")
}

func (d *decoder) boolean(v any, path string) (bool, error) {
	if rv := reflect.ValueOf(v); rv.Kind() == reflect.Bool {
		return rv.Bool(), nil
	}
	switch b := v.(type) {
	case string:
		if d.mode == Keyval {
			// QEMU's qapi_bool_parse.
			switch b {
			case "on", "yes", "true", "y":
				return true, nil
			case "off", "no", "false", "n":
				return false, nil
			}
			return false, errorf("Parameter '%s' expects 'on' or 'off'", path)
		}
	}
	if d.mode == Keyval {
		if err := d.keyvalNonScalar(v, path); err != nil {
			return false, err
		}
	}
	return false, typeError(path, "boolean")
}

// goInt returns the value of a Go integer (or an integral float64, which
// is what encoding/json without UseNumber produces) put in by code.
func goInt(v any) (i int64, u uint64, neg, ok bool) {
	switch n := v.(type) {
	case int:
		i = int64(n)
	case int8:
		i = int64(n)
	case int16:
		i = int64(n)
	case int32:
		i = int64(n)
	case int64:
		i = n
	case uint:
		return 0, uint64(n), false, true
	case uint8:
		return 0, uint64(n), false, true
	case uint16:
		return 0, uint64(n), false, true
	case uint32:
		return 0, uint64(n), false, true
	case uint64:
		return 0, n, false, true
	case Size:
		return 0, uint64(n), false, true
	case float64:
		if n != math.Trunc(n) || math.IsInf(n, 0) || math.IsNaN(n) {
			return 0, 0, false, false
		}
		if n >= 0 && n < 1<<64 {
			return 0, uint64(n), false, true
		}
		if n < 0 && n >= -(1<<63) {
			i = int64(n)
			return i, uint64(i), true, true
		}
		return 0, 0, false, false
	default:
		// Named integer types put in by code (an enum-like int, say).
		rv := reflect.ValueOf(v)
		switch rv.Kind() {
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
			i = rv.Int()
		case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
			return 0, rv.Uint(), false, true
		default:
			return 0, 0, false, false
		}
	}
	return i, uint64(i), i < 0, true
}

// jsonInt reads a json.Number the way QEMU's JSON parser does: an integer
// literal without fraction or exponent that fits int64 or uint64 is an
// integer; anything else is a float.
func jsonInt(n json.Number) (i int64, u uint64, neg, ok bool) {
	s := string(n)
	if strings.ContainsAny(s, ".eE") {
		return 0, 0, false, false
	}
	if x, err := strconv.ParseInt(s, 10, 64); err == nil {
		return x, uint64(x), x < 0, true
	}
	if x, err := strconv.ParseUint(s, 10, 64); err == nil {
		return 0, x, false, true
	}
	return 0, 0, false, false
}

func (d *decoder) int(v any, path string) (int64, error) {
	switch n := v.(type) {
	case json.Number:
		if !strings.ContainsAny(string(n), ".eE") {
			if i, err := strconv.ParseInt(string(n), 10, 64); err == nil {
				return i, nil
			}
		}
		return 0, typeError(path, "integer")
	case string:
		if d.mode == Keyval {
			i, err := parseKeyvalInt(n)
			if err != nil {
				return 0, errorf("Parameter '%s' expects integer", path)
			}
			return i, nil
		}
	default:
		if i, u, neg, ok := goInt(v); ok {
			if !neg && u > math.MaxInt64 {
				return 0, typeError(path, "integer")
			}
			if neg {
				return i, nil
			}
			return int64(u), nil
		}
	}
	if d.mode == Keyval {
		if err := d.keyvalNonScalar(v, path); err != nil {
			return 0, err
		}
	}
	return 0, typeError(path, "integer")
}

// uint reads an unsigned member. QEMU accepts negative JSON integers for
// unsigned members and takes them modulo 2^64 ("backward compatibility");
// so do we. A value of the wrong type is "Parameter 'x' expects uint64" in
// JSON mode (QEMU's words, for every unsigned width and for sizes);
// in keyval mode an unparsable integer "expects integer" and an unparsable
// size "expects size".
func (d *decoder) uint(v any, path string, size bool) (uint64, error) {
	switch n := v.(type) {
	case json.Number:
		if i, u, neg, ok := jsonInt(n); ok {
			if neg {
				return uint64(i), nil
			}
			return u, nil
		}
		return 0, errorf("Parameter '%s' expects uint64", path)
	case string:
		if d.mode == Keyval {
			if size {
				u, err := ParseSize(n)
				if err != nil {
					return 0, errorf("Parameter '%s' expects size", path)
				}
				return u, nil
			}
			u, err := parseKeyvalUint(n)
			if err != nil {
				return 0, errorf("Parameter '%s' expects integer", path)
			}
			return u, nil
		}
	default:
		if _, u, _, ok := goInt(v); ok {
			return u, nil
		}
	}
	if d.mode == Keyval {
		if err := d.keyvalNonScalar(v, path); err != nil {
			return 0, err
		}
	}
	return 0, errorf("Parameter '%s' expects uint64", path)
}

func (d *decoder) float(v any, path string) (float64, error) {
	switch n := v.(type) {
	case json.Number:
		f, err := strconv.ParseFloat(string(n), 64)
		if err == nil || isRangeErr(err) {
			return f, nil
		}
		return 0, typeError(path, "number")
	case float64:
		return n, nil
	case float32:
		return float64(n), nil
	case string:
		if d.mode == Keyval {
			f, err := parseKeyvalFloat(n)
			if err != nil {
				return 0, errorf("Parameter '%s' expects number", path)
			}
			return f, nil
		}
	default:
		if i, u, neg, ok := goInt(v); ok {
			if neg {
				return float64(i), nil
			}
			return float64(u), nil
		}
	}
	if d.mode == Keyval {
		if err := d.keyvalNonScalar(v, path); err != nil {
			return 0, err
		}
	}
	return 0, typeError(path, "number")
}

func isRangeErr(err error) bool {
	ne, ok := err.(*strconv.NumError)
	return ok && ne.Err == strconv.ErrRange
}
