"""The MSE passes of CSKDLoss(similarity="mse") (cskd_kernels/modules/attention_mse.py), op by op.

channel_mse_from_grams and _AdaptedPositionMSE against their formula composed
of plain PyTorch (the reference CAM and cell projection), every input's
gradient by gradcheck in float64 at odd sizes and uneven cells, float32 against
float64, and their map-sized buffers taken from the C++ output pool on the CPU.
"""

import pytest
import torch

from cskd_kernels import reference
from cskd_kernels.backend import empty_output
from cskd_kernels.grid import CellLayout
from cskd_kernels.modules import attention_mse
from cskd_kernels.modules import attention_mse
from cskd_kernels.modules.attention_mse import _AdaptedPositionMSE, _StudentGrams, cell_sums, channel_mse_from_grams
from cskd_kernels.modules.cskd_loss import mse_position_weights
from cskd_kernels.ops.cell_projection import run_cell_projection
from conftest import HAS_EXTENSION, fused_backends, requires_extension

B, CS, CT, H, W = 2, 3, 5, 5, 7


def _maps(dtype, *channels):
    return [torch.randn(B, c, H, W, dtype=dtype) for c in channels]


D, TEMPERATURE = 2, 2.0  # the queries' and keys' width


def _adapted_inputs(dtype, grid, shared):
    cells = 1 if shared else CellLayout(H, W, grid or (1, 1)).num_cells
    gamma = torch.tensor([0.7], dtype=dtype)
    x, x_t, o_t = _maps(dtype, CS, CT, CT)
    qk_weight = torch.randn(cells, 2 * D, CS, dtype=dtype) / CS**0.5
    qk_bias = torch.randn(cells, 2 * D, dtype=dtype)
    adapter = torch.randn(CT, CS, dtype=dtype) / CS**0.5
    value_weight = torch.randn(cells, CT, CS, dtype=dtype) / CS**0.5
    value_bias = torch.randn(cells, CT, dtype=dtype)
    weight = mse_position_weights(H, W, grid, B, CT, dtype=dtype)
    return [gamma, x, qk_weight, qk_bias, adapter, value_weight, value_bias, x_t, o_t], weight


NAMES = ("gamma", "x", "qk_weight", "qk_bias", "adapter", "value_weight", "value_bias", "x_t", "o_t")


def _adapted_expected(gamma, x, qk_weight, qk_bias, adapter, value_weight, value_bias, x_t, o_t, weight, grid):
    q, k = run_cell_projection(x, ((qk_weight[:, :D], qk_bias[:, :D]), (qk_weight[:, D:], qk_bias[:, D:])), grid,
                               "reference")
    z = reference.position_attention(q, k, x, temperature=TEMPERATURE, grid=grid)
    (o,) = run_cell_projection(z, ((value_weight, value_bias),), grid, "reference")
    p = torch.einsum("ts,bshw->bthw", adapter, x) + gamma * o
    return (weight * (p - x_t - gamma * o_t) ** 2).sum()


def _adapted(inputs, weight, grid, backend):
    return _AdaptedPositionMSE.apply(*inputs, weight, grid, TEMPERATURE, backend)


GRIDS = [pytest.param((2, 3), id="grid2x3"), pytest.param((5, 5), id="grid5x5"), pytest.param(None, id="global")]


@pytest.mark.parametrize("backend", [p.values[0] for p in fused_backends()])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("shared", [False, True], ids=["per-cell", "shared"])
def test_adapted_position_mse_value_and_every_gradient(backend, grid, shared):
    """Against the composed formula in float64 (value, gradients), and gradcheck of every input."""
    dtype = torch.float64 if backend == "cpu" else torch.float32
    inputs, weight = _adapted_inputs(torch.float64, grid, shared)
    leaves = [t.detach().to(dtype, copy=True).requires_grad_(True) for t in inputs]
    got = _adapted(leaves, weight.to(dtype) if grid else weight, grid, backend)
    expected_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    expected = _adapted_expected(*expected_leaves, weight, grid)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-4, 1e-5)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)
    got.backward()
    expected.backward()
    for name, ours, theirs in zip(NAMES, leaves, expected_leaves):
        assert theirs.grad.abs().max() > 0, name
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=rtol, atol=atol * 10, msg=name)
    if dtype == torch.float64:
        torch.autograd.gradcheck(lambda *t: _adapted(t, weight, grid, backend),
                                 [t.detach().clone().requires_grad_(True) for t in inputs])


