package qmp

import (
	"encoding/json"
	"reflect"
	"strconv"
	"strings"

	"blockbackend/qmp/qapi"
)

// This file builds query-qmp-schema's answer: QEMU's introspection format
// (docs/devel/qapi-code-gen "Client JSON Protocol introspection", as
// QEMU 7.2 prints it). It is derived by reflection from each command's
// ArgType/RetType and each event's data type, so that it describes what
// we accept and return. As QEMU does, names of non-builtin types are
// masked as numbers in strings ("0", "1", ...); "0" is the empty object
// (commands without arguments or return value). Integer types of every
// width and qapi.Size are the builtin "int", as QEMU 7.2 shows them.

// SchemaInfo is one entry of query-qmp-schema (QEMU's SchemaInfo). Which
// fields are printed depends on MetaType.
type SchemaInfo struct {
	Name     string
	MetaType string // builtin, enum, array, object, alternate, command, event
	Features []string

	JSONType    string          // builtin: string, int, number, boolean, null, value
	Values      []string        // enum
	ElementType string          // array
	Members     []SchemaMember  // object; alternate (Type only)
	Tag         string          // object that is a union: the tag member
	Variants    []SchemaVariant // object that is a union
	ArgType     string          // command, event
	RetType     string          // command
	AllowOOB    bool            // command
}

// SchemaMember is a member of an object type, or (Type only) an
// alternative of an alternate.
type SchemaMember struct {
	Name     string
	Type     string
	Optional bool // printed as "default": null
}

// SchemaVariant is one case of a union: the tag value and the object type
// whose members are added for it.
type SchemaVariant struct {
	Case string
	Type string
}

// MarshalJSON prints the entry with the members its meta-type has.
func (e SchemaInfo) MarshalJSON() ([]byte, error) {
	m := map[string]any{"name": e.Name, "meta-type": e.MetaType}
	if len(e.Features) > 0 {
		m["features"] = e.Features
	}
	switch e.MetaType {
	case "builtin":
		m["json-type"] = e.JSONType
	case "enum":
		vals := append([]string{}, e.Values...)
		mem := make([]map[string]any, len(vals))
		for i, v := range vals {
			mem[i] = map[string]any{"name": v}
		}
		m["values"], m["members"] = vals, mem
	case "array":
		m["element-type"] = e.ElementType
	case "object":
		mem := make([]map[string]any, len(e.Members))
		for i, x := range e.Members {
			mem[i] = map[string]any{"name": x.Name, "type": x.Type}
			if x.Optional {
				mem[i]["default"] = nil
			}
		}
		m["members"] = mem
		if e.Tag != "" {
			m["tag"] = e.Tag
			v := make([]map[string]any, len(e.Variants))
			for i, x := range e.Variants {
				v[i] = map[string]any{"case": x.Case, "type": x.Type}
			}
			m["variants"] = v
		}
	case "alternate":
		mem := make([]map[string]any, len(e.Members))
		for i, x := range e.Members {
			mem[i] = map[string]any{"type": x.Type}
		}
		m["members"] = mem
	case "command":
		m["arg-type"], m["ret-type"] = e.ArgType, e.RetType
		if e.AllowOOB {
			m["allow-oob"] = true
		}
	case "event":
		m["arg-type"] = e.ArgType
	}
	return json.Marshal(m)
}

// SchemaDescriber is implemented by Go types that describe themselves in
// the schema, for what reflection cannot see: a flat union
// (BlockdevOptions: common members, tag "driver", one variant per
// driver), an alternate (a node name or an options object). QAPISchema
// adds the entries it needs to b and returns the type's name (usually
// from b.AddUnion / b.AddAlternate / b.AddObject). It is called on the
// zero value (a pointer to it when the method has a pointer receiver),
// once per schema.
type SchemaDescriber interface {
	QAPISchema(b *SchemaBuilder) string
}

// SchemaBuilder collects the type entries of one schema.
type SchemaBuilder struct {
	entries []SchemaInfo
	named   map[string]bool
	byType  map[reflect.Type]string
	busy    map[reflect.Type]bool
	next    int
}

var (
	describerType = reflect.TypeOf((*SchemaDescriber)(nil)).Elem()
	enumIface     = reflect.TypeOf((*qapi.Enum)(nil)).Elem()
	rawMsgType    = reflect.TypeOf(json.RawMessage(nil))
	sizeGoType    = reflect.TypeOf(qapi.Size(0))
)

