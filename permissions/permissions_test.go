package permissions

import (
	"reflect"
	"testing"
)

func TestPermNames(t *testing.T) {
	cases := []struct {
		p     Perm
		str   string
		names []string
		qapi  []string
	}{
		{0, "", nil, nil},
		{ConsistentRead, "consistent read", []string{"consistent read"}, []string{"consistent-read"}},
		{Write, "write", []string{"write"}, []string{"write"}},
		{WriteUnchanged, "write unchanged", []string{"write unchanged"}, []string{"write-unchanged"}},
		{Resize, "resize", []string{"resize"}, []string{"resize"}},
		{GraphMod, "change children", []string{"change children"}, []string{"graph-mod"}},
		{ConsistentRead | Write, "consistent read, write",
			[]string{"consistent read", "write"}, []string{"consistent-read", "write"}},
		{ConsistentRead | WriteUnchanged | Resize, "consistent read, write unchanged, resize",
			[]string{"consistent read", "write unchanged", "resize"}, []string{"consistent-read", "write-unchanged", "resize"}},
		{All, "consistent read, write, write unchanged, resize",
			[]string{"consistent read", "write", "write unchanged", "resize"},
			[]string{"consistent-read", "write", "write-unchanged", "resize"}},
		// Unknown high bits have no name and are left out, never a panic.
		{Write | 1<<40, "write", []string{"write"}, []string{"write"}},
		{^Perm(0), "consistent read, write, write unchanged, resize, change children",
			[]string{"consistent read", "write", "write unchanged", "resize", "change children"},
			[]string{"consistent-read", "write", "write-unchanged", "resize", "graph-mod"}},
	}
	for _, c := range cases {
		if got := c.p.String(); got != c.str {
			t.Errorf("%#x.String() = %q, want %q", uint64(c.p), got, c.str)
		}
		if got := c.p.Names(); !reflect.DeepEqual(got, c.names) {
			t.Errorf("%#x.Names() = %q, want %q", uint64(c.p), got, c.names)
		}
		if got := c.p.QAPINames(); !reflect.DeepEqual(got, c.qapi) {
			t.Errorf("%#x.QAPINames() = %q, want %q", uint64(c.p), got, c.qapi)
		}
	}
}

func TestParse(t *testing.T) {
	cases := []struct {
		name string
		want Perm
		ok   bool
	}{
		{"consistent read", ConsistentRead, true},
		{"consistent-read", ConsistentRead, true},
		{"write", Write, true},
		{"write unchanged", WriteUnchanged, true},
		{"write-unchanged", WriteUnchanged, true},
		{"resize", Resize, true},
		{"change children", GraphMod, true},
		{"graph-mod", GraphMod, true},
		{"", 0, false},
		{"Write", 0, false},
		{"consistent_read", 0, false},
		{"write ", 0, false},
	}
	for _, c := range cases {
		got, ok := Parse(c.name)
		if got != c.want || ok != c.ok {
			t.Errorf("Parse(%q) = %v, %v; want %v, %v", c.name, got, ok, c.want, c.ok)
		}
	}
	// Every bit round-trips through both of its names.
	for p := ConsistentRead; p <= GraphMod; p <<= 1 {
		for _, n := range []string{p.String(), p.QAPINames()[0]} {
			if got, ok := Parse(n); !ok || got != p {
				t.Errorf("Parse(%q) = %v, %v; want %v", n, got, ok, p)
			}
		}
	}
}

func TestParseLockMode(t *testing.T) {
	for _, c := range []struct {
		s    string
		want LockMode
	}{{"auto", LockAuto}, {"on", LockOn}, {"off", LockOff}} {
		got, err := ParseLockMode(c.s)
		if err != nil || got != c.want {
			t.Errorf("ParseLockMode(%q) = %v, %v", c.s, got, err)
		}
		if got.String() != c.s {
			t.Errorf("%v.String() = %q", got, got.String())
		}
	}
	for _, s := range []string{"", "On", "true", "bogus"} {
		if _, err := ParseLockMode(s); err == nil {
			t.Errorf("ParseLockMode(%q) succeeded", s)
		}
	}
	_, err := ParseLockMode("bogus")
	if want := "Parameter 'locking' does not accept value 'bogus'"; err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	if s := LockMode(7).String(); s != "LockMode(7)" {
		t.Errorf("LockMode(7).String() = %q", s)
	}
}

// Bytes is QEMU's mapping: 100+bit held, 200+bit unshared.
func TestBytes(t *testing.T) {
	cases := []struct {
		perm, shared Perm
		want         []int64
	}{
		{0, All, []int64{}},
		{0, 0, []int64{200, 201, 202, 203}},
		// A QEMU virtio-blk device without share-rw.
		{ConsistentRead | Write, ConsistentRead | WriteUnchanged | Resize, []int64{100, 101, 201}},
		// A qsd export, which shares everything.
		{ConsistentRead | Write, All, []int64{100, 101}},
		// qcow2 over its file child, writable.
		{ConsistentRead | Write | Resize, ConsistentRead | WriteUnchanged, []int64{100, 101, 103, 201, 203}},
		// graph-mod is never locked, whether needed or unshared.
		{GraphMod | ConsistentRead, All &^ Write, []int64{100, 201}},
	}
	for _, c := range cases {
		if got := Bytes(c.perm, c.shared); !reflect.DeepEqual(got, c.want) {
			t.Errorf("Bytes(%v / %v) = %v, want %v", c.perm, c.shared, got, c.want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"consistent read", "write-unchanged", "graph-mod", "", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, ok := Parse(s)
		if ok && (p == 0 || p&(p-1) != 0 || p.String() == "") {
			t.Fatalf("Parse(%q) = %v", s, p)
		}
		if m, err := ParseLockMode(s); err == nil && m.String() != s {
			t.Fatalf("ParseLockMode(%q) = %v", s, m)
		}
	})
}
