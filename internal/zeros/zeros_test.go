package zeros

import "testing"

func TestFirstAndIs(t *testing.T) {
	for _, n := range []int{0, 1, 7, 63, 64, 65, 511, 512, 4095, 4096, 4097, 10000} {
		b := make([]byte, n)
		if !Is(b) || First(b) != -1 || !IsV([][]byte{b, b}) {
			t.Fatalf("len %d: zero buffer not seen as zero", n)
		}
		for i := 0; i < n; i++ {
			b[i] = 1
			if Is(b) || IsV([][]byte{nil, b}) {
				t.Fatalf("len %d: byte %d set, still zero", n, i)
			}
			if got := First(b); got != i {
				t.Fatalf("len %d: First = %d, want %d", n, got, i)
			}
			b[i] = 0
		}
	}
}

func BenchmarkIs512(b *testing.B) {
	buf := make([]byte, 512)
	b.SetBytes(512)
	for b.Loop() {
		if !Is(buf) {
			b.Fatal("not zero")
		}
	}
}
