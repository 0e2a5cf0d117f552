package img

import (
	"fmt"

	"blockbackend/graph"
)

// Exit statuses of qemu-img check.
const (
	checkOK          = 0
	checkIncomplete  = 1
	checkCorrupt     = 2
	checkLeaks       = 3
	checkUnsupported = 63
)

func (t *Tool) check(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "hf:r:T:qU", long: []string{"help", "format=", "repair=", "output=", "object=", "image-opts", "force-share"}})
	if !ok {
		return 1
	}
	var format string
	var fix graph.CheckFix
	jsonOut, quiet, share := false, false, false
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("check")
		case "f", "format":
			format = o.arg
		case "r", "repair":
			switch o.arg {
			case "leaks":
				fix = graph.CheckFixLeaks
			case "all":
				fix = graph.CheckFixLeaks | graph.CheckFixErrors
			default:
				return t.usageErr("Unknown option value for -r (expecting 'leaks' or 'all'): %s", o.arg)
			}
		case "output":
			if jsonOut, ok = t.parseOutput(o.arg); !ok {
				return 1
			}
		case "q":
			quiet = true
		case "U", "force-share":
			share = true
		case "T":
		case "object", "image-opts":
			t.imageOpt(o)
		}
	}
	if len(ops) != 1 {
		return t.usageErr("Expecting one image file name")
	}
	filename := ops[0]
	if jsonOut {
		quiet = false
	}
	im, err := t.open(filename, openFlags{format: format, writable: fix != 0, forceShare: share && fix == 0})
	if err != nil {
		t.errorf("%s", err)
		return checkIncomplete
	}
	defer im.close(t.Ctx)
	chk, ok := im.node.Instance().(graph.Checker)
	if !ok {
		t.errorf("This image format does not support checks")
		return checkUnsupported
	}
	res, err := chk.Check(t.Ctx, fix)
	if err != nil {
		t.errorf("Check failed: %s", errnoText(err))
		return checkIncomplete
	}
	for _, m := range res.Messages {
		fmt.Fprintln(t.Stderr, m)
	}
	if fix != 0 {
		// The repairs must be on disk before we say they were made; the
		// deferred close cannot report a failure.
		if err := im.node.Flush(t.Ctx); err != nil {
			t.errorf("Check failed: %s", errnoText(err))
			return checkIncomplete
		}
	}
	if fix != 0 && (res.LeaksFixed > 0 || res.CorruptionsFixed > 0) {
		// qemu-img checks the repaired image again and reports that.
		if !jsonOut {
			t.printf(quiet, "The following inconsistencies were found and repaired:\n\n"+
				"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
				res.LeaksFixed, res.CorruptionsFixed)
		}
		again, err := chk.Check(t.Ctx, 0)
		if err != nil {
			t.errorf("Check failed: %s", errnoText(err))
			return checkIncomplete
		}
		for _, m := range again.Messages {
			fmt.Fprintln(t.Stderr, m)
		}
		again.LeaksFixed, again.CorruptionsFixed = res.LeaksFixed, res.CorruptionsFixed
		res = again
	}
	if jsonOut {
		filename = im.fname
		m := map[string]any{
			"filename":     filename,
			"format":       im.node.DriverName(),
			"check-errors": res.CheckErrors,
		}
		for k, v := range map[string]int64{
			"image-end-offset": res.ImageEndOffset, "corruptions": int64(res.Corruptions), "leaks": int64(res.Leaks),
			"corruptions-fixed": int64(res.CorruptionsFixed), "leaks-fixed": int64(res.LeaksFixed),
			"total-clusters": res.TotalClusters, "allocated-clusters": res.AllocatedClusters,
			"fragmented-clusters": res.FragmentedClusters, "compressed-clusters": res.CompressedClusters,
		} {
			if v != 0 {
				m[k] = v
			}
		}
		writeJSON(t.Stdout, m)
	} else if !quiet {
		t.writeCheckHuman(res)
	}
	switch {
	case res.CheckErrors > 0:
		return checkIncomplete
	case res.Corruptions > 0:
		return checkCorrupt
	case res.Leaks > 0:
		return checkLeaks
	}
	return checkOK
}

func (t *Tool) writeCheckHuman(r graph.CheckResult) {
	w := t.Stdout
	if r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0 {
		fmt.Fprintf(w, "No errors were found on the image.\n")
	} else {
		if r.Corruptions > 0 {
			fmt.Fprintf(w, "\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", r.Corruptions)
		}
		if r.Leaks > 0 {
			fmt.Fprintf(w, "\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", r.Leaks)
		}
		if r.CheckErrors > 0 {
			fmt.Fprintf(w, "\n%d internal errors have occurred during the check.\n", r.CheckErrors)
		}
	}
	if r.TotalClusters != 0 && r.AllocatedClusters != 0 {
		fmt.Fprintf(w, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			float64(r.AllocatedClusters)*100/float64(r.TotalClusters),
			float64(r.FragmentedClusters)*100/float64(r.AllocatedClusters),
			float64(r.CompressedClusters)*100/float64(r.AllocatedClusters))
	}
	if r.ImageEndOffset > 0 {
		fmt.Fprintf(w, "Image end offset: %d\n", r.ImageEndOffset)
	}
}
