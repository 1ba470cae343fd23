"""Shared test setup.

Without a GPU, the Triton kernels run on the CPU through Triton's interpreter:
TRITON_INTERPRET must be set before the first kernel module is imported, which
happens lazily on the first backend="triton" call.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cskd_kernels.backend import extension, triton_available, triton_interpreting  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_EXTENSION = extension() is not None

CUDA_REASON = "needs a CUDA device"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
requires_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")


def pytest_collection_modifyitems(config, items):
    """CSKD_CUDA_TESTS_ONLY=1 (benchmarks/gpu_check.sh): only the tests that run on CUDA; CI runs the rest."""
    if os.environ.get("CSKD_CUDA_TESTS_ONLY") != "1":
        return
    on_cuda = [item for item in items if "cuda" in item.nodeid
               or any(mark.kwargs.get("reason") == CUDA_REASON for mark in item.iter_markers("skipif"))]
    config.hook.pytest_deselected(items=[item for item in items if item not in on_cuda])
    items[:] = on_cuda


def fused_backends():
    """(backend, device) pairs that can run here: cpu with the extension, triton on CUDA or interpreted."""
    pairs = []
    if HAS_EXTENSION:
        pairs.append(pytest.param("cpu", "cpu", id="cpu"))
    if triton_available():
        device = "cuda" if HAS_CUDA else "cpu"
        if HAS_CUDA or triton_interpreting():
            pairs.append(pytest.param("triton", device, id=f"triton-{device}"))
    return pairs


# Per-dtype tolerances (rtol, atol) for fused results against the float64 reference.
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


@pytest.fixture(autouse=True)
def _gpu_launch_sizes(request):
    """CSKD_GPU_LAUNCH_SIZES=1: interpreted kernels launch with a GPU's tiles, warps and splits (not the interpreter's).

    CI runs the interpreter's launch sizes; this checks the GPU's give the same results without a GPU
    (16-bit cases excepted: the interpreter's bfloat16 tl.dot is wrong, the GPU sizes do not work around it).
    """
    if os.environ.get("CSKD_GPU_LAUNCH_SIZES") == "1" and triton_interpreting():
        from benchmarks.gpu_compile import use_gpu_launch_sizes

        use_gpu_launch_sizes(4, request.getfixturevalue("monkeypatch").setattr)
    yield


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh random inputs, rerunnable failures."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield
