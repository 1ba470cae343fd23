"""CSKDLoss's released variants: similarity "mse" with its adapter, CAM-only, PAM-only and global PAM.

Every mode of the released CriterionSA (restated in cskd_kernels.released.criterion_sa)
against CSKDLoss on every backend that runs here, with the released code's own
random layers: the test records the Conv2d layers the released restatement
builds and hands their weights to CSKDLoss (the adapter "resample" draw itself
is checked to be the released layer's, seed for seed).
"""

import math

import pytest
import torch

from cskd_kernels import CSKDLoss, released
from cskd_kernels.grid import CellLayout
from cskd_kernels.modules import attention_mse, cskd_loss as cskd_module
from cskd_kernels.modules.cskd_loss import draw_adapter, mse_position_weights
from conftest import HAS_EXTENSION, TOLERANCES, fused_backends

B, CS, CT, H, W = 3, 8, 16, 9, 11  # grid 5x5 on 9x11: torch.chunk gives 5 x 4 cells of 2-3 x 3, 1 x 2 at the ends

# mode -> (similarity, lambda_cam, lambda_pam, grid, the parts the released mode returns)
MODES = {
    "CAM_MSE": ("mse", 1.0, 0.0, (5, 5), ("cam",)),
    "CAM_CKA": ("cka", 1.0, 0.0, (5, 5), ("cam",)),
    "PAM_CKA": ("cka", 0.0, 1.0, None, ("pam",)),
    "gridPAM_MSE": ("mse", 0.0, 1.0, (5, 5), ("pam",)),
    "gridPAM_CKA": ("cka", 0.0, 1.0, (5, 5), ("pam",)),
    "separately_CAMgridPAM_MSE": ("mse", 0.3, 0.8, (5, 5), ("cam", "pam")),
    "separately_CAMgridPAM_CKA": ("cka", 0.3, 0.8, (5, 5), ("cam", "pam")),
}


def _backends():
    """(backend, dtype): float64 on the reference and C++ backends, float32 on Triton (its widest)."""
    pairs = [pytest.param("reference", torch.float64, id="reference")]
    for p in fused_backends():
        name = p.values[0]
        pairs.append(pytest.param(name, torch.float64 if name == "cpu" else torch.float32, id=p.id))
    return pairs


def _mode_cases():
    cases = []
    for mode, (similarity, *_rest) in MODES.items():
        for adapter in (("resample", "fixed", "learned") if similarity == "mse" else (None,)):
            cases.append(pytest.param(mode, adapter, id=f"{mode}-{adapter}" if adapter else mode))
    return cases