@pytest.mark.parametrize("backend", [p.values[0] for p in fused_backends()])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("shared", [False, True], ids=["per-cell", "shared"])
def test_adapted_position_mse_gradients_of_x_and_gamma_alone(backend, grid, shared, monkeypatch):
    """Resampled weights (no weight gradient): on "cpu" with small cells x's and gamma's gradients come from
    one kernel (position_attention_adapted_backward); against the formula, and gradcheck in float64."""
    calls = []
    fused = attention_mse.position_attention_adapted_backward
    monkeypatch.setattr(attention_mse, "position_attention_adapted_backward", lambda *a: calls.append(1) or fused(*a))
    dtype = torch.float64 if backend == "cpu" else torch.float32
    inputs, weight = _adapted_inputs(torch.float64, grid, shared)
    leaves = [t.detach().to(dtype, copy=True).requires_grad_(i < 2) for i, t in enumerate(inputs)]
    got = _adapted(leaves, weight.to(dtype) if grid else weight, grid, backend)
    got.backward()
    assert len(calls) == (1 if backend == "cpu" and grid is not None else 0)
    expected_leaves = [t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    _adapted_expected(*expected_leaves, weight, grid).backward()
    rtol, atol = (1e-10, 1e-11) if dtype == torch.float64 else (2e-4, 1e-4)
    for name, ours, theirs in zip(NAMES[:2], leaves, expected_leaves):
        assert theirs.grad.abs().max() > 0, name
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=rtol, atol=atol, msg=name)
    if dtype == torch.float64:
        rest = inputs[2:]
        torch.autograd.gradcheck(lambda gamma, x: _adapted([gamma, x, *rest], weight, grid, backend),
                                 [t.detach().clone().requires_grad_(True) for t in inputs[:2]])


@pytest.mark.parametrize("backend", [p.values[0] for p in fused_backends()])
def test_adapted_position_mse_with_gamma_zero_and_a_float_weight(backend):
    """gamma = 0 (CSKDLoss's initial value) still gives gamma its gradient; a float weight (global mode)."""
    inputs, _ = _adapted_inputs(torch.float64, None, False)
    inputs[0] = torch.zeros(1, dtype=torch.float64)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    leaves = [t.detach().to(dtype, copy=True).requires_grad_(True) for t in inputs]
    weight = 1.0 / (B * CT * H * W)
    _adapted(leaves, weight, None, backend).backward()
    expected_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    _adapted_expected(*expected_leaves, weight, None).backward()
    for ours, theirs, name in zip(leaves, expected_leaves, NAMES):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=2e-4, atol=1e-6, msg=name)
    assert leaves[0].grad.abs().item() > 0
    assert leaves[2].grad.abs().max().item() == 0.0  # the queries and keys get dZ = g u = 0


def _channel_mse_expected(x, x_t, adapter, gamma):
    """mean((CAM(W x) - CAM(x_t))^2) with the reference CAM, maps formed."""
    cam_s = reference.channel_attention(torch.einsum("ts,bshw->bthw", adapter, x), gamma, temperature=TEMPERATURE)
    cam_t = reference.channel_attention(x_t, gamma, temperature=TEMPERATURE)
    return ((cam_s - cam_t) ** 2).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("student_channels", [CS, CT], ids=["widening", "same-width"])
def test_channel_mse_from_grams_value_and_every_gradient(dtype, student_channels):
    gamma = torch.tensor([0.4], dtype=torch.float64)
    x, x_t = _maps(torch.float64, student_channels, CT)
    adapter = torch.randn(CT, student_channels, dtype=torch.float64) / student_channels**0.5
    inputs = [x, x_t, adapter, gamma]
    leaves = [t.detach().to(dtype, copy=True).requires_grad_(name != "x_t")
              for t, name in zip(inputs, ("x", "x_t", "adapter", "gamma"))]
    got = channel_mse_from_grams(leaves[0], leaves[1], leaves[2], leaves[3], TEMPERATURE)
    expected_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    expected = _channel_mse_expected(*expected_leaves)
    rtol, atol = (1e-11, 1e-13) if dtype == torch.float64 else (1e-4, 1e-6)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)
    got.backward()
    expected.backward()
    for name, ours, theirs in zip(("x", "adapter", "gamma"), [leaves[0], *leaves[2:]],
                                  [expected_leaves[0], *expected_leaves[2:]]):
        assert theirs.grad.abs().max() > 0, name
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=rtol * 10, atol=atol * 10, msg=name)
    if dtype == torch.float64:
        torch.autograd.gradcheck(lambda x, w, g: channel_mse_from_grams(x, inputs[1], w, g, TEMPERATURE),
                                 [t.detach().clone().requires_grad_(True) for t in (x, adapter, gamma)])


