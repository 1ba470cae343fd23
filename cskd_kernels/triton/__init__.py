"""Triton kernels, one op per file. Imported lazily by cskd_kernels.backend.triton_kernels."""