class _Recorder:
    """Replaces torch.nn.Conv2d while installed: the layers the released restatement builds, in order."""

    def __init__(self, monkeypatch):
        original = torch.nn.Conv2d
        self.layers = []
        layers = self.layers

        class Recording(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                layers.append(self)

        monkeypatch.setattr(torch.nn, "Conv2d", Recording)
        self.undo = lambda: monkeypatch.setattr(torch.nn, "Conv2d", original)


def _projection_weights(layers, cells):
    """(wq, bq, wk, bk, wv, bv) stacked over cells from the (query, key, value) Conv2d triples of cells."""
    assert len(layers) == 3 * cells
    out = []
    for j in range(3):
        convs = layers[j::3]
        out.append(torch.stack([c.weight.detach()[:, :, 0, 0] for c in convs]))
        out.append(torch.stack([c.bias.detach() for c in convs]))
    return tuple(out)


def _assert_close(actual, expected, dtype, name, scale=None, cka=False):
    rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else TOLERANCES[dtype]
    if cka and dtype == torch.float64:
        # The released CKA loss is -log(|CKA| + 1e-8), ours -log(|CKA|) (SPEC 1): 1e-8 apart, 1e-8 relative in gradients.
        rtol, atol = 5e-8, 5e-8
    if scale is not None:
        atol = max(atol, atol * scale)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,dtype", _backends())
@pytest.mark.parametrize("mode,adapter", _mode_cases())
def test_released_mode(backend, dtype, mode, adapter, monkeypatch):
    similarity, lambda_cam, lambda_pam, grid, parts = MODES[mode]
    feat_s64 = torch.randn(B, CS, H, W, dtype=torch.float64)
    feat_t64 = torch.randn(B, CT, H, W, dtype=torch.float64)
    gamma_cam = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    gamma_pam = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)

    # The released formulation, float64, its random layers recorded.
    recorder = _Recorder(monkeypatch)
    torch.manual_seed(1234)
    feat_s_rel = feat_s64.clone().requires_grad_(True)
    expected = released.criterion_sa(feat_s_rel, feat_t64, gamma_cam, gamma_pam, mode, temperature=2.0)
    recorder.undo()
    expected = expected if isinstance(expected, tuple) else (expected,)
    expected_loss = sum(lam * e for lam, e in zip([w for w, p in ((lambda_cam, "cam"), (lambda_pam, "pam"))
                                                   if p in parts], expected))
    expected_loss.backward()
    layers = recorder.layers
    adapter_conv, pam_layers = layers[0], layers[1:]
    assert adapter_conv.weight.shape == (CT, CS, 1, 1) and adapter_conv.bias is None

    # CSKDLoss with the same layers.
    loss = CSKDLoss(CS, CT, temperature=2.0, lambda_cam=lambda_cam, lambda_pam=lambda_pam, grid=grid,
                    similarity=similarity, adapter=adapter, backend=backend).to(dtype)
    with torch.no_grad():
        loss.gamma_cam.fill_(0.5)
        loss.gamma_pam.fill_(0.7)
    cells = CellLayout(H, W, grid or (1, 1)).num_cells
    if "pam" in parts:
        assert len(pam_layers) == 2 * 3 * cells  # a fresh PAM_Module per cell and side
        drawn_s = _projection_weights(pam_layers[: 3 * cells], cells)
        drawn_t = _projection_weights(pam_layers[3 * cells:], cells)
        monkeypatch.setattr(loss.student_projection, "weights", lambda n, g, like: tuple(t.to(like.dtype) for t in drawn_s))
        monkeypatch.setattr(loss.teacher_projection, "weights", lambda n, g, like: tuple(t.to(like.dtype) for t in drawn_t))
    else:
        assert not pam_layers
    if adapter in ("fixed", "learned"):
        with torch.no_grad():
            loss.adapter.weight.copy_(adapter_conv.weight[:, :, 0, 0])
    feat_s = feat_s64.to(dtype).requires_grad_(True)
    torch.manual_seed(1234)  # adapter "resample": the released layer's own draw (checked below)
    out = loss(feat_s, feat_t64.to(dtype))
    if adapter == "resample":
        torch.manual_seed(1234)
        assert torch.equal(draw_adapter(CS, CT), adapter_conv.weight.detach()[:, :, 0, 0].float())

    cka = similarity == "cka"
    for name, wanted in zip(parts, expected):
        _assert_close(getattr(out, name), wanted.detach(), dtype, name, cka=cka)
    for name in ("cam", "pam"):
        if name not in parts:
            assert getattr(out, name).item() == 0.0  # not computed
    _assert_close(out.loss, expected_loss.detach(), dtype, "loss", cka=cka)

    out.loss.backward()
    scale = feat_s_rel.grad.abs().max().item()
    _assert_close(feat_s.grad, feat_s_rel.grad, dtype, "feat_s.grad", scale, cka=cka)
    for name, ours, theirs in (("gamma_cam", loss.gamma_cam, gamma_cam), ("gamma_pam", loss.gamma_pam, gamma_pam)):
        if theirs.grad is None:  # the released mode does not compute that branch
            assert ours.grad.item() == 0.0, name
        else:
            assert theirs.grad.abs().item() > 0
            _assert_close(ours.grad, theirs.grad, dtype, f"{name}.grad", cka=cka)
    if adapter == "learned":
        wanted = adapter_conv.weight.grad[:, :, 0, 0]
        _assert_close(loss.adapter.weight.grad, wanted, dtype, "adapter.weight.grad", wanted.abs().max().item())


