package main

import (
	"os"

	"blockbackend/drivers/qcow"
	"blockbackend/img"
)

// runImg is `blockbackend img ...`: the qemu-img-shaped image tool. Only
// the tool opens legacy AES qcow images (to convert them).
func runImg(args []string) int {
	qcow.ImageTool.Store(true)
	return img.Main(args, os.Stdout, os.Stderr)
}
