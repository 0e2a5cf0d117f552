package qmp

import (
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"

	"blockbackend/qmp/qapi"
)

// This file is the JSON layer of the wire: a lexer and a "streamer" that
// split a byte stream into JSON values the way QEMU's monitor does, a
// parser with QEMU's error texts, and an encoder that prints values
// byte-for-byte as QEMU 7.2 does (member order, spacing, escapes, number
// formats). Everything here was written from QEMU's documented and
// observed behaviour (qemu-storage-daemon 7.2.22), not from its code.
//
// The splitting rule (QEMU's json-streamer): tokens are collected while
// the count of open braces and brackets is positive; when both counts are
// back to zero (or one goes negative) the collected tokens are parsed as
// one value and the collection restarts. A scalar at depth zero is thus a
// value of its own ("1 2" is two values). A lexical error is reported at
// once as "JSON parse error, stray '<bad text>'", the collection is
// dropped, and the lexer skips input until a promising resynchronisation
// point: a brace or bracket, a control character other than tab, or one
// of the bytes 0xFE/0xFF that never occur in UTF-8 (clients send those to
// force a reset, as qmp-spec.txt says).

// Limits on one value, as QEMU has them: total token bytes, token count
// and nesting depth. Exceeding one is an error and resets the collection.
const (
	maxTokenSize  = 64 << 20
	maxTokenCount = 2 << 20
	maxNesting    = 1 << 10
)

type tokKind uint8

const (
	tkLCurly tokKind = iota + 1
	tkRCurly
	tkLSquare
	tkRSquare
	tkColon
	tkComma
	tkInteger
	tkFloat
	tkKeyword
	tkString
	tkError
)

type token struct {
	kind tokKind
	text string
}

type lexState uint8

const (
	lsStart lexState = iota
	lsRecovery
	lsDQ
	lsDQEsc
	lsSQ
	lsSQEsc
	lsNeg
	lsZero
	lsNonZero
	lsDot
	lsFrac
	lsExp
	lsExpSign
	lsExpDigits
	lsKeyword
)

// parseError is a JSON-level error: the reply is a GenericError whose
// description is the message.
type parseError string

func (e parseError) Error() string { return string(e) }

// lexer turns bytes into tokens. It is not safe for concurrent use. The
// zero value is ready.
type lexer struct {
	state lexState
	buf   []byte // the token being lexed
	// Set for the duration of feed.
	onToken func(k tokKind, text string)
	onError func(msg string)
}

func (s *lexer) feed(p []byte, onToken func(tokKind, string), onError func(string)) {
	s.onToken, s.onError = onToken, onError
	for i := 0; i < len(p); {
		if s.step(p[i]) {
			i++
		}
	}
	s.onToken, s.onError = nil, nil
}

// streamer splits a byte stream into JSON values. It is not safe for
// concurrent use. The zero value is ready.
type streamer struct {
	lex    lexer
	tokens []token
	size   int // bytes in tokens
	braces int
	brkts  int
	emit   func(v any, err error)
}

// feed lexes p and calls emit for every complete value (a JSON null as
// jsonNull, so that v is non-nil) or error, in input order.
func (s *streamer) feed(p []byte, emit func(v any, err error)) {
	s.emit = emit
	s.lex.feed(p, s.token, s.lexError)
	s.emit = nil
}

