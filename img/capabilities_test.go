package img

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"blockbackend/graph"
)

// These tests drive the image tool over fakefmt (fake_test.go), a format
// with every capability, to exercise the paths that raw cannot reach.

func mustRun(t *testing.T, dir string, args ...string) result {
	t.Helper()
	r := runOurs(t, dir, args...)
	if r.code != 0 {
		t.Fatalf("img %s: status %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

func wantRun(t *testing.T, dir string, code int, stdout, stderr string, args ...string) {
	t.Helper()
	r := runOurs(t, dir, args...)
	if r.code != code || r.stdout != stdout || r.stderr != stderr {
		t.Errorf("img %s:\n got status %d\nstdout: %q\nstderr: %q\n want status %d\nstdout: %q\nstderr: %q",
			strings.Join(args, " "), r.code, r.stdout, r.stderr, code, stdout, stderr)
	}
}

// writeImage writes data into an image through the graph.
func writeImage(t *testing.T, path, format string, off int64, data []byte) {
	t.Helper()
	g := graph.New(nil)
	defer g.Close()
	n, err := g.OpenImage(context.Background(), path, graph.ImageOptions{Format: format})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.WriteAt(context.Background(), data, off, 0); err != nil {
		t.Fatal(err)
	}
	if err := n.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// readImage reads a whole image (its chain) through the graph.
func readImage(t *testing.T, path, format string) []byte {
	t.Helper()
	g := graph.New(nil)
	defer g.Close()
	n, err := g.OpenImage(context.Background(), path, graph.ImageOptions{Format: format, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, n.SizeNow())
	if err := n.ReadAt(context.Background(), buf, 0); err != nil {
		t.Fatal(err)
	}
	return buf
}

func pattern(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func TestFakeCreateInfoMap(t *testing.T) {
	dir := t.TempDir()
	wantRun(t, dir, 0, "Formatting 'base.fk', fmt=fakefmt cluster_size=65536 size=1048576 lazy_refcounts=off\n", "",
		"create", "-f", "fakefmt", "base.fk", "1M")
	wantRun(t, dir, 0, "Formatting 'top.fk', fmt=fakefmt cluster_size=65536 size=1048576 backing_file=base.fk backing_fmt=fakefmt lazy_refcounts=off\n", "",
		"create", "-f", "fakefmt", "-b", "base.fk", "-F", "fakefmt", "top.fk")
	wantRun(t, dir, 1, "", "qemu-img: t2.fk: Backing file specified without backing format\nDetected format of fakefmt.",
		"create", "-f", "fakefmt", "-b", "base.fk", "t2.fk")
	wantRun(t, dir, 1, "", "qemu-img: t3.fk: Could not open 'nonexist': No such file or directory\nCould not open backing image.\n",
		"create", "-f", "fakefmt", "-b", "nonexist", "-F", "fakefmt", "t3.fk")
	wantRun(t, dir, 0, "", "", "create", "-q", "-u", "-f", "fakefmt", "-b", "nonexist", "-F", "fakefmt", "t4.fk", "1M")
	wantRun(t, dir, 0, "Formatting 't5.fk', fmt=fakefmt cluster_size=4096 size=65536 lazy_refcounts=on nocow=on\n", "",
		"create", "-f", "fakefmt", "-o", "cluster_size=4k,lazy_refcounts=on,nocow=on", "t5.fk", "64k")
	wantRun(t, dir, 1, "", "qemu-img: t6.fk: Parameter 'lazy-refcounts' expects 'on' or 'off'\n",
		"create", "-f", "fakefmt", "-o", "lazy_refcounts=maybe", "t6.fk", "64k")
	wantRun(t, dir, 0, `Supported options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  data_file=<str>        - File name of an external data file
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  key=<str>
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  size=<size>            - Virtual disk size
`, "", "create", "-f", "fakefmt", "-o", "help", "x.fk")
	wantRun(t, dir, 0, `Supported fakefmt options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  data_file=<str>        - File name of an external data file
  key=<str>
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  size=<size>            - Virtual disk size
`, "", "create", "-f", "fakefmt", "-o", "help")

	// A node-valued option is given as a file name: the file is made
	// and its node passed.
	wantRun(t, dir, 0, "", "", "create", "-q", "-f", "fakefmt", "-o", "data_file=d.data", "t7.fk", "64k")
	if st := fakeStateFor(filepath.Join(dir, "t7.fk")); st.dataFile != "d.data" {
		t.Errorf("data_file: the format got %q", st.dataFile)
	}
	if _, err := os.Stat(filepath.Join(dir, "d.data")); err != nil {
		t.Errorf("data_file not created: %v", err)
	}

	writeImage(t, filepath.Join(dir, "base.fk"), "fakefmt", 0, pattern(1, 128<<10))
	writeImage(t, filepath.Join(dir, "top.fk"), "fakefmt", 64<<10, pattern(2, 64<<10))

	r := mustRun(t, dir, "info", "top.fk")
	for _, want := range []string{
		"image: top.fk\nfile format: fakefmt\nvirtual size: 1 MiB (1048576 bytes)\n",
		"cluster_size: 65536\nbacking file: base.fk\nbacking file format: fakefmt\n",
		"Format specific information:\n    compat: 1.1\n    lazy refcounts: false\n",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("info: missing %q in\n%s", want, r.stdout)
		}
	}
	r = mustRun(t, dir, "info", "--output=json", "--backing-chain", "top.fk")
	var chain []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &chain); err != nil {
		t.Fatalf("%v: %s", err, r.stdout)
	}
	if len(chain) != 2 || chain[0]["backing-filename"] != "base.fk" || chain[0]["backing-filename-format"] != "fakefmt" ||
		chain[1]["filename"] != "base.fk" || chain[0]["cluster-size"] != 65536.0 {
		t.Errorf("info --backing-chain: %s", r.stdout)
	}
	if !strings.HasPrefix(r.stdout, "[\n    {\n        \"backing-filename-format\": \"fakefmt\",\n        \"virtual-size\": 1048576,\n") {
		t.Errorf("info json order: %s", r.stdout)
	}

	wantRun(t, dir, 0, `[{ "start": 0, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 4096},
{ "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 69632},
{ "start": 131072, "length": 917504, "depth": 1, "present": false, "zero": true, "data": false}]
`, "", "map", "--output=json", "top.fk")
	wantRun(t, dir, 0, "Offset          Length          Mapped to       File\n"+
		"0               0x10000         0x1000          base.fk\n"+
		"0x10000         0x10000         0x11000         top.fk\n", "", "map", "top.fk")

	// convert follows the chain.
	mustRun(t, dir, "convert", "-O", "raw", "top.fk", "flat.raw")
	got, _ := os.ReadFile(filepath.Join(dir, "flat.raw"))
	want := append(append(pattern(1, 64<<10), pattern(2, 64<<10)...), make([]byte, 1<<20-128<<10)...)
	if !bytes.Equal(got, want) {
		t.Errorf("convert of a chain: wrong data")
	}
	wantRun(t, dir, 0, "Images are identical.\n", "", "compare", "-f", "fakefmt", "-F", "raw", "top.fk", "flat.raw")
	// -f is the first image's format only; the second is probed.
	wantRun(t, dir, 0, "Images are identical.\n", "", "compare", "-f", "raw", "flat.raw", "top.fk")
}

func TestFakeCheck(t *testing.T) {
	dir := t.TempDir()
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "c.fk", "1M")
	st := fakeStateFor(filepath.Join(dir, "c.fk"))
	set := func(r graph.CheckResult, err error) {
		st.mu.Lock()
		st.check, st.checkErr = r, err
		st.mu.Unlock()
	}
	set(graph.CheckResult{TotalClusters: 16, AllocatedClusters: 1, ImageEndOffset: 655360}, nil)
	wantRun(t, dir, 0, "No errors were found on the image.\n1/16 = 6.25% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 655360\n", "",
		"check", "c.fk")
	wantRun(t, dir, 0, "", "", "check", "-q", "c.fk")
	wantRun(t, dir, 0, `{
    "image-end-offset": 655360,
    "total-clusters": 16,
    "check-errors": 0,
    "allocated-clusters": 1,
    "filename": "c.fk",
    "format": "fakefmt"
}
`, "", "check", "--output=json", "c.fk")

	set(graph.CheckResult{Leaks: 3, TotalClusters: 16, AllocatedClusters: 4, Messages: []string{"Leaked cluster 5 refcount=1 reference=0"}}, nil)
	wantRun(t, dir, 3, "\n3 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n4/16 = 25.00% allocated, 0.00% fragmented, 0.00% compressed clusters\n",
		"Leaked cluster 5 refcount=1 reference=0\n", "check", "c.fk")
	wantRun(t, dir, 0, "The following inconsistencies were found and repaired:\n\n    3 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n"+
		"No errors were found on the image.\n4/16 = 25.00% allocated, 0.00% fragmented, 0.00% compressed clusters\n",
		"Leaked cluster 5 refcount=1 reference=0\nRepairing 3 leaked clusters\nLeaked cluster 5 refcount=1 reference=0\n", "check", "-r", "leaks", "c.fk")

	set(graph.CheckResult{Corruptions: 2, Leaks: 1}, nil)
	wantRun(t, dir, 2, "\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", "",
		"check", "c.fk")
	r := runOurs(t, dir, "check", "--output=json", "c.fk")
	if r.code != 2 || !strings.Contains(r.stdout, "\"corruptions\": 2,\n    \"check-errors\": 0,\n    \"leaks\": 1,\n") {
		t.Errorf("check json with errors: %+v", r)
	}
	set(graph.CheckResult{CheckErrors: 1}, nil)
	wantRun(t, dir, 1, "\n1 internal errors have occurred during the check.\n", "", "check", "c.fk")
	set(graph.CheckResult{}, os.ErrClosed)
	wantRun(t, dir, 1, "", "qemu-img: Check failed: file already closed\n", "check", "c.fk")
	wantRun(t, dir, 1, "", "qemu-img: Could not open 'nonexist': Could not open 'nonexist': No such file or directory\n", "check", "nonexist")
}

func TestFakeSnapshots(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "s.fk")
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "s.fk", "256k")
	writeImage(t, img, "fakefmt", 0, pattern(1, 4096))
	wantRun(t, dir, 0, "", "", "snapshot", "-c", "first", "s.fk")
	writeImage(t, img, "fakefmt", 0, pattern(2, 4096))
	mustRun(t, dir, "snapshot", "-q", "-c", "second", "s.fk")
	r := mustRun(t, dir, "snapshot", "-l", "s.fk")
	row := `\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 00:00:00.000          0\n`
	re := regexp.MustCompile(`^Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n` +
		`1         first                 0 B ` + row + `2         second                0 B ` + row + `$`)
	if !re.MatchString(r.stdout) {
		t.Errorf("snapshot -l:\n%s", r.stdout)
	}
	if r := mustRun(t, dir, "info", "s.fk"); !strings.Contains(r.stdout, "Snapshot list:\nID        TAG") {
		t.Errorf("info without snapshots:\n%s", r.stdout)
	}
	r = mustRun(t, dir, "info", "--output=json", "s.fk")
	if !strings.Contains(r.stdout, "{\n    \"snapshots\": [\n        {\n            \"icount\": 0,\n            \"vm-clock-nsec\": 0,\n            \"name\": \"first\",") {
		t.Errorf("info json snapshots:\n%s", r.stdout)
	}
	mustRun(t, dir, "snapshot", "-a", "first", "s.fk")
	if got := readImage(t, img, "fakefmt"); !bytes.Equal(got[:4096], pattern(1, 4096)) {
		t.Errorf("snapshot -a did not restore the data")
	}
	mustRun(t, dir, "snapshot", "-a", "2", "s.fk") // by ID
	if got := readImage(t, img, "fakefmt"); !bytes.Equal(got[:4096], pattern(2, 4096)) {
		t.Errorf("snapshot -a by ID did not restore the data")
	}
	wantRun(t, dir, 1, "", "qemu-img: Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory\n", "snapshot", "-a", "nope", "s.fk")
	wantRun(t, dir, 1, "", "qemu-img: Could not delete snapshot 'nope': snapshot not found\n", "snapshot", "-d", "nope", "s.fk")
	mustRun(t, dir, "snapshot", "-d", "first", "s.fk")
	r = mustRun(t, dir, "snapshot", "-l", "s.fk")
	if strings.Contains(r.stdout, "first") || !strings.Contains(r.stdout, "second") {
		t.Errorf("after -d:\n%s", r.stdout)
	}
	wantRun(t, dir, 1, "", "qemu-img: Cannot mix '-l', '-a', '-c', '-d'\nTry 'qemu-img --help' for more information\n", "snapshot", "-l", "-d", "x", "s.fk")
	// raw has none: qemu-img's messages.
	mustRun(t, dir, "create", "-q", "-f", "raw", "r.raw", "64k")
	// (qemu-img prints the probing warning twice here, as it reopens the
	// image; once is enough.)
	wantRun(t, dir, 1, "", "WARNING: Image format was not specified for 'r.raw' and probing guessed raw.\n"+
		"         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n"+
		"         Specify the 'raw' format explicitly to remove the restrictions.\n"+
		"qemu-img: Could not apply snapshot 'x': Block driver does not support snapshots\n", "snapshot", "-q", "-a", "x", "r.raw")
}

func TestFakeAmend(t *testing.T) {
	dir := t.TempDir()
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "a.fk", "1M")
	mustRun(t, dir, "amend", "-o", "lazy_refcounts=on", "a.fk")
	if r := mustRun(t, dir, "info", "a.fk"); !strings.Contains(r.stdout, "lazy refcounts: true") ||
		!strings.Contains(r.stdout, "cluster_size: 65536\ncleanly shut down: no\n") {
		t.Errorf("amend lazy_refcounts:\n%s", r.stdout)
	}
	if r := mustRun(t, dir, "info", "--output=json", "a.fk"); !strings.Contains(r.stdout, `"dirty-flag": true`) {
		t.Errorf("dirty flag:\n%s", r.stdout)
	}
	mustRun(t, dir, "amend", "-f", "fakefmt", "-o", "size=2M", "a.fk")
	if r := mustRun(t, dir, "info", "a.fk"); !strings.Contains(r.stdout, "virtual size: 2 MiB (2097152 bytes)") {
		t.Errorf("amend size:\n%s", r.stdout)
	}
	wantRun(t, dir, 1, "", "qemu-img: Error while amending options: Cannot shrink without --force\n", "amend", "-o", "size=1M", "a.fk")
	mustRun(t, dir, "amend", "--force", "-o", "size=1M", "a.fk")
	wantRun(t, dir, 1, "", "qemu-img: Invalid parameter 'bogus'\n", "amend", "-o", "bogus=1", "a.fk")
	wantRun(t, dir, 1, "", "qemu-img: Must specify options (-o)\nTry 'qemu-img --help' for more information\n", "amend", "a.fk")
	wantRun(t, dir, 0, "Amend options for 'fakefmt':\n  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n  size=<size>            - Virtual disk size\n", "",
		"amend", "-o", "help", "-f", "fakefmt")
	wantRun(t, dir, 0, "Amend options for 'fakefmt':\n  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n  size=<size>            - Virtual disk size\n", "",
		"amend", "-o", "help", "a.fk")
}

