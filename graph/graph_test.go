package graph_test

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"

	"blockbackend/graph"
	"blockbackend/permissions"
	"blockbackend/qmp/qapi"
)

// mem is an in-memory protocol driver for the graph's tests.
type memOpts struct {
	Size int64 `qapi:"size,optional"`
}

type memNode struct {
	mu       sync.Mutex
	data     []byte
	perm     [2]permissions.Perm
	failPerm bool
	zeroes   int
}

func (m *memNode) ReadV(_ context.Context, off int64, iov [][]byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, b := range iov {
		off += int64(copy(b, m.data[off:]))
	}
	return nil
}

func (m *memNode) WriteV(_ context.Context, off int64, iov [][]byte, _ graph.WriteFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, b := range iov {
		off += int64(copy(m.data[off:], b))
	}
	return nil
}

func (m *memNode) WriteZeroes(_ context.Context, off, n int64, _ graph.ZeroFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.zeroes++
	clear(m.data[off : off+n])
	return nil
}

func (m *memNode) Flush(context.Context) error { return nil }
func (m *memNode) Size() (int64, error)        { return int64(len(m.data)), nil }
func (m *memNode) Close() error                { return nil }
func (m *memNode) Truncate(_ context.Context, size int64, _ bool, _ string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	nd := make([]byte, size)
	copy(nd, m.data)
	m.data = nd
	return nil
}
func (m *memNode) CheckPerm(p, s permissions.Perm) error {
	if m.failPerm && p&permissions.Write != 0 {
		return qapi.Errorf(qapi.GenericError, "Failed to get \"write\" lock")
	}
	return nil
}
func (m *memNode) SetPerm(p, s permissions.Perm) { m.perm = [2]permissions.Perm{p, s} }
func (m *memNode) AbortPerm()                    {}
func (m *memNode) PrepareReopen(context.Context, any, bool) (func(), func(), error) {
	return func() {}, func() {}, nil
}

var lastMem *memNode

// fmtOpts is a format driver over a "file" child with image roles.
type fmtOpts struct {
	File graph.ChildRef `qapi:"file"`
}

type fmtNode struct{ file *graph.Node }

func (f *fmtNode) ReadV(ctx context.Context, off int64, iov [][]byte) error {
	return f.file.ReadV(ctx, off, iov)
}
func (f *fmtNode) WriteV(ctx context.Context, off int64, iov [][]byte, fl graph.WriteFlags) error {
	return f.file.WriteV(ctx, off, iov, fl)
}
func (f *fmtNode) Flush(ctx context.Context) error { return f.file.Flush(ctx) }
func (f *fmtNode) Size() (int64, error)            { return f.file.SizeNow(), nil }
func (f *fmtNode) Close() error                    { return nil }
func (f *fmtNode) PrepareReopen(context.Context, any, bool) (func(), func(), error) {
	return func() {}, func() {}, nil
}

func init() {
	graph.Register(&graph.Driver{
		Name: "test-mem", Protocol: true,
		NewOptions: func() any { return &memOpts{Size: 1 << 20} },
		Open: func(_ context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
			m := &memNode{data: make([]byte, o.(*memOpts).Size)}
			if strings.HasPrefix(oc.NodeName(), "locked") {
				m.failPerm = true
			}
			lastMem = m
			return m, nil
		},
	})
	graph.Register(&graph.Driver{
		Name:       "test-fmt",
		NewOptions: func() any { return &fmtOpts{} },
		Open: func(ctx context.Context, oc *graph.OpenContext, o any) (graph.Instance, error) {
			c, err := oc.OpenChild(ctx, "file", &o.(*fmtOpts).File, graph.RoleImage, false)
			if err != nil {
				return nil, err
			}
			return &fmtNode{file: c.Node()}, nil
		},
	})
}

type user string

func (u user) UserDesc() string { return "block export '" + string(u) + "'" }

var ctx = context.Background()

func add(t *testing.T, g *graph.Graph, opts map[string]any) *graph.Node {
	t.Helper()
	n, err := g.Add(ctx, opts, qapi.JSON)
	if err != nil {
		t.Fatalf("Add(%v): %v", opts, err)
	}
	return n
}

func wantErr(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %q", want)
	}
	if err.Error() != want {
		t.Fatalf("error %q, want %q", err.Error(), want)
	}
}