// step handles one byte; it returns false when the byte must be handled
// again in the new state (it ended the previous token).
func (s *lexer) step(c byte) bool {
	switch s.state {
	case lsRecovery:
		if (c < 0x20 && c != '\t') || c >= 0xFE || c == '{' || c == '}' || c == '[' || c == ']' {
			s.state = lsStart
			return false
		}
		return true
	case lsStart:
		switch {
		case c == ' ' || c == '\t' || c == '\r' || c == '\n':
		case c == '{':
			s.onToken(tkLCurly, "{")
		case c == '}':
			s.onToken(tkRCurly, "}")
		case c == '[':
			s.onToken(tkLSquare, "[")
		case c == ']':
			s.onToken(tkRSquare, "]")
		case c == ':':
			s.onToken(tkColon, ":")
		case c == ',':
			s.onToken(tkComma, ",")
		case c == '"':
			s.begin(lsDQ, c)
		case c == '\'':
			s.begin(lsSQ, c)
		case c == '-':
			s.begin(lsNeg, c)
		case c == '0':
			s.begin(lsZero, c)
		case c >= '1' && c <= '9':
			s.begin(lsNonZero, c)
		case c >= 'a' && c <= 'z':
			s.begin(lsKeyword, c)
		default:
			s.buf = append(s.buf[:0], c)
			s.fail()
		}
		return true
	case lsDQ, lsSQ:
		quote := byte('"')
		if s.state == lsSQ {
			quote = '\''
		}
		switch {
		case c == quote:
			s.buf = append(s.buf, c)
			s.state = lsStart
			s.emitBuf(tkString)
		case c == '\\':
			s.buf = append(s.buf, c)
			s.state++ // lsDQEsc / lsSQEsc
		case c < 0x20 || c >= 0xFE:
			s.buf = append(s.buf, c)
			s.fail()
		default:
			s.add(c)
		}
		return true
	case lsDQEsc, lsSQEsc:
		// Which escapes are valid is the parser's business; the lexer
		// only keeps an escaped quote from ending the string.
		if c < 0x20 || c >= 0xFE {
			s.buf = append(s.buf, c)
			s.fail()
			return true
		}
		s.state--
		s.add(c)
		return true
	case lsNeg:
		switch {
		case c == '0':
			s.state = lsZero
		case c >= '1' && c <= '9':
			s.state = lsNonZero
		default:
			s.buf = append(s.buf, c)
			s.fail()
			return true
		}
		s.add(c)
		return true
	case lsZero, lsNonZero:
		switch {
		case c == '.':
			s.state = lsDot
		case c == 'e' || c == 'E':
			s.state = lsExp
		case c >= '0' && c <= '9':
			if s.state == lsZero {
				s.buf = append(s.buf, c)
				s.fail()
				return true
			}
		default:
			s.state = lsStart
			s.emitBuf(tkInteger)
			return false
		}
		s.add(c)
		return true
	case lsDot, lsExpSign:
		if c >= '0' && c <= '9' {
			if s.state == lsDot {
				s.state = lsFrac
			} else {
				s.state = lsExpDigits
			}
			s.add(c)
			return true
		}
		s.buf = append(s.buf, c)
		s.fail()
		return true
	case lsExp:
		switch {
		case c == '+' || c == '-':
			s.state = lsExpSign
		case c >= '0' && c <= '9':
			s.state = lsExpDigits
		default:
			s.buf = append(s.buf, c)
			s.fail()
			return true
		}
		s.add(c)
		return true
	case lsFrac, lsExpDigits:
		switch {
		case c >= '0' && c <= '9':
		case (c == 'e' || c == 'E') && s.state == lsFrac:
			s.state = lsExp
		default:
			s.state = lsStart
			s.emitBuf(tkFloat)
			return false
		}
		s.add(c)
		return true
	case lsKeyword:
		if c >= 'a' && c <= 'z' {
			s.add(c)
			return true
		}
		s.state = lsStart
		s.emitBuf(tkKeyword)
		return false
	}
	s.state = lsStart
	return false
}

func (s *lexer) begin(st lexState, c byte) {
	s.state = st
	s.buf = append(s.buf[:0], c)
}

func (s *lexer) emitBuf(k tokKind) {
	text := string(s.buf)
	s.buf = s.buf[:0]
	s.onToken(k, text)
}

// add appends c to the token being lexed, refusing a token that would
// exceed the size limit on its own (a never-ending string).
func (s *lexer) add(c byte) {
	if len(s.buf)+1 > maxTokenSize {
		s.buf = s.buf[:0]
		s.state = lsRecovery
		s.onError("JSON token size limit exceeded")
		return
	}
	s.buf = append(s.buf, c)
}

