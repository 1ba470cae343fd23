"""centered_cross_grams and combine_grams against per-cell Grams built directly from the reference."""

import zlib

import pytest
import torch

from cskd_kernels import reference
from cskd_kernels.ops.cross_gram import centered_cross_grams, combine_grams
from conftest import fused_backends


def _backends():
    """(backend, device, dtypes): float64 where the backend runs it, float32 everywhere."""
    params = [pytest.param("reference", "cpu", (torch.float64, torch.float32), id="reference")]
    for p in fused_backends():
        backend, device = p.values
        # bfloat16 on a GPU only: the interpreter's 16-bit arithmetic is not the GPU's.
        dtypes = {"cpu": (torch.float64, torch.float32)}.get(
            backend, (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,))
        params.append(pytest.param(backend, device, dtypes, id=p.id))
    return params


# (B, C, H, W, grid): uneven cells (13x26 and 6x6 under a 5x5 grid; 6 rows give 3 chunks), one global map.
SHAPES = [(4, 3, 13, 26, (5, 5)), (5, 2, 6, 6, (5, 5)), (3, 5, 13, 11, (2, 3)), (6, 4, 7, 9, None)]


def _maps(k, b, c, h, w, dtype, device):
    # Different offsets per map: centering must remove them, per map.
    return [(torch.randn(b, c, h, w, dtype=torch.float64) + 3.0 * i - 1.0).to(dtype).to(device) for i in range(k)]


def _direct(parts, grid):
    """(cells, k*B, k*B) from the reference's cells: centered features of each map, stacked, multiplied."""
    cells = [reference.grid_cells(p, grid) if grid else [[p]] for p in parts]
    out = []
    for r in range(len(cells[0])):
        for c in range(len(cells[0][r])):
            centered = [reference.centered_features(m[r][c].flatten(1).double()) for m in cells]
            stacked = torch.cat(centered, dim=0)
            out.append(stacked @ stacked.T)
    return torch.stack(out)


@pytest.mark.parametrize("backend,device,dtypes", _backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-{s[4]}")
@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_direct_cell_grams_values_and_gradients(backend, device, dtypes, shape, k):
    b, c, h, w, grid = shape
    for dtype in dtypes:
        parts = [p.requires_grad_(True) for p in _maps(k, b, c, h, w, dtype, device)]
        grams = centered_cross_grams(*parts, grid=grid, backend=backend)
        parts64 = [p.detach().cpu().double().requires_grad_(True) for p in parts]
        expected = _direct(parts64, grid)
        assert grams.dtype == torch.float64 and grams.shape == expected.shape
        # Against the float64 Grams of the same (rounded) inputs: only the accumulation differs.
        rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-3)
        torch.testing.assert_close(grams.cpu(), expected, rtol=rtol, atol=atol * expected.abs().max().item())
        weights = torch.randn(expected.shape, dtype=torch.float64)  # not symmetric: both halves of the backward
        (grams * weights.to(device)).sum().backward()
        (expected * weights).sum().backward()
        if dtype == torch.bfloat16:  # the gradients are rounded to bfloat16 (8 bits)
            rtol, atol = 2e-2, 1e-2
        for i, (p, p64) in enumerate(zip(parts, parts64)):
            scale = p64.grad.abs().max().item()
            torch.testing.assert_close(p.grad.cpu().double(), p64.grad, rtol=rtol, atol=atol * scale,
                                       msg=lambda m: f"grad of part {i} ({dtype}): {m}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not any(p.values[0] == "cpu" for p in fused_backends()), reason="the C++ extension is not built"))])
@pytest.mark.parametrize("grid", [(5, 5), None])
def test_gradcheck_float64(backend, grid):
    a = torch.randn(3, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, x: centered_cross_grams(a, x, grid=grid, backend=backend), (a, x))


def test_only_parts_that_require_grad_get_one():
    a = torch.randn(4, 3, 13, 26, requires_grad=True)
    x = torch.randn(4, 3, 13, 26)
    centered_cross_grams(a, x, grid=(5, 5), backend="reference").sum().backward()
    assert a.grad is not None and x.grad is None


@pytest.mark.parametrize("grid", [(5, 5), None])
def test_combine_grams_is_the_gram_of_the_combined_map(grid):
    """K(g) of g*a + (1-g)*x from the blocks equals the Gram of that map; so does its gradient in g."""
    a, x = _maps(2, 5, 3, 13, 26, torch.float64, "cpu")
    gamma = torch.tensor([0.37], dtype=torch.float64, requires_grad=True)
    combined = combine_grams(centered_cross_grams(a, x, grid=grid), (gamma, 1.0 - gamma))
    gamma_ref = gamma.detach().clone().requires_grad_(True)
    expected = _direct([gamma_ref * a + (1.0 - gamma_ref) * x], grid)
    torch.testing.assert_close(combined, expected, rtol=1e-12, atol=1e-9)
    weights = torch.randn(expected.shape, dtype=torch.float64)
    (combined * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(gamma.grad, gamma_ref.grad, rtol=1e-10, atol=1e-9)
    assert gamma.grad.abs().item() > 0


@pytest.mark.parametrize("shapes", [((4, 3, 8, 8), (4, 2, 8, 8)), ((4, 3, 8, 8), (4, 3, 8))])
def test_maps_of_different_shapes_are_an_error(shapes):
    with pytest.raises(ValueError, match="one shape"):
        centered_cross_grams(torch.randn(shapes[0]), torch.randn(shapes[1]))


requires_cpu_kernels = pytest.mark.skipif(not any(p.values[0] == "cpu" for p in fused_backends()),
                                          reason="the C++ extension is not built")


def _grams_and_grads(parts, grid, backend, weights):
    parts = [p.detach().clone().requires_grad_(True) for p in parts]
    grams = centered_cross_grams(*parts, grid=grid, backend=backend)
    (grams * weights).sum().backward()
    return grams.detach(), [p.grad for p in parts]


@requires_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw,grid", [((13, 26), (5, 5)), ((6, 6), (5, 5)), ((13, 11), (2, 3)), ((7, 9), None)],
                         ids=["13x26-5x5", "6x6-5x5", "13x11-2x3", "7x9-whole"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_in_place_cpu_kernels_match_the_stacked_reference(dtype, hw, grid, k, b):
    """The cpu backend reads the maps in place; the stacked reference path (float64) is the truth.

    A large common offset (+1000) checks that the shift by row 0 keeps float32 accurate.
    """
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, hw, k, b)).encode()))
    parts = [(torch.randn(b, 3, *hw, generator=gen, dtype=torch.float64) + 1000.0 + i).to(dtype)
             for i in range(k)]
    weights = torch.randn((1, k * b, k * b), generator=gen, dtype=torch.float64)
    grams, grads = _grams_and_grads(parts, grid, "cpu", weights)
    expected, expected_grads = _grams_and_grads([p.double() for p in parts], grid, "reference", weights)
    assert grams.dtype == torch.float64 and grams.shape == expected.shape
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-4)
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(grams, expected, rtol=rtol, atol=atol * scale)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == dtype and g.shape == e.shape and g.is_contiguous()
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol * max(e.abs().max().item(), 1.0))


