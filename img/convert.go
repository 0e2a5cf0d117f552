package img

import (
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"

	"blockbackend/graph"
	"blockbackend/internal/zeros"
)

const (
	statusSpan      = 1 << 30  // bytes asked of block status at once
	convertChunk    = 2 << 20  // bytes per request
	maxSparse       = 16 << 20 // qemu-img's limit for -S
	defaultSparse   = 4096
	maxCoroutines   = 16
	defaultParallel = 8
)

// convertJob is one img convert run: sources concatenated into target.
type convertJob struct {
	t        *Tool
	srcs     []*graph.Node
	starts   []int64 // offset of each source in the concatenation
	total    int64
	dst      *graph.Node
	cw       graph.CompressedWriter
	cluster  int64
	sparse   int64 // -S; 0: write everything
	zeroInit bool  // the target reads as zeros already
	// targetBacking: the target has a backing file, which holds what the
	// source's own backing chain holds: only the source's top layer is
	// copied.
	targetBacking bool
	parallel      int
	ordered       bool // without -W writes happen in order
	prog          *progress
	done          atomic.Int64
	zc            *zeroCache // what the sources' children said about long runs
}

func (t *Tool) convert(args []string) int {
	opts, ops, ok := t.getopt(args, optSpec{
		short: "hf:O:B:F:Cco:l:S:pt:T:qnm:WrU",
		long:  []string{"help", "object=", "image-opts", "target-image-opts", "salvage", "target-is-zero", "bitmaps", "force-share"},
	})
	if !ok {
		return 1
	}
	srcFmt, dstFmt, backing, backingFmt := "", "", "", ""
	var optStrs []string
	compress, prog, quiet, noCreate, ordered, share, targetZero := false, false, false, false, true, false, false
	sparse := int64(defaultSparse)
	parallel := defaultParallel
	cache := "unsafe"
	for _, o := range opts {
		switch o.name {
		case "h", "help":
			return t.help("convert")
		case "f":
			srcFmt = o.arg
		case "O":
			dstFmt = o.arg
		case "c":
			compress = true
		case "o":
			optStrs = append(optStrs, o.arg)
		case "S":
			v, ok := parseSize(o.arg)
			if !ok || v%512 != 0 || v > maxSparse {
				return t.errorf("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to %d. Select 0 to disable sparse detection (fully allocates output).", maxSparse)
			}
			sparse = v
		case "p":
			prog = true
		case "q":
			quiet = true
		case "n":
			noCreate = true
		case "m":
			var v int
			if _, err := fmt.Sscan(o.arg, &v); err != nil || v < 1 || v > maxCoroutines || fmt.Sprint(v) != o.arg {
				return t.errorf("Invalid number of coroutines. Allowed number of coroutines is between 1 and %d", maxCoroutines)
			}
			parallel = v
		case "W":
			ordered = false
		case "t":
			switch o.arg {
			case "none", "writeback", "writethrough", "directsync", "unsafe":
				cache = o.arg
			default:
				return t.errorf("Invalid cache option: %s", o.arg)
			}
		case "T":
			switch o.arg {
			case "none", "writeback", "writethrough", "directsync", "unsafe":
			default:
				return t.errorf("Invalid source cache option: %s", o.arg)
			}
		case "U", "force-share":
			share = true
		case "target-is-zero":
			targetZero = true
		case "object", "image-opts":
			t.imageOpt(o)
		case "B":
			backing = o.arg
		case "F":
			backingFmt = o.arg
		case "C", "l", "r", "salvage", "bitmaps", "target-image-opts":
			return t.errorf("option %s is not supported by blockbackend img", o.name)
		}
	}
	if quiet {
		prog = false
	}
	optStr := strings.Join(optStrs, ",")
	if dstFmt == "" {
		dstFmt = "raw"
	}
	if isHelpOpt(optStr) {
		return t.printCreateHelp(dstFmt, "")
	}
	if len(ops) < 2 {
		return t.errorf("Must specify image file name")
	}
	if targetZero && !noCreate {
		return t.errorf("--target-is-zero requires use of -n flag")
	}
	srcNames, dstName := ops[:len(ops)-1], ops[len(ops)-1]
	if backing != "" && len(srcNames) > 1 {
		return t.errorf("Having a backing file for the target makes no sense when concatenating multiple input images")
	}
	if backing != "" && backingFmt == "" {
		return t.errorf("Use of backing file requires explicit backing format")
	}
	if backing != "" && noCreate {
		return t.errorf("-B makes no sense when not creating the target (-n)")
	}
	if graph.Lookup(dstFmt) == nil {
		return t.errorf("Unknown file format '%s'", dstFmt)
	}
	j := &convertJob{t: t, sparse: sparse, parallel: parallel, ordered: ordered, zc: newZeroCache()}
	for _, name := range srcNames {
		im, err := t.open(name, openFlags{format: srcFmt, forceShare: share, exclusive: true})
		if err != nil {
			return t.errorf("%s", err)
		}
		defer im.close(t.Ctx)
		j.srcs = append(j.srcs, im.node)
		j.starts = append(j.starts, j.total)
		j.total += im.node.SizeNow()
	}
	if compress && !noCreate && encryptedOpts(optStr) {
		return t.errorf("Compression and encryption not supported at the same time")
	}
	created := false
	if !noCreate {
		if err := t.createImage(createReq{
			filename: dstName, format: dstFmt, size: j.total, opts: parseOptList(optStr),
			backing: backing, backingFmt: backingFmt, quiet: true, noFormattingOutput: true,
		}); err != nil {
			var oe optionError
			if errors.As(err, &oe) {
				return t.errorf("%s", errText(err))
			}
			return t.errorf("%s: error while converting %s: %s", dstName, dstFmt, errText(err))
		}
		created = true
	}
	extra := map[string]any{}
	if created {
		// Create options the format also takes at open time (LUKS's
		// key-secret, qcow2's encrypt.key-secret) open the new image,
		// as qemu-img does.
		if d := graph.Lookup(dstFmt); d != nil && !d.Protocol {
			ot := newTarget(d.NewOptions())
			for _, it := range parseOptList(optStr) {
				q := qapiName(it.key)
				top, _, _ := strings.Cut(q, ".")
				// Only string-valued members: the image is opened in
				// JSON mode, where "on" is no boolean.
				if m, ok := member(ot.opts, top); ok && top != "file" && top != "backing" && !isChildRef(m.Type) && stringish(m.Type) {
					ot.set(q, it.val)
				}
			}
			extra = ot.tree
		}
	}
	switch cache {
	case "none", "directsync":
		extra["cache"] = map[string]any{"direct": true}
	case "unsafe":
		extra["cache"] = map[string]any{"no-flush": true}
	}
	dst, err := t.openWith(dstName, openFlags{format: dstFmt, writable: true, plainName: true}, extra)
	if err != nil {
		return t.errorf("%s", err)
	}
	defer dst.close(t.Ctx)
	j.dst = dst.node
	if compress {
		j.cw = dst.node.CompressedWriter()
		if j.cw == nil || j.cw.ClusterSize() <= 0 {
			dst.close(t.Ctx)
			if created && !strings.Contains(dstName, ":") {
				os.Remove(dstName)
			}
			return t.errorf("Compression not supported for this file format")
		}
		j.cluster = j.cw.ClusterSize()
	}
	if noCreate && dst.node.SizeNow() < j.total {
		return t.errorf("output file is smaller than input file")
	}
	// A new image reads as zeros, unless it was given a backing file
	// (-B, -o backing_file): then what it does not allocate comes from
	// there, and what the source does not allocate itself is left to it.
	j.targetBacking = dst.node.Child("backing") != nil
	newReadsZero := true
	if zi, ok := dst.node.Instance().(graph.ZeroIniter); ok {
		newReadsZero = zi.HasZeroInit()
	}
	j.zeroInit = created && !j.targetBacking && newReadsZero || targetZero
	j.prog = newProgress(t.Stdout, prog)
	if err := j.run(); err != nil {
		j.prog.end()
		return t.errorf("%s", err)
	}
	if err := dst.close(t.Ctx); err != nil {
		j.prog.end()
		return t.errorf("%s", errText(err))
	}
	if j.total == 0 {
		j.prog.set(100) // nothing to copy: qemu-img shows 100% once
		j.prog.end()
	} else {
		j.prog.done()
	}
	return 0
}