// fail reports the bad text in buf and skips to a resynchronisation point.
func (s *lexer) fail() {
	msg := "JSON parse error, stray '" + string(s.buf) + "'"
	s.buf = s.buf[:0]
	s.state = lsRecovery
	s.onError(msg)
}

func (s *streamer) lexError(msg string) {
	s.reset()
	s.emit(nil, parseError(msg))
}

func (s *streamer) reset() {
	s.tokens = s.tokens[:0]
	s.size, s.braces, s.brkts = 0, 0, 0
}

// token is the streamer proper: it collects tokens and emits a value when
// the braces and brackets balance.
func (s *streamer) token(k tokKind, text string) {
	emit := s.emit
	switch k {
	case tkLCurly:
		s.braces++
	case tkRCurly:
		s.braces--
	case tkLSquare:
		s.brkts++
	case tkRSquare:
		s.brkts--
	}
	var err error
	switch {
	case s.size+len(text)+1 > maxTokenSize:
		err = parseError("JSON token size limit exceeded")
	case len(s.tokens)+1 > maxTokenCount:
		err = parseError("JSON token count limit exceeded")
	case s.braces+s.brkts > maxNesting:
		err = parseError("JSON nesting depth limit exceeded")
	}
	if err != nil {
		s.reset()
		emit(nil, err)
		return
	}
	s.tokens = append(s.tokens, token{k, text})
	s.size += len(text)
	if (s.braces > 0 || s.brkts > 0) && s.braces >= 0 && s.brkts >= 0 {
		return
	}
	p := parser{toks: s.tokens}
	v, err := p.value()
	s.reset()
	if len(s.tokens) > 1<<16 {
		s.tokens = nil // do not keep a huge backing array alive
	}
	if err != nil {
		emit(nil, err)
		return
	}
	if v == nil {
		v = jsonNull
	}
	emit(v, nil)
}

// jsonNull stands for a parsed JSON null where a nil would be ambiguous
// (emit's v). Inside trees, null is plain nil.
type jsonNullType struct{}

var jsonNull = jsonNullType{}

// object is a JSON object that remembers its members' insertion order,
// which QEMU's printing depends on.
type object struct {
	keys []string
	vals []any
	idx  map[string]int
}

func (o *object) get(k string) (any, bool) {
	if o.idx != nil {
		i, ok := o.idx[k]
		if !ok {
			return nil, false
		}
		return o.vals[i], true
	}
	for i, key := range o.keys {
		if key == k {
			return o.vals[i], true
		}
	}
	return nil, false
}

// set adds or replaces member k.
func (o *object) set(k string, v any) {
	if o.idx != nil {
		if i, ok := o.idx[k]; ok {
			o.vals[i] = v
			return
		}
	} else {
		for i, key := range o.keys {
			if key == k {
				o.vals[i] = v
				return
			}
		}
	}
	o.keys = append(o.keys, k)
	o.vals = append(o.vals, v)
	if o.idx == nil && len(o.keys) > 16 {
		o.idx = make(map[string]int, len(o.keys))
		for i, key := range o.keys {
			o.idx[key] = i
		}
	} else if o.idx != nil {
		o.idx[k] = len(o.keys) - 1
	}
}

func (o *object) has(k string) bool {
	_, ok := o.get(k)
	return ok
}

// parser is a recursive-descent parser over one collected value's tokens.
// Its depth is bounded by the streamer's nesting limit.
type parser struct {
	toks []token
	pos  int
}

func perr(msg string) error { return parseError("JSON parse error, " + msg) }

func (p *parser) next() (token, bool) {
	if p.pos >= len(p.toks) {
		return token{}, false
	}
	t := p.toks[p.pos]
	p.pos++
	return t, true
}

func (p *parser) peek() (token, bool) {
	if p.pos >= len(p.toks) {
		return token{}, false
	}
	return p.toks[p.pos], true
}

