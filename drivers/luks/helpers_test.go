package luks

import (
	"context"
	"os/exec"
	"testing"

	_ "blockbackend/drivers/file"
	"blockbackend/graph"
	"blockbackend/internal/qemutest"
	"blockbackend/qmp/qapi"
)

const pass = "pässwörd 1"

func newGraph(t *testing.T) *graph.Graph {
	t.Helper()
	g := graph.New(nil)
	t.Cleanup(func() { g.Close() })
	for id, data := range map[string]string{"s": pass, "n": "new secret", "w": "wrong"} {
		if err := g.Objects.Add(map[string]any{"qom-type": "secret", "id": id, "data": data}, qapi.JSON); err != nil {
			t.Fatal(err)
		}
	}
	return g
}

// openLUKS opens the luks image at path with secret id.
func openLUKS(t *testing.T, g *graph.Graph, name, path, secret string, readOnly bool) (*graph.Node, error) {
	t.Helper()
	opts := map[string]any{"driver": "luks", "node-name": name, "file": map[string]any{"driver": "file", "filename": path}, "read-only": readOnly}
	if secret != "" {
		opts["key-secret"] = secret
	}
	return g.Add(context.Background(), opts, qapi.JSON)
}

// createLUKS makes a luks image at path through blockdev-create's path
// (file create, then luks create on the opened file node).
func createLUKS(t *testing.T, g *graph.Graph, path string, size int64, extra map[string]any) {
	t.Helper()
	ctx := context.Background()
	run, err := g.PrepareCreate(map[string]any{"driver": "file", "filename": path, "size": 0}, qapi.JSON, "options")
	if err != nil {
		t.Fatal(err)
	}
	if err := run(ctx); err != nil {
		t.Fatal(err)
	}
	f, err := g.Add(ctx, map[string]any{"driver": "file", "filename": path, "node-name": "create-file"}, qapi.JSON)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Delete(ctx, "create-file")
	o := map[string]any{"driver": "luks", "file": f.Name(), "size": size, "key-secret": "s", "iter-time": 10}
	for k, v := range extra {
		o[k] = v
	}
	run, err = g.PrepareCreate(o, qapi.JSON, "options")
	if err != nil {
		t.Fatal(err)
	}
	if err := run(ctx); err != nil {
		t.Fatal(err)
	}
}

// qemuTool runs a QEMU tool; it fails the test if the tool is missing.
// qemu-img's PBKDF2 calibration sometimes fails on a busy machine with
// "Unable to get accurate CPU usage": that is retried.
func qemuTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is needed for this test (make deps installs it): %v", name, err)
	}
	out, err := qemutest.CombinedOutput(func() *exec.Cmd { return exec.Command(name, args...) })
	return string(out), err
}

func secretArgs() []string {
	return []string{"--object", "secret,id=s,data=" + pass}
}

func imageOpts(path string) string {
	return "driver=luks,key-secret=s,file.filename=" + path
}