func TestFakeRebase(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	const c = 64 << 10
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "b1.fk", "512k")
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "b2.fk", "256k")
	writeImage(t, p("b1.fk"), "fakefmt", 0, append(pattern(1, c), pattern(3, c)...))
	writeImage(t, p("b1.fk"), "fakefmt", 5*c, pattern(4, c))
	writeImage(t, p("b2.fk"), "fakefmt", 0, append(pattern(2, c), pattern(3, c)...))
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "-b", "b1.fk", "-F", "fakefmt", "top.fk")
	before := readImage(t, p("top.fk"), "fakefmt")

	r := mustRun(t, dir, "rebase", "-p", "-b", "b2.fk", "-F", "fakefmt", "top.fk")
	if !strings.HasPrefix(r.stdout, "    (0.00/100%)\r") || !strings.HasSuffix(r.stdout, "    (100.00/100%)\r\n") {
		t.Errorf("rebase -p: %q", r.stdout)
	}
	if after := readImage(t, p("top.fk"), "fakefmt"); !bytes.Equal(before, after) {
		t.Fatalf("safe rebase changed what the image reads")
	}
	// Cluster 0 differed and was copied; cluster 1 was equal and was not;
	// cluster 5 lies beyond the new backing file and was copied.
	r = mustRun(t, dir, "map", "--output=json", "top.fk")
	for _, want := range []string{
		`{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 4096}`,
		`{ "start": 65536, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 69632}`,
		`{ "start": 327680, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true,`,
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("map after rebase lacks %s:\n%s", want, r.stdout)
		}
	}
	if r := mustRun(t, dir, "info", "top.fk"); !strings.Contains(r.stdout, "backing file: b2.fk\n") {
		t.Errorf("info after rebase:\n%s", r.stdout)
	}
	st := fakeStateFor(p("top.fk"))
	mustRun(t, dir, "rebase", "-u", "-b", "b1.fk", "-F", "fakefmt", "top.fk")
	if r := mustRun(t, dir, "info", "top.fk"); !strings.Contains(r.stdout, "backing file: b1.fk\n") || st.changeCalls != 2 {
		t.Errorf("info after rebase -u (%d changes):\n%s", st.changeCalls, r.stdout)
	}
	wantRun(t, dir, 1, "", "qemu-img: Could not open new backing file 'nope.fk': Could not open 'nope.fk': No such file or directory\n",
		"rebase", "-b", "nope.fk", "-F", "fakefmt", "top.fk")
	wantRun(t, dir, 1, "", "qemu-img: Could not change the backing file to 'b2.fk': backing format must be specified\n",
		"rebase", "-b", "b2.fk", "top.fk")
	// Flatten: the data of the whole chain comes in.
	want := readImage(t, p("top.fk"), "fakefmt")
	mustRun(t, dir, "rebase", "-b", "", "top.fk")
	if got := readImage(t, p("top.fk"), "fakefmt"); !bytes.Equal(got, want) {
		t.Errorf("rebase -b '' changed the data")
	}
	if r := mustRun(t, dir, "info", "top.fk"); strings.Contains(r.stdout, "backing file") {
		t.Errorf("still a backing file after flattening:\n%s", r.stdout)
	}
}

