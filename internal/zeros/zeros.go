// Package zeros finds zero bytes fast. Image conversion, comparison and
// detect-zeroes look at every byte they move, and a byte-at-a-time loop
// was the largest user-space cost of a qcow2-to-raw convert.
package zeros

import "bytes"

// page is compared against with bytes.Equal, whose assembly compares
// 32 or 64 bytes at a time.
var page [4096]byte

// Is reports whether every byte of b is zero.
func Is(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(page))
		if !bytes.Equal(b[:n], page[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// IsV reports whether every byte of every slice in iov is zero.
func IsV(iov [][]byte) bool {
	for _, b := range iov {
		if !Is(b) {
			return false
		}
	}
	return true
}

// First returns the index of b's first non-zero byte, or -1.
func First(b []byte) int {
	const step = 64
	for i := 0; i < len(b); i += len(page) {
		c := b[i:min(i+len(page), len(b))]
		if Is(c) {
			continue
		}
		for j := 0; j < len(c); j += step {
			s := c[j:min(j+step, len(c))]
			if Is(s) {
				continue
			}
			for k, v := range s {
				if v != 0 {
					return i + j + k
				}
			}
		}
	}
	return -1
}