func TestAddErrors(t *testing.T) {
	g := graph.New(nil)
	add(t, g, map[string]any{"driver": "test-mem", "node-name": "m0"})
	cases := []struct {
		opts map[string]any
		want string
	}{
		{map[string]any{"driver": "test-mem", "node-name": "m0"}, "Duplicate nodes with node-name='m0'"},
		{map[string]any{"driver": "test-mem", "node-name": "1x"}, "Invalid node-name: '1x'"},
		{map[string]any{"driver": "test-mem", "node-name": strings.Repeat("a", 32)}, "Node name too long"},
		{map[string]any{"driver": "test-mem"}, "'node-name' must be specified for the root node"},
		{map[string]any{"driver": "bogus", "node-name": "b"}, "Parameter 'driver' does not accept value 'bogus'"},
		{map[string]any{"node-name": "b"}, "Parameter 'driver' is missing"},
		{map[string]any{"driver": "test-mem", "node-name": "b", "bogus": 1}, "Parameter 'bogus' is unexpected"},
		{map[string]any{"driver": "test-mem", "node-name": "b", "force-share": true}, "force-share=on can only be used with read-only images"},
		{map[string]any{"driver": "test-fmt", "node-name": "b", "file": "nope"}, "Cannot find device='' nor node-name='nope'"},
		{map[string]any{"driver": "test-fmt", "node-name": "b"}, "Parameter 'file' is missing"},
	}
	for _, c := range cases {
		_, err := g.Add(ctx, c.opts, qapi.JSON)
		wantErr(t, err, c.want)
	}
	if got := len(g.Nodes()); got != 1 {
		t.Fatalf("failed adds left nodes behind: %d nodes", got)
	}
}

func TestNestedChildAndDelete(t *testing.T) {
	g := graph.New(nil)
	f := add(t, g, map[string]any{"driver": "test-fmt", "node-name": "f",
		"file": map[string]any{"driver": "test-mem", "size": 4096}})
	if n := len(g.Nodes()); n != 2 {
		t.Fatalf("%d nodes, want 2", n)
	}
	c := f.Child("file")
	if c == nil || !strings.HasPrefix(c.Node().Name(), "#block") {
		t.Fatalf("implicit child not named like QEMU's: %+v", c)
	}
	// The format node is writable: its metadata child gets write and
	// resize, unshared (QEMU's model).
	p, s := c.Perms()
	if p != permissions.ConsistentRead|permissions.Write|permissions.Resize {
		t.Errorf("child perm = %v", p)
	}
	if s&(permissions.Write|permissions.Resize) != 0 {
		t.Errorf("child shares %v", s)
	}
	wantErr(t, g.Delete(ctx, c.Node().Name()), "Node "+c.Node().Name()+" is not owned by the monitor")
	if err := g.Delete(ctx, "f"); err != nil {
		t.Fatal(err)
	}
	if n := len(g.Nodes()); n != 0 {
		t.Fatalf("implicit child survived its parent: %d nodes", n)
	}
}

func TestInUse(t *testing.T) {
	g := graph.New(nil)
	add(t, g, map[string]any{"driver": "test-mem", "node-name": "m"})
	add(t, g, map[string]any{"driver": "test-fmt", "node-name": "f", "file": "m"})
	wantErr(t, g.Delete(ctx, "m"), "Block device m is in use")
	wantErr(t, g.Delete(ctx, "zz"), "Failed to find node with node-name='zz'")
	if err := g.Delete(ctx, "f"); err != nil {
		t.Fatal(err)
	}
	if err := g.Delete(ctx, "m"); err != nil {
		t.Fatal(err)
	}
}

func TestPermissionConflict(t *testing.T) {
	g := graph.New(nil)
	n := add(t, g, map[string]any{"driver": "test-mem", "node-name": "m"})
	const r, w, wu, rs = permissions.ConsistentRead, permissions.Write, permissions.WriteUnchanged, permissions.Resize
	c1, err := g.AttachUser(user("e1"), n, "root", r|w, r|wu|rs)
	if err != nil {
		t.Fatal(err)
	}
	_, err = g.AttachUser(user("e2"), n, "root", r|w, r|wu|rs)
	wantErr(t, err, "Permission conflict on node 'm': permissions 'write' are both required by block export 'e2' (uses node 'm' as 'root' child) and unshared by block export 'e1' (uses node 'm' as 'root' child).")
	// A reader that shares everything is fine.
	c3, err := g.AttachUser(user("e3"), n, "root", r, permissions.All)
	if err != nil {
		t.Fatal(err)
	}
	if p, s := n.Perms(); p != r|w || s != r|wu|rs {
		t.Fatalf("combined perms %v / %v", p, s)
	}
	// A format node over it now needs write for its metadata: refused.
	_, err = g.Add(ctx, map[string]any{"driver": "test-fmt", "node-name": "f", "file": "m"}, qapi.JSON)
	if err == nil || !strings.Contains(err.Error(), "Permission conflict on node 'm'") {
		t.Fatalf("format over exported node: %v", err)
	}
	// Resize: e1 shares it, so block_resize works.
	if err := g.Resize(ctx, n, 2<<20); err != nil {
		t.Fatal(err)
	}
	if n.SizeNow() != 2<<20 {
		t.Fatalf("size %d", n.SizeNow())
	}
	g.DetachUser(c1)
	g.DetachUser(c3)
	if p, s := n.Perms(); p != 0 || s != permissions.All {
		t.Fatalf("perms after detach %v / %v", p, s)
	}
}

