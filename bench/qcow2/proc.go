package main

// serverArgs is qemu-storage-daemon's command line, which blockbackend
// takes verbatim: a file node (page cache, thread pool AIO, as bench/vhost)
// under a qcow2 node, exported writable on one queue.
func serverArgs(img, sock string) []string {
	return []string{
		"--blockdev", "driver=file,node-name=f,filename=" + img + ",cache.direct=off,aio=threads",
		"--blockdev", "driver=qcow2,node-name=d,file=f",
		"--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=" + sock + ",writable=on,num-queues=1",
	}
}