@requires_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_cpu_kernels_do_not_depend_on_the_thread_count(dtype):
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(4, 40, 27, 53, generator=gen, dtype=torch.float64).to(dtype) + i for i in range(2)]
    weights = torch.randn((1, 8, 8), generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grams_and_grads(parts, (5, 5), "cpu", weights))
    finally:
        torch.set_num_threads(threads)
    for grams, grads in results[1:]:
        assert torch.equal(grams, results[0][0])
        for g, g0 in zip(grads, results[0][1]):
            assert torch.equal(g, g0)


@requires_cpu_kernels
def test_in_place_cpu_kernels_take_non_contiguous_and_mixed_dtype_parts():
    a = torch.randn(3, 4, 9, 10, dtype=torch.float64).permute(0, 1, 3, 2).requires_grad_(True)  # (3, 4, 10, 9)
    x = torch.randn(3, 4, 10, 9, dtype=torch.float32).requires_grad_(True)
    weights = torch.randn(1, 6, 6, dtype=torch.float64)
    grams, grads = _grams_and_grads([a, x], (2, 2), "cpu", weights)
    expected, expected_grads = _grams_and_grads([a.double(), x.double()], (2, 2), "reference", weights)
    torch.testing.assert_close(grams, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    assert grads[0].dtype == torch.float64 and grads[1].dtype == torch.float32
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-6, atol=1e-6 * e.abs().max().item())


@pytest.mark.parametrize("backend,device", [p.values for p in fused_backends() if p.values[0] == "triton"] or [
    pytest.param("triton", "cpu", marks=pytest.mark.skip(reason="needs Triton"))])
@pytest.mark.parametrize("k,b", [(5, 3), (2, 65)], ids=["five-maps", "130-rows"])
def test_triton_beyond_its_kernels_limits(backend, device, k, b):
    """More maps than the in-place kernels take (stacked path), more rows than any Triton Gram holds (reference)."""
    parts = [p.requires_grad_(True) for p in _maps(k, b, 2, 6, 7, torch.float32, device)]
    grams = centered_cross_grams(*parts, grid=(2, 2), backend=backend)
    parts64 = [p.detach().cpu().double().requires_grad_(True) for p in parts]
    expected = _direct(parts64, (2, 2))
    torch.testing.assert_close(grams.cpu(), expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())
    weights = torch.randn(expected.shape, dtype=torch.float64)
    (grams * weights.to(device)).sum().backward()
    (expected * weights).sum().backward()
    for p, p64 in zip(parts, parts64):
        torch.testing.assert_close(p.grad.cpu().double(), p64.grad, rtol=1e-4, atol=1e-3 * p64.grad.abs().max().item())
