package permissions

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"
)

func TestNames(t *testing.T) {
	cases := []struct {
		p    Perm
		str  string
		qapi []string
	}{
		{0, "", nil},
		{Write, "write", []string{"write"}},
		{ConsistentRead | WriteUnchanged | Resize, "consistent read, write unchanged, resize",
			[]string{"consistent-read", "write-unchanged", "resize"}},
		{GraphMod, "change children", []string{"graph-mod"}},
	}
	for _, c := range cases {
		if got := c.p.String(); got != c.str {
			t.Errorf("%#x.String() = %q, want %q", uint64(c.p), got, c.str)
		}
		if got := c.p.QAPINames(); !reflect.DeepEqual(got, c.qapi) {
			t.Errorf("%#x.QAPINames() = %v, want %v", uint64(c.p), got, c.qapi)
		}
	}
	for _, n := range []string{"consistent read", "consistent-read", "write unchanged", "write-unchanged", "resize", "graph-mod"} {
		if _, ok := Parse(n); !ok {
			t.Errorf("Parse(%q) failed", n)
		}
	}
	if _, ok := Parse("bogus"); ok {
		t.Error("Parse(bogus) succeeded")
	}
}

func openTwice(t *testing.T) (string, int, int) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	fd1, err := unix.Open(p, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fd2, err := unix.Open(p, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd1); unix.Close(fd2) })
	return p, fd1, fd2
}

func newLocker(t *testing.T, fd int, p string, mode LockMode) *Locker {
	t.Helper()
	l, err := NewLocker(fd, p, mode, nil)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Two open file descriptions conflict even in one process: that is what
// makes two nodes on one image see each other, as in QEMU.
func TestLocksBetweenDescriptions(t *testing.T) {
	p, fd1, fd2 := openTwice(t)
	if !ProbeOFD(fd1) {
		t.Skip("no OFD locks on this kernel")
	}
	a, b := newLocker(t, fd1, p, LockAuto), newLocker(t, fd2, p, LockAuto)
	// A device without share-rw: holds read+write, shares read, write-unchanged, resize.
	if err := a.Set(ConsistentRead|Write, ConsistentRead|WriteUnchanged|Resize); err != nil {
		t.Fatal(err)
	}
	if got := sortedBytes(a.held); !reflect.DeepEqual(got, []int64{100, 101, 201}) {
		t.Fatalf("held bytes %v, want QEMU's 100, 101, 201", got)
	}
	err := b.Prepare(ConsistentRead|Write, All)
	var le *LockError
	if !errors.As(err, &le) || err.Error() != `Failed to get "write" lock` || le.Hint() != "Is another process using the image ["+p+"]?" {
		t.Fatalf("second writer: %v", err)
	}
	if !errors.Is(err, unix.EAGAIN) {
		t.Error("lock conflict does not match EAGAIN")
	}
	if len(b.held) != 0 {
		t.Fatalf("failed Prepare kept bytes %v", b.held)
	}
	// A reader that does not share write fails the other way round.
	err = b.Prepare(ConsistentRead, ConsistentRead|WriteUnchanged|Resize)
	if err == nil || err.Error() != `Failed to get shared "write" lock` {
		t.Fatalf("reader not sharing write: %v", err)
	}
	// A force-share reader is fine.
	if err := b.Set(ConsistentRead, All); err != nil {
		t.Fatal(err)
	}
	// Prepare/Abort restores, Prepare/Commit drops.
	if err := a.Prepare(ConsistentRead, All); err != nil {
		t.Fatal(err)
	}
	a.Abort()
	if got := sortedBytes(a.held); !reflect.DeepEqual(got, []int64{100, 101, 201}) {
		t.Fatalf("after Abort %v", got)
	}
	if err := a.Set(ConsistentRead, All); err != nil {
		t.Fatal(err)
	}
	if got := sortedBytes(a.held); !reflect.DeepEqual(got, []int64{100}) {
		t.Fatalf("after Commit %v", got)
	}
	if p, s := a.Held(); p != ConsistentRead || s != All {
		t.Fatalf("Held() = %v / %v", p, s)
	}
	// Now b may write.
	if err := b.Set(ConsistentRead|Write, All); err != nil {
		t.Fatal(err)
	}
	a.Close()
	a.Close()
	if len(a.held) != 0 {
		t.Fatal("Close kept bytes")
	}
}

func TestLockingOff(t *testing.T) {
	p, fd1, fd2 := openTwice(t)
	a := newLocker(t, fd1, p, LockOff)
	if err := a.Set(ConsistentRead|Write, 0); err != nil {
		t.Fatal(err)
	}
	b := newLocker(t, fd2, p, LockAuto)
	if err := b.Set(ConsistentRead|Write, 0); err != nil {
		t.Fatalf("locking=off still locked: %v", err)
	}
	if _, ok := ParseLockMode("bogus"); ok {
		t.Error("ParseLockMode(bogus)")
	}
}
