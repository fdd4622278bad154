"""The qcow2 driver of the reference implementation, one module per spec area."""
