package main

import (
	"context"

	"blockbackend/nbd/nbdexport"
	"blockbackend/qmp"
	"blockbackend/qmp/qapi"
)

type nbdServer struct{ d *daemon }

func (n *nbdServer) stop() {
	if nbdexport.Default().Running() {
		_ = qmp.StopNBD(context.Background(), n.d.g)
	}
}

func (d *daemon) registerNBDCommands() {
	nbdexport.SetLogger(d.log)
	qmp.NBDCommands(d.qmp, d.g)
	d.nbd = &nbdServer{d: d}
}

func (d *daemon) startNBD(m map[string]any, mode qapi.Mode) error {
	var o nbdexport.ServerOptions
	if err := qapi.Decode(m, &o, mode); err != nil {
		return err
	}
	return nbdexport.Default().Start(o)
}
