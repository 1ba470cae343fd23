"""position_attention (SPEC section 3) and the PositionAttention module against the reference.

Every fused backend, at odd sizes, global and grid mode, d != Cv: outputs and
the gradients of q, k and v against the float64 reference, with the same
random grad_output through both. The Triton kernels run under the interpreter
when there is no GPU, so their shapes stay small there.
"""

import pytest
import torch

from cskd_kernels import reference
from cskd_kernels.backend import BackendError, extension
from cskd_kernels.grid import chunk_sizes
from cskd_kernels.modules.position_attention import PositionAttention
from cskd_kernels.ops.position_attention import cell_table, position_attention
from tests.conftest import HAS_CUDA, TOLERANCES, fused_backends, requires_cuda, requires_extension

INTERPRETED = not HAS_CUDA

# (B, d, Cv, H, W, grid, temperature)
CPU_CASES = [
    (2, 16, 128, 13, 26, None, 1.0),
    (1, 8, 300, 7, 9, None, 0.5),
    (1, 16, 40, 45, 45, None, 2.0),
    (2, 32, 64, 6, 6, (5, 5), 1.0),
    (1, 16, 1024, 7, 9, (2, 3), 1.0),
    (1, 16, 24, 64, 128, (5, 5), 2.0),
    (1, 8, 16, 30, 20, (1, 3), 1.0),
    (1, 12, 20, 6, 7, (10, 2), 1.0),  # more rows asked than the map has
    (2, 8, 20, 45, 46, (2, 2), 1.0),  # cells of 529 and 506 positions: the tiled and the whole-cell CPU paths in one call
]
# Small enough for Triton's interpreter.
INTERPRETER_CASES = [
    (1, 4, 8, 7, 9, None, 1.0),
    (1, 16, 40, 6, 7, (2, 3), 0.5),
    (2, 5, 12, 6, 6, (5, 5), 2.0),
    (1, 12, 33, 5, 13, None, 1.0),
]
CUDA_CASES = CPU_CASES + [
    (2, 16, 128, 64, 128, None, 1.0),
    (1, 32, 2048, 13, 26, None, 1.0),
    (1, 64, 256, 45, 45, (5, 5), 1.0),
    (1, 100, 96, 7, 9, None, 1.0),
]


def cases_for(backend, device):
    if backend == "triton" and device == "cpu":
        return INTERPRETER_CASES
    if device == "cuda":
        return CUDA_CASES
    return CPU_CASES


def backend_case_params():
    params = []
    for pair in fused_backends():
        backend, device = pair.values
        for case in cases_for(backend, device):
            b, d, cv, h, w, grid, temperature = case
            params.append(pytest.param(backend, device, case, id=f"{pair.id}-B{b}-d{d}-cv{cv}-{h}x{w}-grid{grid}-T{temperature}"))
    return params


