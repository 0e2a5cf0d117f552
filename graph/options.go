package graph

import (
	"encoding/json"
	"fmt"

	"blockbackend/qmp/qapi"
)

// DiscardMode is the "discard" option: whether discard requests reach the
// driver.
type DiscardMode string

// EnumValues lists QEMU's values.
func (DiscardMode) EnumValues() []string { return []string{"ignore", "unmap", "off", "on"} }

// Unmap reports whether discards pass ("unmap" and its alias "on").
func (d DiscardMode) Unmap() bool { return d == "unmap" || d == "on" }

// DetectZeroes is the "detect-zeroes" option.
type DetectZeroes string

// EnumValues lists QEMU's values.
func (DetectZeroes) EnumValues() []string { return []string{"off", "on", "unmap"} }

// CacheOptions is BlockdevCacheOptions.
type CacheOptions struct {
	Direct  bool `qapi:"direct,optional"`
	NoFlush bool `qapi:"no-flush,optional"`
}

// CommonOptions are the members of BlockdevOptions that every driver has.
type CommonOptions struct {
	Driver       string       `qapi:"driver"`
	NodeName     string       `qapi:"node-name,optional"`
	Discard      DiscardMode  `qapi:"discard,optional"`
	Cache        CacheOptions `qapi:"cache,optional"`
	ReadOnly     bool         `qapi:"read-only,optional"`
	AutoReadOnly bool         `qapi:"auto-read-only,optional"`
	ForceShare   bool         `qapi:"force-share,optional"`
	DetectZeroes DetectZeroes `qapi:"detect-zeroes,optional"`
}

// blockdevOptions is the flat union BlockdevOptions: the common base, and
// the rest for the driver's variant.
type blockdevOptions struct {
	CommonOptions
	Rest map[string]any `qapi:",rest"`
}

// ChildRef is QAPI's BlockdevRefOrNull alternate: a child given as the
// name of an existing node, as nested options for a new node, or (for
// backing) as JSON null to say "no child".
type ChildRef struct {
	// Ref is the node name of an existing node.
	Ref string
	// Options, when non-nil, describe a new node opened for this child.
	Options map[string]any
	// Mode is how Options were written (JSON or keyval).
	Mode qapi.Mode
	// Null is set for an explicit null.
	Null bool
}

// Present reports whether the option was given at all.
func (r *ChildRef) Present() bool {
	return r != nil && (r.Ref != "" || r.Options != nil || r.Null)
}

// UnmarshalQAPI implements the alternate.
func (r *ChildRef) UnmarshalQAPI(v any, mode qapi.Mode, path string) error {
	switch t := v.(type) {
	case nil:
		r.Null = true
	case string:
		if t == "" {
			// QEMU's keyval spelling of "no backing": backing= (empty).
			r.Null = true
			break
		}
		r.Ref = t
	case map[string]any:
		r.Options = t
		r.Mode = mode
	default:
		return qapi.Errorf(qapi.GenericError, "Invalid parameter type for '%s', expected: object", path)
	}
	return nil
}

// MarshalJSON shows the reference as QEMU would echo it.
func (r ChildRef) MarshalJSON() ([]byte, error) {
	switch {
	case r.Null:
		return []byte("null"), nil
	case r.Options != nil:
		return json.Marshal(r.Options)
	default:
		return json.Marshal(r.Ref)
	}
}

func (r *ChildRef) String() string {
	if r == nil {
		return "<none>"
	}
	if r.Options != nil {
		return fmt.Sprint(r.Options)
	}
	return r.Ref
}

// inheritChildOptions fills the options of a new child node from its
// parent's, as QEMU's block layer does for nested children: read-only,
// auto-read-only, force-share and the cache mode pass down unless the child
// sets them, discard defaults to "unmap" (the parent already filters what
// it sends) and a COW child is read-only.
func inheritChildOptions(child map[string]any, parent CommonOptions, role Role, mode qapi.Mode) {
	set := func(key string, v bool) {
		if _, ok := child[key]; ok {
			return
		}
		child[key] = boolValue(v, mode)
	}
	if role&RoleCOW != 0 {
		set("read-only", true)
		set("auto-read-only", false)
	} else {
		set("read-only", parent.ReadOnly)
		set("auto-read-only", parent.AutoReadOnly)
	}
	set("force-share", parent.ForceShare)
	cache, _ := child["cache"].(map[string]any)
	if cache == nil {
		if _, ok := child["cache"]; ok {
			return // malformed; the decoder will say so
		}
		cache = map[string]any{}
		child["cache"] = cache
	}
	if _, ok := cache["direct"]; !ok {
		cache["direct"] = boolValue(parent.Cache.Direct, mode)
	}
	if _, ok := cache["no-flush"]; !ok {
		cache["no-flush"] = boolValue(parent.Cache.NoFlush, mode)
	}
	if _, ok := child["discard"]; !ok {
		child["discard"] = "unmap"
	}
}

func boolValue(v bool, mode qapi.Mode) any {
	if mode == qapi.Keyval {
		if v {
			return "on"
		}
		return "off"
	}
	return v
}
