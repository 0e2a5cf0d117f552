package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// runDemo is the main job on an embedded default: a sparse scratch raw
// image served over vhost-user-blk (for a QEMU guest) and over NBD (for
// QEMU's tools), with a QMP socket beside it. Both exports write the one
// node, so both share write (share-rw=on).
func runDemo(args []string) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	dir := fs.String("dir", filepath.Join(os.TempDir(), "blockbackend-demo"), "directory for the image and sockets")
	size := fs.Int64("size", 1<<30, "size of a new scratch image in bytes")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return fatalf("demo: %v", err)
	}
	img := filepath.Join(*dir, "scratch.img")
	if _, err := os.Stat(img); os.IsNotExist(err) {
		f, err := os.Create(img)
		if err == nil {
			err = f.Truncate(*size)
			f.Close()
		}
		if err != nil {
			return fatalf("demo: creating %s: %v", img, err)
		}
	}
	vhostSock := filepath.Join(*dir, "vhost-user-blk.sock")
	nbdSock := filepath.Join(*dir, "nbd.sock")
	qmpSock := filepath.Join(*dir, "qmp.sock")
	esc := func(s string) string { return strings.ReplaceAll(s, ",", ",,") }
	fmt.Fprintf(os.Stderr, `blockbackend demo: serving %s
  vhost-user-blk export "scratch-vhost": %s
      try: qemu-system-x86_64 -accel tcg -m 512 -object memory-backend-memfd,id=mem,size=512M,share=on \
             -numa node,memdev=mem -chardev socket,id=c0,path=%s \
             -device vhost-user-blk-pci,chardev=c0,num-queues=2 ...
  NBD export "scratch": nbd+unix:///scratch?socket=%s
      try: qemu-img info 'nbd+unix:///scratch?socket=%s'
           qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' 'nbd+unix:///scratch?socket=%s'
  QMP monitor: %s
      try: blockbackend qmp --socket %s query-named-block-nodes
Stop with Ctrl-C (or the QMP command quit).
`, img, vhostSock, vhostSock, nbdSock, nbdSock, nbdSock, qmpSock, qmpSock)
	return runDaemon([]string{
		"--blockdev", "driver=file,node-name=scratch-file,filename=" + esc(img),
		"--blockdev", "driver=raw,node-name=scratch,file=scratch-file",
		"--nbd-server", "addr.type=unix,addr.path=" + esc(nbdSock),
		"--export", "type=vhost-user-blk,id=scratch-vhost,node-name=scratch,writable=on,share-rw=on,num-queues=2,addr.type=unix,addr.path=" + esc(vhostSock),
		"--export", "type=nbd,id=scratch,node-name=scratch,name=scratch,writable=on,share-rw=on",
		"--qmp", qmpSock,
	})
}
