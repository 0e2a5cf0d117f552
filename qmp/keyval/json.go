package keyval

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"blockbackend/qmp/qapi"
)

// maxDepth bounds nesting, as QEMU's JSON parser does (it allows 1024).
const maxDepth = 1024

// syntaxError is a JSON syntax error; its text follows QEMU's
// "JSON parse error, ..." form.
type syntaxError struct{ msg string }

func (e *syntaxError) Error() string { return "JSON parse error, " + e.msg }

// parseJSONObject parses s, which starts with '{', as one JSON object.
func parseJSONObject(s string) (map[string]any, error) {
	v, err := parseJSON(s)
	if err != nil {
		return nil, qapi.Errorf(qapi.GenericError, "%w", err)
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, qapi.Errorf(qapi.GenericError, "Invalid JSON object given")
	}
	return m, nil
}

// parseJSON parses exactly one JSON value: numbers stay json.Number, a
// duplicate key in an object is an error (QEMU: "JSON parse error,
// duplicate key"), and text after the value is an error (QEMU: "Expecting
// at most one JSON value").
func parseJSON(s string) (any, error) {
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	v, err := readValue(dec, 0)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		//lint:ignore ST1005 QEMU's wording, shown to users as is
		return nil, errors.New("Expecting at most one JSON value")
	}
	return v, nil
}

func tokenErr(err error) error {
	if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
		return &syntaxError{"unexpected end of input"}
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return &syntaxError{se.Error()}
	}
	return &syntaxError{err.Error()}
}

func readValue(dec *json.Decoder, depth int) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, tokenErr(err)
	}
	switch t := tok.(type) {
	case json.Delim:
		if depth >= maxDepth {
			return nil, &syntaxError{"too many nested data structures"}
		}
		switch t {
		case '{':
			m := map[string]any{}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, tokenErr(err)
				}
				k, ok := kt.(string)
				if !ok {
					return nil, &syntaxError{fmt.Sprintf("key is not a string: %v", kt)}
				}
				if _, dup := m[k]; dup {
					return nil, &syntaxError{"duplicate key"}
				}
				v, err := readValue(dec, depth+1)
				if err != nil {
					return nil, err
				}
				m[k] = v
			}
			if _, err := dec.Token(); err != nil { // '}'
				return nil, tokenErr(err)
			}
			return m, nil
		case '[':
			l := []any{}
			for dec.More() {
				v, err := readValue(dec, depth+1)
				if err != nil {
					return nil, err
				}
				l = append(l, v)
			}
			if _, err := dec.Token(); err != nil { // ']'
				return nil, tokenErr(err)
			}
			return l, nil
		}
		return nil, &syntaxError{fmt.Sprintf("unexpected '%v'", t)}
	default:
		return t, nil // string, json.Number, bool, nil
	}
}
