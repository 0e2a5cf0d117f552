package file

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"blockbackend/graph"
)

// FuzzUnalignedIO drives reads, writes and write-zeroes at arbitrary
// offsets, lengths and buffer splits through the O_DIRECT bounce path (4
// KiB alignment forced) and checks every result against a model in memory.
// The input is a list of 8-byte operations: kind, buffer split, offset
// (3 bytes), length (2 bytes), fill byte.
func FuzzUnalignedIO(f *testing.F) {
	f.Add([]byte{0, 3, 0, 0, 1, 0x10, 0, 0xaa, 1, 1, 0, 0, 0, 0x20, 0, 0})
	f.Add([]byte{0, 0, 0, 0xff, 0x0f, 0xff, 0xff, 1, 2, 5, 0, 0x10, 1, 0, 1, 0, 1, 7, 0, 0, 0, 0xff, 0xff, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 8*64 {
			return
		}
		dir := fuzzDir(t)
		const size = 3*65536 + 777
		p := filepath.Join(dir, "img")
		model := make([]byte, size)
		for i := range model {
			model[i] = byte(i * 13)
		}
		if err := os.WriteFile(p, model, 0o644); err != nil {
			t.Fatal(err)
		}
		g := graph.New(nil)
		defer g.Close()
		n, err := g.Add(ctx, map[string]any{"driver": "file", "node-name": "f", "filename": p,
			"cache": map[string]any{"direct": true}}, 0)
		if err != nil {
			t.Fatal(err)
		}
		inst := n.Instance().(*node)
		inst.align, inst.memAlign = 4096, 4096
		inst.bounce = newBouncePool(4096, 4096)
		backing := make([]byte, 70000)
		for ; len(ops) >= 8; ops = ops[8:] {
			kind, parts := ops[0]%3, int(ops[1]%9)+1
			off := int64(ops[2]) | int64(ops[3])<<8 | int64(ops[4]&3)<<16
			length := int64(binary.LittleEndian.Uint16(ops[5:7]))
			off = min(off, size)
			length = min(length, size-off)
			buf := backing[int(ops[7])*7%1000:][:length]
			iov := cut(buf, parts, ops[1])
			switch kind {
			case 0:
				for i := range buf {
					buf[i] = ops[7] + byte(i)
				}
				if err := n.WriteV(ctx, off, iov, 0); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], buf)
			case 1:
				if err := n.ReadV(ctx, off, iov); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf, model[off:off+length]) {
					t.Fatalf("read [%d,+%d) differs", off, length)
				}
			case 2:
				if err := n.WriteZeroes(ctx, off, length, 0); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+length])
			}
		}
		got := make([]byte, size)
		if err := n.ReadAt(ctx, got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatal("image differs from the model")
		}
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil || st.Size != size {
			t.Fatalf("size %d, %v", st.Size, err)
		}
	})
}

// cut splits b into parts pieces at positions derived from seed.
func cut(b []byte, parts int, seed byte) [][]byte {
	iov := make([][]byte, 0, parts)
	for i := 0; i < parts-1 && len(b) > 0; i++ {
		k := (int(seed)*31 + i*977) % (len(b) + 1)
		iov = append(iov, b[:k])
		b = b[k:]
	}
	return append(iov, b)
}

func fuzzDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	p := filepath.Join(dir, "probe")
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	pfd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Skip("no O_DIRECT in the temporary directory's file system")
	}
	unix.Close(pfd)
	return dir
}
