package qapi

import (
	"errors"
	"math"
	"strconv"
	"strings"
)

// Size is QAPI's 'size' type: a byte count. In keyval mode it accepts
// QEMU's size syntax (see ParseSize); in JSON mode a JSON integer.
type Size uint64

var errSyntax = errors.New("invalid number")

// isCSpace is C's isspace, which strtol and friends skip before a number.
func isCSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'
}

func trimCSpace(s string) string {
	i := 0
	for i < len(s) && isCSpace(s[i]) {
		i++
	}
	return s[i:]
}

// parseCUint parses the digits of a C strtoull with base 0: "0x"/"0X"
// prefix for hex, a leading 0 for octal, else decimal. The whole string
// must be consumed; overflow is an error (ERANGE).
func parseCUint(s string) (uint64, error) {
	base := 10
	switch {
	case len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'):
		base, s = 16, s[2:]
	case len(s) > 1 && s[0] == '0':
		base, s = 8, s[1:]
	}
	if s == "" {
		return 0, errSyntax
	}
	var v uint64
	for i := 0; i < len(s); i++ {
		d := digitVal(s[i])
		if d >= base {
			return 0, errSyntax
		}
		if v > (math.MaxUint64-uint64(d))/uint64(base) {
			return 0, strconv.ErrRange
		}
		v = v*uint64(base) + uint64(d)
	}
	return v, nil
}

func digitVal(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'z':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'Z':
		return int(c-'A') + 10
	}
	return 99
}

// parseKeyvalInt is QEMU's qemu_strtoi64(s, NULL, 0, &v): leading white
// space, an optional sign, then a base-0 C integer, nothing after it.
func parseKeyvalInt(s string) (int64, error) {
	s = trimCSpace(s)
	neg := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	u, err := parseCUint(s)
	if err != nil {
		return 0, err
	}
	if neg {
		if u > 1<<63 {
			return 0, strconv.ErrRange
		}
		return -int64(u), nil
	}
	if u > math.MaxInt64 {
		return 0, strconv.ErrRange
	}
	return int64(u), nil
}

// parseKeyvalUint is QEMU's qemu_strtou64(s, NULL, 0, &v). Like C's
// strtoull it accepts a minus sign and negates modulo 2^64: QEMU relies on
// that ("-1" is UINT64_MAX), and a narrower member then fails its range check.
func parseKeyvalUint(s string) (uint64, error) {
	s = trimCSpace(s)
	neg := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	u, err := parseCUint(s)
	if err != nil {
		return 0, err
	}
	if neg {
		return -u, nil
	}
	return u, nil
}

// parseKeyvalFloat is QEMU's qemu_strtod: strtod after leading white space,
// nothing after the number.
func parseKeyvalFloat(s string) (float64, error) {
	s = trimCSpace(s)
	if s == "" || strings.ContainsRune(s, '_') {
		return 0, errSyntax
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, errSyntax
	}
	return f, nil
}

// ParseSize parses a size the way QEMU's qemu_strtosz does, as observed on
// QEMU 7.2: optional leading white space and '+'; a decimal number with an
// optional fraction ("1.5"), or a hex number ("0x200", no fraction); then an
// optional one-letter suffix, case-insensitive: B (bytes), K, M, G, T, P, E
// (powers of 1024). A fraction needs a suffix other than B. Negative values,
// exponents, trailing text and values of 2^64 or more are errors. The
// fraction is read as a double and fraction × unit rounded to the nearest
// byte, which is what QEMU's results show.
func ParseSize(s string) (uint64, error) {
	s = trimCSpace(s)
	if s != "" && s[0] == '+' {
		s = s[1:]
	}
	if s == "" || s[0] == '-' || s[0] == '+' {
		return 0, errSyntax
	}
	i := 0
	hex := len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')
	var intPart, fracPart string
	if hex {
		i = 2
		for i < len(s) && digitVal(s[i]) < 16 {
			i++
		}
		intPart = s[:i]
		if i == 2 {
			return 0, errSyntax
		}
	} else {
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
		if i == 0 {
			return 0, errSyntax
		}
		intPart = s[:i]
		if i < len(s) && s[i] == '.' {
			j := i + 1
			for j < len(s) && s[j] >= '0' && s[j] <= '9' {
				j++
			}
			fracPart = s[i+1 : j]
			i = j
		}
	}
	var shift uint
	if i < len(s) {
		switch s[i] {
		case 'b', 'B':
			shift = 0
		case 'k', 'K':
			shift = 10
		case 'm', 'M':
			shift = 20
		case 'g', 'G':
			shift = 30
		case 't', 'T':
			shift = 40
		case 'p', 'P':
			shift = 50
		case 'e', 'E':
			shift = 60
		default:
			return 0, errSyntax
		}
		i++
	}
	if i != len(s) {
		return 0, errSyntax
	}
	var whole uint64
	var err error
	if hex {
		whole, err = parseCUint(intPart)
	} else {
		whole, err = strconv.ParseUint(intPart, 10, 64)
	}
	if err != nil {
		return 0, strconv.ErrRange
	}
	if whole > math.MaxUint64>>shift {
		return 0, strconv.ErrRange
	}
	v := whole << shift
	if strings.Trim(fracPart, "0") != "" {
		if shift == 0 {
			return 0, errSyntax // fractional bytes
		}
		// QEMU reads the fraction as a double and rounds fraction × unit to
		// the nearest byte: "15.9999E" is 15 EiB + 1152806225053537408,
		// not the exact 1152806225053537395.
		frac, err := strconv.ParseFloat("0."+fracPart, 64)
		if err != nil {
			return 0, errSyntax
		}
		add := math.Round(frac * float64(uint64(1)<<shift))
		if add >= 1<<64 || uint64(add) > math.MaxUint64-v {
			return 0, strconv.ErrRange
		}
		v += uint64(add)
	}
	return v, nil
}
