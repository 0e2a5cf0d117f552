package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"testing"
)

func TestErrnoOf(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want Errno
	}{
		{nil, 0},
		{syscall.EPERM, EPERM},
		{&fs.PathError{Op: "write", Path: "x", Err: syscall.EROFS}, EPERM},
		{fmt.Errorf("qcow2: L2 table: %w", syscall.EIO), EIO},
		{syscall.EDQUOT, ENOSPC},
		{syscall.EFBIG, ENOSPC},
		{syscall.ENOSPC, ENOSPC},
		{syscall.EINVAL, EINVAL},
		{syscall.EOVERFLOW, EOVERFLOW},
		{syscall.EOPNOTSUPP, ENOTSUP},
		{context.Canceled, ESHUTDOWN},
		{syscall.ENOMEM, ENOMEM},
		{fmt.Errorf("wrapped %w", EINVAL), EINVAL},
		{errors.New("anything else"), EIO},
		{os.ErrNotExist, EIO},
		{syscall.EBADF, EIO},
	} {
		if got := ErrnoOf(tc.err); got != tc.want {
			t.Errorf("ErrnoOf(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if !errors.Is(fmt.Errorf("read: %w", ENOSPC), syscall.ENOSPC) || errors.Is(EIO, syscall.EINVAL) {
		t.Error("Errno.Is")
	}
	if Errno(1234).Syscall() != syscall.EINVAL {
		t.Error("unknown errno must read as EINVAL")
	}
}

func TestCodecWire(t *testing.T) {
	// Byte layouts from proto.md, written out by hand.
	if got := AppendGreeting(nil, 3); !bytes.Equal(got, []byte("NBDMAGICIHAVEOPT\x00\x03")) {
		t.Errorf("greeting % x", got)
	}
	req := Request{Flags: CmdFlagFUA, Type: CmdWrite, Handle: 0x0102030405060708, Offset: 0x1000, Length: 0x200}
	want := []byte{0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0}
	if got := req.Append(nil); !bytes.Equal(got, want) {
		t.Errorf("request % x", got)
	}
	if got := (SimpleReply{Error: EIO, Handle: 9}).Append(nil); !bytes.Equal(got, []byte{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9}) {
		t.Errorf("simple reply % x", got)
	}
	if got := (OptionReplyHeader{Option: OptGo, Type: RepErrUnknown, Length: 2}).Append(nil); !bytes.Equal(got,
		[]byte{0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 2}) {
		t.Errorf("option reply % x", got)
	}
	if n := len(AppendExportNameReply(nil, ExportInfo{Size: 1}, false)); n != 134 {
		t.Errorf("export name reply of %d bytes", n)
	}
	if _, err := ParseRequest(bytes.Repeat([]byte{0}, RequestSize)); !errors.Is(err, ErrProtocol) {
		t.Errorf("bad magic: %v", err)
	}
	for _, b := range [][]byte{
		{0, 0, 0, 0xff, 'a'},        // name longer than data
		{0, 0, 0, 0, 0, 2, 0, 1},    // 2 infos, 1 present
		{0, 0, 0, 1, 0, 0, 0},       // NUL in name
		{0, 0, 0, 0, 0, 0, 0, 0, 1}, // trailing byte
	} {
		if _, err := ParseInfoRequest(b); err == nil {
			t.Errorf("ParseInfoRequest(% x) accepted", b)
		}
	}
	if _, err := ParseMetaContextRequest([]byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 'x'}); err == nil {
		t.Error("query running past the data accepted")
	}
}

func TestBufPool(t *testing.T) {
	if len(bufPools) != maxPoolShift-minPoolShift+1 || 1<<maxPoolShift != MaxPayload {
		t.Fatal("pool classes do not match MaxPayload")
	}
	for _, n := range []int{1, 4095, 4096, 4097, 1 << 20, MaxPayload - 1, MaxPayload} {
		b := getBuf(n)
		if len(b) != n || cap(b)&(cap(b)-1) != 0 || cap(b) < n {
			t.Fatalf("getBuf(%d): len %d cap %d", n, len(b), cap(b))
		}
		putBuf(b)
	}
	putBuf(make([]byte, 5000)) // not a pool size: dropped
}
