package tests

// The one file of package tests that names the qcow2 driver: its blank
// import registers "qcow2" in the test binary for the in-process qcow2
// tests (qcow2_interop_test.go, qcow2_model_test.go), which find it
// through graph.Lookup. Until drivers/qcow2 exists this file does not
// compile; the rest of the qcow2 harness does not depend on it.

import _ "blockbackend/drivers/qcow2"
