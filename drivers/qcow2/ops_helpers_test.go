package qcow2

// Helpers for the tests of check, snapshots, amend and measure: images
// made and judged by the real qemu-img and qemu-io.

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fileStorage is Storage over an *os.File.
type fileStorage struct{ f *os.File }

func (s fileStorage) ReadAt(_ context.Context, p []byte, off int64) error {
	n, err := s.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return nil
	}
	return err
}

func (s fileStorage) WriteAt(_ context.Context, p []byte, off int64) error {
	_, err := s.f.WriteAt(p, off)
	return err
}

func (s fileStorage) Size() (int64, error) {
	fi, err := s.f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (s fileStorage) Flush(context.Context) error { return s.f.Sync() }

func (s fileStorage) Truncate(_ context.Context, size int64) error { return s.f.Truncate(size) }

// needTool fails the test when a QEMU tool is missing.
func needTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is needed for this test (Debian: apt-get install qemu-utils): %v", name, err)
	}
	return p
}

// run runs a tool and returns stdout, stderr and the exit code.
func run(t testing.TB, name string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(needTool(t, name), args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("%s %v: %v", name, args, err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}

// must runs a tool that must succeed.
func must(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, errs, code := run(t, name, args...)
	if code != 0 {
		t.Fatalf("%s %v: exit %d: %s%s", name, args, code, out, errs)
	}
	return out
}

// newImage makes a qcow2 image with qemu-img create and runs qemu-io
// commands on it.
func newImage(t testing.TB, opts, size string, ioCmds ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	must(t, "qemu-img", append(args, p, size)...)
	qemuIO(t, p, ioCmds...)
	return p
}

func qemuIO(t testing.TB, p string, cmds ...string) {
	t.Helper()
	if len(cmds) == 0 {
		return
	}
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	must(t, "qemu-io", append(args, p)...)
}

// checkReport is what qemu-img check says about an image.
type checkReport struct {
	Corruptions        int   `json:"corruptions"`
	Leaks              int   `json:"leaks"`
	CheckErrors        int   `json:"check-errors"`
	CorruptionsFixed   int   `json:"corruptions-fixed"`
	LeaksFixed         int   `json:"leaks-fixed"`
	ImageEndOffset     int64 `json:"image-end-offset"`
	TotalClusters      int64 `json:"total-clusters"`
	AllocatedClusters  int64 `json:"allocated-clusters"`
	FragmentedClusters int64 `json:"fragmented-clusters"`
	CompressedClusters int64 `json:"compressed-clusters"`
	Messages           []string
}

func runQemuCheck(t testing.TB, p string, extra ...string) checkReport {
	t.Helper()
	args := append([]string{"check", "--output=json"}, extra...)
	out, errs, code := run(t, "qemu-img", append(args, p)...)
	var qc checkReport
	if code == 1 && out == "" {
		// The check itself failed ("Check failed: ...").
		qc.CheckErrors = -1
	} else if err := json.Unmarshal([]byte(out), &qc); err != nil {
		t.Fatalf("qemu-img check %s: exit %d, %v: %s%s", p, code, err, out, errs)
	}
	for _, l := range strings.Split(errs, "\n") {
		if l != "" && !strings.HasPrefix(l, "qemu-img:") {
			qc.Messages = append(qc.Messages, l)
		}
	}
	return qc
}

// openTestImage opens p for the metadata operations.
func openTestImage(t testing.TB, p string) (fileStorage, *Header) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st := fileStorage{f}
	size, _ := st.Size()
	h, err := ParseHeader(f, size)
	if err != nil {
		t.Fatalf("ParseHeader %s: %v", p, err)
	}
	return st, h
}

// poke writes big-endian v (8 bytes) at off.
func poke64(t testing.TB, p string, off int64, v uint64) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	be.PutUint64(b[:], v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

func peek64(t testing.TB, p string, off int64) uint64 {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return be.Uint64(b[:])
}

// setStoredRefcount overwrites the stored refcount of host cluster k.
func setStoredRefcount(t testing.TB, p string, k int64, v uint64) {
	t.Helper()
	st, h := openTestImage(t, p)
	g := h.Geometry()
	idx, i := g.RefcountIndex(k * h.ClusterSize())
	rb := int64(peek64(t, p, int64(h.RefcountTableOffset)+int64(idx)*8) &^ RefcountTableReservedMask)
	blk := make([]byte, h.ClusterSize())
	if err := st.ReadAt(context.Background(), blk, rb); err != nil {
		t.Fatal(err)
	}
	if err := SetRefcount(blk, h.RefcountOrder, i, v); err != nil {
		t.Fatal(err)
	}
	if err := st.WriteAt(context.Background(), blk, rb); err != nil {
		t.Fatal(err)
	}
}

// l2EntryOffset is the file offset of the L2 entry for guest offset off
// in the active tables.
func l2EntryOffset(t testing.TB, p string, guest int64) int64 {
	t.Helper()
	_, h := openTestImage(t, p)
	g := h.Geometry()
	l1e := peek64(t, p, int64(h.L1TableOffset)+int64(g.L1Index(guest))*8)
	l2 := int64(l1e & OffsetMask)
	if l2 == 0 {
		t.Fatalf("no L2 table for guest offset %#x", guest)
	}
	return l2 + int64(g.L2Index(guest))*g.L2EntrySize()
}