@pytest.mark.parametrize("backend,dtype", [p for p in _backends() if p.id != "reference"])
@pytest.mark.parametrize("grid", [(5, 5), None], ids=["grid5x5", "global"])
@pytest.mark.parametrize("cs,ct", [(CS, CT), (CT, CS)], ids=["widening", "narrowing"])
def test_learned_projections_match_the_reference_backend(backend, dtype, grid, cs, ct):
    """Learned projections and adapter: the fused backends against the reference ops, loss and every gradient.

    A widening adapter takes the fused path's folded branches (the student's attention at its own width),
    a narrowing one the adapted map's.
    """
    feat_s = torch.randn(B, cs, H, W, dtype=dtype, requires_grad=True)
    feat_t = torch.randn(B, ct, H, W, dtype=dtype)
    fused = CSKDLoss(cs, ct, grid=grid, similarity="mse", adapter="learned", projection="learned",
                     backend=backend).to(dtype)
    with torch.no_grad():
        fused.gamma_cam.fill_(0.4)
        fused.gamma_pam.fill_(0.6)
    reference = CSKDLoss(cs, ct, grid=grid, similarity="mse", adapter="learned", projection="learned",
                         backend="reference").double()
    reference.load_state_dict(fused.state_dict())
    feat_s64 = feat_s.detach().double().requires_grad_(True)
    out, expected = fused(feat_s, feat_t), reference(feat_s64, feat_t.double())
    for name in out._fields:
        _assert_close(getattr(out, name), getattr(expected, name), dtype, name)
    out.loss.backward()
    expected.loss.backward()
    _assert_close(feat_s.grad, feat_s64.grad, dtype, "feat_s.grad", feat_s64.grad.abs().max().item())
    for (name, p), (_, q) in zip(fused.named_parameters(), reference.named_parameters()):
        assert q.grad is not None and q.grad.abs().max().item() > 0, name  # teacher projections too (via gamma)
        _assert_close(p.grad, q.grad, dtype, f"{name}.grad", q.grad.abs().max().item())


@pytest.mark.parametrize("backend", [p.values[0] for p in fused_backends()])
@pytest.mark.parametrize("cs,ct,student_width", [(CS, CT, CS), (CT, CS, CS), (CS, CS, CS)],
                         ids=["widening", "narrowing", "square"])
def test_student_attention_runs_at_the_narrower_width(backend, cs, ct, student_width, monkeypatch):
    """The fused PAM MSE applies the student's attention to the map before a widening adapter (its values
    at C_s channels, the teacher's at C_t): the value products cost C_s / C_t of the adapted map's."""
    widths = []

    def recording(module, name, value_width):
        original = getattr(module, name)

        def wrapper(*args):
            widths.append(value_width(*args))
            return original(*args)
        monkeypatch.setattr(module, name, wrapper)
    # The teacher's: (x, (wq, bq, wk, bk, wv, bv), ...); the folded student branch's own Function: (q, k, v, ...).
    recording(cskd_module, "run_projected_position_attention", lambda x, weights, *rest: weights[4].shape[1])
    recording(attention_mse, "run_position_attention_saving", lambda q, k, v, *rest: v.shape[1])
    # On "cpu", one kernel: its attention's values are its input x.
    recording(attention_mse, "position_attention_adapted_forward", lambda x, *rest: x.shape[1])
    loss = CSKDLoss(cs, ct, lambda_cam=0.0, similarity="mse", backend=backend)
    loss(torch.randn(B, cs, H, W, requires_grad=True), torch.randn(B, ct, H, W)).loss.backward()
    assert widths == [ct, student_width]  # the teacher's, then the student's


def test_adapter_draw_is_the_released_conv2d_default_init():
    for cs, ct in ((8, 16), (128, 256), (3, 5)):
        torch.manual_seed(7)
        layer = torch.nn.Conv2d(cs, ct, kernel_size=1, bias=False)
        torch.manual_seed(7)
        weight = draw_adapter(cs, ct)
        assert weight.dtype == torch.float32 and weight.shape == (ct, cs)
        assert torch.equal(weight, layer.weight.detach()[:, :, 0, 0])
        # kaiming_uniform_(a=sqrt(5)): bound sqrt(3) * sqrt(2 / 6) / sqrt(fan_in) = 1/sqrt(fan_in) (to rounding).
        gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        assert math.isclose(math.sqrt(3.0) * gain / math.sqrt(cs), 1 / math.sqrt(cs), rel_tol=1e-15)
        assert weight.abs().max().item() <= 1 / math.sqrt(cs)
    big = draw_adapter(256, 512, generator=torch.Generator().manual_seed(0))
    assert big.abs().max().item() > 0.99 / math.sqrt(256)


def test_adapter_modes_resample_fixed_learned():
    feat_s, feat_t = torch.randn(B, CS, H, W), torch.randn(B, CT, H, W)
    resample = CSKDLoss(CS, CT, similarity="mse")
    assert resample.adapter_mode == "resample" and not list(resample.adapter.parameters())
    assert resample(feat_s, feat_t).cam.item() != resample(feat_s, feat_t).cam.item()  # a fresh layer each call
    seeded = [CSKDLoss(CS, CT, similarity="mse", generator=torch.Generator().manual_seed(3))(feat_s, feat_t).loss
              for _ in range(2)]
    assert seeded[0].item() == seeded[1].item()
    fixed = CSKDLoss(CS, CT, similarity="mse", adapter="fixed", projection="fixed")
    assert "adapter.weight" in dict(fixed.named_buffers()) and fixed(feat_s, feat_t).loss.item() == fixed(
        feat_s, feat_t).loss.item()
    learned = CSKDLoss(CS, CT, similarity="mse", adapter="learned")
    assert dict(learned.named_parameters())["adapter.weight"].shape == (CT, CS)
    assert learned.student_projection.channels == CT  # the student's PAM runs at the teacher's width