// openWith is open with extra options for the format node.
func (t *Tool) openWith(filename string, f openFlags, extra map[string]any) (*image, error) {
	if len(extra) == 0 {
		return t.open(filename, f)
	}
	saved := t.extraOpts
	t.extraOpts = extra
	defer func() { t.extraOpts = saved }()
	return t.open(filename, f)
}

// source maps an offset of the concatenation onto a source.
func (j *convertJob) source(off int64) (int, int64) {
	i := len(j.starts) - 1
	for i > 0 && j.starts[i] > off {
		i--
	}
	return i, off - j.starts[i]
}

// status is the block status at off of the concatenated sources, at most
// n bytes and never across a source's end.
func (j *convertJob) status(ctx context.Context, off, n int64) (extent, error) {
	i, local := j.source(off)
	src := j.srcs[i]
	n = min(n, src.SizeNow()-local)
	if n <= 0 {
		return extent{start: off, length: 0}, nil
	}
	return chainStatus(ctx, src, local, n, j.zc)
}

// readAt reads the concatenation.
func (j *convertJob) readAt(ctx context.Context, buf []byte, off int64) error {
	for len(buf) > 0 {
		i, local := j.source(off)
		n := min(int64(len(buf)), j.srcs[i].SizeNow()-local)
		if n <= 0 {
			// A source of size zero: skip to the next one.
			clear(buf)
			return nil
		}
		if err := j.srcs[i].ReadAt(ctx, buf[:n], local); err != nil {
			return fmt.Errorf("error while reading at byte %d: %s", off, ioErrString(err))
		}
		buf, off = buf[n:], off+n
	}
	return nil
}

