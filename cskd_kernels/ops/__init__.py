"""Public ops: validation, backend dispatch and the kernels as PyTorch custom ops ("cskd::"), one op per file."""
