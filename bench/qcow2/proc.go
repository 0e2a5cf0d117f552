package main

import "strconv"

// serverArgs is qemu-storage-daemon's command line, which blockbackend
// takes verbatim: a file node (page cache, thread pool AIO, as bench/vhost)
// under a qcow2 node, exported writable on one queue. The references
// serve the file as raw, or null-co of the same size with no file.
func serverArgs(img, sock, image string, size int64) []string {
	export := []string{"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=" + sock + ",writable=on,num-queues=1"}
	file := "driver=file,node-name=f,filename=" + img + ",cache.direct=off,aio=threads"
	switch image {
	case "null":
		return append([]string{"--blockdev", "driver=null-co,node-name=d,read-zeroes=on,size=" + strconv.FormatInt(size, 10)}, export...)
	case "raw":
		return append([]string{"--blockdev", file, "--blockdev", "driver=raw,node-name=d,file=f"}, export...)
	}
	return append([]string{"--blockdev", file, "--blockdev", "driver=qcow2,node-name=d,file=f"}, export...)
}