// task is one request of the conversion.
type task struct {
	seq      int
	off, len int64
	zero     bool // the source reads as zeros here
}

func (j *convertJob) run() error {
	ctx, cancel := context.WithCancel(j.t.Ctx)
	defer cancel()
	tasks := make(chan task, j.parallel*2)
	var (
		errOnce  sync.Once
		firstErr error
		turnMu   sync.Mutex
		turnCond = sync.NewCond(&turnMu)
		turn     = 0
	)
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err; cancel() })
		turnMu.Lock()
		turnCond.Broadcast()
		turnMu.Unlock()
	}
	// waitTurn keeps writes in order unless -W.
	waitTurn := func(seq int) bool {
		if !j.ordered {
			return true
		}
		turnMu.Lock()
		defer turnMu.Unlock()
		for turn != seq && ctx.Err() == nil {
			turnCond.Wait()
		}
		return ctx.Err() == nil
	}
	// A cancel from outside (j.t.Ctx) wakes the writers waiting for
	// their turn too: the turn they wait for may belong to a task that
	// a worker skipped.
	stopWake := context.AfterFunc(ctx, func() {
		turnMu.Lock()
		turnCond.Broadcast()
		turnMu.Unlock()
	})
	defer stopWake()
	passTurn := func() {
		if !j.ordered {
			return
		}
		turnMu.Lock()
		turn++
		turnCond.Broadcast()
		turnMu.Unlock()
	}
	var wg sync.WaitGroup
	for w := 0; w < j.parallel; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, max(convertChunk, j.cluster))
			for tk := range tasks {
				if ctx.Err() != nil {
					continue
				}
				if err := j.do(ctx, tk, buf, waitTurn, passTurn); err != nil {
					fail(err)
				}
			}
		}()
	}
	err := j.plan(ctx, tasks)
	close(tasks)
	wg.Wait()
	if err != nil && firstErr == nil {
		return err
	}
	if firstErr == nil && j.t.Ctx.Err() != nil {
		// Cancelled from outside: tasks were skipped, so the target is
		// incomplete and the conversion must not report success.
		return fmt.Errorf("error while converting: %s", j.t.Ctx.Err())
	}
	return firstErr
}

