package graph

import (
	"context"

	"blockbackend/qmp/qapi"
)

// Create makes a new image with driver's Create (QEMU's
// BlockdevCreateOptions: what blockdev-create runs as a job and img
// create runs directly). opts are the driver's create options without
// "driver" (a "driver" member equal to driver is accepted and dropped);
// they are decoded strictly into the driver's NewCreateOptions struct, as
// open decodes BlockdevOptions. Nodes that the options name (qcow2's
// "file") must already exist in g; Create neither adds nor removes nodes.
//
// It runs synchronously: the job machinery of blockdev-create, with its
// events, wraps it.
func (g *Graph) Create(ctx context.Context, driver string, opts map[string]any) error {
	d := Lookup(driver)
	if d == nil {
		if _, err := lookupDriverForOpen(driver); err != nil {
			return err
		}
		return qapi.Errorf(qapi.GenericError, "Parameter 'driver' does not accept value '%s'", driver)
	}
	if d.Create == nil || d.NewCreateOptions == nil {
		return qapi.Errorf(qapi.GenericError, "Driver does not support blockdev-create")
	}
	rest := qapi.Clone(opts)
	if v, ok := rest["driver"]; ok {
		if s, _ := v.(string); s != driver {
			return qapi.Errorf(qapi.GenericError, "Parameter 'driver' is '%v', but %s create options were given", v, driver)
		}
		delete(rest, "driver")
	}
	co := d.NewCreateOptions()
	if err := qapi.Decode(rest, co, qapi.JSON); err != nil {
		return err
	}
	return d.Create(ctx, &CreateContext{g: g, log: g.log.With("driver", driver)}, co)
}