func newSchemaBuilder() *SchemaBuilder {
	b := &SchemaBuilder{named: map[string]bool{}, byType: map[reflect.Type]string{}, busy: map[reflect.Type]bool{}}
	b.Add(SchemaInfo{Name: b.NewName(), MetaType: "object"}) // "0": the empty object
	return b
}

// NewName returns a fresh masked type name.
func (b *SchemaBuilder) NewName() string {
	n := strconv.Itoa(b.next)
	b.next++
	return n
}

// Add adds an entry as is (its Name must be new).
func (b *SchemaBuilder) Add(e SchemaInfo) {
	if b.named[e.Name] {
		return
	}
	b.named[e.Name] = true
	b.entries = append(b.entries, e)
}

// EmptyObject is the name of the object type without members.
func (b *SchemaBuilder) EmptyObject() string { return "0" }

// Builtin returns the name of a builtin type ("str", "int", "number",
// "bool", "null", "any"), adding its entry.
func (b *SchemaBuilder) Builtin(name string) string {
	jt := map[string]string{"str": "string", "int": "int", "number": "number", "bool": "boolean", "null": "null", "any": "value"}[name]
	if jt == "" {
		name, jt = "any", "value"
	}
	b.Add(SchemaInfo{Name: name, MetaType: "builtin", JSONType: jt})
	return name
}

// Array returns the name of the array type of elem ("[elem]").
func (b *SchemaBuilder) Array(elem string) string {
	name := "[" + elem + "]"
	b.Add(SchemaInfo{Name: name, MetaType: "array", ElementType: elem})
	return name
}

// AddObject adds an object type and returns its name.
func (b *SchemaBuilder) AddObject(members []SchemaMember) string {
	if len(members) == 0 {
		return b.EmptyObject()
	}
	name := b.NewName()
	b.Add(SchemaInfo{Name: name, MetaType: "object", Members: members})
	return name
}

// AddEnum adds an enum type and returns its name.
func (b *SchemaBuilder) AddEnum(values []string) string {
	name := b.NewName()
	b.Add(SchemaInfo{Name: name, MetaType: "enum", Values: values})
	return name
}

// AddUnion adds a flat union: the base members (among them the tag) and
// one variant object per tag value. It returns the union's name.
func (b *SchemaBuilder) AddUnion(base []SchemaMember, tag string, variants []SchemaVariant) string {
	name := b.NewName()
	b.Add(SchemaInfo{Name: name, MetaType: "object", Members: base, Tag: tag, Variants: variants})
	return name
}

// AddAlternate adds an alternate of the given types and returns its name.
func (b *SchemaBuilder) AddAlternate(types ...string) string {
	mem := make([]SchemaMember, len(types))
	for i, t := range types {
		mem[i] = SchemaMember{Type: t}
	}
	name := b.NewName()
	b.Add(SchemaInfo{Name: name, MetaType: "alternate", Members: mem})
	return name
}

// Type returns the schema name of Go type t, adding the entries it needs.
// nil is "any".
func (b *SchemaBuilder) Type(t reflect.Type) string {
	if t == nil {
		return b.Builtin("any")
	}
	if n, ok := b.byType[t]; ok {
		return n
	}
	if d, ok := describer(t); ok {
		if b.busy[t] {
			return b.Builtin("any") // a describer that recurses into itself
		}
		b.busy[t] = true
		n := d.QAPISchema(b)
		delete(b.busy, t)
		b.byType[t] = n
		return n
	}
	switch {
	case t == rawMsgType:
		return b.Builtin("any")
	case t == sizeGoType:
		return b.Builtin("int")
	}
	switch t.Kind() {
	case reflect.Pointer:
		return b.Type(t.Elem())
	case reflect.Interface, reflect.Map:
		return b.Builtin("any")
	case reflect.String:
		if t.Implements(enumIface) {
			vals := reflect.Zero(t).Interface().(qapi.Enum).EnumValues()
			n := b.AddEnum(vals)
			b.byType[t] = n
			return n
		}
		return b.Builtin("str")
	case reflect.Bool:
		return b.Builtin("bool")
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return b.Builtin("int")
	case reflect.Float32, reflect.Float64:
		return b.Builtin("number")
	case reflect.Slice, reflect.Array:
		if t.Elem().Kind() == reflect.Uint8 {
			return b.Builtin("str") // encoding/json prints bytes as base64
		}
		return b.Array(b.Type(t.Elem()))
	case reflect.Struct:
		if len(qapi.Members(t)) == 0 && !qapi.HasRest(t) && len(jsonMembers(t)) == 0 {
			b.byType[t] = b.EmptyObject()
			return b.EmptyObject()
		}
		name := b.NewName()
		b.byType[t] = name // before the members: types may recurse
		b.named[name] = true
		mem := b.Members(t)
		b.entries = append(b.entries, SchemaInfo{Name: name, MetaType: "object", Members: mem})
		return name
	}
	return b.Builtin("any")
}

