// Command blockbackend serves QEMU's block layer out of process: a
// qemu-storage-daemon-compatible daemon (the default), plus subcommands.
//
//	blockbackend [--blockdev ...] [--export ...] [--chardev ...] [--monitor ...] ...
//	blockbackend demo [--dir DIR]   serve a scratch image with a QMP socket
//	blockbackend qmp  ...           a QMP client
//	blockbackend img  ...           the image tool, shaped like qemu-img
//
// This file only wires packages together.
package main

import (
	"fmt"
	"os"

	_ "blockbackend/drivers/file"
	_ "blockbackend/drivers/luks"
	_ "blockbackend/drivers/null"
	_ "blockbackend/drivers/qcow"
	_ "blockbackend/drivers/qcow2"
	_ "blockbackend/drivers/raw"
	_ "blockbackend/vhostuser/blk"
)

// progName prefixes error messages, as qemu-storage-daemon's name does.
const progName = "blockbackend"

func main() {
	args := os.Args[1:]
	if len(args) > 0 {
		switch args[0] {
		case "demo":
			os.Exit(runDemo(args[1:]))
		case "qmp":
			os.Exit(runQMPClient(args[1:]))
		case "img":
			os.Exit(runImg(args[1:]))
		}
	}
	os.Exit(runDaemon(args))
}

func fatalf(format string, a ...any) int {
	fmt.Fprintf(os.Stderr, progName+": "+format+"\n", a...)
	return 1
}
