"""The position attention of a map's own per-cell projections, for a side that takes no gradient.

    out = position_attention(Wq x + bq, Wk x + bk, Wv x + bv), cell by cell

is what CSKDLoss computes for the teacher (its projections resampled or
fixed, its map detached): cell_projection's maps followed by
position_attention. On the "cpu" backend, when every cell is small (at most
SMALL_CELL positions: every released grid), one C++ kernel does both per
(cell, group of images) task (csrc/position_attention.cpp,
position_attention_projected_forward): q, k and v live in the task's
workspace and are never written as maps and gathered again (80 MiB each way
for the Cityscapes teacher), and no log-sum-exp is kept. Elsewhere (other
backends, global mode, or a gradient wanted) it is the two ops in turn.

run_projected_position_grams goes one step further for CSKDLoss's CKA: the
per-cell cross-Grams of (O, x) that the loss needs of the teacher's PAM. On
the same fused path, position_attention_projected_gram takes every image of a
cell in one task and forms the Gram of the cell's O and x rows there, while
they are in the workspace: O is never written as a map, and neither it nor x
is read again by cell_cross_gram (at CamVid's shapes 57 -> 43 ms, VOC's
116 -> 83 ms, the two kernels against the one, 2 threads).

position_attention_adapted_forward does the same for the student's PAM of
the MSE variants through a widening adapter (modules/attention_mse.py): its
projections, its attention applied to the map itself, and the folded value
projection plus the adapter, in one kernel; it writes what the backward
needs (q, k, z, lse) and P, each once.
"""

import torch

from cskd_kernels._library import kernel_op
from cskd_kernels.backend import kernels
from cskd_kernels.ops.cell_projection import run_cell_projection, stacked_rows
from cskd_kernels.ops.cross_gram import center_blocks, gram_mixing, run_centered_cross_grams
from cskd_kernels.ops.position_attention import cell_table, largest_cell, run_position_attention

# Positions of the largest cell the fused kernel takes (its kSingleBlock: one score block per cell).
SMALL_CELL = 512


@kernel_op("position_attention_projected_forward")
def position_attention_projected_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                         cells: torch.Tensor, d: int, scale: float, backend: str) -> torch.Tensor:
    """(B, rows - 2d, H, W): the attention of the projections stacked in weight (cells|1, 2d + Cv, C)."""
    return kernels("position_attention", backend).projected_forward(x, weight, bias, cells, d, scale)


@position_attention_projected_forward.register_fake
def _position_attention_projected_forward_fake(x, weight, bias, cells, d, scale, backend):
    return x.new_empty((x.shape[0], weight.shape[1] - 2 * d, *x.shape[2:]))


def fuses(x, weights, grid, backend):
    """Whether run_projected_position_attention takes the one-kernel path for these inputs."""
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    return backend == "cpu" and not needs_graph and x.dtype in (torch.float32, torch.float64) and small_cells(x, grid)


@kernel_op("position_attention_projected_gram")
def position_attention_projected_gram(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                      cells: torch.Tensor, d: int, scale: float, keep: bool,
                                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, O, lse): G (cells, 2B, 2B) float64 cell_cross_gram's Gram of (O, x), O the projected attention
    (Cv = C). With ``keep``, O (B C H W values) and its log-sum-exp (B H W) kept for the backward kernel,
    flat and cell by cell in the layout that kernel reads (see csrc/position_attention.cpp); else empty."""
    gram, out, lse = kernels("position_attention", backend).projected_gram(x, weight, bias, cells, d, scale, keep)
    return gram, out, lse


@position_attention_projected_gram.register_fake
def _position_attention_projected_gram_fake(x, weight, bias, cells, d, scale, keep, backend):
    b, c, h, w = x.shape
    gram = x.new_empty((cells.shape[0], 2 * b, 2 * b), dtype=torch.float64)
    return gram, x.new_empty((b * c * h * w if keep else 0,)), x.new_empty((b * h * w if keep else 0,))


@kernel_op("position_attention_projected_gram_backward")
def position_attention_projected_gram_backward(m: torch.Tensor, x: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                               weight: torch.Tensor, bias: torch.Tensor, cells: torch.Tensor, d: int,
                                               scale: float, backend: str) -> torch.Tensor:
    """x's gradient of the projected Gram from m = the Gram's gradient mixing (cells, 2B, 2B) in x's dtype."""
    return kernels("position_attention", backend).projected_gram_backward(m, x, out, lse, weight, bias, cells, d,
                                                                          scale)


@position_attention_projected_gram_backward.register_fake
def _position_attention_projected_gram_backward_fake(m, x, out, lse, weight, bias, cells, d, scale, backend):
    return torch.empty_like(x)


class _ProjectedGramFunction(torch.autograd.Function):
    """The block-centered Grams (cells, 2B, 2B) of (O, x), differentiable in x (the projections take none).

    Forward: one kernel per cell of every image (O, its Gram; O and lse kept).
    Backward: one kernel per cell again: the Gram's gradient mixing gives dO
    and x's own part, then the attention's and the projections' backward, q,
    k made again from x and v never needed (see csrc/position_attention.cpp).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, cells, d, scale, backend):
        gram, out, lse = position_attention_projected_gram(x, weight, bias, cells, d, scale, True, backend)
        ctx.save_for_backward(x, out, lse, weight, bias, cells)
        ctx.d, ctx.scale, ctx.backend = d, scale, backend
        return center_blocks(gram, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gram):
        x, out, lse, weight, bias, cells = ctx.saved_tensors
        m = gram_mixing(grad_gram, 2).to(x.dtype).contiguous()
        grad_x = position_attention_projected_gram_backward(m, x, out, lse, weight, bias, cells, ctx.d, ctx.scale,
                                                            ctx.backend)
        return grad_x, None, None, None, None, None, None


def _fused_arguments(x, weights, temperature, grid):
    """(x, weight, bias, cells, d, scale) as the fused kernels take them: q, k, v's weights stacked."""
    wq, bq, wk, bk, wv, bv = weights
    weight = stacked_rows([wq, wk, wv], x.dtype).contiguous()
    bias = stacked_rows([bq, bk, bv], x.dtype).contiguous()
    cells = cell_table(x.shape[2], x.shape[3], grid, x.device)
    return x.contiguous(), weight, bias, cells, wq.shape[1], 1.0 / float(temperature)