def test_mse_needs_no_minimum_batch():
    out = CSKDLoss(CS, CT, similarity="mse")(torch.randn(1, CS, H, W), torch.randn(1, CT, H, W))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="at least 3 samples"):
        CSKDLoss(CS, CT)(torch.randn(2, CS, H, W), torch.randn(2, CT, H, W))


@pytest.mark.parametrize("h,w,grid", [(9, 11, (5, 5)), (13, 26, (5, 5)), (6, 6, (5, 5)), (7, 9, None)])
def test_position_weights_are_the_mean_within_cells_then_over_cells(h, w, grid):
    weights = mse_position_weights(h, w, grid, 2, 3, dtype=torch.float64)
    if grid is None:
        assert weights == 1 / (2 * 3 * h * w)
        return
    cells = [(r, c) for r in torch.chunk(torch.arange(h), grid[0]) for c in torch.chunk(torch.arange(w), grid[1])]
    for rows, cols in cells:
        block = weights[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
        assert torch.allclose(block, torch.full_like(block, 1 / (2 * 3 * len(rows) * len(cols) * len(cells))),
                              rtol=1e-15, atol=0)
    # An elementwise pass with these weights is the released sum(mse(cell_s, cell_t)) / n.
    a, b = torch.randn(2, 3, h, w, dtype=torch.float64), torch.randn(2, 3, h, w, dtype=torch.float64)
    per_cell = [torch.nn.functional.mse_loss(a[:, :, r[0]:r[-1] + 1, c[0]:c[-1] + 1], b[:, :, r[0]:r[-1] + 1, c[0]:c[-1] + 1])
                for r, c in cells]
    torch.testing.assert_close((weights * (a - b) ** 2).sum(), sum(per_cell) / len(per_cell), rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"adapter": "fixed"}, r"adapter='fixed' applies only to similarity='mse'"),
        ({"similarity": "cka", "adapter": "resample"}, r"adapter='resample' applies only to similarity='mse'"),
        ({"similarity": "l2"}, r"similarity='l2' is not one of \('cka', 'mse'\)"),
        ({"similarity": "mse", "adapter": "conv"}, r"adapter='conv' is not one of \('resample', 'fixed', 'learned'\)"),
        ({"similarity": "mse", "global_batch": True}, r"global_batch=True applies only to similarity='cka'"),
    ],
)
def test_refusals(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CSKDLoss(CS, CT, **kwargs)


@pytest.mark.parametrize("similarity,adapter", [("cka", None), ("mse", "learned")])
@pytest.mark.parametrize("projection", ["resample", "learned"])
@pytest.mark.parametrize("lambda_cam,lambda_pam", [(0.0, 0.8), (0.3, 0.0), (0.0, 0.0)])
def test_a_zero_weight_branch_is_not_computed(similarity, adapter, projection, lambda_cam, lambda_pam, monkeypatch):
    calls = {}

    def counting(name):
        original = getattr(cskd_module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)
        monkeypatch.setattr(cskd_module, name, wrapper)

    channel_ops = ("run_channel_attention", "channel_gram")
    position_ops = ("run_projected_position_attention", "run_projected_position_grams", "draw_projections")
    for name in channel_ops + position_ops + ("draw_adapter",):
        counting(name)
    loss = CSKDLoss(CS, CT, lambda_cam=lambda_cam, lambda_pam=lambda_pam, similarity=similarity, adapter=adapter,
                    projection=projection, backend="reference")
    calls.clear()  # construction draws the learned weights
    out = loss(torch.randn(B, CS, H, W, requires_grad=True), torch.randn(B, CT, H, W))
    out.loss.backward()
    if lambda_cam == 0:
        assert not any(calls.get(name) for name in channel_ops), calls
        assert out.cam.item() == 0.0 and loss.gamma_cam.grad.item() == 0.0  # a zero gradient, for DDP
    else:
        assert any(calls.get(name) for name in channel_ops), calls
    if lambda_pam == 0:
        assert not any(calls.get(name) for name in position_ops), calls
        assert out.pam.item() == 0.0 and loss.gamma_pam.grad.item() == 0.0
        if projection == "learned":
            assert all(p.grad is not None and p.grad.abs().max().item() == 0.0
                       for p in loss.student_projection.parameters())
    else:
        # Both sides: the CKA through their Grams, the MSE through their attention outputs.
        pam_op = "run_projected_position_grams" if similarity == "cka" else "run_projected_position_attention"
        assert calls.get(pam_op) == 2, calls
    assert calls.get("draw_adapter", 0) == 0  # learned: drawn at construction only
    if lambda_cam == lambda_pam == 0:
        assert out.loss.item() == 0.0 and not calls
        if adapter == "learned":
            assert loss.adapter.weight.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("o_s_given", [True, False], ids=["pam", "cam"])
@pytest.mark.parametrize("grid", [(5, 5), None], ids=["grid5x5", "global"])
def test_chunked_elementwise_pass(o_s_given, grid, monkeypatch):
    """_AttentionMSE in one C++ pass (maps of one dtype, the extension built), in chunks of rows (the
    PyTorch pass: a shorter last chunk) and with 16-bit inputs (chunks, converted to float32)."""
    maps = [torch.randn(B, CT, H, W, dtype=torch.float64) for _ in range(4)]
    weight = mse_position_weights(H, W, grid, B, CT, dtype=torch.float64)
    fused_calls = []
    fused_pass = attention_mse._fused_squared_error_pass
    monkeypatch.setattr(attention_mse, "_fused_squared_error_pass", lambda *a: fused_calls.append(1) or fused_pass(*a))

    def run(dtype, chunk=None):
        if chunk is not None:  # the PyTorch pass, in chunks
            monkeypatch.setitem(cskd_module.MSE_CHUNK_ELEMENTS, "cpu", chunk)
            monkeypatch.setattr(attention_mse, "_runs_fused_pass", lambda maps, r: False)
        gamma = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
        x_s, o_s, x_t, o_t = (m.to(dtype, copy=True).requires_grad_(i in (0, 1, 3)) for i, m in enumerate(maps))
        loss = cskd_module._AttentionMSE.apply(gamma, x_s, o_s if o_s_given else None, x_t, o_t, weight)
        loss.backward()
        return [loss, gamma.grad, x_s.grad, o_t.grad] + ([o_s.grad] if o_s_given else [])

    g = 0.6
    a_s = g * maps[1] + maps[0] if o_s_given else maps[0]
    expected_loss = (weight * (a_s - g * maps[3] - maps[2]) ** 2).sum()
    whole = run(torch.float64)
    torch.testing.assert_close(whole[0], expected_loss, rtol=1e-13, atol=0)
    single = run(torch.float32)  # float32 in one pass too, its sums in float64
    assert len(fused_calls) == (2 if HAS_EXTENSION else 0)
    for a, b in zip(single, whole):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    chunked = run(torch.float64, chunk=2 * H * W + 5)  # 2 rows a chunk: 24 chunks of the 48 rows
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-16)
    for dtype in (torch.float32, torch.bfloat16):
        low = run(dtype, chunk=7 * H * W)  # 7 rows a chunk: the last one shorter
        assert low[0].dtype == torch.float32 and low[2].dtype == dtype
        rtol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(low[0].double(), whole[0], rtol=rtol, atol=0)
        torch.testing.assert_close(low[1].double(), whole[1], rtol=rtol, atol=0)


@pytest.mark.compile
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=pytest.mark.skipif(
    not any(p.values[0] == "cpu" for p in fused_backends()), reason="the C++ extension is not built")), "reference"])
def test_compiles_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) of the MSE variant (learned adapter and projections), as of the CKA one."""
    torch._dynamo.reset()
    loss = CSKDLoss(CS, CT, grid=(2, 3), similarity="mse", adapter="learned", projection="learned", backend=backend)
    with torch.no_grad():
        loss.gamma_cam.fill_(0.5)
        loss.gamma_pam.fill_(0.7)
    feat_s, feat_t = torch.randn(B, CS, 6, 7), torch.randn(B, CT, 6, 7)

    def run(module):
        x = feat_s.clone().requires_grad_(True)
        out = module(x, feat_t)
        return [t.detach() for t in out], torch.autograd.grad(out.loss, [x, *loss.parameters()])

    expected = run(loss)
    actual = run(torch.compile(loss, fullgraph=True, backend="inductor" if backend == "cpu" else "aot_eager"))
    for got, want in zip(actual[0] + list(actual[1]), expected[0] + list(expected[1])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
