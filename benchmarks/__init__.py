"""Benchmarks of the fused ops against the released code, the reference and torch.compile.

Run with ``pytest benchmarks/``; print the README table with ``python -m benchmarks.report``.
"""
