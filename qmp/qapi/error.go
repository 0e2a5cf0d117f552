package qapi

import (
	"errors"
	"fmt"
)

// ErrorClass is the "class" member of a QMP error reply. QEMU has kept only
// a handful of classes; almost everything is GenericError.
type ErrorClass string

// The error classes QEMU still sends (qapi/error.json).
const (
	GenericError    ErrorClass = "GenericError"
	CommandNotFound ErrorClass = "CommandNotFound"
	DeviceNotFound  ErrorClass = "DeviceNotFound"
	DeviceNotActive ErrorClass = "DeviceNotActive"
	KVMMissingCap   ErrorClass = "KVMMissingCap"
)

// Error is an error that a QMP reply can carry: a class and a
// human-readable description, and optionally the Go error that caused it
// (kept reachable for errors.Is / errors.As; it never reaches the wire).
type Error struct {
	Class ErrorClass
	Desc  string
	Err   error
}

// Error returns the description, as QEMU prints it.
func (e *Error) Error() string {
	if e.Desc == "" && e.Err != nil {
		return e.Err.Error()
	}
	return e.Desc
}

// Unwrap returns the wrapped cause, if any.
func (e *Error) Unwrap() error { return e.Err }

// Errorf builds an *Error. The format may use %w: the wrapped errors become
// Err (so errno values stay reachable) and the text becomes Desc.
func Errorf(class ErrorClass, format string, args ...any) *Error {
	err := fmt.Errorf(format, args...)
	e := &Error{Class: class, Desc: err.Error()}
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		e.Err = u.Unwrap()
	case interface{ Unwrap() []error }:
		e.Err = errors.Join(u.Unwrap()...)
	}
	return e
}

// ClassOf returns the class of the first *Error in err's chain, or
// GenericError when there is none (QEMU reports every other failure so).
func ClassOf(err error) ErrorClass {
	var e *Error
	if errors.As(err, &e) && e.Class != "" {
		return e.Class
	}
	return GenericError
}

// errorf is the decoder's shorthand: every decoding error is a GenericError.
func errorf(format string, args ...any) *Error {
	return Errorf(GenericError, format, args...)
}