def run_projected_position_attention(x, weights, temperature, grid, backend):
    """The cell-wise attention O of x's projections ``weights`` = (wq, bq, wk, bk, wv, bv), (cells|1, R, C) each.

    Checked inputs and a resolved backend, as CSKDLoss gives them. Differentiable
    (through the two ops) whenever x or a weight needs a gradient.
    """
    wq, bq, wk, bk, wv, bv = weights
    if not fuses(x, weights, grid, backend):
        q, k, v = run_cell_projection(x, ((wq, bq), (wk, bk), (wv, bv)), grid, backend)
        return run_position_attention(q, k, v, temperature, grid, backend)
    return position_attention_projected_forward(*_fused_arguments(x, weights, temperature, grid), backend)


def gram_fuses(x, weights, grid, backend):
    """Whether run_projected_position_grams takes the Gram kernels: as fuses(), and x may want a gradient
    (the weights none), the values as wide as x."""
    weights_need = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    return (backend == "cpu" and not weights_need and x.dtype in (torch.float32, torch.float64)
            and weights[4].shape[-2] == x.shape[1] and small_cells(x, grid))


def run_projected_position_grams(x, weights, temperature, grid, backend):
    """Per-cell centered cross-Grams (cells, 2B, 2B) of (O, x), O = run_projected_position_attention's.

    What run_centered_cross_grams((O, x), grid, backend) gives, differentiable
    in x and the weights like those two steps. On the fused path (gram_fuses)
    one kernel per pass, O never a map to gather again: without a gradient the
    Grams alone; with x's, O and its log-sum-exp kept for the backward kernel.
    """
    if not gram_fuses(x, weights, grid, backend):
        attention = run_projected_position_attention(x, weights, temperature, grid, backend)
        return run_centered_cross_grams((attention, x), grid, backend)
    arguments = _fused_arguments(x, weights, temperature, grid)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ProjectedGramFunction.apply(*arguments, backend)
    gram, _, _ = position_attention_projected_gram(*arguments, False, backend)
    return center_blocks(gram, 2)


@kernel_op("position_attention_adapted_forward")
def position_attention_adapted_forward(x: torch.Tensor, qk_weight: torch.Tensor, qk_bias: torch.Tensor,
                                       out_weight: torch.Tensor, out_bias: torch.Tensor, cells: torch.Tensor,
                                       scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                            torch.Tensor, torch.Tensor]:
    """(P, q, k, z, lse) of the student's PAM through a widening adapter (modules/attention_mse.py).

    q, k = the per-cell projections qk_weight (cells|1, 2d, C) of x, z their
    attention applied to x itself (lse its log-sum-exp), P = out_weight
    [z; x] + out_bias with out_weight (cells|1, R, 2C): one C++ kernel per
    (cell, group of images), each map written once. "cpu", cells of at most
    SMALL_CELL positions.
    """
    return tuple(kernels("position_attention", backend).adapted_forward(x, qk_weight, qk_bias, out_weight, out_bias,
                                                                         cells, scale))


@position_attention_adapted_forward.register_fake
def _position_attention_adapted_forward_fake(x, qk_weight, qk_bias, out_weight, out_bias, cells, scale, backend):
    b, c, h, w = x.shape
    d = qk_weight.shape[1] // 2
    return (x.new_empty((b, out_weight.shape[1], h, w)), x.new_empty((b, d, h, w)), x.new_empty((b, d, h, w)),
            torch.empty_like(x), x.new_empty((b, h, w)))


def small_cells(x, grid):
    """Whether every torch.chunk cell of x's map has at most SMALL_CELL positions (the one-kernel paths)."""
    return grid is not None and largest_cell(x.shape[2], x.shape[3], grid) <= SMALL_CELL


@kernel_op("position_attention_adapted_backward")
def position_attention_adapted_backward(r: torch.Tensor, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                        z: torch.Tensor, lse: torch.Tensor, u_weight: torch.Tensor,
                                        qk_weight: torch.Tensor, bias: torch.Tensor, g: torch.Tensor,
                                        cells: torch.Tensor, scale: float,
                                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, gamma's parts) of the adapted PAM from r = the loss's gradient by P, one kernel per (cell, group).

    With u_weight = [s M^T; s W^T] (cells|1, 2C, R): [u; w] = u_weight r,
    dZ = g u, the attention's backward, dx = w + dV + qk_weight^T [dq; dk];
    gamma's parts (B * cells, float64: one per task) sum to <u, z> +
    <cell sums of r, bias>. "cpu", cells of at most SMALL_CELL positions.
    """
    return tuple(kernels("position_attention", backend).adapted_backward(r, x, q, k, z, lse, u_weight, qk_weight,
                                                                          bias, g, cells, scale))


@position_attention_adapted_backward.register_fake
def _position_attention_adapted_backward_fake(r, x, q, k, z, lse, u_weight, qk_weight, bias, g, cells, scale,
                                              backend):
    return torch.empty_like(x), x.new_empty((x.shape[0] * cells.shape[0],), dtype=torch.float64)
