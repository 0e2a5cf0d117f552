package qapi

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"
)

func TestError(t *testing.T) {
	e := Errorf(DeviceNotFound, "Cannot find device='%s' nor node-name='%s'", "", "zz")
	if e.Error() != "Cannot find device='' nor node-name='zz'" || e.Class != DeviceNotFound || e.Unwrap() != nil {
		t.Fatalf("%+v", e)
	}
	w := Errorf(GenericError, "Could not open '%s': %w", "/x", &fs.PathError{Op: "open", Path: "/x", Err: syscall.ENOENT})
	if !errors.Is(w, syscall.ENOENT) {
		t.Fatal("errno not reachable")
	}
	if ClassOf(fmt.Errorf("ctx: %w", e)) != DeviceNotFound {
		t.Fatal("ClassOf through wrapping")
	}
	if ClassOf(errors.New("x")) != GenericError || ClassOf(nil) != GenericError {
		t.Fatal("ClassOf default")
	}
	m := Errorf(GenericError, "%w and %w", syscall.EIO, syscall.ENOSPC)
	if !errors.Is(m, syscall.EIO) || !errors.Is(m, syscall.ENOSPC) {
		t.Fatal("multiple %w")
	}
	if (&Error{Err: syscall.EIO}).Error() != syscall.EIO.Error() {
		t.Fatal("empty Desc")
	}
}
