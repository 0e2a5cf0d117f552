package main

import (
	"os"

	"blockbackend/img"
)

// runImg is `blockbackend img ...`: the qemu-img-shaped image tool.
func runImg(args []string) int {
	return img.Main(args, os.Stdout, os.Stderr)
}