// value parses one value. Numbers become json.Number holding the literal,
// strings Go strings, objects *object, arrays []any, null nil.
func (p *parser) value() (any, error) {
	t, ok := p.next()
	if !ok {
		return nil, perr("expecting value")
	}
	switch t.kind {
	case tkLCurly:
		return p.object()
	case tkLSquare:
		return p.array()
	case tkString:
		return parseString(t.text)
	case tkInteger, tkFloat:
		return json.Number(t.text), nil
	case tkKeyword:
		switch t.text {
		case "true":
			return true, nil
		case "false":
			return false, nil
		case "null":
			return nil, nil
		}
		return nil, perr("invalid keyword '" + t.text + "'")
	}
	return nil, perr("expecting value")
}

func (p *parser) object() (any, error) {
	o := &object{}
	if t, ok := p.peek(); ok && t.kind == tkRCurly {
		p.pos++
		return o, nil
	}
	for {
		kt, ok := p.peek()
		if !ok {
			return nil, perr("premature EOI")
		}
		k, err := p.value()
		if err != nil {
			return nil, err
		}
		key, isStr := k.(string)
		if kt.kind != tkString || !isStr {
			return nil, perr("key is not a string in object")
		}
		if t, ok := p.next(); !ok || t.kind != tkColon {
			return nil, perr("missing : in object pair")
		}
		v, err := p.value()
		if err != nil {
			return nil, err
		}
		if o.has(key) {
			return nil, perr("duplicate key")
		}
		o.set(key, v)
		t, ok := p.next()
		if !ok {
			return nil, perr("premature EOI")
		}
		switch t.kind {
		case tkRCurly:
			return o, nil
		case tkComma:
		default:
			return nil, perr("expected separator in dict")
		}
	}
}

func (p *parser) array() (any, error) {
	l := []any{}
	if t, ok := p.peek(); ok && t.kind == tkRSquare {
		p.pos++
		return l, nil
	}
	for {
		v, err := p.value()
		if err != nil {
			return nil, err
		}
		l = append(l, v)
		t, ok := p.next()
		if !ok {
			return nil, perr("premature EOI")
		}
		switch t.kind {
		case tkRSquare:
			return l, nil
		case tkComma:
		default:
			return nil, perr("expected separator in list")
		}
	}
}