func TestDriverPermFailureAbortsAll(t *testing.T) {
	g := graph.New(nil)
	n := add(t, g, map[string]any{"driver": "test-mem", "node-name": "locked1"})
	_, err := g.AttachUser(user("e"), n, "root", permissions.ConsistentRead|permissions.Write, permissions.All)
	wantErr(t, err, `Failed to get "write" lock`)
	if p, _ := n.Perms(); p != 0 {
		t.Fatalf("perm changed after failure: %v", p)
	}
	if len(g.DumpGraph().Edges) != 0 {
		t.Fatal("failed attach left an edge")
	}
}

func TestReadOnly(t *testing.T) {
	g := graph.New(nil)
	n := add(t, g, map[string]any{"driver": "test-fmt", "node-name": "f", "read-only": true,
		"file": map[string]any{"driver": "test-mem"}})
	if !n.Child("file").Node().ReadOnly() {
		t.Fatal("read-only not inherited by the implicit child")
	}
	_, err := g.AttachUser(user("e"), n, "root", permissions.ConsistentRead|permissions.Write, permissions.All)
	wantErr(t, err, "Block node is read-only")
	if err := n.WriteAt(ctx, []byte{1}, 0, 0); err == nil {
		t.Fatal("write to a read-only node succeeded")
	}
	// Reopen read-write: the child follows.
	err = g.Reopen(ctx, []map[string]any{{"driver": "test-fmt", "node-name": "f", "file": map[string]any{"driver": "test-mem"}}}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	if n.ReadOnly() || n.Child("file").Node().ReadOnly() {
		t.Fatal("reopen did not make the nodes writable")
	}
	c, err := g.AttachUser(user("e"), n, "root", permissions.ConsistentRead|permissions.Write, permissions.All)
	if err != nil {
		t.Fatal(err)
	}
	// Back to read-only while a writer is attached: refused.
	err = g.Reopen(ctx, []map[string]any{{"driver": "test-fmt", "node-name": "f", "read-only": true}}, qapi.JSON)
	wantErr(t, err, "Block node is read-only")
	g.DetachUser(c)
	wantErr(t, g.Reopen(ctx, []map[string]any{{"driver": "raw", "node-name": "f"}}, qapi.JSON), "Cannot change the option 'driver'")
	wantErr(t, g.Reopen(ctx, []map[string]any{{"driver": "test-fmt", "node-name": "f", "cache": map[string]any{"direct": true}}}, qapi.JSON),
		"Cannot change the option 'cache.direct'")
}

func TestIOBoundsAndDetectZeroes(t *testing.T) {
	g := graph.New(nil)
	n := add(t, g, map[string]any{"driver": "test-mem", "node-name": "m", "size": 8192, "detect-zeroes": "on"})
	m := lastMem
	buf := bytes.Repeat([]byte{7}, 512)
	if err := n.WriteAt(ctx, buf, 512, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 512)
	if err := n.ReadAt(ctx, got, 512); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back %v %v", err, got[:4])
	}
	if err := n.ReadAt(ctx, got, 8192-100); err == nil {
		t.Fatal("read past the end succeeded")
	}
	if err := n.WriteAt(ctx, make([]byte, 512), 512, 0); err != nil {
		t.Fatal(err)
	}
	if m.zeroes != 1 {
		t.Fatalf("detect-zeroes did not turn the zero write into write-zeroes (%d)", m.zeroes)
	}
	if err := n.ReadAt(ctx, got, 512); err != nil || !bytes.Equal(got, make([]byte, 512)) {
		t.Fatal("zeros not read back")
	}
}

func TestDumpGraph(t *testing.T) {
	g := graph.New(nil)
	add(t, g, map[string]any{"driver": "test-mem", "node-name": "m"})
	add(t, g, map[string]any{"driver": "test-fmt", "node-name": "f", "file": "m"})
	d := g.DumpGraph()
	if len(d.Nodes) != 2 || len(d.Edges) != 1 {
		t.Fatalf("dump %+v", d)
	}
	e := d.Edges[0]
	if e.Name != "file" || strings.Join(e.Perm, ",") != "resize,write,consistent-read" ||
		strings.Join(e.SharedPerm, ",") != "write-unchanged,consistent-read" {
		t.Fatalf("edge %+v", e)
	}
}

func TestSecrets(t *testing.T) {
	o := graph.NewObjects()
	if err := o.Add(map[string]any{"qom-type": "secret", "id": "s0", "data": "c2VjcmV0", "format": "base64"}, qapi.JSON); err != nil {
		t.Fatal(err)
	}
	v, err := o.Secret("s0")
	if err != nil || string(v) != "secret" {
		t.Fatalf("secret %q %v", v, err)
	}
	wantErr(t, o.Add(map[string]any{"qom-type": "secret", "id": "s0", "data": "x"}, qapi.JSON),
		"attempt to add duplicate property 's0' to object (type 'container')")
	wantErr(t, o.Delete("zz"), "object 'zz' not found")
	wantErr(t, o.Add(map[string]any{"qom-type": "secret", "id": "s1"}, qapi.JSON), "Either 'data' or 'file' must be provided")
	if err := o.Delete("s0"); err != nil {
		t.Fatal(err)
	}
	if _, err := o.Secret("s0"); err == nil {
		t.Fatal("deleted secret still readable")
	}
}
