package luks

import (
	"errors"
	"path/filepath"
	"reflect"
	"testing"

	"blockbackend/graph"
)

// TestNoIO: opened for metadata only (qemu-img info's BDRV_O_NO_IO), a
// LUKS image needs no secret, a wrong one is not even tried, info and
// size are those of the keyed open, and every data request, resize and
// amend fails with graph.ErrNoIO.
func TestNoIO(t *testing.T) {
	img := filepath.Join(t.TempDir(), "a.luks")
	g := newGraph(t)
	createLUKS(t, g, img, 1<<20, nil)
	keyed, err := openLUKS(t, g, "k", img, "s", true)
	if err != nil {
		t.Fatal(err)
	}
	wantInfo := keyed.Instance().(graph.Infoer).Info()
	for _, extra := range []map[string]any{nil, {"key-secret": "w"}, {"key-secret": "nonexistent"}} {
		n, err := g.OpenImage(ctx, img, graph.ImageOptions{Format: "luks", ReadOnly: true, ForceShare: true, NoIO: true, Extra: extra})
		if err != nil {
			t.Fatalf("NoIO open with %v: %v", extra, err)
		}
		if got := n.Instance().(graph.Infoer).Info(); !reflect.DeepEqual(got, wantInfo) {
			t.Errorf("info %v, want %v", got, wantInfo)
		}
		if n.SizeNow() != keyed.SizeNow() {
			t.Errorf("size %d, want %d", n.SizeNow(), keyed.SizeNow())
		}
		inst := n.Instance()
		if err := inst.ReadV(ctx, 0, [][]byte{make([]byte, 512)}); !errors.Is(err, graph.ErrNoIO) {
			t.Errorf("read: %v, want ErrNoIO", err)
		}
		if err := inst.WriteV(ctx, 0, [][]byte{make([]byte, 512)}, 0); !errors.Is(err, graph.ErrNoIO) {
			t.Errorf("write: %v, want ErrNoIO", err)
		}
		if err := inst.(*node).Truncate(ctx, 2<<20, false, "off"); !errors.Is(err, graph.ErrNoIO) {
			t.Errorf("truncate: %v, want ErrNoIO", err)
		}
		if err := inst.(*node).Amend(ctx, &AmendOptions{State: "inactive", Keyslot: new(int64)}, true); !errors.Is(err, graph.ErrNoIO) {
			t.Errorf("amend: %v, want ErrNoIO", err)
		}
	}
	// Without NoIO the secret is still required.
	if _, err := g.OpenImage(ctx, img, graph.ImageOptions{Format: "luks", ReadOnly: true, ForceShare: true}); err == nil ||
		err.Error() != "Parameter 'key-secret' is required for cipher" {
		t.Errorf("keyless open: %v", err)
	}
}