def test_channel_mse_from_grams_of_equal_maps_is_zero_to_float32_rounding():
    """The three Gram terms cancel: equal student and teacher maps give 0 to within
    the float32 rounding of the Grams, not of the squared maps' sum."""
    x = torch.randn(4, 16, 32, 32) + 3.0  # an offset makes every term large
    gamma = torch.tensor([0.5])
    got = channel_mse_from_grams(x, x.clone(), torch.eye(16), gamma, TEMPERATURE)
    scale = _channel_mse_expected(x.double(), torch.zeros_like(x.double()), torch.eye(16).double(),
                                  gamma.double()).item()  # mean of the squared CAM itself
    assert abs(got.item()) < 1e-6 * scale
    nudged = x.clone()
    nudged[0, 0, 0, 0] += 1.0  # one element off by 1: the loss sees it
    expected = _channel_mse_expected(nudged.double(), x.double(), torch.eye(16).double(), gamma.double()).item()
    got = channel_mse_from_grams(nudged, x, torch.eye(16), gamma, TEMPERATURE).item()
    assert got == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("teacher_dtype", [torch.float64, torch.bfloat16])
def test_channel_mse_from_grams_of_a_teacher_in_another_dtype(teacher_dtype):
    """A teacher run in another precision is taken in the student's dtype (torch.bmm takes one)."""
    gamma = torch.tensor([0.4])
    x, x_t = torch.randn(B, CS, H, W), torch.randn(B, CT, H, W).to(teacher_dtype)
    adapter = torch.randn(CT, CS) / CS**0.5
    got = channel_mse_from_grams(x, x_t, adapter, gamma, TEMPERATURE)
    expected = channel_mse_from_grams(x, x_t.float(), adapter, gamma, TEMPERATURE)
    assert torch.equal(got, expected)


def test_student_grams_value_and_gradient():
    x = torch.randn(2, 3, 35, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 35, dtype=torch.float64)
    gram, cross = _StudentGrams.apply(x, t)
    torch.testing.assert_close(gram, x @ x.transpose(1, 2), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(cross, x @ t.transpose(1, 2), rtol=1e-14, atol=1e-14)
    torch.autograd.gradcheck(lambda x: _StudentGrams.apply(x, t), [x])


@pytest.mark.parametrize("grid", [(5, 5), (2, 3), None], ids=["grid5x5", "grid2x3", "global"])
def test_cell_sums_are_the_sums_of_torch_chunk_cells(grid):
    maps = torch.randn(3, 4, 9, 11, dtype=torch.float64)
    expected = [cell.sum((0, 2, 3)) for rows in maps.chunk((grid or (1, 1))[0], 2)
                for cell in rows.chunk((grid or (1, 1))[1], 3)]
    torch.testing.assert_close(cell_sums(maps, grid), torch.stack(expected), rtol=1e-13, atol=1e-13)


@requires_extension
def test_large_cpu_outputs_come_from_the_pool_on_huge_page_boundaries():
    like = torch.empty(())
    pooled = empty_output((8, 256, 1024), like)  # 8 MiB
    assert pooled.shape == (8, 256, 1024) and pooled.is_contiguous() and pooled.dtype == like.dtype
    assert pooled.data_ptr() % (2 << 20) == 0
    small = empty_output((3, 5), like.double())
    assert small.dtype == torch.float64 and small.shape == (3, 5)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")
def test_the_map_sized_buffers_are_pooled(monkeypatch):
    """r and the student's map gradient of both functions come from empty_output (the pool on the CPU)."""
    requested = []

    def recording(shape, like):
        requested.append(tuple(shape))
        return empty_output(shape, like)
    monkeypatch.setattr(attention_mse, "empty_output", recording)
    inputs, weight = _adapted_inputs(torch.float32, (2, 3), False)
    leaves = [t.requires_grad_(True) for t in inputs]
    _adapted(leaves, weight, (2, 3), "cpu").backward()
    assert requested and all(shape in ((B * CT, H * W), (B, CT, H, W)) for shape in requested)  # the pass's r
    requested.clear()
    x, x_t = torch.randn(B, CS, H * W, requires_grad=True), torch.randn(B, CT, H * W)
    gram, cross = _StudentGrams.apply(x, x_t)
    (gram.sum() + cross.sum()).backward()
    assert requested == [(B, CS, H * W)]  # dx, both products into it