def make_inputs(b, d, cv, h, w, device, dtype, scale=1.0):
    q = (torch.randn(b, d, h, w, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    k = (torch.randn(b, d, h, w, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    v = torch.randn(b, cv, h, w, dtype=torch.float64).to(device=device, dtype=dtype)
    return q, k, v


def compare_with_reference(backend, device, case, dtype, score_scale=1.0, tolerances=None):
    b, d, cv, h, w, grid, temperature = case
    q, k, v = make_inputs(b, d, cv, h, w, device, dtype, score_scale)
    grad = torch.randn(b, cv, h, w, dtype=torch.float64)

    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = position_attention(*inputs, temperature=temperature, grid=grid, backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))

    exact = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    expected = reference.position_attention(*exact, temperature=temperature, grid=grid)
    expected.backward(grad)

    rtol, atol = tolerances or TOLERANCES[dtype]
    assert out.shape == expected.shape and out.dtype == dtype and out.device.type == torch.device(device).type
    torch.testing.assert_close(out.detach().cpu().double(), expected.detach(), rtol=rtol, atol=atol)
    for name, got, want in zip("qkv", inputs, exact):
        scale = want.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(
            got.grad.cpu().double(), want.grad, rtol=rtol, atol=atol * max(1.0, scale), msg=lambda m: f"d{name}: {m}"
        )


@pytest.mark.parametrize("backend, device, case", backend_case_params())
def test_matches_reference_float32(backend, device, case):
    compare_with_reference(backend, device, case, torch.float32)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_peaked_softmax_is_stable(backend, device):
    """Large scores (a nearly one-hot softmax) need the running max: no overflow, no NaN.

    Scores near 500 carry float32 rounding of ~3e-5 in every logit, so the rule
    here is flash-attention's: the error against float64 is at most twice the
    error of the same computation done by PyTorch in float32.
    """
    b, d, cv, h, w, grid, temperature = 1, 8, 12, 6, 7, (2, 2), 0.05
    q, k, v = make_inputs(b, d, cv, h, w, "cpu", torch.float64, scale=3.0)
    grad = torch.randn(b, cv, h, w, dtype=torch.float64)

    def run(dtype, fn, dev):
        inputs = [t.detach().to(device=dev, dtype=dtype).clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs, temperature=temperature, grid=grid)
        out.backward(grad.to(device=dev, dtype=dtype))
        return [t.detach().cpu().double() for t in (out, *(i.grad for i in inputs))]

    exact = run(torch.float64, reference.position_attention, "cpu")
    torch32 = run(torch.float32, reference.position_attention, "cpu")
    fused = run(torch.float32, lambda *a, **kw: position_attention(*a, backend=backend, **kw), device)
    # dS = P (dP - Delta) / T with Delta = rowsum(dO * O) from the float32 O: where P is one-hot
    # dP - Delta is a float32 rounding difference amplified by 1/T (flash-attention has the same).
    delta_rounding = 1e-6 / temperature * max(q.abs().max(), k.abs().max()) * grad.abs().max() * v.abs().max()
    for name, e, t, f in zip(("out", "dq", "dk", "dv"), exact, torch32, fused):
        assert torch.isfinite(f).all(), name
        assert (f - e).abs().max() <= 2 * (t - e).abs().max() + delta_rounding, name


@requires_extension
@pytest.mark.parametrize("grid", [None, (2, 3), (5, 5)])
def test_gradcheck_float64_cpu(grid):
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 3, 5, 6, 7, "cpu", torch.float64))

    def fn(q, k, v):
        return position_attention(q, k, v, temperature=0.7, grid=grid, backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


@requires_extension
def test_float64_cpu_matches_reference_tightly():
    compare_with_reference("cpu", "cpu", (2, 7, 33, 13, 26, (5, 5), 1.3), torch.float64)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 16, 128, 13, 26, None, 1.0), (1, 32, 300, 45, 45, (5, 5), 2.0)])
def test_triton_half_precision(dtype, case):
    compare_with_reference("triton", "cuda", case, dtype)


