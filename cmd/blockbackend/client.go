package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// runQMPClient is "blockbackend qmp": run one QMP command against a
// monitor socket (ours or QEMU's) and print the reply's "return" value.
func runQMPClient(args []string) int {
	fs := flag.NewFlagSet("qmp", flag.ContinueOnError)
	sock := fs.String("socket", "", "QMP monitor socket: a UNIX path, or host:port with -tcp")
	tcp := fs.Bool("tcp", false, "the socket is host:port over TCP")
	timeout := fs.Duration("timeout", 10*time.Second, "connect timeout")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: blockbackend qmp --socket PATH COMMAND [JSON-ARGUMENTS]\n"+
			"Runs one QMP command and prints its return value as JSON.\n"+
			"Example: blockbackend qmp --socket /tmp/qmp.sock query-named-block-nodes '{\"flat\": true}'\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *sock == "" || fs.NArg() < 1 || fs.NArg() > 2 {
		fs.Usage()
		return 2
	}
	cmd := map[string]any{"execute": fs.Arg(0)}
	if fs.NArg() == 2 {
		var a map[string]any
		if err := json.Unmarshal([]byte(fs.Arg(1)), &a); err != nil {
			return fatalf("qmp: arguments must be a JSON object: %v", err)
		}
		cmd["arguments"] = a
	}
	network := "unix"
	if *tcp {
		network = "tcp"
	}
	mon, err := goqmp.NewSocketMonitor(network, *sock, *timeout)
	if err != nil {
		return fatalf("qmp: %v", err)
	}
	if err := mon.Connect(); err != nil {
		return fatalf("qmp: negotiating capabilities: %v", err)
	}
	defer mon.Disconnect()
	raw, _ := json.Marshal(cmd)
	reply, err := mon.Run(raw)
	if err != nil {
		return fatalf("qmp: %s: %v", fs.Arg(0), err)
	}
	var r struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(reply, &r); err != nil {
		return fatalf("qmp: bad reply: %v", err)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, r.Return, "", "  "); err != nil {
		out.Write(r.Return)
	}
	fmt.Println(out.String())
	return 0
}
