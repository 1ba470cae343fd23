"""run_projected_position_attention: the one-kernel teacher path against cell_projection + position_attention."""

import pytest
import torch

from cskd_kernels import CSKDLoss, reference
from cskd_kernels.grid import CellLayout
from cskd_kernels.modules.cskd_loss import draw_projections
from cskd_kernels.ops import projected_position_attention as projected_module
from cskd_kernels.ops.position_attention import cell_table
from cskd_kernels.ops.cross_gram import run_centered_cross_grams
from cskd_kernels.ops.projected_position_attention import (gram_fuses, position_attention_projected_forward,
                                                           position_attention_projected_gram,
                                                           position_attention_projected_gram_backward, fuses,
                                                           run_projected_position_attention,
                                                           run_projected_position_grams)
from conftest import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ extension is not built")

TOLERANCES = {torch.float64: 1e-11, torch.float32: 2e-5}


def _reference(x, weights, temperature, grid):
    """The reference ops on float64: PyTorch's per-cell projections, then the reference attention."""
    wq, bq, wk, bk, wv, bv = (w.double() for w in weights)
    layout = CellLayout(x.shape[2], x.shape[3], grid)
    rows = []
    index = 0
    for row in reference.grid_cells(x.double(), grid):
        outs = []
        for cell in row:
            pick = (lambda w: w[index] if w.shape[0] > 1 else w[0])
            q, k, v = (torch.einsum("oc,bchw->bohw", pick(w), cell) + pick(b)[None, :, None, None]
                       for w, b in ((wq, bq), (wk, bk), (wv, bv)))
            outs.append(reference.position_attention(q, k, v, temperature=temperature))
            index += 1
        rows.append(torch.cat(outs, dim=3))
    assert index == layout.num_cells
    return torch.cat(rows, dim=2)


def _weights(cells, channels, d, dtype, generator, values=None):
    """(wq, bq, wk, bk, wv, bv), each (cells, rows, C) / (cells, rows), not drawn stacked (a copy is taken).

    ``values`` rows of v (default C + 3: the attention's width need not be the map's).
    """
    values = channels + 3 if values is None else values

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return (draw(cells, d, channels), draw(cells, d), draw(cells, d, channels), draw(cells, d),
            draw(cells, values, channels) / channels**0.5, draw(cells, values))


# Odd sizes: uneven torch.chunk cells, tiny cells grouped several images to a task (the demo's 2 x 2), a
# batch that splits into unequal groups, full-width cells, torch.chunk giving fewer cells than asked.
@pytest.mark.parametrize("shape,grid", [((3, 7, 13, 26), (5, 5)), ((5, 9, 6, 6), (5, 5)), ((7, 5, 5, 3), (2, 2)),
                                        ((2, 6, 11, 9), (3, 1)), ((3, 4, 4, 9), (5, 4))])
