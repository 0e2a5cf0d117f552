package qcow2

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"blockbackend/graph"
)

type checkCase struct {
	name string
	// make builds the image and returns its path.
	make func(t *testing.T) string
	// repairable: after check -r all the image is clean for qemu-img.
	repairable bool
}

func writes(cmds ...string) []string { return cmds }

func checkCases() []checkCase {
	basic := func(t *testing.T) string {
		return newImage(t, "", "64M", writes("write -P 1 0 1M", "write -P 2 10M 64k")...)
	}
	withSnap := func(t *testing.T) string {
		p := basic(t)
		must(t, "qemu-img", "snapshot", "-c", "s1", p)
		qemuIO(t, p, "write -P 3 64k 64k", "write -P 4 20M 128k")
		must(t, "qemu-img", "snapshot", "-c", "s2", p)
		qemuIO(t, p, "write -P 5 0 64k")
		return p
	}
	damaged := func(base func(*testing.T) string, dmg func(t *testing.T, p string)) func(*testing.T) string {
		return func(t *testing.T) string {
			p := base(t)
			dmg(t, p)
			return p
		}
	}
	l2e := func(t *testing.T, p string) int64 { return l2EntryOffset(t, p, 0) }
	return []checkCase{
		{"clean", basic, true},
		{"empty", func(t *testing.T) string { return newImage(t, "", "1G") }, true},
		{"v2", func(t *testing.T) string {
			return newImage(t, "compat=0.10", "64M", "write -P 1 0 300k", "write 5M 4k")
		}, true},
		{"cluster512-refcount64", func(t *testing.T) string {
			return newImage(t, "cluster_size=512,refcount_bits=64", "8M", "write -P 1 0 100k", "write 3M 4k", "write 7M 1k")
		}, true},
		{"refcount1", func(t *testing.T) string {
			return newImage(t, "refcount_bits=1", "64M", "write 0 1M", "discard 64k 64k")
		}, true},
		{"extended-l2", func(t *testing.T) string {
			return newImage(t, "extended_l2=on,cluster_size=128k", "64M", "write 0 4k", "write 1M 64k", "write -z 2M 4k")
		}, true},
		{"compressed", func(t *testing.T) string {
			dir := t.TempDir()
			raw := filepath.Join(dir, "src.raw")
			must(t, "qemu-img", "create", "-q", "-f", "raw", raw, "16M")
			must(t, "qemu-io", "-f", "raw", "-c", "write -P 7 0 2M", "-c", "write -P 9 5M 100k", raw)
			p := filepath.Join(dir, "c.qcow2")
			must(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, p)
			qemuIO(t, p, "write -P 1 64k 64k")
			return p
		}, true},
		{"snapshots", withSnap, true},
		{"leak", damaged(basic, func(t *testing.T, p string) { setStoredRefcount(t, p, 5, 2) }), true},
		{"leak-free-cluster", damaged(basic, func(t *testing.T, p string) { setStoredRefcount(t, p, 21, 1) }), true},
		{"refcount-zero", damaged(basic, func(t *testing.T, p string) { setStoredRefcount(t, p, 5, 0) }), true},
		{"refcount-drop", damaged(withSnap, func(t *testing.T, p string) {
			// Cluster 5 holds guest data shared by both snapshots.
			setStoredRefcount(t, p, 6, 1)
		}), true},
		{"copied-l2", damaged(basic, func(t *testing.T, p string) {
			poke64(t, p, l2e(t, p), peek64(t, p, l2e(t, p))&^FlagCopied)
		}), true},
		{"copied-l1", damaged(basic, func(t *testing.T, p string) {
			_, h := openTestImage(t, p)
			poke64(t, p, int64(h.L1TableOffset), peek64(t, p, int64(h.L1TableOffset))&^FlagCopied)
		}), true},
		{"copied-set-shared", damaged(withSnap, func(t *testing.T, p string) {
			off := l2EntryOffset(t, p, 128<<10)
			poke64(t, p, off, peek64(t, p, off)|FlagCopied)
		}), true},
		{"unaligned-data", damaged(basic, func(t *testing.T, p string) {
			poke64(t, p, l2e(t, p), peek64(t, p, l2e(t, p))+0x200)
		}), false},
		{"data-past-eof", damaged(basic, func(t *testing.T, p string) {
			poke64(t, p, l2e(t, p), FlagCopied|0x10000000)
		}), false},
		{"reserved-bits", damaged(basic, func(t *testing.T, p string) {
			poke64(t, p, l2e(t, p), peek64(t, p, l2e(t, p))|1<<57)
		}), false},
		{"refblock-shared", damaged(basic, func(t *testing.T, p string) {
			poke64(t, p, l2e(t, p), FlagCopied|0x20000)
		}), false},
		{"reftable-unaligned", damaged(basic, func(t *testing.T, p string) {
			_, h := openTestImage(t, p)
			off := int64(h.RefcountTableOffset)
			poke64(t, p, off, peek64(t, p, off)+0x200)
		}), true},
		{"bitmaps", func(t *testing.T) string {
			p := newImage(t, "", "64M", "write -P 1 0 1M")
			must(t, "qemu-img", "bitmap", "--add", p, "b0")
			must(t, "qemu-img", "bitmap", "--add", "-g", "4k", p, "b1")
			qemuIO(t, p, "write -P 2 4M 1M")
			return p
		}, true},
		{"data-file", func(t *testing.T) string {
			dir := t.TempDir()
			p := filepath.Join(dir, "df.qcow2")
			must(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "d.raw"), p, "16M")
			qemuIO(t, p, "write -P 1 0 1M", "write -z 4M 64k")
			return p
		}, true},
		{"prealloc-metadata", func(t *testing.T) string {
			return newImage(t, "preallocation=metadata", "16M", "write -z 0 128k")
		}, true},
		{"compressed-snapshot", func(t *testing.T) string {
			dir := t.TempDir()
			raw := filepath.Join(dir, "src.raw")
			must(t, "qemu-img", "create", "-q", "-f", "raw", raw, "4M")
			must(t, "qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", raw)
			p := filepath.Join(dir, "c.qcow2")
			must(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, p)
			must(t, "qemu-img", "snapshot", "-c", "s", p)
			qemuIO(t, p, "write -P 1 0 64k")
			return p
		}, true},
		{"compressed-copied", func(t *testing.T) string {
			dir := t.TempDir()
			raw := filepath.Join(dir, "src.raw")
			must(t, "qemu-img", "create", "-q", "-f", "raw", raw, "4M")
			must(t, "qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", raw)
			p := filepath.Join(dir, "c.qcow2")
			must(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, p)
			off := l2EntryOffset(t, p, 64<<10)
			poke64(t, p, off, peek64(t, p, off)|FlagCopied)
			return p
		}, false},
		{"extl2-bad-bitmap", damaged(func(t *testing.T) string {
			return newImage(t, "extended_l2=on", "16M", "write -P 1 0 64k", "write -P 2 1M 4k")
		}, func(t *testing.T, p string) {
			off := l2EntryOffset(t, p, 1<<20) + 8
			poke64(t, p, off, peek64(t, p, off)|1<<33) // allocated and zero
			off = l2EntryOffset(t, p, 2<<20) + 8
			poke64(t, p, off, 1) // allocated without a host cluster
		}), false},
		{"snapshot-l1-unaligned", damaged(withSnap, func(t *testing.T, p string) {
			_, h := openTestImage(t, p)
			poke64(t, p, int64(h.SnapshotsOffset), peek64(t, p, int64(h.SnapshotsOffset))+0x200)
		}), false},
		{"snapshot-l1-huge", damaged(withSnap, func(t *testing.T, p string) {
			_, h := openTestImage(t, p)
			off := int64(h.SnapshotsOffset) + 8
			v := peek64(t, p, off)
			poke64(t, p, off, v&0xffffffff|uint64(0x10000000)<<32)
		}), false},
		{"refcount-overflow", damaged(func(t *testing.T) string {
			return newImage(t, "refcount_bits=1", "16M", "write 0 128k")
		}, func(t *testing.T, p string) {
			off := l2EntryOffset(t, p, 0)
			poke64(t, p, off+8, peek64(t, p, off))
		}), false},
		{"lazy-dirty", func(t *testing.T) string {
			p := newImage(t, "lazy_refcounts=on", "10M")
			// qemu-io aborts on purpose, leaving the image dirty.
			run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", "-c", "abort", p)
			return p
		}, true},
	}
}

