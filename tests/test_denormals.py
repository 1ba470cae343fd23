"""The C++ kernels flush subnormal floats inside a call and leave the caller's mode as it was.

csrc/denormals.h: subnormal products (a CKA gradient of 1e-9 times a softmax
entry of 1e-30) take a microcode assist per vector FMA on Intel cores, which
made the student CAM's backward 5x slower; the kernels set MXCSR's FTZ and
DAZ bits on every thread of their call and restore the caller's afterwards.
"""

import platform

import pytest
import torch

import cskd_kernels
from cskd_kernels import _C

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"),
                                reason="MXCSR (flush-to-zero) is x86's; elsewhere the guard is a no-op")

TINY = 1e-30  # TINY * SMALL = 1e-40: below float32's smallest normal number (1.2e-38), above its smallest subnormal
SMALL = 1e-10


def subnormal_products_survive():
    """Whether the caller's float32 products keep subnormal results, on this thread and on torch's pool."""
    single = torch.tensor([TINY]) * SMALL  # one element: this thread
    many = torch.full((1 << 22,), TINY) * SMALL  # big enough for torch to split it over its threads
    return bool(single.item() != 0), bool((many != 0).all())


@pytest.fixture
def caller_mode():
    """Yields a function to set the caller's mode; leaves it off (torch's default) afterwards."""
    yield torch.set_flush_denormal
    torch.set_flush_denormal(False)


def test_products_inside_a_kernel_are_flushed():
    a = torch.full((4, 4), TINY)
    b = torch.full((4, 4), SMALL)
    assert torch.equal(_C.gemm(a, b, False, False), torch.zeros(4, 4))
    assert (a @ b != 0).all(), "torch's own product keeps the subnormal (the caller's mode is untouched)"


def test_operands_inside_a_kernel_are_read_as_zero():
    subnormal = torch.full((4, 4), TINY * SMALL)
    assert (subnormal != 0).all()
    assert torch.equal(_C.gemm(subnormal, torch.full((4, 4), 1e30), False, False), torch.zeros(4, 4))


@pytest.mark.parametrize("threads", [1, 2])
def test_the_callers_mode_is_restored_on_every_thread(caller_mode, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        caller_mode(False)
        assert subnormal_products_survive() == (True, True)
        torch.manual_seed(0)
        loss = cskd_kernels.CSKDLoss(8, 16, grid=(2, 2))
        feat_s = torch.randn(4, 8, 6, 6, requires_grad=True)
        loss(feat_s, torch.randn(4, 16, 6, 6)).loss.backward()
        assert subnormal_products_survive() == (True, True)
        caller_mode(True)  # a caller who flushes keeps flushing
        _C.gemm(torch.ones(64, 64), torch.ones(64, 64), False, False)
        assert subnormal_products_survive() == (False, False)
    finally:
        torch.set_num_threads(previous)


def test_a_failing_call_restores_the_mode(caller_mode):
    """A kernel that raises still restores the mode (the guard is RAII), and the next call flushes again."""
    caller_mode(False)
    with pytest.raises(RuntimeError, match="inner sizes differ"):
        _C.gemm(torch.ones(2, 3), torch.ones(2, 3), False, False)
    assert subnormal_products_survive() == (True, True)
    assert torch.equal(_C.gemm(torch.full((1, 1), TINY), torch.full((1, 1), SMALL), False, False), torch.zeros(1, 1))