// Members returns the schema members of struct type t: from its qapi tags
// when it has any (argument types), else from its json tags (return
// types), with embedded structs flattened as each package does.
func (b *SchemaBuilder) Members(t reflect.Type) []SchemaMember {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if qm := qapi.Members(t); len(qm) > 0 || qapi.HasRest(t) {
		out := make([]SchemaMember, len(qm))
		for i, m := range qm {
			out[i] = SchemaMember{Name: m.Name, Type: b.Type(m.Type), Optional: m.Optional}
		}
		return out
	}
	jm := jsonMembers(t)
	out := make([]SchemaMember, len(jm))
	for i, m := range jm {
		out[i] = SchemaMember{Name: m.name, Type: b.Type(m.typ), Optional: m.optional}
	}
	return out
}

func describer(t reflect.Type) (SchemaDescriber, bool) {
	if t.Implements(describerType) {
		if t.Kind() == reflect.Pointer {
			return reflect.New(t.Elem()).Interface().(SchemaDescriber), true
		}
		return reflect.Zero(t).Interface().(SchemaDescriber), true
	}
	if t.Kind() != reflect.Pointer && reflect.PointerTo(t).Implements(describerType) {
		return reflect.New(t).Interface().(SchemaDescriber), true
	}
	return nil, false
}

type jsonMember struct {
	name     string
	typ      reflect.Type
	optional bool
}

// jsonMembers lists the members encoding/json prints for struct type t
// (simplified: a shallower name hides a deeper one, no tag-vs-untagged
// tie breaking).
func jsonMembers(t reflect.Type) []jsonMember {
	var out []jsonMember
	seen := map[string]bool{}
	var walk func(t reflect.Type, depth int, visiting map[reflect.Type]bool)
	walk = func(t reflect.Type, depth int, visiting map[reflect.Type]bool) {
		if visiting[t] || depth > 16 {
			return
		}
		visiting[t] = true
		defer delete(visiting, t)
		var embedded []reflect.Type
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			tag := f.Tag.Get("json")
			if tag == "-" {
				continue
			}
			name, opts, _ := strings.Cut(tag, ",")
			ft := f.Type
			if f.Anonymous && name == "" {
				if ft.Kind() == reflect.Pointer {
					ft = ft.Elem()
				}
				if ft.Kind() == reflect.Struct {
					embedded = append(embedded, ft)
					continue
				}
			}
			if !f.IsExported() {
				continue
			}
			if name == "" {
				name = f.Name
			}
			if seen[name] {
				continue
			}
			seen[name] = true
			optional := strings.Contains(","+opts+",", ",omitempty,") || strings.Contains(","+opts+",", ",omitzero,")
			out = append(out, jsonMember{name, ft, optional})
		}
		for _, e := range embedded {
			walk(e, depth+1, visiting)
		}
	}
	walk(t, 0, map[reflect.Type]bool{})
	return out
}

// Schema returns the server's query-qmp-schema answer: commands in
// registration order, then events, then the types they use.
func (s *Server) Schema() []SchemaInfo {
	s.mu.Lock()
	cmds := make([]Command, len(s.order))
	for i, n := range s.order {
		cmds[i] = *s.cmds[n]
	}
	events := append([]eventDef(nil), s.events...)
	s.mu.Unlock()

	b := newSchemaBuilder()
	var out []SchemaInfo
	for _, c := range cmds {
		arg, ret := b.EmptyObject(), b.EmptyObject()
		if c.ArgType != nil {
			arg = b.Type(c.ArgType)
		}
		if c.RetType != nil {
			ret = b.Type(c.RetType)
		}
		out = append(out, SchemaInfo{Name: c.Name, MetaType: "command", ArgType: arg, RetType: ret, AllowOOB: c.AllowOOB})
	}
	for _, e := range events {
		arg := b.EmptyObject()
		if e.data != nil {
			arg = b.Type(e.data)
		}
		out = append(out, SchemaInfo{Name: e.name, MetaType: "event", ArgType: arg})
	}
	return append(out, b.entries...)
}