func resultOf(r graph.CheckResult) checkReport {
	return checkReport{
		Corruptions: r.Corruptions, Leaks: r.Leaks, CheckErrors: r.CheckErrors,
		CorruptionsFixed: r.CorruptionsFixed, LeaksFixed: r.LeaksFixed,
		ImageEndOffset: r.ImageEndOffset, TotalClusters: r.TotalClusters,
		AllocatedClusters: r.AllocatedClusters, FragmentedClusters: r.FragmentedClusters,
		CompressedClusters: r.CompressedClusters, Messages: r.Messages,
	}
}

func copyFile(t *testing.T, src string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "copy.qcow2")
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestCheckMatchesQemu: our check finds what qemu-img check finds, with
// the same numbers and lines.
func TestCheckMatchesQemu(t *testing.T) {
	for _, tc := range checkCases() {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.make(t)
			want := runQemuCheck(t, p)
			st, h := openTestImage(t, p)
			res, err := checkImage(context.Background(), st, h, 0)
			if err != nil {
				t.Fatalf("check: %v", err)
			}
			got := resultOf(res)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("check differs from qemu-img check:\n got %+v\nwant %+v\n got lines:\n%s\nwant lines:\n%s",
					got, want, strings.Join(got.Messages, "\n"), strings.Join(want.Messages, "\n"))
			}
		})
	}
}

