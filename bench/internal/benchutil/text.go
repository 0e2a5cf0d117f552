package benchutil

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ParseSize reads a size with an optional K, M or G suffix; with mib set
// it must be a whole number of MiB (image sizes).
func ParseSize(s string, mib bool) (int64, error) {
	if s == "" {
		return 0, fmt.Errorf("empty size")
	}
	mult := int64(1)
	switch strings.ToUpper(s[len(s)-1:]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	}
	if mult > 1 {
		s = s[:len(s)-1]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n > (1<<50)/mult {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	if mib && (n*mult)%(1<<20) != 0 {
		return 0, fmt.Errorf("%q is not a positive multiple of 1 MiB", s)
	}
	return n * mult, nil
}

// LoadAvg is the first three fields of /proc/loadavg, to show how busy
// the machine was: other work on a 2-core machine is the main source of
// noise.
func LoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

// FirstLine is the first line of s, trimmed.
func FirstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// Short cuts a message for a table cell.
func Short(s string) string {
	if len(s) > 160 {
		return s[:157] + "..."
	}
	return s
}

// Num formats a figure for a table cell: "-" for none.
func Num(v float64) string {
	if v == 0 {
		return "-"
	}
	return strconv.FormatFloat(v, 'f', 1, 64)
}
