package qapi

import "testing"

// Accepted and refused sizes as qemu-storage-daemon 7.2 parses them.
func TestParseSize(t *testing.T) {
	ok := map[string]uint64{
		"0": 0, "512": 512, "64k": 64 << 10, "4K": 4096, " 4k": 4096, "+5": 5, "1.": 1, "005": 5,
		"1.5G": 3 << 29, "1.5k": 1536, "1.333k": 1365, "1.3333333k": 1365, "0.5k": 512, "2m": 2 << 20,
		"1t": 1 << 40, "1p": 1 << 50, "1e": 1 << 60, "15E": 15 << 60, "512b": 512, "512B": 512,
		"0x200": 512, "0X5": 5, "0x3k": 3072, "1.0000000000000001k": 1024,
		"18446744073709551615": 1<<64 - 1, "15.9999E": 18446628781559090944,
	}
	for s, want := range ok {
		got, err := ParseSize(s)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", s, got, err, want)
		}
	}
	for _, s := range []string{
		"", " ", "x", "4kB", "1.5b", ".5k", "0x1.8k", "18446744073709551616", "16E", "-0", "-1", "5 ", "0x",
		"0.5", "1.5kk", "1e3", "++1", "+-1", "1_000", "0x1g0",
	} {
		if v, err := ParseSize(s); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", s, v)
		}
	}
}

func TestKeyvalIntegers(t *testing.T) {
	for s, want := range map[string]int64{"0": 0, "010": 8, "0x10": 16, " -5": -5, "+7": 7, "-9223372036854775808": -1 << 63} {
		if got, err := parseKeyvalInt(s); err != nil || got != want {
			t.Errorf("parseKeyvalInt(%q) = %d, %v", s, got, err)
		}
	}
	for _, s := range []string{"", "08", "0x", "1.0", "9223372036854775808", "1 ", "0b1", "1_0"} {
		if _, err := parseKeyvalInt(s); err == nil {
			t.Errorf("parseKeyvalInt(%q) succeeded", s)
		}
	}
	if u, err := parseKeyvalUint("-1"); err != nil || u != 1<<64-1 {
		t.Errorf("parseKeyvalUint(-1) = %d, %v", u, err)
	}
}
