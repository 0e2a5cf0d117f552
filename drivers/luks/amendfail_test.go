package luks

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"syscall"
	"testing"

	"blockbackend/drivers/crypto"
	"blockbackend/graph"
	"blockbackend/qmp/qapi"
)

// faultyFile is the image behind the "luks-test-faulty" protocol driver:
// bytes in memory, and a count of writes and flushes of which the
// failAt-th (from 1; 0 never) fails with EIO without taking effect.
type faultyFile struct {
	mu          sync.Mutex
	data        []byte
	ops, failAt int
}

var faultyFiles sync.Map // filename → *faultyFile

type faultyOpts struct {
	Filename string `qapi:"filename"`
}

type faultyNode struct{ f *faultyFile }

func init() {
	graph.Register(&graph.Driver{
		Name: "luks-test-faulty", Protocol: true,
		NewOptions: func() any { return &faultyOpts{} },
		Open: func(_ context.Context, _ *graph.OpenContext, o any) (graph.Instance, error) {
			f, ok := faultyFiles.Load(o.(*faultyOpts).Filename)
			if !ok {
				return nil, os.ErrNotExist
			}
			return &faultyNode{f.(*faultyFile)}, nil
		},
	})
}

func (n *faultyNode) fault() error {
	n.f.ops++
	if n.f.ops == n.f.failAt {
		return syscall.EIO
	}
	return nil
}

func (n *faultyNode) ReadV(_ context.Context, off int64, iov [][]byte) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	for _, b := range iov {
		c := 0
		if off < int64(len(n.f.data)) {
			c = copy(b, n.f.data[off:])
		}
		clear(b[c:])
		off += int64(len(b))
	}
	return nil
}

func (n *faultyNode) WriteV(_ context.Context, off int64, iov [][]byte, _ graph.WriteFlags) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	if err := n.fault(); err != nil {
		return err
	}
	for _, b := range iov {
		if end := off + int64(len(b)); end > int64(len(n.f.data)) {
			n.f.data = append(n.f.data, make([]byte, end-int64(len(n.f.data)))...)
		}
		copy(n.f.data[off:], b)
		off += int64(len(b))
	}
	return nil
}

func (n *faultyNode) Flush(context.Context) error {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	return n.fault()
}

func (n *faultyNode) Size() (int64, error) {
	n.f.mu.Lock()
	defer n.f.mu.Unlock()
	return int64(len(n.f.data)), nil
}

func (n *faultyNode) Close() error { return nil }

// TestAmendFailureKeepsMemoryAndDiskAlike fails each write or flush of an
// amend in turn (overwriting an active slot with force, adding a slot,
// erasing one) and then wants the header in memory to be the header on
// disk, the volume to open with the untouched passphrase, and the slot
// amended to be inactive or open with its old or its new passphrase,
// never active and garbled.
func TestAmendFailureKeepsMemoryAndDiskAlike(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.luks")
	g := newGraph(t)
	createLUKS(t, g, path, 64<<10, nil)
	// Slot 1 holds "wrong" (secret w) beside slot 0's pass (secret s).
	setup, err := openLUKS(t, g, "setup", path, "s", false)
	if err != nil {
		t.Fatal(err)
	}
	one, it := int64(1), int64(1)
	if err := setup.Instance().(*node).Amend(ctx, &AmendOptions{State: "active", NewSecret: "w", Keyslot: &one, IterTime: &it}, false); err != nil {
		t.Fatal(err)
	}
	if err := g.Delete(ctx, "setup"); err != nil {
		t.Fatal(err)
	}
	image, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string][]byte{"s": []byte(pass), "w": []byte("wrong"), "n": []byte("new secret")}
	for _, tc := range []struct {
		name  string
		opts  AmendOptions
		force bool
		slot1 []string // the passphrases slot 1 may hold afterwards, if active
	}{
		{"overwrite active slot", AmendOptions{State: "active", NewSecret: "n", Keyslot: &one, IterTime: &it}, true, []string{"w", "n"}},
		{"add to free slot", AmendOptions{State: "active", NewSecret: "n", IterTime: &it}, false, []string{"w"}},
		{"erase slot", AmendOptions{State: "inactive", Keyslot: &one}, false, []string{"w"}},
	} {
		for k := 1; ; k++ {
			name := tc.name + string(rune('a'+k))
			ff := &faultyFile{data: append([]byte(nil), image...)}
			faultyFiles.Store(name, ff)
			n, err := g.Add(ctx, map[string]any{"driver": "luks", "node-name": "l", "key-secret": "s",
				"file": map[string]any{"driver": "luks-test-faulty", "filename": name}}, qapi.JSON)
			if err != nil {
				t.Fatal(err)
			}
			ln := n.Instance().(*node)
			ff.mu.Lock()
			ff.ops, ff.failAt = 0, k
			ff.mu.Unlock()
			opts := tc.opts
			amendErr := ln.Amend(ctx, &opts, tc.force)
			if amendErr != nil && !errors.Is(amendErr, syscall.EIO) {
				t.Fatalf("%s, failing op %d: %v", tc.name, k, amendErr)
			}
			ff.mu.Lock()
			disk, err := crypto.ParseHeader(ff.data[:crypto.HeaderSize], int64(len(ff.data)))
			ops := ff.ops
			ff.mu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			ln.mu.Lock()
			mem := *ln.hdr
			ln.mu.Unlock()
			if !reflect.DeepEqual(&mem, disk) {
				t.Errorf("%s, failing op %d of %d: header in memory %+v\ndiffers from disk %+v", tc.name, k, ops, mem.Slots, disk.Slots)
			}
			read := func(p []byte, off int64) error {
				ff.mu.Lock()
				defer ff.mu.Unlock()
				copy(p, ff.data[off:])
				return nil
			}
			if mk, err := disk.TrySlot(0, read, secrets["s"]); err != nil || mk == nil {
				t.Errorf("%s, failing op %d: slot 0 no longer opens: %v", tc.name, k, err)
			}
			if disk.Slots[1].Active {
				ok := false
				for _, id := range tc.slot1 {
					if mk, err := disk.TrySlot(1, read, secrets[id]); err == nil && mk != nil {
						ok = true
					}
				}
				if !ok {
					t.Errorf("%s, failing op %d: slot 1 active but opens with none of %v", tc.name, k, tc.slot1)
				}
			}
			if err := g.Delete(ctx, "l"); err != nil {
				t.Fatal(err)
			}
			faultyFiles.Delete(name)
			if amendErr == nil {
				if k < 3 {
					t.Errorf("%s: only %d writes and flushes", tc.name, k-1)
				}
				break
			}
		}
	}
}