// parseString decodes a string token (with its quotes). QEMU accepts
// \u0000 and the "modified UTF-8" two-byte NUL, and refuses unpaired
// surrogates and invalid UTF-8.
func parseString(tok string) (string, error) {
	s := tok[1 : len(tok)-1]
	var b strings.Builder
	for i := 0; i < len(s); {
		c := s[i]
		if c == '\\' {
			if i+1 >= len(s) {
				return "", perr("invalid escape sequence in string")
			}
			e := s[i+1]
			i += 2
			switch e {
			case '"', '\'', '\\', '/':
				b.WriteByte(e)
			case 'b':
				b.WriteByte('\b')
			case 'f':
				b.WriteByte('\f')
			case 'n':
				b.WriteByte('\n')
			case 'r':
				b.WriteByte('\r')
			case 't':
				b.WriteByte('\t')
			case 'u':
				r, n, err := unicodeEscape(tok, s, i)
				if err != nil {
					return "", err
				}
				i = n
				b.WriteRune(r)
			default:
				return "", perr("invalid escape sequence in string")
			}
			continue
		}
		if c < utf8.RuneSelf {
			b.WriteByte(c)
			i++
			continue
		}
		if c == 0xC0 && i+1 < len(s) && s[i+1] == 0x80 {
			b.WriteByte(0)
			i += 2
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size <= 1 || !validCodepoint(r) {
			return "", perr("invalid UTF-8 sequence in string")
		}
		b.WriteString(s[i : i+size])
		i += size
	}
	return b.String(), nil
}

// unicodeEscape decodes the \uXXXX whose hex digits start at s[i] (a
// surrogate pair takes two escapes). It returns the rune and the index
// after it.
func unicodeEscape(tok, s string, i int) (rune, int, error) {
	bad := func(at int) error {
		// QEMU quotes up to four characters after "\u", from the token
		// (so a closing quote may show).
		rest := tok[1+at:]
		if len(rest) > 4 {
			rest = rest[:4]
		}
		return perr("\\u" + rest + " is not a valid Unicode character")
	}
	hex4 := func(at int) (rune, bool) {
		if at+4 > len(s) {
			return 0, false
		}
		v, err := strconv.ParseUint(s[at:at+4], 16, 32)
		if err != nil || strings.ContainsAny(s[at:at+4], "+-") {
			return 0, false
		}
		return rune(v), true
	}
	r, ok := hex4(i)
	if !ok {
		return 0, 0, bad(i)
	}
	switch {
	case r >= 0xD800 && r < 0xDC00:
		if i+10 <= len(s) && s[i+4] == '\\' && s[i+5] == 'u' {
			if lo, ok := hex4(i + 6); ok && lo >= 0xDC00 && lo < 0xE000 {
				if c := utf16.DecodeRune(r, lo); validCodepoint(c) {
					return c, i + 10, nil
				}
			}
		}
		return 0, 0, bad(i)
	case !validCodepoint(r):
		return 0, 0, bad(i)
	}
	return r, i + 4, nil
}

// validCodepoint is QEMU's notion of a character a string may hold: not a
// surrogate and not a Unicode noncharacter (U+FDD0..U+FDEF, U+xFFFE,
// U+xFFFF), whether written raw or as \u escapes.
func validCodepoint(r rune) bool {
	return r >= 0 && r <= utf8.MaxRune && !(r >= 0xD800 && r < 0xE000) &&
		!(r >= 0xFDD0 && r <= 0xFDEF) && r&0xFFFE != 0xFFFE
}

// ---- encoding ----

// order returns the indices of o's members in QEMU's printing order.
func (o *object) order() []int {
	idx := make([]int, len(o.keys))
	b := make([]uint32, len(o.keys))
	for i := range idx {
		idx[i] = i
		b[i] = qapi.QDictBucket(o.keys[i])
	}
	sort.SliceStable(idx, func(x, y int) bool {
		if b[idx[x]] != b[idx[y]] {
			return b[idx[x]] < b[idx[y]]
		}
		return idx[x] > idx[y]
	})
	return idx
}

// encode prints tree v (as built by the parser or toTree) as QEMU prints
// a QMP message, with the line ending QEMU's monitor sends ("\r\n").
func encode(v any, pretty bool) []byte {
	e := encoder{pretty: pretty}
	e.value(v, 0)
	e.buf = append(e.buf, '\r', '\n')
	return e.buf
}

type encoder struct {
	buf    []byte
	pretty bool
}

func (e *encoder) newline(level int) {
	e.buf = append(e.buf, '\r', '\n')
	for i := 0; i < level; i++ {
		e.buf = append(e.buf, "    "...)
	}
}

func (e *encoder) value(v any, level int) {
	switch v := v.(type) {
	case nil, jsonNullType:
		e.buf = append(e.buf, "null"...)
	case bool:
		e.buf = strconv.AppendBool(e.buf, v)
	case string:
		e.str(v)
	case json.Number:
		e.buf = append(e.buf, formatNumber(string(v))...)
	case *object:
		e.buf = append(e.buf, '{')
		for n, i := range v.order() {
			if n > 0 {
				e.buf = append(e.buf, ',')
				if !e.pretty {
					e.buf = append(e.buf, ' ')
				}
			}
			if e.pretty {
				e.newline(level + 1)
			}
			e.str(v.keys[i])
			e.buf = append(e.buf, ": "...)
			e.value(v.vals[i], level+1)
		}
		if e.pretty {
			e.newline(level)
		}
		e.buf = append(e.buf, '}')
	case []any:
		e.buf = append(e.buf, '[')
		for i, x := range v {
			if i > 0 {
				e.buf = append(e.buf, ',')
				if !e.pretty {
					e.buf = append(e.buf, ' ')
				}
			}
			if e.pretty {
				e.newline(level + 1)
			}
			e.value(x, level+1)
		}
		if e.pretty {
			e.newline(level)
		}
		e.buf = append(e.buf, ']')
	default:
		// Not a tree value: convert first (never happens for trees built
		// by toTree).
		t, err := toTree(v)
		if err != nil {
			e.str(fmt.Sprintf("<unencodable %T>", v))
			return
		}
		e.value(t, level)
	}
}

// str prints a string as QEMU does (qapi.AppendQuoted).
func (e *encoder) str(s string) { e.buf = qapi.AppendQuoted(e.buf, s) }

// formatNumber prints a JSON number literal the way QEMU prints the QNum
// it parses to: an integer that fits int64 or uint64 as such, anything
// else as a double with C's "%.17g" (so 0.1 is 0.10000000000000001, 2.0
// is 2 and 1e400 is inf).
func formatNumber(lit string) string {
	if !strings.ContainsAny(lit, ".eE") {
		if i, err := strconv.ParseInt(lit, 10, 64); err == nil {
			return strconv.FormatInt(i, 10)
		}
		if u, err := strconv.ParseUint(lit, 10, 64); err == nil {
			return strconv.FormatUint(u, 10)
		}
	}
	f, err := strconv.ParseFloat(lit, 64)
	if err != nil && !math.IsInf(f, 0) && f != 0 {
		return lit
	}
	return formatDouble(f)
}

// formatDouble is C's printf("%.17g").
func formatDouble(f float64) string {
	switch {
	case math.IsInf(f, 1):
		return "inf"
	case math.IsInf(f, -1):
		return "-inf"
	case math.IsNaN(f):
		return "nan"
	}
	const prec = 17
	s := strconv.FormatFloat(f, 'e', prec-1, 64)
	mant, expStr, _ := strings.Cut(s, "e")
	exp, _ := strconv.Atoi(expStr)
	if exp < -4 || exp >= prec {
		mant = trimFraction(mant)
		sign := "+"
		if exp < 0 {
			sign, exp = "-", -exp
		}
		es := strconv.Itoa(exp)
		if len(es) < 2 {
			es = "0" + es
		}
		return mant + "e" + sign + es
	}
	return trimFraction(strconv.FormatFloat(f, 'f', prec-1-exp, 64))
}

func trimFraction(s string) string {
	if !strings.Contains(s, ".") {
		return s
	}
	s = strings.TrimRight(s, "0")
	return strings.TrimSuffix(s, ".")
}

// toTree converts a Go value to an encoder tree: trees pass through; other
// values go through encoding/json (their json tags give names and member
// order) and are parsed back keeping that order.
func toTree(v any) (any, error) {
	switch v := v.(type) {
	case nil, bool, string, json.Number, *object:
		return v, nil
	case jsonNullType:
		return nil, nil
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			t, err := toTree(x)
			if err != nil {
				return nil, err
			}
			out[i] = t
		}
		return out, nil
	case map[string]any:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		o := &object{}
		for _, k := range keys {
			t, err := toTree(v[k])
			if err != nil {
				return nil, err
			}
			o.set(k, t)
		}
		return o, nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return parseComplete(b)
}

// parseComplete parses one complete JSON text (no size limits: it is for
// our own output).
func parseComplete(b []byte) (any, error) {
	var l lexer
	var toks []token
	var lexErr error
	onTok := func(k tokKind, text string) { toks = append(toks, token{k, text}) }
	onErr := func(msg string) {
		if lexErr == nil {
			lexErr = parseError(msg)
		}
	}
	l.feed(b, onTok, onErr)
	l.feed([]byte{' '}, onTok, onErr) // end a trailing number or keyword
	if lexErr != nil {
		return nil, lexErr
	}
	p := parser{toks: toks}
	v, err := p.value()
	if err == nil && p.pos != len(toks) {
		err = fmt.Errorf("qmp: trailing JSON tokens")
	}
	return v, err
}

// toPlain converts a parsed tree into the plain form handlers get:
// map[string]any, []any, json.Number, string, bool, nil.
func toPlain(v any) any {
	switch v := v.(type) {
	case *object:
		m := make(map[string]any, len(v.keys))
		for i, k := range v.keys {
			m[k] = toPlain(v.vals[i])
		}
		return m
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = toPlain(x)
		}
		return out
	case jsonNullType:
		return nil
	}
	return v
}