func TestFakeConvertCompressed(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	mustRun(t, dir, "create", "-q", "-f", "raw", "src.raw", "1M")
	writeImage(t, p("src.raw"), "raw", 0, pattern(1, 1000))
	writeImage(t, p("src.raw"), "raw", 3<<16+7, pattern(2, 70000)) // spans clusters 3 and 4
	mustRun(t, dir, "create", "-q", "-f", "raw", "tail.raw", "100000")
	writeImage(t, p("tail.raw"), "raw", 99999, []byte{9})
	for _, m := range []string{"1", "8"} {
		name := "dst" + m + ".fk"
		mustRun(t, dir, "convert", "-c", "-m", m, "-O", "fakefmt", "src.raw", "tail.raw", name)
		if n := fakeStateFor(p(name)).compressed; n != 4 {
			t.Errorf("-m %s: %d compressed clusters written, want 4 (clusters 0, 3, 4 and the last)", m, n)
		}
		want := append(readImage(t, p("src.raw"), "raw"), readImage(t, p("tail.raw"), "raw")...)
		got := readImage(t, p(name), "fakefmt")
		if !bytes.Equal(got, want[:len(got)]) || int64(len(got)) < int64(len(want)) {
			t.Errorf("-m %s: converted data differs (%d vs %d bytes)", m, len(got), len(want))
		}
	}
	// Compressed clusters have no offset: map's human form cannot show
	// them, after its header, as qemu-img.
	wantRun(t, dir, 1, "Offset          Length          Mapped to       File\n", "qemu-img: File contains external, encrypted or compressed clusters.\n", "map", "dst1.fk")
	r := mustRun(t, dir, "map", "--output=json", "dst1.fk")
	if !strings.HasPrefix(r.stdout, `[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true},`) {
		t.Errorf("map of compressed clusters:\n%s", r.stdout)
	}
	wantRun(t, dir, 1, "", "qemu-img: Compression not supported for this file format\n", "convert", "-c", "-O", "raw", "src.raw", "nc.raw")
	if _, err := os.Stat(p("nc.raw")); err == nil {
		t.Errorf("convert -c to raw left its target behind")
	}
	// Without -c the same data goes through WriteV, sparse.
	mustRun(t, dir, "convert", "-O", "fakefmt", "src.raw", "plain.fk")
	if n := fakeStateFor(p("plain.fk")).compressed; n != 0 {
		t.Errorf("convert without -c wrote %d compressed clusters", n)
	}
	wantRun(t, dir, 0, "Images are identical.\n", "", "compare", "-F", "fakefmt", "src.raw", "plain.fk")
	r = mustRun(t, dir, "map", "--output=json", "plain.fk")
	if strings.Count(r.stdout, `"present": true`) != 2 {
		t.Errorf("convert to fakefmt not sparse:\n%s", r.stdout)
	}
}

