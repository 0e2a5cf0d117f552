package qapi

import (
	"encoding/json"
	"sort"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// QDictBucket is the bucket of key in QEMU's QDict hash table (512
// buckets, the TDB string hash). QEMU prints a dictionary bucket by
// bucket, and within a bucket newest member first; matching that gives
// QEMU's member order on the wire ({"return": ..., "id": ...} but
// {"id": ..., "error": ...}; "micro", "minor", "major") and in json:
// filenames ({"offset": 512, "driver": "raw", "size": 1024, "file": ...}).
func QDictBucket(key string) uint32 {
	v := uint32(0x238F13AF) * uint32(len(key))
	for i := 0; i < len(key); i++ {
		v += uint32(key[i]) << (uint(i) * 5 % 24)
	}
	return (1103515243*v + 12345) % 512
}

// CompactJSON prints v (a tree of maps, slices, strings, numbers, bools
// and nils) as QEMU prints a QDict on one line, as in json: filenames:
// ", " and ": " between members, members in QDict order. Members that
// share a bucket are in name order: a Go map keeps no insertion order
// (QEMU puts the newest first; no keys of a json: filename collide).
func CompactJSON(v any) string {
	var sb strings.Builder
	compactJSON(&sb, v)
	return sb.String()
}

func compactJSON(sb *strings.Builder, v any) {
	switch x := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Slice(keys, func(i, j int) bool {
			bi, bj := QDictBucket(keys[i]), QDictBucket(keys[j])
			if bi != bj {
				return bi < bj
			}
			return keys[i] < keys[j]
		})
		sb.WriteString("{")
		for i, k := range keys {
			if i > 0 {
				sb.WriteString(", ")
			}
			compactJSON(sb, k)
			sb.WriteString(": ")
			compactJSON(sb, x[k])
		}
		sb.WriteString("}")
	case []any:
		sb.WriteString("[")
		for i, e := range x {
			if i > 0 {
				sb.WriteString(", ")
			}
			compactJSON(sb, e)
		}
		sb.WriteString("]")
	case string:
		sb.Write(AppendQuoted(nil, x))
	default:
		b, err := json.Marshal(x)
		if err != nil {
			b = []byte("null")
		}
		sb.Write(b)
	}
}

const hexdigits = "0123456789ABCDEF"

// AppendQuoted appends s as QEMU prints a JSON string: ASCII controls
// and everything outside printable ASCII as \uXXXX with upper-case hex
// (surrogate pairs above the BMP), invalid UTF-8 as \uFFFD; '/' is not
// escaped.
func AppendQuoted(buf []byte, s string) []byte {
	buf = append(buf, '"')
	u4 := func(r rune) {
		buf = append(buf, '\\', 'u', hexdigits[r>>12&15], hexdigits[r>>8&15], hexdigits[r>>4&15], hexdigits[r&15])
	}
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch c {
			case '"':
				buf = append(buf, '\\', '"')
			case '\\':
				buf = append(buf, '\\', '\\')
			case '\b':
				buf = append(buf, '\\', 'b')
			case '\f':
				buf = append(buf, '\\', 'f')
			case '\n':
				buf = append(buf, '\\', 'n')
			case '\r':
				buf = append(buf, '\\', 'r')
			case '\t':
				buf = append(buf, '\\', 't')
			default:
				if c < 0x20 || c == 0x7F {
					u4(rune(c))
				} else {
					buf = append(buf, c)
				}
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if c == 0xC0 && i+1 < len(s) && s[i+1] == 0x80 {
			r, size = 0, 2
		}
		i += size
		if r > 0xFFFF {
			h, l := utf16.EncodeRune(r)
			u4(h)
			u4(l)
			continue
		}
		u4(r) // RuneError for invalid bytes is U+FFFD
	}
	buf = append(buf, '"')
	return buf
}