// TestCheckRepair: our repair fixes what qemu-img check -r fixes, and
// qemu-img check then finds the image clean.
func TestCheckRepair(t *testing.T) {
	for _, tc := range checkCases() {
		for _, mode := range []struct {
			name string
			fix  graph.CheckFix
		}{{"leaks", graph.CheckFixLeaks}, {"all", graph.CheckFixLeaks | graph.CheckFixErrors}} {
			t.Run(tc.name+"/"+mode.name, func(t *testing.T) {
				p := tc.make(t)
				theirs := copyFile(t, p)
				q := runQemuCheck(t, theirs, "-r", mode.name)
				st, h := openTestImage(t, p)
				res, err := checkImage(context.Background(), st, h, mode.fix)
				if q.CheckErrors != 0 {
					if mode.name == "all" && err == nil {
						// Ours repaired what qemu-img could not: fine if clean.
						if after := runQemuCheck(t, p); after.Corruptions != 0 || after.Leaks != 0 {
							t.Errorf("qemu-img check after our repair: %+v", after)
						}
						return
					}
					if err == nil {
						t.Errorf("qemu-img check -r %s failed (%v), ours did not: %+v", mode.name, q.Messages, res)
					}
					return
				}
				if err != nil {
					t.Fatalf("repair: %v\n%s", err, strings.Join(res.Messages, "\n"))
				}
				if tc.repairable && (res.LeaksFixed != q.LeaksFixed || res.CorruptionsFixed != q.CorruptionsFixed) {
					t.Errorf("fixed leaks/corruptions: ours %d/%d, qemu-img %d/%d\nours:\n%s\nqemu:\n%s",
						res.LeaksFixed, res.CorruptionsFixed, q.LeaksFixed, q.CorruptionsFixed,
						strings.Join(res.Messages, "\n"), strings.Join(q.Messages, "\n"))
				}
				if tc.repairable && !reflect.DeepEqual(res.Messages, q.Messages) {
					t.Errorf("repair lines differ:\nours:\n%s\nqemu:\n%s", strings.Join(res.Messages, "\n"), strings.Join(q.Messages, "\n"))
				}
				after := runQemuCheck(t, p)
				if mode.name == "all" && tc.repairable && (after.Corruptions != 0 || after.Leaks != 0 || after.CheckErrors != 0) {
					t.Errorf("qemu-img check after our repair: %+v", after)
				}
				if mode.name == "leaks" && after.Leaks != 0 && q.Leaks == 0 {
					t.Errorf("leaks left after -r leaks: %+v", after)
				}
				if after.Corruptions > q.Corruptions || (tc.repairable && after.Corruptions != q.Corruptions) {
					t.Errorf("corruptions left: ours %d, after qemu-img's repair %d\n%s", after.Corruptions, q.Corruptions,
						strings.Join(after.Messages, "\n"))
				}
			})
		}
	}
}

// TestRebuildRefcountStructure: the refcounts of a dirty lazy-refcounts
// image rebuilt from the references alone satisfy qemu-img check.
func TestRebuildRefcountStructure(t *testing.T) {
	p := newImage(t, "lazy_refcounts=on,cluster_size=4k", "10M", "write -P 1 0 1M")
	must(t, "qemu-img", "snapshot", "-c", "s", p)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 512k 1M", "-c", "write -c -P 4 4M 64k", "-c", "abort", p)
	st, h := openTestImage(t, p)
	if err := rebuildRefcountStructure(context.Background(), st, h); err != nil {
		t.Fatal(err)
	}
	if h.IncompatibleFeatures&IncompatDirty != 0 {
		t.Fatal("still dirty")
	}
	assertClean(t, p)
}

// TestRepairClearsCorruptBit: a repair that leaves nothing wrong clears
// the corrupt bit, as qemu-img check -r does.
func TestRepairClearsCorruptBit(t *testing.T) {
	p := newImage(t, "", "16M", "write 0 64k")
	poke64(t, p, 72, IncompatCorrupt)
	st, h := openTestImage(t, p)
	if _, err := checkImage(context.Background(), st, h, 0); err != nil || h.IncompatibleFeatures != IncompatCorrupt {
		t.Fatalf("check without repair: %v %#x", err, h.IncompatibleFeatures)
	}
	if _, err := checkImage(context.Background(), st, h, graph.CheckFixLeaks); err != nil {
		t.Fatal(err)
	}
	if infoField(t, p, "corrupt") != "false" {
		t.Fatal("corrupt bit still set")
	}
}
