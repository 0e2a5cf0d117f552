package qmp

import (
	"context"
	"encoding/json"
	"reflect"
	"testing"
)

// A flat union described through the SchemaDescriber hook, as the lead's
// BlockdevOptions will be.
type testUnion struct {
	Driver string         `qapi:"driver"`
	Rest   map[string]any `qapi:",rest"`
}

type fileVariant struct {
	Filename string `qapi:"filename"`
	Locking  Toggle `qapi:"locking,optional"`
}

type Toggle string

func (Toggle) EnumValues() []string { return []string{"on", "off", "auto"} }

func (testUnion) QAPISchema(b *SchemaBuilder) string {
	base := []SchemaMember{{Name: "driver", Type: b.AddEnum([]string{"file", "null-co"})}, {Name: "node-name", Type: b.Builtin("str"), Optional: true}}
	return b.AddUnion(base, "driver", []SchemaVariant{
		{Case: "file", Type: b.Type(reflect.TypeOf(fileVariant{}))},
		{Case: "null-co", Type: b.EmptyObject()},
	})
}

type nodeRef struct{}

func (*nodeRef) QAPISchema(b *SchemaBuilder) string {
	return b.AddAlternate(b.Builtin("str"), b.Type(reflect.TypeOf(testUnion{})), b.Builtin("null"))
}

// Embedding a SchemaDescriber would promote its method: addArgs would
// then be described as the union itself.
type addArgs struct {
	Driver  string   `qapi:"driver"`
	Backing *nodeRef `qapi:"backing,optional"`
	Sizes   []uint64 `qapi:"sizes,optional"`
	Ratio   float64  `qapi:"ratio,optional"`
}

type info struct {
	Name     string  `json:"node-name"`
	RO       bool    `json:"ro"`
	Children []*info `json:"children,omitempty"` // recursive
	Extra    any     `json:"extra,omitempty"`
}

func TestSchemaIntegrity(t *testing.T) {
	s, _ := testServer(t)
	s.Register(Command{Name: "blockdev-add", ArgType: reflect.TypeOf(addArgs{}), Handler: nopHandler})
	s.Register(Command{Name: "query-nodes", RetType: reflect.TypeOf([]info{}), Handler: nopHandler})
	s.Register(Command{Name: "bd2", ArgType: reflect.TypeOf(testUnion{}), Handler: nopHandler})
	c := negotiated(t, s)
	c.send(t, `{"execute": "query-qmp-schema"}`)
	var r struct {
		Return []map[string]any `json:"return"`
	}
	line := c.line(t)
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		t.Fatal(err)
	}
	byName := map[string]map[string]any{}
	for _, e := range r.Return {
		n, _ := e["name"].(string)
		mt, _ := e["meta-type"].(string)
		if n == "" || mt == "" {
			t.Fatalf("entry without name or meta-type: %v", e)
		}
		if mt != "command" && mt != "event" {
			if _, dup := byName[n]; dup {
				t.Errorf("type %s defined twice", n)
			}
		}
		byName[n] = e
	}
	check := func(where string, ref any) {
		n, ok := ref.(string)
		if !ok {
			t.Errorf("%s: type reference %v is not a string", where, ref)
			return
		}
		e, ok := byName[n]
		if !ok {
			t.Errorf("%s references undefined type %q", where, n)
			return
		}
		if mt := e["meta-type"]; mt == "command" || mt == "event" {
			t.Errorf("%s references %s %q", where, mt, n)
		}
	}
	for _, e := range r.Return {
		n := e["name"].(string)
		switch e["meta-type"] {
		case "command":
			check(n+".arg-type", e["arg-type"])
			check(n+".ret-type", e["ret-type"])
			if byName[e["arg-type"].(string)]["meta-type"] != "object" {
				t.Errorf("%s: arg-type is not an object", n)
			}
		case "event":
			check(n+".arg-type", e["arg-type"])
		case "object":
			for _, m := range e["members"].([]any) {
				mm := m.(map[string]any)
				check(n+"."+mm["name"].(string), mm["type"])
				if d, ok := mm["default"]; ok && d != nil {
					t.Errorf("%s: default %v", n, d)
				}
			}
			if v, ok := e["variants"]; ok {
				if _, ok := e["tag"].(string); !ok {
					t.Errorf("%s: variants without tag", n)
				}
				for _, x := range v.([]any) {
					check(n+" variant", x.(map[string]any)["type"])
				}
			}
		case "alternate":
			for _, m := range e["members"].([]any) {
				check(n+" alternative", m.(map[string]any)["type"])
			}
		case "array":
			check(n+".element-type", e["element-type"])
		case "enum":
			if len(e["values"].([]any)) != len(e["members"].([]any)) {
				t.Errorf("%s: values and members differ", n)
			}
		case "builtin":
			if _, ok := e["json-type"].(string); !ok {
				t.Errorf("builtin %s lacks json-type", n)
			}
		default:
			t.Errorf("%s: meta-type %v", n, e["meta-type"])
		}
	}
	// Spot checks against QEMU's shapes.
	if e := byName["0"]; e == nil || len(e["members"].([]any)) != 0 {
		t.Errorf(`"0" is not the empty object: %v`, e)
	}
	qv := byName["query-version"]
	if qv["arg-type"] != "0" || byName[qv["ret-type"].(string)]["meta-type"] != "object" {
		t.Errorf("query-version %v", qv)
	}
	if byName["ping"]["allow-oob"] != true {
		t.Errorf("ping lacks allow-oob: %v", byName["ping"])
	}
	if _, ok := byName["echo"]["allow-oob"]; ok {
		t.Errorf("echo has allow-oob")
	}
	if ev := byName["TEST_EVENT"]; ev["meta-type"] != "event" {
		t.Errorf("TEST_EVENT %v", ev)
	}
	bd := byName[byName["bd2"]["arg-type"].(string)]
	if bd["tag"] != "driver" || len(bd["variants"].([]any)) != 2 {
		t.Errorf("union %v", bd)
	}
	caps := byName[byName["qmp_capabilities"]["arg-type"].(string)]
	enable := caps["members"].([]any)[0].(map[string]any)
	if enable["name"] != "enable" || enable["default"] != nil || byName[byName[enable["type"].(string)]["element-type"].(string)]["meta-type"] != "enum" {
		t.Errorf("qmp_capabilities args %v", caps)
	}
	for _, b := range []string{"str", "int", "bool", "number", "null", "any"} {
		if byName[b]["meta-type"] != "builtin" {
			t.Errorf("builtin %s missing", b)
		}
	}
}

func nopHandler(ctx context.Context, args map[string]any) (any, error) { return nil, nil }
