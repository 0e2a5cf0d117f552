package img

import (
	"errors"
	"syscall"
	"time"

	"blockbackend/graph"
)

func (t *Tool) snapshot(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{short: "la:c:d:hqU", long: []string{"help", "object=", "image-opts", "force-share"}})
	if !ok {
		return 1
	}
	action, name := "", ""
	quiet, share := false, false
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("snapshot")
		case "l", "a", "c", "d":
			if action != "" {
				return t.usageErr("Cannot mix '-l', '-a', '-c', '-d'")
			}
			action, name = o.name, o.arg
		case "q":
			quiet = true
		case "U", "force-share":
			share = true
		case "object", "image-opts":
			t.imageOpt(o)
		}
	}
	if len(ops) != 1 {
		return t.usageErr("Expecting one image file name")
	}
	filename := ops[0]
	// Without an action qemu-img opens the image for writing and does
	// nothing.
	im, err := t.open(filename, openFlags{writable: action != "l", forceShare: share && action == "l"})
	if err != nil {
		return t.errorf("%s", err)
	}
	defer im.close(t.Ctx)
	ss, _ := im.node.Instance().(graph.Snapshotter)
	switch action {
	case "l":
		if ss == nil {
			return 0
		}
		list, err := ss.Snapshots(t.Ctx)
		if err != nil {
			return t.errorf("%s", errnoText(err))
		}
		if len(list) > 0 && !quiet {
			t.printf(quiet, "Snapshot list:\n")
			writeSnapshotTable(t.Stdout, list)
		}
	case "c":
		if ss == nil {
			return t.errorf("Could not create snapshot '%s': %s", name, errnoText(syscall.ENOTSUP))
		}
		now := time.Now()
		_, err := ss.CreateSnapshot(t.Ctx, graph.SnapshotInfo{
			Name: name, DateSec: now.Unix(), DateNsec: int64(now.Nanosecond()),
		})
		if err != nil {
			return t.errorf("Could not create snapshot '%s': %s", name, errnoText(err))
		}
	case "a":
		if ss == nil {
			return t.errorf("Could not apply snapshot '%s': Block driver does not support snapshots", name)
		}
		s, err := findSnapshot(t, ss, name)
		if err != nil {
			return t.errorf("Could not apply snapshot '%s': Failed to load snapshot: %s", name, strerror(syscall.ENOENT))
		}
		if err := ss.ApplySnapshot(t.Ctx, s.ID, s.Name); err != nil {
			return t.errorf("Could not apply snapshot '%s': %s", name, errnoText(err))
		}
	case "d":
		if ss == nil {
			return t.errorf("Could not delete snapshot '%s': snapshot not found", name)
		}
		s, err := findSnapshot(t, ss, name)
		if err != nil {
			return t.errorf("Could not delete snapshot '%s': snapshot not found", name)
		}
		if _, err := ss.DeleteSnapshot(t.Ctx, s.ID, s.Name); err != nil {
			return t.errorf("Could not delete snapshot '%s': %s", name, errnoText(err))
		}
	}
	if err := im.close(t.Ctx); err != nil {
		return t.errorf("%s", errText(err))
	}
	return 0
}

// findSnapshot looks a snapshot up as qemu-img does: by ID first, then
// by name.
func findSnapshot(t *Tool, ss graph.Snapshotter, key string) (graph.SnapshotInfo, error) {
	list, err := ss.Snapshots(t.Ctx)
	if err != nil {
		return graph.SnapshotInfo{}, err
	}
	for _, s := range list {
		if s.ID == key {
			return s, nil
		}
	}
	for _, s := range list {
		if s.Name == key {
			return s, nil
		}
	}
	return graph.SnapshotInfo{}, errors.New("snapshot not found")
}
