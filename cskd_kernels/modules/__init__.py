"""nn.Module wrappers of the public ops, one op per file."""
