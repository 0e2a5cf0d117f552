// Package img is blockbackend's image tool, `blockbackend img`, shaped like
// qemu-img 7.2: the same subcommands (create, info, check, convert,
// compare, snapshot, resize, map, measure, amend, rebase), options,
// messages, exit codes and output formats, so that people and scripts used
// to qemu-img feel at home.
//
// It is a top-level package because the image tools are a concern of their
// own that fits none of the others: not the graph (it is a user of the
// graph, like an export), not a driver, not QMP. cmd/blockbackend wires it
// as a subcommand and the end-to-end tests drive it in-process.
//
// Every image is opened with the daemon's own code: a graph.Graph, then
// Graph.OpenImage (plain paths, "proto:" names and json:{...} filenames,
// given or probed formats), images are made with the registered drivers'
// Create, and everything format-specific comes only through the optional
// capability interfaces of package graph (Infoer, BlockStatuser, Checker,
// Snapshotter, Amender, BackingChanger, CompressedWriter, Driver.Measure).
// A format that lacks one gets qemu-img's message for that case. The
// package never switches on a driver's name, so a format added later works
// here at once.
//
// Byte-for-byte output: qemu-img prints its JSON objects in the iteration
// order of QEMU's hash tables, not in schema order. The order tables in
// json.go were observed from qemu-img 7.2's output; keys not seen there
// come after, sorted.
//
// What it is not: no bench, bitmap, commit or dd subcommands, no
// --target-image-opts, no convert -B/-l/-C/-r/--salvage/--bitmaps; -T and
// -t other than convert's are accepted and ignored.
package img
