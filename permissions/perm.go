// Package permissions is QEMU's block permission bits — what a user of a
// node needs (perm) and what it lets others do (shared) — and their mapping
// onto the OFD byte locks QEMU puts on image files, byte for byte, so that
// QEMU's processes and blockbackend see each other's locks.
//
// It is pure bit algebra plus the lock mapping; who needs what is decided
// in package graph. Facts come from QEMU-FACTS.md ("Permissions and image
// locks") and QEMU's documentation of image locking.
package permissions

import "strings"

// Perm is a set of permission bits.
type Perm uint64

// QEMU's bits. GraphMod ("change children") was removed in QEMU 6.2; it is
// named here only so that old QEMU's messages and lock bytes (104/204) can
// be described. We never request it and always share it.
const (
	ConsistentRead Perm = 0x1
	Write          Perm = 0x2
	WriteUnchanged Perm = 0x4
	Resize         Perm = 0x8
	GraphMod       Perm = 0x10

	// All are the bits we request, share and lock.
	All = ConsistentRead | Write | WriteUnchanged | Resize
)

var bitNames = []struct{ human, qapi string }{
	{"consistent read", "consistent-read"},
	{"write", "write"},
	{"write unchanged", "write-unchanged"},
	{"resize", "resize"},
	{"change children", "graph-mod"},
}

// Names lists the bits' names as QEMU prints them in messages, lowest bit
// first.
func (p Perm) Names() []string {
	var out []string
	for i, n := range bitNames {
		if p&(1<<i) != 0 {
			out = append(out, n.human)
		}
	}
	return out
}

// QAPINames lists the bits' QAPI enum names (BlockPermission), lowest bit
// first.
func (p Perm) QAPINames() []string {
	var out []string
	for i, n := range bitNames {
		if p&(1<<i) != 0 {
			out = append(out, n.qapi)
		}
	}
	return out
}

// String joins Names with ", ", as QEMU's conflict message does.
func (p Perm) String() string { return strings.Join(p.Names(), ", ") }

// Parse returns the bit for a human or QAPI name.
func Parse(name string) (Perm, bool) {
	for i, n := range bitNames {
		if name == n.human || name == n.qapi {
			return 1 << i, true
		}
	}
	return 0, false
}

// bits lists the single bits of All in QEMU's order (the order in which
// lock conflicts are looked for and reported).
var bits = []Perm{ConsistentRead, Write, WriteUnchanged, Resize}

// LockMode is the file driver's "locking" option.
type LockMode int

// The locking modes.
const (
	LockAuto LockMode = iota // OFD locks if the kernel has them, else none
	LockOn                   // OFD locks, or POSIX locks with a warning
	LockOff                  // no locks
)

// EnumValues lists the QAPI values of OnOffAuto.
func (LockMode) EnumValues() []string { return []string{"auto", "on", "off"} }

// ParseLockMode parses "auto", "on" or "off".
func ParseLockMode(s string) (LockMode, bool) {
	switch s {
	case "auto", "":
		return LockAuto, true
	case "on":
		return LockOn, true
	case "off":
		return LockOff, true
	}
	return 0, false
}

func (m LockMode) String() string { return [...]string{"auto", "on", "off"}[m] }
