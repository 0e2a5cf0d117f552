package qcow2

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blockbackend/graph"
)

// opsCrashStore is Storage over memory that "crashes" at a chosen write:
// that write and everything after it fail, and the crashed image keeps
// what was flushed plus any subset of the writes since the last flush.
type opsCrashStore struct {
	durable []byte
	cur     []byte
	pending []opsWrite
	writes  int
	crashAt int // the write that fails; -1: none
	crashed bool
}

type opsWrite struct {
	off  int64
	data []byte
}

var errOpsCrash = errors.New("crashed")

func (s *opsCrashStore) ReadAt(_ context.Context, p []byte, off int64) error {
	if off < 0 {
		return errors.New("negative offset")
	}
	clear(p)
	if off < int64(len(s.cur)) {
		copy(p, s.cur[off:])
	}
	return nil
}

func (s *opsCrashStore) WriteAt(_ context.Context, p []byte, off int64) error {
	if off < 0 || off > 1<<40 {
		return errors.New("offset out of range")
	}
	if s.crashed {
		return errOpsCrash
	}
	if s.writes == s.crashAt {
		s.crashed = true
		return errOpsCrash
	}
	s.writes++
	s.cur = opsApply(s.cur, off, p)
	s.pending = append(s.pending, opsWrite{off, append([]byte(nil), p...)})
	return nil
}

func opsApply(b []byte, off int64, p []byte) []byte {
	if end := off + int64(len(p)); end > int64(len(b)) {
		b = append(b, make([]byte, end-int64(len(b)))...)
	}
	copy(b[off:], p)
	return b
}

func (s *opsCrashStore) Size() (int64, error) { return int64(len(s.cur)), nil }

func (s *opsCrashStore) Flush(context.Context) error {
	if s.crashed {
		return errOpsCrash
	}
	s.durable = append(s.durable[:0], s.cur...)
	s.pending = nil
	return nil
}

func (s *opsCrashStore) Truncate(_ context.Context, size int64) error {
	return errors.New("not used")
}

// image after the crash: flushed state plus a random subset of the rest.
func (s *opsCrashStore) crashImage(rng *rand.Rand) []byte {
	img := append([]byte(nil), s.durable...)
	for _, w := range s.pending {
		if rng.Intn(2) == 0 {
			img = opsApply(img, w.off, w.data)
		}
	}
	return img
}

// TestOpsCrashSafety runs each metadata operation and cuts it at every
// write (keeping a random subset of the unflushed writes): qemu-img check
// must then find at most leaks and stale COPIED flags (harmless in the
// direction this code leaves them), never a refcount below its references,
// and the guest data must be the old or the new state.
func TestOpsCrashSafety(t *testing.T) {
	type op struct {
		name string
		make func(t *testing.T) string
		run  func(st Storage, h *Header) error
		// states lists acceptable active contents: "before" or a
		// snapshot name whose data must then be active.
		after string
	}
	ctx := context.Background()
	base := func(t *testing.T) string {
		p := newImage(t, "cluster_size=4k", "4M", "write -P 1 0 3M")
		must(t, "qemu-img", "snapshot", "-c", "s1", p)
		qemuIO(t, p, "write -P 2 1M 64k", "write -z 2M 64k")
		return p
	}
	ops := []op{
		{"create", base, func(st Storage, h *Header) error {
			_, err := createSnapshot(ctx, st, h, graph.SnapshotInfo{Name: "new"})
			return err
		}, ""},
		{"apply", base, func(st Storage, h *Header) error { return applySnapshot(ctx, st, h, "", "s1") }, "s1"},
		{"delete", base, func(st Storage, h *Header) error {
			_, err := deleteSnapshot(ctx, st, h, "", "s1")
			return err
		}, ""},
		{"refcount-width", base, func(st Storage, h *Header) error {
			return amendImage(ctx, st, h, &AmendOptions{RefcountBits: ptr(int64(4))}, false)
		}, ""},
		{"downgrade", base, func(st Storage, h *Header) error {
			return amendImage(ctx, st, h, &AmendOptions{Compat: "0.10"}, false)
		}, ""},
		{"shrink", base, func(st Storage, h *Header) error { return resizeImage(ctx, st, h, 1<<20+4096) }, "shrink"},
		{"grow-l1", base, func(st Storage, h *Header) error { return resizeImage(ctx, st, h, 8<<20) }, "grow"},
		{"rebuild", func(t *testing.T) string {
			p := base(t)
			setStoredRefcount(t, p, 40, 0)
			return p
		}, func(st Storage, h *Header) error {
			_, err := checkImage(ctx, st, h, graph.CheckFixLeaks|graph.CheckFixErrors)
			return err
		}, ""},
	}
	rng := rand.New(rand.NewSource(7))
	for _, o := range ops {
		t.Run(o.name, func(t *testing.T) {
			p := o.make(t)
			orig, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			before := readAs(t, p, "")
			var target []byte
			switch o.after {
			case "":
				target = before
			case "shrink":
				target = before[:1<<20+4096]
			case "grow":
				target = append(bytes.Clone(before), make([]byte, 4<<20)...)
			default:
				target = readAs(t, p, o.after)
			}
			// Count the writes of an uninterrupted run.
			full := &opsCrashStore{durable: bytes.Clone(orig), cur: bytes.Clone(orig), crashAt: -1}
			h, err := ParseHeader(storageReader{ctx, full}, int64(len(orig)))
			if err != nil {
				t.Fatal(err)
			}
			if err := o.run(full, h); err != nil {
				t.Fatalf("uninterrupted: %v", err)
			}
			dir := t.TempDir()
			t.Logf("%d writes", full.writes)
			known := map[string]bool{} // what was wrong before the operation
			for _, l := range runQemuCheck(t, p).Messages {
				known[l] = true
			}
			for n := 0; n <= full.writes; n++ {
				s := &opsCrashStore{durable: bytes.Clone(orig), cur: bytes.Clone(orig), crashAt: n}
				h, _ := ParseHeader(storageReader{ctx, s}, int64(len(orig)))
				err := o.run(s, h)
				if n < full.writes && !errors.Is(err, errOpsCrash) {
					t.Fatalf("crash at write %d: %v", n, err)
				}
				for sample := 0; sample < 3; sample++ {
					cp := filepath.Join(dir, "crash.qcow2")
					if err := os.WriteFile(cp, s.crashImage(rng), 0o644); err != nil {
						t.Fatal(err)
					}
					q := runQemuCheck(t, cp)
					for _, l := range q.Messages {
						if strings.HasPrefix(l, "ERROR") && !strings.HasPrefix(l, "ERROR OFLAG_COPIED") && !known[l] {
							t.Fatalf("crash at write %d of %d (sample %d): %s\n%s", n, full.writes, sample, l, strings.Join(q.Messages, "\n"))
						}
					}
					if q.CheckErrors != 0 {
						t.Fatalf("crash at write %d: check errors %+v", n, q)
					}
					got := readAs(t, cp, "")
					if !bytes.Equal(got, before) && !bytes.Equal(got, target) {
						if o.after != "shrink" || !bytes.Equal(got[:len(target)], target) {
							t.Fatalf("crash at write %d: active data is neither the old nor the new state", n)
						}
					}
				}
			}
		})
	}
}
