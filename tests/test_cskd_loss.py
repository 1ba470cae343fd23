"""CSKDLoss against the reference composition of SPEC section 5 (one cell at a time)."""

import math

import pytest
import torch

from cskd_kernels import CSKDLoss, reference
from cskd_kernels.grid import CellLayout, chunk_sizes
from cskd_kernels.modules.cskd_loss import draw_projections
from conftest import fused_backends, requires_cuda, requires_extension


def _backends():
    """Backends that run float64 (the exact comparison) here: the reference and the C++ extension."""
    names = [pytest.param("reference", id="reference")]
    names += [pytest.param(p.values[0], id=p.id) for p in fused_backends() if p.values[0] == "cpu"]
    return names


def _reference_projections(loss, projection, side, feat, cells, generator_seed):
    """The projection a cell gets, as a callable for reference.cskd_loss."""
    if projection == "resample":
        generator = torch.Generator().manual_seed(generator_seed)
        student = draw_projections(loss.student_channels, 8, cells, generator=generator, dtype=feat.dtype)
        teacher = draw_projections(loss.teacher_channels, 8, cells, generator=generator, dtype=feat.dtype)
        drawn = student if side == "student" else teacher
        return lambda i: tuple(t[i] for t in drawn)
    module = loss.student_projection if side == "student" else loss.teacher_projection
    return lambda i: tuple(getattr(module, name)[0] for name in module.NAMES)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("projection", ["fixed", "learned", "resample"])
@pytest.mark.parametrize("grid", [(5, 5), (2, 3), None], ids=["grid5x5", "grid2x3", "global"])
def test_matches_the_reference_composition(backend, projection, grid):
    _check_against_the_reference_composition(backend, projection, grid, 13, 11)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("projection", ["fixed", "learned", "resample"])
@pytest.mark.parametrize("h,w", [(13, 26), (6, 6)], ids=["13x26", "6x6"])
def test_matches_the_reference_composition_uneven_cells(backend, projection, h, w):
    """Grid 5x5 on 13x26 (last row and column shorter) and on 6x6 (torch.chunk gives 3 x 3 cells)."""
    _check_against_the_reference_composition(backend, projection, (5, 5), h, w)


def _check_against_the_reference_composition(backend, projection, grid, h, w):
    b, cs, ct = 4, 16, 24
    feat_s = torch.randn(b, cs, h, w, dtype=torch.float64, requires_grad=True)
    feat_t = torch.randn(b, ct, h, w, dtype=torch.float64)
    loss = CSKDLoss(cs, ct, grid=grid, projection=projection, backend=backend,
                    generator=torch.Generator().manual_seed(11)).double()
    with torch.no_grad():
        loss.gamma_cam.fill_(0.5)
        loss.gamma_pam.fill_(0.7)
    out = loss(feat_s, feat_t)

    cells = CellLayout(h, w, grid or (1, 1)).num_cells
    projections_s = _reference_projections(loss, projection, "student", feat_s, cells, 11)
    projections_t = _reference_projections(loss, projection, "teacher", feat_t, cells, 11)
    gamma_cam = loss.gamma_cam.detach().clone().requires_grad_(True)
    gamma_pam = loss.gamma_pam.detach().clone().requires_grad_(True)
    feat_s_ref = feat_s.detach().clone().requires_grad_(True)
    expected = reference.cskd_loss(feat_s_ref, feat_t, gamma_cam, gamma_pam, projections_s, projections_t, grid=grid)

    for name, actual, wanted in zip(out._fields, out, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    out.loss.backward()
    expected[0].backward()
    torch.testing.assert_close(feat_s.grad, feat_s_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(loss.gamma_cam.grad, gamma_cam.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(loss.gamma_pam.grad, gamma_pam.grad, rtol=1e-8, atol=1e-10)
    assert loss.gamma_cam.grad.abs().item() > 0 and loss.gamma_pam.grad.abs().item() > 0
    if projection == "learned":
        assert loss.student_projection.wq.grad is not None
        assert loss.teacher_projection.wq.grad is not None  # through gamma-scaled teacher attention


@pytest.mark.parametrize("backend", _backends())
def test_zero_gammas_give_the_cka_of_the_raw_maps_and_cells(backend):
    b, c, h, w = 5, 16, 12, 14
    feat_s, feat_t = torch.randn(b, c, h, w, dtype=torch.float64), torch.randn(b, 2 * c, h, w, dtype=torch.float64)
    out = CSKDLoss(c, 2 * c, backend=backend).double()(feat_s, feat_t)
    torch.testing.assert_close(out.cam, reference.cka_loss(feat_s, feat_t))
    cells_s = [cell for row in reference.grid_cells(feat_s, (5, 5)) for cell in row]
    cells_t = [cell for row in reference.grid_cells(feat_t, (5, 5)) for cell in row]
    expected_pam = torch.stack([reference.cka_loss(s, t) for s, t in zip(cells_s, cells_t)]).mean()
    torch.testing.assert_close(out.pam, expected_pam)
    torch.testing.assert_close(out.loss, 0.3 * out.cam + 0.8 * out.pam)


def test_float32_fused_close_to_float64_reference():
    b, cs, ct, h, w = 4, 32, 64, 16, 20
    feat_s = torch.randn(b, cs, h, w, requires_grad=True)
    feat_t = torch.randn(b, ct, h, w)
    loss = CSKDLoss(cs, ct, projection="fixed")
    with torch.no_grad():
        loss.gamma_cam.fill_(0.3)
        loss.gamma_pam.fill_(0.4)
    out = loss(feat_s, feat_t)
    out.loss.backward()
    reference_loss = CSKDLoss(cs, ct, projection="fixed", backend="reference").double()
    reference_loss.load_state_dict(loss.state_dict())
    feat_s64 = feat_s.detach().double().requires_grad_(True)
    expected = reference_loss(feat_s64, feat_t.double())
    expected.loss.backward()
    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feat_s.grad.double(), feat_s64.grad, rtol=1e-3, atol=1e-4 * feat_s64.grad.abs().max().item())


# Loss and feat_s gradient against float64: float32 (tf32x3 products on a GPU), and bfloat16 features under autocast.
DEVICE_TOLERANCE = {"fp32": {"loss_atol": 1e-5, "grad_rtol_of_max": 1e-3},
                    "bf16": {"loss_atol": 1e-2, "grad_rtol_of_max": 5e-2}}


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=requires_extension, id="cpu"),
                                    pytest.param("cuda", marks=requires_cuda, id="cuda")])
