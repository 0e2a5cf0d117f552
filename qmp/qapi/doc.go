// Package qapi decodes option trees into typed Go structs the way QEMU's
// QAPI input visitors do, and carries QMP errors.
//
// Every option in blockbackend — QMP command arguments, --blockdev and
// --object on the command line, json: filenames — first becomes one nested
// map[string]any (see package keyval for the text syntaxes), then Decode
// turns it into a struct described by `qapi` tags. Decoding is strict, as
// QEMU's is: a missing required member, an unknown member and a value of
// the wrong type are errors, with QEMU's wording and the member's full
// name ("file.filename", "server[0].host"). The wording was checked
// against qemu-storage-daemon 7.2:
//
//	Parameter 'driver' is missing
//	Parameter 'bogus' is unexpected
//	Invalid parameter type for 'size', expected: integer   (JSON; also number, boolean, string, object, array)
//	Parameter 'max-connections' expects uint64            (JSON, unsigned or size member, wrong type)
//	Parameter 'num-queues' expects uint16_t                (out of range; int8_t … int32_t, uint8_t … uint32_t)
//	Parameter 'read-only' expects 'on' or 'off'            (keyval)
//	Parameter 'x' expects integer | number | size          (keyval)
//	Parameters 'read-only.*' are unexpected                (keyval: keys below a scalar)
//	Parameter 'discard' does not accept value 'bogus'      (enum; the member's own name)
//
// Two modes mirror QEMU's two visitors. JSON mode wants JSON types
// (numbers as json.Number). Keyval mode reads string leaves as QEMU's
// keyval visitor does: bools on/off/yes/no/true/false/y/n, integers in C
// syntax with base prefixes, sizes with k/M/G/T/P/E suffixes (ParseSize).
// Keyval mode also takes values already typed (bool, json.Number, Go
// numbers), so that options computed by code can be merged into parsed
// ones.
//
// The package also holds Error, the QMP error carrier (class and
// description, with the Go cause kept for errors.Is), so that the graph,
// the drivers and the QMP server share it without import cycles; the tree
// helpers Flatten, Unflatten (QEMU's qdict_flatten and qdict_crumple),
// Listify, Merge and Clone; and Members, which exposes the tags for
// schema introspection (query-qmp-schema).
//
// It is not a schema compiler or a QMP server, and it does not validate
// values beyond their type (ranges of a member's meaning, cross-member
// rules): that is the caller's job after Decode.
package qapi
