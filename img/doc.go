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
// given or probed formats) or Graph.OpenImageOptions (--image-opts), with
// a user edge holding the permissions qemu-img's BlockBackend holds, so
// image locks meet QEMU's. Images are made with the registered drivers'
// Create (ImageCreate for formats only qemu-img creates): the protocol
// driver makes the file, the format driver formats a node opened over it,
// and -o options are decoded into whichever of the two create structs
// has them (qemu-img's cluster_size is QAPI's cluster-size). Everything
// format-specific comes only through the optional capability interfaces
// of package graph (Infoer, BackingFiler, DirtyReporter, BlockStatuser,
// Checker, Snapshotter, Amender, BackingChanger, CompressedWriter,
// Driver.Measure, Driver.NewAmendOptions).
// A format that lacks one gets qemu-img's message for that case. The
// package never switches on a driver's name, so a format added later works
// here at once.
//
// Byte-for-byte output: qemu-img prints its JSON objects in the iteration
// order of QEMU's hash tables, not in schema order. The order tables in
// json.go were observed from qemu-img 7.2's output; keys not seen there
// come after, sorted.
//
// Files: img.go (dispatch, opening images, messages), getopt.go,
// json.go (qemu-img's JSON and human dumps), createopts.go (-o), one file
// per command, status.go (block status through a backing chain),
// progress.go (-p).
//
// What it is not: no bench, bitmap, commit or dd subcommands, no
// --target-image-opts, no convert -l/-C/-r/--salvage/--bitmaps; -T, and
// -t other than convert's, are accepted and ignored.
package img
