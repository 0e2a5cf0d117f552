// Package permissions is QEMU's block permission bits — what a user of a
// node needs (perm) and what it lets others do (shared) — and their mapping
// onto the OFD byte locks QEMU's file driver puts on image files, byte for
// byte as QEMU 7.2 does, so that qemu-img, qemu-io, QEMU itself and
// blockbackend see each other's locks.
//
// It is pure bit algebra (Perm, its names in messages and in QAPI) plus the
// lock mapping (Locker) and a reader of /proc/locks for tests and debugging.
// It is not the permission system: who needs and shares what, and conflicts
// between users inside one process ("Permission conflict on node …"), are
// decided in package graph, which calls a Locker's two-phase
// Prepare/Commit/Abort for each file node.
//
// Facts followed (no QEMU code): QEMU's documentation, "Disk image file
// locking" in qemu-block-drivers, and the section "Permissions and image
// locks" of the project's QEMU-FACTS.md, checked against QEMU 7.2's tools:
//
//   - bit i of a permission is lock byte 100+i while held and byte 200+i
//     while not shared; each is a one-byte shared (F_RDLCK) OFD lock;
//   - a conflict is found with F_OFD_GETLK for a write lock: on 200+i for
//     each bit needed ("Failed to get "write" lock"), then on 100+i for each
//     bit not shared ("Failed to get shared "write" lock");
//   - locking=auto locks only where OFD locks work, locking=on falls back to
//     POSIX locks with two warnings, locking=off takes none.
package permissions

import (
	"fmt"
	"strings"
)

// Perm is a set of permission bits (QEMU's BLK_PERM_*).
type Perm uint64

// QEMU's bits. GraphMod ("change children") was removed in QEMU 6.2; it is
// named here only so that old QEMU's messages and lock bytes (104/204) can
// be described. We never request it, never lock it and always share it.
const (
	ConsistentRead Perm = 0x1  // "consistent read"
	Write          Perm = 0x2  // "write"
	WriteUnchanged Perm = 0x4  // "write unchanged"
	Resize         Perm = 0x8  // "resize"
	GraphMod       Perm = 0x10 // "change children": removed in QEMU 6.2

	// All are the bits we request, share and lock (QEMU 7.2's BLK_PERM_ALL).
	All = ConsistentRead | Write | WriteUnchanged | Resize
)

// bitNames is indexed by bit number: the name in QEMU's messages and the
// QAPI BlockPermission enum name.
var bitNames = [...]struct{ human, qapi string }{
	{"consistent read", "consistent-read"},
	{"write", "write"},
	{"write unchanged", "write-unchanged"},
	{"resize", "resize"},
	{"change children", "graph-mod"},
}

// Names lists the bits' names as QEMU prints them in messages, lowest bit
// first. Bits without a name (above GraphMod) are left out.
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
// first, as x-debug-query-block-graph's "perm" and "shared-perm" arrays
// show them.
func (p Perm) QAPINames() []string {
	var out []string
	for i, n := range bitNames {
		if p&(1<<i) != 0 {
			out = append(out, n.qapi)
		}
	}
	return out
}

// String joins Names with ", ", as QEMU's conflict messages do
// ("permissions 'consistent read, write' are both required by …"); it is
// "" for no bits.
func (p Perm) String() string { return strings.Join(p.Names(), ", ") }

// Parse returns the bit named by a message name ("write unchanged") or a
// QAPI name ("write-unchanged").
func Parse(name string) (Perm, bool) {
	for i, n := range bitNames {
		if name == n.human || name == n.qapi {
			return 1 << i, true
		}
	}
	return 0, false
}

// bits lists the single bits of All in QEMU's order: the order in which
// lock bytes are numbered and conflicts are looked for and reported.
var bits = [...]Perm{ConsistentRead, Write, WriteUnchanged, Resize}

// LockMode is the file driver's "locking" option (QAPI OnOffAuto).
type LockMode int

// The locking modes.
const (
	LockAuto LockMode = iota // OFD locks if the kernel has them, else none (the default)
	LockOn                   // OFD locks, or POSIX locks with a warning
	LockOff                  // no locks
)

var lockModeNames = [...]string{"auto", "on", "off"}

// EnumValues lists the QAPI values of OnOffAuto.
func (LockMode) EnumValues() []string { return lockModeNames[:] }

// ParseLockMode parses "auto", "on" or "off". Anything else is refused
// with QAPI's wording for a bad enum value.
func ParseLockMode(s string) (LockMode, error) {
	for i, n := range lockModeNames {
		if s == n {
			return LockMode(i), nil
		}
	}
	return LockAuto, fmt.Errorf("Parameter 'locking' does not accept value '%s'", s) //nolint:staticcheck // QEMU's text
}

func (m LockMode) String() string {
	if m < 0 || int(m) >= len(lockModeNames) {
		return fmt.Sprintf("LockMode(%d)", int(m))
	}
	return lockModeNames[m]
}