// plan walks the sources and hands out the requests: runs that read as
// zeros become zero tasks (nothing at all when the target already reads
// as zeros and sparse output is on), data runs become data tasks of at
// most convertChunk bytes. With compression every task is whole clusters.
func (j *convertJob) plan(ctx context.Context, tasks chan<- task) error {
	seq := 0
	emit := func(tk task) error {
		tk.seq = seq
		seq++
		select {
		case tasks <- tk:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
	var pend *task // the request being built from consecutive runs
	flush := func() error {
		if pend == nil {
			return nil
		}
		tk := *pend
		pend = nil
		return emit(tk)
	}
	unit := int64(convertChunk)
	if j.cw != nil {
		unit = j.cluster * max(1, convertChunk/j.cluster)
	}
	for off := int64(0); off < j.total && ctx.Err() == nil; {
		if j.cw != nil {
			// Whole clusters, whatever the sources' runs.
			n := min(unit, j.total-off)
			zero, below, err := j.clusterStatus(ctx, off, n)
			if err != nil {
				return err
			}
			if zero && j.zeroInit || below && j.targetBacking {
				j.progress(n)
			} else if err := emit(task{off: off, len: n, zero: zero}); err != nil {
				return err
			}
			off += n
			continue
		}
		// One status query for a long run (a query per request would
		// cost a SEEK_DATA/SEEK_HOLE scan each on some file systems),
		// then requests of at most unit bytes within it.
		e, err := j.status(ctx, off, min(statusSpan, j.total-off))
		if err != nil {
			return fmt.Errorf("error while reading block status at offset %d: %s", off, errString(err))
		}
		run := e.length
		if run <= 0 {
			run = min(unit, j.total-off)
		}
		zero := e.zero
		if zero && j.zeroInit && j.sparse > 0 || j.targetBacking && (e.depth > 0 || !e.present) {
			if err := flush(); err != nil {
				return err
			}
			j.progress(run)
			off += run
			continue
		}
		// Runs of the same kind join into requests of up to unit bytes
		// (formats answer block status a cluster or an L2 table at a
		// time); zeros join without limit.
		for end := off + run; off < end && ctx.Err() == nil; {
			if pend != nil && pend.zero == zero && pend.off+pend.len == off && (zero || pend.len < unit) {
				n := end - off
				if !zero {
					n = min(n, unit-pend.len)
				}
				pend.len += n
				off += n
				continue
			}
			if err := flush(); err != nil {
				return err
			}
			n := end - off
			if !zero {
				n = min(n, unit)
			}
			pend = &task{off: off, len: n, zero: zero}
			off += n
		}
	}
	return flush()
}

// clusterStatus reports whether block status says [off, off+n) reads
// as zeros, and whether none of it is allocated in the source's top layer.
func (j *convertJob) clusterStatus(ctx context.Context, off, n int64) (zero, below bool, err error) {
	zero, below = true, true
	for end := off + n; off < end; {
		e, err := j.status(ctx, off, end-off)
		if err != nil {
			return false, false, fmt.Errorf("error while reading block status at offset %d: %s", off, errString(err))
		}
		if e.length <= 0 {
			break
		}
		zero = zero && e.zero
		below = below && (e.depth > 0 || !e.present)
		off += e.length
	}
	return zero, below, nil
}

func (j *convertJob) progress(n int64) {
	d := j.done.Add(n)
	if j.total > 0 {
		j.prog.set(float64(d) * 100 / float64(j.total))
	}
}

// do runs one task: read, then write in turn.
func (j *convertJob) do(ctx context.Context, tk task, buf []byte, waitTurn func(int) bool, passTurn func()) error {
	var data []byte
	if !tk.zero || j.cw != nil {
		// Zero tasks outside compression may be longer than buf; they
		// need no data.
		data = buf[:tk.len]
		if tk.zero {
			clear(data)
		} else if err := j.readAt(ctx, data, tk.off); err != nil {
			return err // fail() cancels, which releases the writers waiting for this turn
		}
	}
	if !waitTurn(tk.seq) {
		return nil
	}
	defer passTurn()
	var err error
	switch {
	case j.cw != nil:
		err = j.writeCompressed(ctx, tk.off, data)
	case tk.zero && j.sparse == 0:
		// -S 0: the target is fully allocated, zeros written as data.
		clear(buf)
		for off, end := tk.off, tk.off+tk.len; off < end && err == nil; off += int64(len(buf)) {
			err = j.dst.WriteAt(ctx, buf[:min(int64(len(buf)), end-off)], off, 0)
		}
	case tk.zero:
		err = j.dst.WriteZeroes(ctx, tk.off, tk.len, graph.ZeroMayUnmap)
	default:
		err = j.writeSparse(ctx, tk.off, data)
	}
	if err != nil {
		if strings.HasPrefix(err.Error(), "error while") {
			return err
		}
		return fmt.Errorf("error while writing at byte %d: %s", tk.off, ioErrString(err))
	}
	j.progress(tk.len)
	return nil
}

// writeCompressed writes whole clusters through the target's
// CompressedWriter, skipping clusters of zeros.
func (j *convertJob) writeCompressed(ctx context.Context, off int64, data []byte) error {
	for len(data) > 0 {
		n := min(int64(len(data)), j.cluster)
		c := data[:n]
		if !zeros.Is(c) {
			if err := j.dst.WriteCompressed(ctx, off, c); err != nil {
				return err
			}
		} else if !j.zeroInit {
			if err := j.dst.WriteZeroes(ctx, off, n, graph.ZeroMayUnmap); err != nil {
				return err
			}
		}
		data, off = data[n:], off+n
	}
	return nil
}

// writeSparse writes data, leaving out runs of zeros of at least j.sparse
// bytes (in 512-byte sectors) as qemu-img's -S does; shorter zero runs
// are written with the data around them.
func (j *convertJob) writeSparse(ctx context.Context, off int64, data []byte) error {
	if j.sparse == 0 {
		return j.dst.WriteAt(ctx, data, off, 0)
	}
	const sector = 512
	n := int64(len(data))
	// zeroRun returns where the run of zero sectors starting at i ends.
	zeroRun := func(i int64) int64 {
		for i < n && zeros.Is(data[i:min(i+sector, n)]) {
			i += sector
		}
		return min(i, n)
	}
	var i int64
	for i < n {
		// Data up to the next zero run long enough to leave out; shorter
		// zero runs go with the data around them.
		start, zs, ze := i, n, n
		for i < n {
			e := zeroRun(i)
			if e == i {
				i += sector
				continue
			}
			if e-i >= j.sparse {
				zs, ze = i, e
				break
			}
			i = e
		}
		if end := min(i, n); end > start {
			if err := j.dst.WriteAt(ctx, data[start:end], off+start, 0); err != nil {
				return err
			}
		}
		if ze > zs && !j.zeroInit {
			if err := j.dst.WriteZeroes(ctx, off+zs, ze-zs, graph.ZeroMayUnmap); err != nil {
				return err
			}
		}
		i = ze
	}
	return nil
}

// stringish reports whether a member takes a string (or a tree of them).
func stringish(t reflect.Type) bool {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t.Kind() == reflect.String || t.Kind() == reflect.Map
}

// encryptedOpts reports whether create options ask for encryption
// (encrypt.format, or qemu-img's encryption=on).
func encryptedOpts(optStr string) bool {
	for _, it := range parseOptList(optStr) {
		if it.key == "encrypt.format" || (it.key == "encryption" && it.val != "off") {
			return true
		}
	}
	return false
}