@requires_cuda
@pytest.mark.parametrize("case", [(2, 16, 128, 13, 26, None, 1.0), (2, 32, 256, 64, 128, (5, 5), 2.0)])
def test_triton_tf32_when_float32_matmul_precision_allows_it(case):
    """Under torch.set_float32_matmul_precision("high") float32 runs one TF32 product: about fp16's error."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        compare_with_reference("triton", "cuda", case, torch.float32, tolerances=TOLERANCES[torch.float16])
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_non_contiguous_inputs(backend, device):
    b, d, cv, h, w = 1, 4, 10, 6, 7
    q = torch.randn(b, h, w, d, device=device).permute(0, 3, 1, 2)
    k = torch.randn(b, d, w, h, device=device).transpose(2, 3)
    v = torch.randn(b, cv, h, w, device=device)
    out = position_attention(q, k, v, grid=(2, 2), backend=backend)
    expected = reference.position_attention(q.double(), k.double(), v.double(), grid=(2, 2))
    torch.testing.assert_close(out.double(), expected, rtol=2e-4, atol=1e-5)


def test_reference_backend_is_the_reference():
    q, k, v = make_inputs(2, 4, 6, 5, 7, "cpu", torch.float32)
    out = position_attention(q, k, v, temperature=0.5, grid=(2, 2), backend="reference")
    torch.testing.assert_close(out, reference.position_attention(q, k, v, temperature=0.5, grid=(2, 2)))


# --------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size, parts", [(64, 5), (128, 5), (6, 5), (45, 5), (7, 3), (5, 10), (13, 1)])
def test_cell_table_follows_torch_chunk(size, parts):
    table = cell_table(size, 9, (parts, 1))
    chunks = torch.chunk(torch.arange(size), parts)
    assert table[:, 1].tolist() == [len(c) for c in chunks] == chunk_sizes(size, parts)
    assert table[:, 0].tolist() == [int(c[0]) for c in chunks]
    assert table[:, 2].tolist() == [0] * len(chunks) and table[:, 3].tolist() == [9] * len(chunks)


def test_grid_64x128_cells():
    table = cell_table(64, 128, (5, 5))
    assert table.shape == (25, 4)
    assert sorted(set(table[:, 1].tolist())) == [12, 13] and sorted(set(table[:, 3].tolist())) == [24, 26]
    assert int((table[:, 1] * table[:, 3]).sum()) == 64 * 128


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def _good():
    return torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(2, 10, 5, 6)


@pytest.mark.parametrize(
    "mutate, error, words",
    [
        (lambda q, k, v: (q, k[:, :3], v), ValueError, "width d"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "spatial size"),
        (lambda q, k, v: (q[..., 0], k, v), ValueError, "4-D"),
        (lambda q, k, v: (q, k, v[:1]), ValueError, "batch"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "floating-point"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "dtype"),
        (lambda q, k, v: (q, k, v.numpy()), TypeError, "torch.Tensor"),
        (lambda q, k, v: (q[:0], k[:0], v[:0]), ValueError, "empty"),
    ],
)
def test_bad_shapes(mutate, error, words):
    q, k, v = mutate(*_good())
    with pytest.raises(error, match=words) as info:
        position_attention(q, k, v)
    if error is ValueError and words != "empty":
        assert "(2, " in str(info.value) or "(1, " in str(info.value)  # the message names the shapes


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        position_attention(*_good(), temperature=temperature)


@pytest.mark.parametrize("grid", [(0, 2), (2,), (2, 2, 2), (1.5, 2), "55", (2, -1), 5, (True, 2)])
def test_bad_grid(grid):
    with pytest.raises(ValueError, match="grid"):
        position_attention(*_good(), grid=grid)


def test_unknown_backend():
    with pytest.raises(BackendError, match="backend"):
        position_attention(*_good(), backend="gpu")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError):
        position_attention(*_good(), backend="triton")


# --------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------


def _module_reference(module, x, weights):
    wq, bq, wk, bk, wv, bv = weights
    q = torch.nn.functional.conv2d(x, wq[:, :, None, None], bq)
    k = torch.nn.functional.conv2d(x, wk[:, :, None, None], bk)
    v = torch.nn.functional.conv2d(x, wv[:, :, None, None], bv)
    att = reference.position_attention(q, k, v, temperature=module.temperature, grid=module.grid)
    return module.gamma * att + x


@pytest.mark.parametrize("projection", ["fixed", "learned"])
@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_module_matches_composition(projection, grid):
    module = PositionAttention(16, temperature=2.0, grid=grid, projection=projection, reduction=4, backend="reference")
    with torch.no_grad():
        module.gamma.fill_(0.7)
    x = torch.randn(2, 16, 7, 9)
    weights = tuple(getattr(module.projection, name)[0] for name in module.projection.NAMES)
    torch.testing.assert_close(module(x), _module_reference(module, x, weights))


def test_module_starts_as_identity_and_gamma_learns():
    module = PositionAttention(16, projection="learned", reduction=8)
    x = torch.randn(1, 16, 6, 7, requires_grad=True)
    out = module(x)
    torch.testing.assert_close(out, x)
    out.square().sum().backward()
    assert module.gamma.grad is not None and module.gamma.grad.abs() > 0
    assert module.projection.wv.grad is not None


def test_module_resample_draws_per_call_and_per_cell():
    module = PositionAttention(8, grid=(2, 2), projection="resample", reduction=2)
    with torch.no_grad():
        module.gamma.fill_(1.0)
    assert not list(module.projection.parameters()) and not list(module.projection.buffers())
    x = torch.randn(1, 8, 6, 6)
    first, second = module(x), module(x)
    assert not torch.allclose(first, second)
    gen = torch.Generator().manual_seed(3)
    module.generator = gen
    a = module(x)
    gen.manual_seed(3)
    b = module(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [dict(channels=4, reduction=8), dict(channels=8, projection="random"),
                                 dict(channels=8, temperature=0.0), dict(channels=8, grid=(0, 1))])
def test_module_bad_arguments(bad):
    with pytest.raises(ValueError):
        PositionAttention(**bad)


def test_module_bad_input_channels():
    with pytest.raises(ValueError, match="channels"):
        PositionAttention(8)(torch.randn(1, 6, 4, 4))


# --------------------------------------------------------------------------
# The released formulation (the benchmark baseline) computes the same thing
# --------------------------------------------------------------------------


def _released_projections_then_reference(x, gamma, reduction, temperature, grid):
    """The reference composition with the Conv2d layers drawn in the released order (q, k, v per cell)."""
    def one(cell):
        c = cell.shape[1]
        convs = [torch.nn.Conv2d(c, c // reduction, 1), torch.nn.Conv2d(c, c // reduction, 1), torch.nn.Conv2d(c, c, 1)]
        q, k, v = (conv.to(torch.float64)(cell) for conv in convs)
        return gamma * reference.position_attention(q, k, v, temperature=temperature) + cell

    if grid is None:
        return one(x)
    return torch.cat([torch.cat([one(c) for c in torch.chunk(r, grid[1], dim=3)], dim=3)
                      for r in torch.chunk(x, grid[0], dim=2)], dim=2)


@pytest.mark.parametrize("grid", [None, (5, 5)])
def test_released_pam_matches_reference(grid):
    from cskd_kernels import released

    x = torch.randn(2, 16, 13, 11, dtype=torch.float64)
    gamma = torch.tensor([0.6], dtype=torch.float64)
    torch.manual_seed(5)
    if grid is None:
        got = released.position_attention_module(x, gamma, reduction=4, temperature=1.5)
    else:
        got = released.position_attention_grid(x, gamma, grid=grid, reduction=4, temperature=1.5)
    torch.manual_seed(5)
    expected = _released_projections_then_reference(x, gamma, 4, 1.5, grid)
    torch.testing.assert_close(got, expected)


@pytest.mark.skipif(not any(p.values[0] == "triton" for p in fused_backends()), reason="needs Triton")
def test_tuning_sweep_checks_every_configuration_against_the_default():
    """benchmarks/tune_position_attention.py (run on a lent GPU) ranks only configurations that agree."""
    from benchmarks.tune_position_attention import tune

    rows = tune(quick=True)
    cases = [row["case"] for row in rows]
    # Both quick configurations per case, and the default where it is neither (GPU launch sizes).
    assert sorted(set(cases)) == ["student", "teacher"] and cases.count("student") == cases.count("teacher") >= 2
    assert all(row["agrees"] and row["ms"] is not None for row in rows)
    assert sum(row["default"] for row in rows) == 2


@requires_extension
@pytest.mark.parametrize("table,pattern", [([[0, 4, 0, 8]], r"cell 0 \[0, 4, 0, 8\] is outside the 3 x 7 map"),
                                           ([[1, 2, 3]], r"cells must be a \(cells, 4\) int32")])
def test_cpu_kernels_refuse_a_cell_table_that_does_not_fit(table, pattern):
    """The C++ kernels read the cell table on the host (csrc/cell_table.h): a bad one is an error, not a bad read."""
    q = torch.randn(1, 2, 3, 7)
    with pytest.raises(RuntimeError, match=pattern):
        extension().position_attention_forward(q, q, q, torch.tensor(table, dtype=torch.int32), 1.0)
