// Package keyval parses QEMU's option syntaxes into the nested trees that
// package qapi decodes: the dotted-key "keyval" syntax of the command line
// (--blockdev driver=qcow2,file.filename=a.qcow2), a JSON object in its
// place (--blockdev '{"driver": ...}'), and "json:{...}" filenames.
//
// It follows the behaviour of QEMU's keyval parser as documented in QEMU's
// docs/devel and qemu-storage-daemon(1), and as observed on QEMU 7.2:
//
//	key-vals     = [ key-val-1st { ',' key-val } [ ',' ] ]
//	key-val-1st  = val-no-key | key-val      (val-no-key only with an implied key)
//	key-val      = key '=' val
//	key          = key-fragment { '.' key-fragment }
//	key-fragment = qapi-name | index         (the first fragment is never an index)
//	qapi-name    = [A-Za-z][A-Za-z0-9_-]*, at most 127 characters
//	index        = [0-9]+
//	val          = { [^,] | ',,' }           (",," is a comma)
//	val-no-key   = [^=,]+
//
// A key given twice keeps its last value. Objects whose keys are all
// indices become lists (server.0.host=a,server.1.host=b). Leaves are
// strings; typing them is package qapi's job (Keyval mode).
//
// It is not QEMU's QemuOpts syntax (no "help", no "no"-prefixed bools, no
// id= handling) and not a general JSON library: JSON here is an object,
// decoded with numbers as json.Number and duplicate keys refused, as QEMU
// refuses them. Every error is a *qapi.Error of class GenericError, worded
// as QEMU words it.
package keyval

import (
	"strings"

	"blockbackend/qmp/qapi"
)

// maxFragment is QEMU's limit on one key fragment (127 characters).
const maxFragment = 127

// Parse parses "k1=v1,k2.sub=v2,..." into a nested tree: leaves are
// strings, dotted keys nest objects, objects whose keys are the indices
// 0..n-1 become []any, ",," is a comma inside a value. If impliedKey is
// not empty and the first element has no '=', that element is the value
// of impliedKey ("secret,id=s0" with "qom-type"). The empty string parses
// to an empty object. JSON is not recognised here: see ParseOption.
func Parse(s, impliedKey string) (map[string]any, error) {
	root := map[string]any{}
	pos := 0
	for first := true; pos < len(s); first = false {
		end := pos
		for end < len(s) && s[end] != '=' && s[end] != ',' {
			end++
		}
		key := s[pos:end]
		if first && impliedKey != "" && key != "" && (end == len(s) || s[end] == ',') {
			if err := set(root, strings.Split(impliedKey, "."), key); err != nil {
				return nil, err
			}
			pos = end
		} else {
			frags, err := splitKey(key)
			if err != nil {
				return nil, err
			}
			if end == len(s) || s[end] != '=' {
				return nil, qapi.Errorf(qapi.GenericError, "Expected '=' after parameter '%s'", key)
			}
			var val strings.Builder
			pos = end + 1
			for pos < len(s) {
				if s[pos] == ',' {
					if pos+1 < len(s) && s[pos+1] == ',' {
						val.WriteByte(',')
						pos += 2
						continue
					}
					break
				}
				val.WriteByte(s[pos])
				pos++
			}
			if err := set(root, frags, val.String()); err != nil {
				return nil, err
			}
		}
		if pos < len(s) { // s[pos] == ',': a separator, possibly the trailing one
			pos++
		}
	}
	out, err := qapi.Listify(root, "")
	if err != nil {
		return nil, err
	}
	return out.(map[string]any), nil
}

// splitKey checks a key and returns its fragments.
func splitKey(key string) ([]string, error) {
	frags := strings.Split(key, ".")
	for i, f := range frags {
		if len(f) > maxFragment {
			if i == 0 {
				return nil, qapi.Errorf(qapi.GenericError, "Parameter '%s' is too long", f)
			}
			return nil, qapi.Errorf(qapi.GenericError, "Parameter fragment '%s' is too long", f)
		}
		if !isQAPIName(f) && (i == 0 || !isIndex(f)) {
			return nil, qapi.Errorf(qapi.GenericError, "Invalid parameter '%s'", key)
		}
	}
	return frags, nil
}

func isQAPIName(f string) bool {
	if f == "" || !isLetter(f[0]) {
		return false
	}
	for i := 1; i < len(f); i++ {
		c := f[i]
		if !isLetter(c) && !(c >= '0' && c <= '9') && c != '-' && c != '_' {
			return false
		}
	}
	return true
}

func isLetter(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

func isIndex(f string) bool {
	if f == "" {
		return false
	}
	for i := 0; i < len(f); i++ {
		if f[i] < '0' || f[i] > '9' {
			return false
		}
	}
	return true
}

// set stores val under the key made of frags. A key that is both a value
// and the prefix of other keys is an error; a value given again replaces
// the old one.
func set(root map[string]any, frags []string, val string) error {
	cur := root
	for i, f := range frags[:len(frags)-1] {
		switch next := cur[f].(type) {
		case nil:
			m := map[string]any{}
			cur[f] = m
			cur = m
		case map[string]any:
			cur = next
		default:
			return inconsistent(frags[:i+1])
		}
	}
	last := frags[len(frags)-1]
	if _, ok := cur[last].(map[string]any); ok {
		return inconsistent(frags)
	}
	cur[last] = val
	return nil
}

func inconsistent(frags []string) error {
	return qapi.Errorf(qapi.GenericError, "Parameters '%s.*' used inconsistently", strings.Join(frags, "."))
}

// ParseOption parses a command-line option value: a JSON object if s
// begins with '{' (numbers become json.Number), keyval otherwise.
// isJSON tells which, since package qapi decodes the two differently.
func ParseOption(s, impliedKey string) (m map[string]any, isJSON bool, err error) {
	if strings.HasPrefix(s, "{") {
		m, err = parseJSONObject(s)
		return m, true, err
	}
	m, err = Parse(s, impliedKey)
	return m, false, err
}

// ParseJSONFilename parses a "json:{...}" pseudo-filename. As QEMU does,
// dotted keys inside it are nested ({"file.driver": "file"} is
// {"file": {"driver": "file"}}); where a dotted key and a nested object
// give the same member, the nested object wins (QEMU 7.2 does the same).
// ok is false, with no error, when s does not start with "json:".
func ParseJSONFilename(s string) (m map[string]any, ok bool, err error) {
	rest, ok := strings.CutPrefix(s, "json:")
	if !ok {
		return nil, false, nil
	}
	v, err := parseJSON(rest)
	if err != nil {
		return nil, true, qapi.Errorf(qapi.GenericError, "Could not parse the JSON options: %w", err)
	}
	obj, isObj := v.(map[string]any)
	if !isObj {
		return nil, true, qapi.Errorf(qapi.GenericError, "Invalid JSON object given")
	}
	m, err = qapi.Unflatten(obj)
	if err != nil {
		return nil, true, err
	}
	return m, true, nil
}