func TestFakeMeasure(t *testing.T) {
	dir := t.TempDir()
	wantRun(t, dir, 0, "required size: 4096\nfully allocated size: 1052672\nbitmaps size: 0\n", "", "measure", "-O", "fakefmt", "--size", "1M")
	wantRun(t, dir, 0, "{\n    \"bitmaps\": 0,\n    \"required\": 4096,\n    \"fully-allocated\": 1052672\n}\n", "", "measure", "-O", "fakefmt", "--size", "1M", "--output=json")
	mustRun(t, dir, "create", "-q", "-f", "raw", "src.raw", "1M")
	writeImage(t, filepath.Join(dir, "src.raw"), "raw", 0, pattern(1, 1000))
	wantRun(t, dir, 0, "required size: 69632\nfully allocated size: 1052672\nbitmaps size: 0\n", "", "measure", "-O", "fakefmt", "-f", "raw", "src.raw")
	wantRun(t, dir, 1, "", "qemu-img: Invalid parameter 'bogus'\nqemu-img: Invalid options for file format 'fakefmt'\n", "measure", "-O", "fakefmt", "-o", "bogus=1", "--size", "1M")
}

// TestFakeConvertOverBacking: a target created with a backing file does
// not read as zeros, so the zeros of the source must be written.
func TestFakeConvertOverBacking(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "base.fk", "256k")
	writeImage(t, p("base.fk"), "fakefmt", 0, pattern(7, 256<<10))
	mustRun(t, dir, "create", "-q", "-f", "raw", "src.raw", "256k")
	writeImage(t, p("src.raw"), "raw", 64<<10, pattern(1, 4096))
	mustRun(t, dir, "convert", "-O", "fakefmt", "-o", "backing_file=base.fk,backing_fmt=fakefmt", "src.raw", "out.fk")
	if got, want := readImage(t, p("out.fk"), "fakefmt"), readImage(t, p("src.raw"), "raw"); !bytes.Equal(got, want) {
		t.Errorf("the backing file's data shows through the converted image")
	}
	if r := mustRun(t, dir, "info", "out.fk"); !strings.Contains(r.stdout, "backing file: base.fk\n") {
		t.Errorf("info:\n%s", r.stdout)
	}
}

