"""cskd::blas::gemm, the product every C++ kernel runs on: all operand layouts, odd sizes, against float64 torch.mm.

On AVX-512 CPUs where MKL runs its AVX2 kernels (non-Intel) float32 goes
through the package's packed AVX-512 kernel (csrc/gemm_avx512.h); elsewhere,
and for float64, through the BLAS torch links. The sizes cross every blocking
edge of the packed kernel: the 8-row and 32-column micro tiles, the 16 x 16
packing transposes, the 256-deep blocks and the 512-row / 1024-column blocks.
"""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")

SIZES = [(1, 1, 1), (7, 5, 3), (8, 32, 16), (9, 33, 17), (17, 15, 257), (130, 338, 26), (513, 70, 33),
         (16, 1030, 300), (40, 24, 600)]
LAYOUTS = list(itertools.product([False, True], [False, True]))
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}


def _C():
    from cskd_kernels import _C
    return _C


def _operands(m, n, k, trans_a, trans_b, dtype):
    a = torch.randn((k, m) if trans_a else (m, k), dtype=dtype)
    b = torch.randn((n, k) if trans_b else (k, n), dtype=dtype)
    expected = (a.double().t() if trans_a else a.double()) @ (b.double().t() if trans_b else b.double())
    return a, b, expected


def _relative_error(out, expected):
    return ((out.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("trans_a,trans_b", LAYOUTS)
@pytest.mark.parametrize("m,n,k", SIZES)
def test_product_matches_float64(m, n, k, trans_a, trans_b, dtype):
    a, b, expected = _operands(m, n, k, trans_a, trans_b, dtype)
    assert _relative_error(_C().gemm(a, b, trans_a, trans_b), expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("trans_a,trans_b", LAYOUTS)
@pytest.mark.parametrize("m,n,k", [(9, 33, 17), (130, 338, 300), (16, 1030, 40)])
def test_addend_is_added(m, n, k, trans_a, trans_b):
    a, b, expected = _operands(m, n, k, trans_a, trans_b, torch.float32)
    addend = torch.randn(m, n) * expected.abs().max()
    out = _C().gemm(a, b, trans_a, trans_b, addend)
    assert _relative_error(out, expected + addend.double()) < TOLERANCE[torch.float32]


def test_strided_operands_are_read_with_their_leading_dimension():
    a, b = torch.randn(40, 70)[:, 3:37], torch.randn(50, 90)[5:39, 10:75]
    expected = a.double() @ b.double()
    assert _relative_error(_C().gemm(a, b, False, False), expected) < TOLERANCE[torch.float32]


# (200, 300): on the BLAS path, row panels of 64 from the diagonal (and a last one of 8 rows).
@pytest.mark.parametrize("channels,depth", [(7, 5), (40, 300), (300, 37), (520, 64), (200, 300)])
def test_upper_triangle_of_a_symmetric_product(channels, depth):
    x = torch.randn(channels, depth)
    expected = (x.double() @ x.double().t()).triu()
    out = _C().gemm(x, x, False, True, None, True)
    assert _relative_error(out, expected) < TOLERANCE[torch.float32]
    # The same product from x stored transposed: op(A) = A^T.
    out = _C().gemm(x.t().contiguous(), x.t().contiguous(), True, False, None, True)
    assert _relative_error(out, expected) < TOLERANCE[torch.float32]


def test_zero_depth_gives_zero_or_the_addend():
    a, b, addend = torch.randn(5, 0), torch.randn(0, 7), torch.randn(5, 7)
    assert torch.equal(_C().gemm(a, b, False, False), torch.zeros(5, 7))
    assert torch.equal(_C().gemm(a, b, False, False, addend), addend)


def test_mismatched_inner_sizes_are_refused():
    with pytest.raises(RuntimeError, match="inner sizes differ"):
        _C().gemm(torch.randn(3, 4), torch.randn(5, 6), False, False)


def test_blas_path_when_the_own_kernel_is_switched_off():
    """CSKD_OWN_GEMM=0 runs every product on torch's BLAS, the path of Intel and non-AVX-512 CPUs."""
    script = textwrap.dedent("""
        import itertools, torch
        from cskd_kernels import _C
        assert not _C.gemm_runs_own_kernel()
        torch.manual_seed(0)
        for (m, n, k), (ta, tb) in itertools.product([(9, 33, 17), (130, 70, 300)], itertools.product([0, 1], [0, 1])):
            a = torch.randn((k, m) if ta else (m, k)); b = torch.randn((n, k) if tb else (k, n))
            addend = torch.randn(m, n)
            expected = (a.double().t() if ta else a.double()) @ (b.double().t() if tb else b.double()) + addend.double()
            out = _C.gemm(a, b, bool(ta), bool(tb), addend)
            assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 2e-5, (m, n, k, ta, tb)
        x = torch.randn(40, 300)
        assert torch.allclose(_C.gemm(x, x, False, True, None, True), (x @ x.t()).triu(), rtol=1e-4, atol=1e-3)
        print("ok")
    """)
    env = dict(os.environ, CSKD_OWN_GEMM="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