@pytest.mark.parametrize("grid", [(5, 5), None], ids=["grid5x5", "global"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_loss_close_to_float64_reference(device, grid, precision):
    """The loss as cskd-train runs it (auto backend: Triton on CUDA; under autocast for bf16), grid and global,
    against the float64 reference on the same (rounded) features; benchmarks/gpu_check.sh's quick plan runs it."""
    b, cs, ct, h, w = 4, 32, 64, 16, 20
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    feat_s, feat_t = torch.randn(b, cs, h, w).to(dtype), torch.randn(b, ct, h, w).to(dtype)
    loss = CSKDLoss(cs, ct, grid=grid, projection="fixed").to(device)
    with torch.no_grad():
        loss.gamma_cam.fill_(0.3)
        loss.gamma_pam.fill_(0.4)
    student = feat_s.to(device, copy=True).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = loss(student, feat_t.to(device))
    out.loss.backward()
    reference_loss = CSKDLoss(cs, ct, grid=grid, projection="fixed", backend="reference").double()
    reference_loss.load_state_dict(loss.state_dict())
    student64 = feat_s.double().requires_grad_(True)
    expected = reference_loss(student64, feat_t.double())
    expected.loss.backward()
    tolerance = DEVICE_TOLERANCE[precision]
    for name, got, want in zip(out._fields, out, expected):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=tolerance["loss_atol"],
                                   msg=lambda m: f"{name}: {m}")
    assert student.grad.dtype == dtype
    scale = student64.grad.abs().max()
    error = (student.grad.cpu().double() - student64.grad).abs().max()
    assert error <= tolerance["grad_rtol_of_max"] * scale, f"feat_s gradient off by {error} (largest {scale})"


def test_teacher_features_get_no_gradient():
    feat_s = torch.randn(3, 16, 10, 10, requires_grad=True)
    feat_t = torch.randn(3, 16, 10, 10, requires_grad=True)
    CSKDLoss(16, 16)(feat_s, feat_t).loss.backward()
    assert feat_t.grad is None
    assert feat_s.grad is not None


def test_resample_draws_fresh_projections_every_call():
    feat_s, feat_t = torch.randn(4, 16, 10, 10), torch.randn(4, 16, 10, 10)
    loss = CSKDLoss(16, 16, grid=None)
    with torch.no_grad():
        loss.gamma_pam.fill_(1.0)
    assert loss(feat_s, feat_t).pam.item() != loss(feat_s, feat_t).pam.item()
    fixed = CSKDLoss(16, 16, grid=None, projection="fixed")
    with torch.no_grad():
        fixed.gamma_pam.fill_(1.0)
    assert fixed(feat_s, feat_t).pam.item() == fixed(feat_s, feat_t).pam.item()


@pytest.mark.parametrize("own_generator", [True, False], ids=["generator", "default-generator"])
def test_a_resampled_call_leaves_the_generator_where_drawing_both_sides_does(own_generator):
    """The student's projections are drawn again later in the call (memory); the stream must not notice."""
    feat_s, feat_t = torch.randn(4, 16, 9, 9), torch.randn(4, 24, 9, 9)
    generator = torch.Generator().manual_seed(21) if own_generator else torch.default_generator
    if not own_generator:
        torch.manual_seed(21)
    loss = CSKDLoss(16, 24, grid=(3, 3), generator=generator if own_generator else None)
    loss(feat_s, feat_t)
    after_call = generator.get_state()
    replay = torch.Generator().manual_seed(21)
    draw_projections(16, 8, 9, generator=replay)
    draw_projections(24, 8, 9, generator=replay)
    assert torch.equal(after_call, replay.get_state())


def test_the_drawn_projections_reach_the_projection_without_a_copy():
    """draw_projections gives row slices of one stacked weight and bias; stacked_rows joins them as a view."""
    from cskd_kernels.ops.cell_projection import stacked_rows

    wq, bq, wk, bk, wv, bv = draw_projections(32, 8, cells=5)
    weight = stacked_rows([wq, wk, wv], torch.float32)
    bias = stacked_rows([bq, bk, bv], torch.float32)
    assert weight.shape == (5, 40, 32) and bias.shape == (5, 40)
    assert weight.data_ptr() == wq.data_ptr() and bias.data_ptr() == bq.data_ptr()  # no copy
    torch.testing.assert_close(weight, torch.cat([wq, wk, wv], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(bias, torch.cat([bq, bk, bv], dim=1), rtol=0, atol=0)
    # Not adjacent, another dtype, or tensors of their own: a copy, the same values.
    for parts, dtype in (([wq, wv], torch.float32), ([wq, wk, wv], torch.float64),
                         ([wq.clone(), wk.clone(), wv.clone()], torch.float32)):
        joined = stacked_rows(parts, dtype)
        assert joined.data_ptr() != wq.data_ptr()
        torch.testing.assert_close(joined, torch.cat([p.to(dtype) for p in parts], dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("projection", ["fixed", "learned"])
def test_stored_projections_own_their_storage(projection):
    """Buffers and parameters are not slices of the stacked draw (a state_dict would save all of it)."""
    loss = CSKDLoss(16, 24, projection=projection)
    for module in (loss.student_projection, loss.teacher_projection):
        for name in module.NAMES:
            tensor = getattr(module, name)
            assert tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * 4


def test_projection_init_matches_conv2d_default_bounds():
    wq, bq, wk, bk, wv, bv = draw_projections(64, 8, cells=3)
    assert wq.shape == (3, 8, 64) and bv.shape == (3, 64)
    bound = 1 / math.sqrt(64)
    for t in (wq, bq, wk, bk, wv, bv):
        assert t.abs().max().item() <= bound
        assert t.abs().max().item() > 0.9 * bound


@pytest.mark.parametrize("size,parts", [(64, 5), (128, 5), (6, 5), (13, 4), (5, 5), (7, 1)])
def test_chunk_sizes_match_torch_chunk(size, parts):
    assert chunk_sizes(size, parts) == [len(c) for c in torch.chunk(torch.arange(size), parts)]


@pytest.mark.parametrize("h,w,grid", [(13, 26, (5, 5)), (6, 6, (5, 5)), (10, 10, (5, 5)), (7, 9, (1, 1))])
def test_cell_layout_round_trip_and_zero_padding(h, w, grid):
    x = torch.randn(2, 3, h, w) + 1.0
    layout = CellLayout(h, w, grid)
    cells = layout.to_cells(x)
    torch.testing.assert_close(layout.from_cells(cells), x)
    expected = [cell for row in reference.grid_cells(x, grid) for cell in row]
    assert cells.shape[0] == len(expected)
    for i, cell in enumerate(expected):
        padded = cells[i].reshape(2, 3, layout.cell_h, layout.cell_w)
        torch.testing.assert_close(padded[:, :, : cell.shape[2], : cell.shape[3]], cell)
        assert padded.sum().item() == pytest.approx(cell.sum().item(), rel=1e-5)  # zeros elsewhere
    out = torch.zeros(len(expected), 4, 3, layout.cell_h * layout.cell_w)
    layout.to_cells(x, out=out[:, 1:3])
    torch.testing.assert_close(out[:, 1:3], cells)
    assert out[:, 0].abs().sum().item() == 0 and out[:, 3].abs().sum().item() == 0


@pytest.mark.parametrize("projection", ["resample", "fixed", "learned"])
@pytest.mark.parametrize("grid", [(5, 5), None], ids=["grid5x5", "global"])
def test_the_graph_holds_no_teacher_map_unless_teacher_projections_learn(projection, grid):
    """With constant teacher projections only n x n Grams of the teacher outlive the forward."""
    b, cs, ct, h, w = 4, 8, 24, 13, 26
    feat_s = torch.randn(b, cs, h, w, requires_grad=True)
    feat_t = torch.randn(b, ct, h, w)
    loss = CSKDLoss(cs, ct, grid=grid, projection=projection)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss(feat_s, feat_t)
    teacher_sized = [tuple(t.shape) for t in saved if t.numel() >= b * ct * h * w]
    student_sized = [tuple(t.shape) for t in saved if b * cs * h * w <= t.numel() < b * ct * h * w]
    if projection == "learned":
        assert teacher_sized
    else:
        assert not teacher_sized
    assert student_sized  # the student's maps are saved (the check above can fail)


@pytest.mark.parametrize(
    "kwargs,shapes,pattern",
    [
        ({}, ((2, 16, 8, 8), (3, 16, 8, 8)), r"\(2, 16, 8, 8\).*\(3, 16, 8, 8\).*batch size"),
        ({}, ((2, 16, 8, 8), (2, 16, 8, 9)), r"differ in spatial size; pass resize="),
        ({}, ((2, 8, 8, 8), (2, 16, 8, 8)), r"feat_s \(2, 8, 8, 8\) has 8 channels.*16"),
        ({}, ((2, 16, 8, 8), (2, 32, 8, 8)), r"feat_t \(2, 32, 8, 8\) has 32 channels.*16"),
        ({}, ((2, 16, 4, 8), (2, 16, 4, 8)), r"grid \(5, 5\) is larger than the feature map \(4, 8\)"),
        ({}, ((2, 16, 8), (2, 16, 8)), r"4-D"),
    ],
)
def test_bad_feature_maps(kwargs, shapes, pattern):
    loss = CSKDLoss(16, 16, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        loss(torch.randn(shapes[0]), torch.randn(shapes[1]))


@pytest.mark.skipif(not any(p.values[0] == "triton" for p in fused_backends()), reason="needs Triton")
def test_triton_batch_beyond_its_kernels_is_refused_before_any_kernel_runs():
    loss = CSKDLoss(16, 16, backend="triton")
    with pytest.raises(ValueError, match=r"batch 129: the Triton kernels take at most 128 samples"):
        loss(torch.randn(129, 16, 8, 8), torch.randn(129, 16, 8, 8))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"lambda_cam": float("nan")}, "lambda_cam"),
        ({"lambda_pam": float("inf")}, "lambda_pam"),
        ({"temperature": 0.0}, "temperature"),
        # The range every op takes (cskd_kernels._validation.check_temperature), refused at construction.
        ({"temperature": 1e-30}, r"CSKDLoss: temperature must be a number in \[0.01, 100\], got 1e-30"),
        ({"temperature": 1e6}, r"CSKDLoss: temperature must be a number in \[0.01, 100\]"),
        ({"temperature": float("inf")}, r"CSKDLoss: temperature must be a number in"),
        ({"grid": (0, 5)}, "grid"),
        ({"grid": (5,)}, "grid"),
        ({"projection": "random"}, "projection"),
    ],
)
def test_bad_constructor_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CSKDLoss(16, 16, **kwargs)


@pytest.mark.parametrize("backend", ["reference", *(p.values[0] for p in fused_backends())])
@pytest.mark.parametrize("similarity,grid", [("cka", (5, 5)), ("cka", None), ("mse", (5, 5))])
def test_one_backend_resolution_and_one_input_check_per_call(backend, similarity, grid, monkeypatch):
    """CSKDLoss checks its maps and resolves the backend once at its boundary (#24): the ops inside take them
    as given, so a forward + backward makes one resolve_backend call and checks each map once."""
    import sys

    counts = {"resolve_backend": 0, "check_float_tensor": 0}
    for module in [m for name, m in sys.modules.items() if name.startswith("cskd_kernels")]:
        for name in counts:
            original = getattr(module, name, None)
            if original is None:
                continue

            def counting(*args, _name=name, _original=original, **kwargs):
                counts[_name] += 1
                return _original(*args, **kwargs)
            monkeypatch.setattr(module, name, counting)
    loss = CSKDLoss(8, 16, grid=grid, similarity=similarity, backend=backend)
    feat_s = torch.randn(3, 8, 9, 11, requires_grad=True)
    loss(feat_s, torch.randn(3, 16, 9, 11)).loss.backward()
    assert counts == {"resolve_backend": 1, "check_float_tensor": 2}
    assert feat_s.grad.abs().max().item() > 0