// TestFakeConvertBacking: convert -B copies only the source's top layer
// and leaves the rest to the target's backing file.
func TestFakeConvertBacking(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	const c = 64 << 10
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "base.fk", "512k")
	writeImage(t, p("base.fk"), "fakefmt", 0, pattern(1, 4*c))
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "-b", "base.fk", "-F", "fakefmt", "top.fk")
	writeImage(t, p("top.fk"), "fakefmt", c, pattern(2, c))
	writeImage(t, p("top.fk"), "fakefmt", 2*c, make([]byte, c)) // zeros over the base's data
	mustRun(t, dir, "convert", "-O", "fakefmt", "-B", "base.fk", "-F", "fakefmt", "top.fk", "out.fk")
	if got, want := readImage(t, p("out.fk"), "fakefmt"), readImage(t, p("top.fk"), "fakefmt"); !bytes.Equal(got, want) {
		t.Errorf("convert -B: data differs")
	}
	r := mustRun(t, dir, "map", "--output=json", "out.fk")
	for _, want := range []string{
		`{ "start": 0, "length": 65536, "depth": 1,`,
		`{ "start": 65536, "length": 131072, "depth": 0,`,
		`{ "start": 196608, "length": 65536, "depth": 1, "present": true,`,
		`{ "start": 262144, "length": 262144, "depth": 1, "present": false,`,
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("map after convert -B lacks %s:\n%s", want, r.stdout)
		}
	}
	wantRun(t, dir, 1, "", "qemu-img: Use of backing file requires explicit backing format\n", "convert", "-O", "fakefmt", "-B", "base.fk", "top.fk", "o2.fk")
	wantRun(t, dir, 1, "", "qemu-img: Backing file not supported for file format 'raw'\n", "convert", "-O", "raw", "-B", "base.fk", "-F", "fakefmt", "top.fk", "o3.raw")
}

