"""Public ops: validation, backend dispatch and autograd Functions, one op per file."""
