package qcow2

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"blockbackend/graph"
)

// applyIOCmds runs a subset of qemu-io's commands ("write [-P pattern]
// off len", "write -z [-u] off len"; sizes with k/M suffixes) through our driver, in order, one at
// a time as qemu-io does, then closes the graph.
func applyIOCmds(t *testing.T, p string, cmds []string) {
	t.Helper()
	// qemu-io opens with unmap: write -z -u may deallocate.
	g, n := openQcow2(t, p, false, map[string]any{"discard": "unmap"})
	ctx := context.Background()
	for _, c := range cmds {
		f := strings.Fields(c)
		switch {
		case f[0] == "write" && f[1] == "-z":
			var flags graph.ZeroFlags
			args := f[2:]
			if args[0] == "-u" {
				flags, args = graph.ZeroMayUnmap, args[1:]
			}
			if err := n.WriteZeroes(ctx, ioSize(t, args[0]), ioSize(t, args[1]), flags); err != nil {
				t.Fatalf("%s: %v", c, err)
			}
			continue
		case f[0] != "write":
			t.Fatalf("applyIOCmds: %q not handled", c)
		}
		pat := byte(0xcd) // qemu-io's default pattern
		args := f[1:]
		if args[0] == "-P" {
			v, err := strconv.ParseUint(args[1], 0, 8)
			if err != nil {
				t.Fatal(err)
			}
			pat, args = byte(v), args[2:]
		}
		off, length := ioSize(t, args[0]), ioSize(t, args[1])
		if err := n.WriteAt(ctx, bytes.Repeat([]byte{pat}, int(length)), off, 0); err != nil {
			t.Fatalf("%s: %v", c, err)
		}
	}
	if err := n.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
}

func ioSize(t *testing.T, s string) int64 {
	t.Helper()
	mul := int64(1)
	switch {
	case strings.HasSuffix(s, "k"):
		mul, s = 1<<10, strings.TrimSuffix(s, "k")
	case strings.HasSuffix(s, "M"):
		mul, s = 1<<20, strings.TrimSuffix(s, "M")
	}
	v, err := strconv.ParseInt(s, 0, 64)
	if err != nil {
		t.Fatal(err)
	}
	return v * mul
}

// TestAllocationOrderMatchesQemu pins the host layout: the same writes
// into the same image, one at a time, through qemu-io and through our
// driver give byte-identical files. In particular a write into a guest
// range with no L2 table allocates the table before the data cluster(s),
// as QEMU 7.2 does (the data then follows its table: no fragmentation).
func TestAllocationOrderMatchesQemu(t *testing.T) {
	qemuTool(t, "qemu-io")
	for _, tc := range []struct {
		name, opts, size string
		setup            []string // qemu-io commands on both images first
		snapshot         bool     // an internal snapshot after setup
		cmds             []string
	}{
		{name: "convert-shape", size: "4M", cmds: []string{"write -P 5 1M 1M", "write -P 6 3M 4k"}},
		{name: "partial", size: "4M", cmds: []string{"write -P 1 70000 1000", "write -P 2 3M 100k", "write -P 3 64k 64k"}},
		{name: "tables", opts: "cluster_size=4k", size: "8M", cmds: []string{
			"write -P 1 5M 8k", "write -P 2 1000 9000", "write -P 3 2M 4k", "write -P 4 7M 64k", "write -P 5 5M 16k"}},
		{name: "refblocks", opts: "cluster_size=512", size: "2M", cmds: []string{
			"write -P 1 0 200k", "write -P 2 1M 200k", "write -P 3 700k 512", "write -P 4 1900k 100k"}},
		{name: "extl2", opts: "extended_l2=on,cluster_size=64k", size: "8M", cmds: []string{
			"write -P 1 4k 4k", "write -P 2 1M 100k", "write -P 3 40k 8k", "write -P 4 6M 2k"}},
		{name: "after-snapshot", opts: "cluster_size=4k", size: "4M",
			setup:    []string{"write -P 1 0 1M", "write -P 2 3M 4k"},
			snapshot: true,
			cmds:     []string{"write -P 3 8k 4k", "write -P 4 3M 6k", "write -P 5 2M 4k"}},
		{name: "zeroes", opts: "cluster_size=4k", size: "8M", cmds: []string{
			"write -z 3M 8k", "write -P 1 3M 4k", "write -z -u 5M 64k", "write -P 2 5M 1k", "write -z 3M 4k", "write -P 3 7M 4k", "write -P 4 3M 1k"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			theirs := makeQemuImage(t, dir, "theirs.qcow2", tc.opts, tc.size, tc.setup...)
			if tc.snapshot {
				qemu(t, "qemu-img", "snapshot", "-c", "s1", theirs)
			}
			ours := filepath.Join(dir, "ours.qcow2")
			b, err := os.ReadFile(theirs)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(ours, b, 0o644); err != nil {
				t.Fatal(err)
			}
			args := []string{"-f", "qcow2"}
			for _, c := range tc.cmds {
				args = append(args, "-c", c)
			}
			qemu(t, "qemu-io", append(args, theirs)...)
			applyIOCmds(t, ours, tc.cmds)
			qemuCheck(t, ours)
			want, got := mustRead(t, theirs), mustRead(t, ours)
			if !bytes.Equal(got, want) {
				t.Errorf("files differ: %s\nqemu:\n%sours:\n%s", firstDiff(got, want),
					qemu(t, "qemu-img", "map", "--output=json", theirs),
					qemu(t, "qemu-img", "map", "--output=json", ours))
			}
		})
	}
}

// Requests that all write into a guest range with no L2 table yet, at
// once, allocate the table once: each data cluster and one table more,
// nothing leaked.
func TestConcurrentFirstWritesOneL2Table(t *testing.T) {
	qemuTool(t, "qemu-img")
	p := filepath.Join(t.TempDir(), "c.qcow2")
	const cs, writers = 65536, 16
	createImage(t, p, 4<<20, map[string]any{"cluster-size": cs})
	before := runQemuCheck(t, p).ImageEndOffset
	g, n := openQcow2(t, p, false, nil)
	ctx := context.Background()
	start := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			<-start
			if err := n.WriteAt(ctx, bytes.Repeat([]byte{byte(w + 1)}, cs), int64(w)*2*cs, 0); err != nil {
				t.Error(err)
			}
		}(w)
	}
	close(start)
	wg.Wait()
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, p)
	r := runQemuCheck(t, p)
	if want := before + (writers+1)*cs; r.Leaks != 0 || r.AllocatedClusters != writers || r.ImageEndOffset != want {
		t.Fatalf("allocated clusters %d, leaks %d, image end %d; want %d, 0, %d", r.AllocatedClusters, r.Leaks, r.ImageEndOffset, writers, want)
	}
	got := qemuRaw(t, p)
	for w := 0; w < writers; w++ {
		if o := w * 2 * cs; got[o] != byte(w+1) || got[o+cs-1] != byte(w+1) {
			t.Fatalf("cluster %d holds %#x", 2*w, got[o])
		}
	}
}