// TestFakeConvertReadError: a source that fails to read stops the
// conversion with qemu-img's message, whatever the parallelism, and
// nothing hangs.
func TestFakeConvertReadError(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	mustRun(t, dir, "create", "-q", "-f", "fakefmt", "src.fk", "16M")
	for off := int64(0); off < 16<<20; off += 1 << 20 {
		writeImage(t, p("src.fk"), "fakefmt", off, pattern(byte(off>>20)+1, 64<<10))
	}
	st := fakeStateFor(p("src.fk"))
	st.mu.Lock()
	st.failReadAt = 9 << 20
	st.mu.Unlock()
	for _, args := range [][]string{
		{"convert", "-m", "1", "-O", "raw", "src.fk", "d1.raw"},
		{"convert", "-m", "16", "-O", "raw", "src.fk", "d2.raw"},
		{"convert", "-W", "-m", "16", "-O", "raw", "src.fk", "d3.raw"},
		{"convert", "-c", "-m", "8", "-O", "fakefmt", "src.fk", "d4.fk"},
	} {
		// The byte is where the failed request starts.
		r := runOurs(t, dir, args...)
		if r.code != 1 || !regexp.MustCompile(`^qemu-img: error while reading at byte (9437184|8388608): Input/output error\n$`).MatchString(r.stderr) {
			t.Errorf("%q: %+v", args, r)
		}
	}
	wantRun(t, dir, 4, "", "qemu-img: Error while reading offset 9437184 of src.fk: Input/output error\n",
		"compare", "src.fk", "src.fk")
}

// TestFakeConvertOpenOptions: create options that the format also needs
// at open time (LUKS's key-secret) open the new target.
func TestFakeConvertOpenOptions(t *testing.T) {
	dir := t.TempDir()
	mustRun(t, dir, "create", "-q", "-f", "raw", "src.raw", "256k")
	writeImage(t, filepath.Join(dir, "src.raw"), "raw", 0, pattern(5, 4096))
	mustRun(t, dir, "convert", "-O", "fakefmt", "-o", "key=abc,lazy_refcounts=on", "src.raw", "k.fk")
	wantRun(t, dir, 0, "Images are identical.\n", "", "compare", "--image-opts", "driver=raw,file.filename=src.raw", "driver=fakefmt,key=abc,file.filename=k.fk")
	wantRun(t, dir, 1, "", "qemu-img: Could not open 'k.fk': fakefmt: wrong or missing key\n", "info", "k.fk")
}