@pytest.mark.parametrize("shared", [False, True], ids=["per-cell", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_projections_then_attention(shape, grid, shared, dtype):
    generator = torch.Generator().manual_seed(sum(shape) + 7 * shared)
    b, c, h, w = shape
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    cells = 1 if shared else CellLayout(h, w, grid).num_cells
    weights = _weights(cells, c, 2, dtype, generator)
    assert fuses(x, weights, grid, "cpu")
    out = run_projected_position_attention(x, weights, 1.7, grid, "cpu")
    expected = _reference(x, weights, 1.7, grid)
    assert out.dtype == dtype and out.shape == (b, c + 3, h, w)
    scale = expected.abs().max().item()
    assert (out.double() - expected).abs().max().item() <= TOLERANCES[dtype] * scale
    # The same as the two fused ops it replaces.
    composed = run_projected_position_attention(x.requires_grad_(True), weights, 1.7, grid, "cpu")
    assert composed.grad_fn is not None
    assert (composed.detach().double() - out.double()).abs().max().item() <= TOLERANCES[dtype] * scale


def test_reads_stacked_projections_without_a_copy_and_nonfinite_input_stays_nonfinite():
    x = torch.randn(2, 16, 13, 26)
    weights = draw_projections(16, 8, 25, generator=torch.Generator().manual_seed(0))
    out = run_projected_position_attention(x, weights, 2.0, (5, 5), "cpu")
    assert torch.allclose(out.double(), _reference(x, weights, 2.0, (5, 5)), rtol=1e-5, atol=1e-5)
    x[1, 3, 2, 4] = float("nan")
    out = run_projected_position_attention(x, weights, 2.0, (5, 5), "cpu")
    # The 3 x 6 cell of that pixel (torch.chunk: rows 3, 3, 3, 3, 1; columns 6, 6, 6, 6, 2), and no other.
    assert out[1, :, :3, :6].isnan().all() and out[0].isfinite().all()
    assert out[1, :, 3:].isfinite().all() and out[1, :, :, 6:].isfinite().all()


def test_routes_to_the_two_ops_where_the_kernel_does_not_apply():
    x, weights = torch.randn(2, 16, 26, 26), draw_projections(16, 8, 1)
    assert fuses(x, weights, (5, 5), "cpu")
    assert not fuses(x, weights, (5, 5), "reference")
    assert not fuses(x, weights, None, "cpu")  # global mode: the tiled kernel
    assert not fuses(x, weights, (1, 1), "cpu")  # one cell of 676 positions
    assert not fuses(x.requires_grad_(True), weights, (5, 5), "cpu")  # a gradient wanted
    with torch.no_grad():
        assert fuses(x, weights, (5, 5), "cpu")


def test_refuses_what_it_cannot_compute():
    x = torch.randn(2, 8, 30, 30)
    weight, bias = torch.randn(1, 12, 8), torch.randn(1, 12)
    with pytest.raises(RuntimeError, match="at most 512 positions, got one of 900"):
        position_attention_projected_forward(x, weight, bias, cell_table(30, 30, None), 2, 1.0, "cpu")
    with pytest.raises(RuntimeError, match="leave no values"):
        position_attention_projected_forward(x, weight, bias, cell_table(30, 30, (5, 5)), 6, 1.0, "cpu")
    with pytest.raises(RuntimeError, match=r"weight must be \(cells \| 1, 2d \+ Cv, C\)"):
        position_attention_projected_forward(x, torch.randn(3, 12, 8), torch.randn(3, 12),
                                             cell_table(30, 30, (5, 5)), 2, 1.0, "cpu")


# As above, and 10 images in cells of 81 positions: groups of 4, 4 and 2 images in the kernels' tiles.
GRAM_CASES = [((3, 7, 13, 26), (5, 5)), ((5, 9, 6, 6), (5, 5)), ((7, 5, 5, 3), (2, 2)), ((2, 6, 11, 9), (3, 1)),
              ((4, 4, 4, 9), (5, 4)), ((10, 6, 27, 27), (3, 3))]


@pytest.mark.parametrize("shape,grid", GRAM_CASES)
@pytest.mark.parametrize("shared", [False, True], ids=["per-cell", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projected_grams_match_the_reference_attention_and_cross_grams(shape, grid, shared, dtype):
    """The one-kernel Grams of (O, x) against the reference's O and the reference cross-Grams, and the two kernels."""
    generator = torch.Generator().manual_seed(sum(shape) + 11 * shared)
    b, c, h, w = shape
    # A common offset: the shifted Gram keeps float32 accurate where a plain one would cancel.
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) + 20).to(dtype)
    cells = 1 if shared else CellLayout(h, w, grid).num_cells
    weights = _weights(cells, c, 2, dtype, generator, values=c)
    assert fuses(x, weights, grid, "cpu")
    grams = run_projected_position_grams(x, weights, 1.7, grid, "cpu")
    assert grams.dtype == torch.float64 and grams.shape == (CellLayout(h, w, grid).num_cells, 2 * b, 2 * b)
    expected = run_centered_cross_grams((_reference(x, weights, 1.7, grid), x.double()), grid, "reference")
    scale = expected.abs().amax(dim=(1, 2), keepdim=True)  # per cell: cells differ in size
    # float32: O's own rounding at |O| ~ 20 moves the centered Grams by ~5e-5 of their largest entry.
    tolerance = {torch.float64: 1e-10, torch.float32: 5e-4}[dtype]
    assert ((grams - expected).abs() / scale).max().item() <= tolerance
    # The same as the two kernels it replaces (the map O, then cell_cross_gram).
    attention = run_projected_position_attention(x, weights, 1.7, grid, "cpu")
    composed = run_centered_cross_grams((attention, x), grid, "cpu")
    assert ((grams - composed).abs() / scale).max().item() <= tolerance


def test_projected_grams_keep_a_nonfinite_input_in_its_cell_and_image():
    x = torch.randn(3, 16, 13, 26)
    weights = draw_projections(16, 8, 25, generator=torch.Generator().manual_seed(1))
    x[1, 3, 2, 4] = float("nan")  # image 1, cell 0 (rows 0-2, columns 0-5)
    grams = run_projected_position_grams(x, weights, 2.0, (5, 5), "cpu")
    assert grams[1:].isfinite().all()
    # Centering spreads image 1's rows (of O and of x) over the cell's blocks: the cell's Gram is NaN, a loss
    # made from it too, never a finite number that hides the NaN.
    assert grams[0].isnan().any()


def test_projected_grams_route_to_the_two_steps_where_the_kernel_does_not_apply():
    x = torch.randn(3, 16, 26, 26)
    weights = draw_projections(16, 8, 1)
    wider = weights[:4] + (torch.randn(1, 19, 16), torch.randn(1, 19))  # values wider than x: no Gram of (O, x)
    with pytest.raises(RuntimeError, match="one shape"):
        run_projected_position_grams(x, wider, 2.0, (5, 5), "cpu")
    fused = run_projected_position_grams(x, weights, 2.0, (5, 5), "cpu")
    graph = run_projected_position_grams(x.requires_grad_(True), weights, 2.0, (5, 5), "cpu")
    assert graph.grad_fn is not None  # the gradient path: the two differentiable steps
    torch.testing.assert_close(graph.detach(), fused, rtol=1e-5, atol=1e-5 * fused.abs().max().item())


def test_projected_gram_refuses_what_it_cannot_compute():
    x = torch.randn(2, 8, 30, 30)
    cells = cell_table(30, 30, (5, 5))
    with pytest.raises(RuntimeError, match="the values must have x's 8 channels, got 9"):
        position_attention_projected_gram(x, torch.randn(1, 13, 8), torch.randn(1, 13), cells, 2, 1.0, False, "cpu")
    with pytest.raises(RuntimeError, match="at most 512 positions, got one of 900"):
        position_attention_projected_gram(x, torch.randn(1, 12, 8), torch.randn(1, 12), cell_table(30, 30, None), 2,
                                          1.0, False, "cpu")
    weight, bias = torch.randn(1, 12, 8), torch.randn(1, 12)
    _, out, lse = position_attention_projected_gram(x, weight, bias, cells, 2, 1.0, True, "cpu")
    m = torch.zeros(25, 4, 4)
    with pytest.raises(RuntimeError, match=r"m must be \(cells, 2B, 2B\) = \(25, 4, 4\) in x's dtype"):
        position_attention_projected_gram_backward(m.double(), x, out, lse, weight, bias, cells, 2, 1.0, "cpu")
    with pytest.raises(RuntimeError, match="lse must be"):
        position_attention_projected_gram_backward(m, x, out, lse[:1], weight, bias, cells, 2, 1.0, "cpu")


def _student_grams(x, weights, temperature, grid, backend):
    return run_centered_cross_grams((run_projected_position_attention(x, weights, temperature, grid, backend), x),
                                    grid, backend)


@pytest.mark.parametrize("shape,grid", GRAM_CASES)
@pytest.mark.parametrize("shared", [False, True], ids=["per-cell", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_student_grams_and_x_gradient_match_the_reference(shape, grid, shared, dtype):
    """With x's gradient wanted: the Gram kernel's values and dx against the reference's attention and cross-Grams."""
    generator = torch.Generator().manual_seed(sum(shape) + 13 * shared)
    b, c, h, w = shape
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) + 5).to(dtype).requires_grad_(True)
    cells = 1 if shared else CellLayout(h, w, grid).num_cells
    weights = _weights(cells, c, 2, dtype, generator, values=c)
    grams = run_projected_position_grams(x, weights, 1.7, grid, "cpu")
    assert type(grams.grad_fn).__name__ == "_ProjectedGramFunctionBackward"  # the kernels, not the two steps
    x_ref = x.detach().double().requires_grad_(True)
    expected = _student_grams(x_ref, tuple(t.double() for t in weights), 1.7, grid, "reference")
    grad_grams = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    grad_x, = torch.autograd.grad((grams * grad_grams).sum(), x)
    grad_ref, = torch.autograd.grad((expected * grad_grams).sum(), x_ref)
    tolerance = {torch.float64: 1e-10, torch.float32: 5e-4}[dtype]
    scale = expected.abs().amax(dim=(1, 2), keepdim=True)
    assert ((grams.detach() - expected.detach()).abs() / scale).max().item() <= tolerance
    assert grad_x.dtype == dtype
    assert (grad_x.double() - grad_ref).abs().max().item() <= tolerance * grad_ref.abs().max().item()


@pytest.mark.parametrize("shape,grid", [((3, 6, 6, 5), (2, 2)), ((4, 4, 5, 7), (3, 2))])
def test_student_grams_gradcheck_float64(shape, grid):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = _weights(CellLayout(shape[2], shape[3], grid).num_cells, shape[1], 2, torch.float64, generator,
                       values=shape[1])
    assert torch.autograd.gradcheck(lambda x: run_projected_position_grams(x, weights, 1.3, grid, "cpu"), (x,))


def test_student_gram_backward_reads_the_kept_attention_without_changing_it():
    """The backward takes O and lse from what the forward kept (cell by cell) and leaves them as they were:
    a second backward through a retained graph gives the same gradient bitwise, and the first matches
    the reference's."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(5, 12, 17, 23, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = _weights(CellLayout(17, 23, (4, 3)).num_cells, 12, 2, torch.float64, generator, values=12)
    grams = run_projected_position_grams(x, weights, 1.5, (4, 3), "cpu")
    assert type(grams.grad_fn).__name__ == "_ProjectedGramFunctionBackward"
    grad_grams = torch.randn(grams.shape, generator=generator, dtype=torch.float64)
    first, = torch.autograd.grad(grams, x, grad_grams, retain_graph=True)
    second, = torch.autograd.grad(grams, x, grad_grams)
    assert torch.equal(first, second)
    x_ref = x.detach().requires_grad_(True)
    expected, = torch.autograd.grad(_student_grams(x_ref, weights, 1.5, (4, 3), "reference"), x_ref, grad_grams)
    torch.testing.assert_close(first, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_student_gram_gradient_keeps_a_nan_in_its_cell():
    """A NaN pixel makes its cell's Gram and gradients NaN, never a finite gradient; other cells keep theirs."""
    x = torch.randn(3, 16, 13, 26)
    x[1, 3, 2, 4] = float("nan")  # cell 0 (rows 0-2, columns 0-5)
    x.requires_grad_(True)
    weights = draw_projections(16, 8, 25, generator=torch.Generator().manual_seed(2))
    grams = run_projected_position_grams(x, weights, 2.0, (5, 5), "cpu")
    grad_x, = torch.autograd.grad(grams[1:].sum() + grams[0, 0, 0], x)
    assert grad_x[:, :, :3, :6].isnan().any()
    assert grad_x[:, :, 3:].isfinite().all() and grad_x[:, :, :, 6:].isfinite().all()


def test_student_grams_route_learned_weights_to_the_two_steps():
    """Weights that want a gradient take the differentiable two steps (the kernel gives x's gradient only)."""
    x = torch.randn(3, 8, 10, 10, requires_grad=True)
    weights = tuple(t.requires_grad_(True) for t in draw_projections(8, 4, 1))
    assert not gram_fuses(x, weights, (5, 5), "cpu")
    grams = run_projected_position_grams(x, weights, 2.0, (5, 5), "cpu")
    assert type(grams.grad_fn).__name__ != "_ProjectedGramFunctionBackward"
    grads = torch.autograd.grad(grams.sum(), weights)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[::2])  # wq, wk, wv


@pytest.mark.parametrize("similarity", ["cka", "mse"])
def test_cskd_loss_takes_the_teacher_through_the_kernel(similarity, monkeypatch):
    """On "cpu" the teacher's PAM (no gradient) is one kernel call; the loss is the reference backend's.

    The CKA takes the Grams of (O, x) of both sides from the Gram kernel (the student's with x's gradient);
    the MSE the teacher's O from the forward kernel (its student takes the adapted kernels).
    """
    calls = []
    name = "position_attention_projected_gram" if similarity == "cka" else "position_attention_projected_forward"
    original = getattr(projected_module, name)

    def counting(x, *args):
        calls.append(x.shape[1])
        return original(x, *args)
    monkeypatch.setattr(projected_module, name, counting)
    feat_s, feat_t = torch.randn(4, 16, 13, 26, requires_grad=True), torch.randn(4, 32, 13, 26)
    losses = []
    for backend in ("cpu", "reference"):
        loss = CSKDLoss(16, 32, similarity=similarity, generator=torch.Generator().manual_seed(5), backend=backend)
        with torch.no_grad():
            loss.gamma_pam.fill_(0.5)
        losses.append(loss(feat_s, feat_t).pam)
    assert calls == ([32, 16] if similarity == "cka" else [32])  # the teacher's first; on "cpu" only
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
