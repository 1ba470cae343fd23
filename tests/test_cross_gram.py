"""centered_cross_grams and combine_grams against per-cell Grams built directly from the reference."""

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
        dtypes = (torch.float64, torch.float32) if backend == "cpu" else (torch.float32,)
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
        rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1e-3)
        torch.testing.assert_close(grams.cpu(), expected, rtol=rtol, atol=atol * expected.abs().max().item())
        weights = torch.randn(expected.shape, dtype=torch.float64)  # not symmetric: both halves of the backward
        (grams * weights.to(device)).sum().backward()
        (expected * weights).sum().backward()
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
