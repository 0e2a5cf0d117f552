package luks

import (
	"bytes"
	"math/rand"
	"testing"
)

// Requests longer than the driver's 1 MiB bounce chunk, at unaligned
// offsets and split over several buffers, read back what was written
// (the conformance suite's requests stop at 1 MiB).
func TestLargeUnalignedRequests(t *testing.T) {
	g := newGraph(t)
	path := t.TempDir() + "/l.luks"
	const size = 6 << 20
	createLUKS(t, g, path, size, nil)
	n, err := openLUKS(t, g, "n", path, "s", false)
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	if err := n.WriteAt(ctx, model, 0, 0); err != nil {
		t.Fatal(err)
	}
	rnd := rand.New(rand.NewSource(5))
	split := func(b []byte) [][]byte {
		var iov [][]byte
		for k := rnd.Intn(4); k > 0 && len(b) > 1; k-- {
			c := 1 + rnd.Intn(len(b)-1)
			iov, b = append(iov, b[:c]), b[c:]
		}
		return append(iov, b)
	}
	for i := 0; i < 40; i++ {
		l := int64(1<<20 - 700 + rnd.Intn(3<<20))
		off := rnd.Int63n(size - l + 1)
		data := make([]byte, l)
		rnd.Read(data)
		if err := n.WriteV(ctx, off, split(data), 0); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], data)
		l2 := int64(1 + rnd.Intn(3<<20))
		off2 := rnd.Int63n(size - l2 + 1)
		got := make([]byte, l2)
		if err := n.ReadV(ctx, off2, split(got)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model[off2:off2+l2]) {
			t.Fatalf("op %d: read [%d,+%d) after write [%d,+%d) differs", i, off2, l2, off, l)
		}
	}
}
