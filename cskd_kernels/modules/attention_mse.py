"""The MSE between attention outputs of CSKDLoss(similarity="mse"), each one elementwise pass.

    _AttentionMSE:        sum(weight * (g o_s + x_s - g o_t - x_t)^2)
    channel_mse_from_grams: the CAM's MSE through a widening adapter, from the maps'
                          C x C Grams alone (no CAM output formed)
    _AdaptedPositionMSE:  the same for the student's PAM through a widening adapter,
                          whose adapted map is never held (see its docstring)

_AdaptedPositionMSE forms its map-sized product in a buffer of the output
pool and turns it into the loss's gradient r in place; its backward folds
the output's scale into the small matrices.

``weight`` is a float or an (H, W) tensor (CSKDLoss's mse_position_weights).
The passes run in float32 at least, the sums of their chunks added in float64.
"""

from typing import Optional

import torch

from cskd_kernels._validation import accumulation_dtype
from cskd_kernels.backend import empty_output, extension, extension_built
from cskd_kernels.grid import CellLayout
from cskd_kernels.ops.cell_projection import (run_cell_projection, run_cell_projection_input_grad,
                                               run_cell_projection_weight_grads)
from cskd_kernels.ops.position_attention import (cell_table, run_position_attention_grads,
                                                 run_position_attention_saving)
from cskd_kernels.ops.projected_position_attention import (position_attention_adapted_backward,
                                                           position_attention_adapted_forward, small_cells)

# Elements of one chunk of the elementwise passes, per device type: on the CPU a few cache-sized
# chunks with reused scratch buffers (fresh map-sized temporaries cost page faults and memory
# passes); elsewhere the whole map at once (a GPU pays per launch, not per temporary).
MSE_CHUNK_ELEMENTS = {"cpu": 2**17}


def _rows_per_chunk(rows, positions, device):
    return max(1, min(rows, MSE_CHUNK_ELEMENTS.get(device.type, rows * positions) // positions))


def _doubled_weight(weight, positions, dtype):
    """2 weight, as a float or a (1, positions) row broadcast over the map's (B C) rows."""
    if isinstance(weight, torch.Tensor):
        return (2.0 * weight).to(dtype).reshape(1, positions)
    return 2.0 * weight


@torch.library.custom_op("cskd::squared_error_pass", mutates_args=("r",))
def _fused_squared_error_pass(x_s: Optional[torch.Tensor], o_s: Optional[torch.Tensor], x_t: torch.Tensor,
                              o_t: torch.Tensor, g: torch.Tensor, weight: Optional[torch.Tensor],
                              scalar_weight: float, r: torch.Tensor) -> torch.Tensor:
    """The C++ pass (csrc/squared_error.cpp): r written in place, x_s None when r holds it; (2,) float64 sums."""
    return extension().squared_error_pass(x_s, o_s, x_t, o_t, g, weight, scalar_weight, r)


@_fused_squared_error_pass.register_fake
def _fused_squared_error_pass_fake(x_s, o_s, x_t, o_t, g, weight, scalar_weight, r):
    return r.new_empty((2,), dtype=torch.float64)


def _runs_fused_pass(maps, r):
    """Whether the C++ pass takes these (rows, positions) maps: CPU, r's dtype, contiguous, the extension built."""
    return (r.device.type == "cpu" and r.dtype in (torch.float32, torch.float64) and extension_built()
            and all(m.dtype == r.dtype and m.is_contiguous() for m in maps if m is not None))


def _squared_error_pass(x_s, o_s, x_t, o_t, g, weight2, r):
    """d = g o_s + x_s - g o_t - x_t (o_s may be None), r = weight2 d, in one pass on the CPU, else by chunks of rows.

    All maps are (rows, positions) views; r (in the accumulation dtype) may be
    x_s itself (each element, or chunk, of x_s is read before r's is written).
    Returns the float64 sums (sum d r, sum r (o_s - o_t)), the second being
    -sum r o_t without o_s: the loss is half the first, and gamma's gradient
    the second.
    """
    acc, (rows, positions) = r.dtype, r.shape
    if _runs_fused_pass((x_s, o_s, x_t, o_t, r), r):
        weight = weight2.reshape(positions).contiguous() if isinstance(weight2, torch.Tensor) else None
        sums = _fused_squared_error_pass(None if x_s is r else x_s, o_s, x_t, o_t, g.reshape(1), weight,
                                         0.0 if weight is not None else float(weight2), r)
        return sums[0], sums[1]
    step = _rows_per_chunk(rows, positions, r.device)
    d = torch.empty((step, positions), dtype=acc, device=r.device)
    e = torch.empty_like(d) if o_s is not None else None
    loss_parts, gamma_parts = [], []
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        dc, rc, o_tc = d[: r1 - r0], r[r0:r1], o_t[r0:r1].to(acc)
        torch.sub(x_s[r0:r1].to(acc), x_t[r0:r1].to(acc), out=dc)
        if o_s is None:
            dc.addcmul_(o_tc, g, value=-1.0)
        else:
            ec = e[: r1 - r0]
            torch.sub(o_s[r0:r1].to(acc), o_tc, out=ec)
            dc.addcmul_(ec, g)
        torch.mul(dc, weight2, out=rc)
        loss_parts.append(dc.mul_(rc).sum())
        gamma_parts.append(torch.mul(o_tc, rc, out=dc).sum().neg() if o_s is None else ec.mul_(rc).sum())
    return torch.stack(loss_parts).sum(dtype=torch.float64), torch.stack(gamma_parts).sum(dtype=torch.float64)


def _chunked_dot(a, b):
    """sum(a * b) of two same-shaped maps in float64, by chunks of rows (no map-sized product)."""
    a, b = a.reshape(-1, a.shape[-1] * a.shape[-2]), b.reshape(-1, b.shape[-1] * b.shape[-2])
    rows, positions = a.shape
    step = _rows_per_chunk(rows, positions, a.device)
    scratch = torch.empty((step, positions), dtype=a.dtype, device=a.device)
    parts = [torch.mul(a[r0:r0 + step], b[r0:r0 + step], out=scratch[: min(step, rows - r0)]).sum()
             for r0 in range(0, rows, step)]
    return torch.stack(parts).sum(dtype=torch.float64)


class _AttentionMSE(torch.autograd.Function):
    """sum(weight * (g o_s + x_s - g o_t - x_t)^2): the MSE of two attention outputs g O + x, one elementwise pass.

    ``o_s`` may be None (x_s is then the whole student map, g Y + x, from the
    CAM op, which takes gamma's student gradient itself). The forward computes
    every gradient but the output's scale: the backward holds one map, 2 weight d.
    """

    @staticmethod
    def forward(ctx, gamma, x_s, o_s, x_t, o_t, weight):
        acc = accumulation_dtype(x_s.dtype, x_t.dtype)
        g = gamma.detach().to(acc).reshape(())
        b, c, h, w = x_t.shape
        rows, positions = b * c, h * w
        x_s, x_t, o_t = (t.reshape(rows, positions) for t in (x_s, x_t, o_t))
        o_s = None if o_s is None else o_s.reshape(rows, positions)
        r = empty_output((rows, positions), x_t.new_empty((), dtype=acc))  # 2 weight d, kept for the backward
        total_loss, total_gamma = _squared_error_pass(x_s, o_s, x_t, o_t, g, _doubled_weight(weight, positions, acc), r)
        ctx.save_for_backward(r)
        ctx.g, ctx.grad_gamma, ctx.shape = g, total_gamma.to(acc), (b, c, h, w)
        ctx.dtypes = (gamma.dtype, x_s.dtype, None if o_s is None else o_s.dtype, o_t.dtype)
        return (0.5 * total_loss).to(acc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (r,) = ctx.saved_tensors
        shape = ctx.shape
        need_gamma, need_x_s, need_o_s, _, need_o_t, _ = ctx.needs_input_grad
        gamma_dtype, x_s_dtype, o_s_dtype, o_t_dtype = ctx.dtypes
        grad_gamma = (ctx.grad_gamma * grad_out).reshape(1).to(gamma_dtype) if need_gamma else None
        grad_x_s = _scaled(r, grad_out, x_s_dtype).view(shape) if need_x_s else None
        grad_o_s = _scaled(r, ctx.g * grad_out, o_s_dtype).view(shape) if need_o_s else None
        grad_o_t = _scaled(r, -ctx.g * grad_out, o_t_dtype).view(shape) if need_o_t else None
        return grad_gamma, grad_x_s, grad_o_s, None, grad_o_t, None


def _scaled(r, scale, dtype):
    """r * scale in dtype, a map-sized gradient from the output pool where r has that dtype."""
    if r.dtype != dtype:
        return (r * scale).to(dtype)
    return torch.mul(r, scale, out=empty_output(r.shape, r))


class _StudentGrams(torch.autograd.Function):
    """(x x^T, x t^T) per image, x (B, C_s, N), t (B, C_t, N) held constant: the Grams the CAM's MSE is made of.

    torch.bmm's own backward would form a map-sized product per use of x and
    sum them; here dx = (dS + dS^T) x + dH t goes into one pooled buffer.
    """

    @staticmethod
    def forward(ctx, x, t):
        ctx.save_for_backward(x, t)
        return torch.bmm(x, x.transpose(1, 2)), torch.bmm(x, t.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gram, grad_cross):
        x, t = ctx.saved_tensors
        grad_x = torch.bmm((grad_gram + grad_gram.transpose(1, 2)).to(x.dtype), x, out=empty_output(x.shape, x))
        return grad_x.baddbmm_(grad_cross.to(x.dtype), t), None


def channel_softmax(energy, temperature):
    """The released CAM's attention from its energy E (B, C, C): softmax((max E - E) / T) along each row."""
    return torch.softmax((energy.amax(dim=-1, keepdim=True).detach() - energy) / temperature, dim=-1)


def channel_mse_from_grams(x, x_t, weight, gamma, temperature):
    """mean((CAM(W x) - CAM(x_t))^2) over every element, from C x C matrices only (no map-sized product).

    With X = W x, the student's CAM is g A_s X + X = M x (M = g A_s W + W,
    A_s from E_s = W (x x^T) W^T) and the teacher's g A_t x_t + x_t = P x_t
    (P = g A_t + I). Per image the squared error is then

        |M x - P x_t|^2 = tr(M S M^T) - 2 tr(M H P^T) + tr(P T P^T),
        S = x x^T (C_s x C_s), H = x x_t^T (C_s x C_t), T = x_t x_t^T (C_t x C_t)

    so the map-sized work is the three Grams (forward) and dx = (dS + dS^T) x
    + dH x_t (backward, _StudentGrams): no CAM output of either side is formed
    (the teacher's A_t x_t alone is a C_t^2 N product), and nothing map-sized
    is held but the inputs. The C x C algebra runs in float64, so the three
    terms cancel to the accuracy of the Grams' float32 sums.
    """
    b, cs, h, w = x.shape
    ct, positions = x_t.shape[1], h * w
    # The teacher in the student's dtype (a teacher run in another precision): the Grams take one.
    flat_s, flat_t = x.reshape(b, cs, positions), x_t.reshape(b, ct, positions).to(x.dtype)
    gram_s, cross = _StudentGrams.apply(flat_s, flat_t)
    wide = torch.float64
    with torch.no_grad():  # the teacher's terms: g^2 tr(A T A^T) + 2 g tr(A T) + tr(T)
        gram_t = torch.bmm(flat_t, flat_t.transpose(1, 2))
        attention_t = channel_softmax(gram_t, temperature).to(wide)
        gram_t = gram_t.to(wide)
        teacher = torch.stack([(torch.bmm(attention_t, gram_t) * attention_t).sum(), (attention_t * gram_t).sum(),
                               gram_t.diagonal(dim1=1, dim2=2).sum()])
    weight = weight.to(x.dtype)
    attention_s = channel_softmax(torch.matmul(torch.matmul(weight, gram_s), weight.t()), temperature)
    g = gamma.reshape(()).to(wide)
    mix = torch.addcmul(weight, gamma.to(x.dtype), torch.matmul(attention_s, weight)).to(wide)  # M = g A_s W + W
    cross_t = cross.to(wide).transpose(1, 2)  # H^T = x_t x^T (C_t x C_s)
    projected = g * torch.bmm(attention_t, cross_t) + cross_t  # P H^T
    student = (torch.bmm(mix, gram_s.to(wide)) * mix).sum()
    total = student - 2.0 * (mix * projected).sum() + g * g * teacher[0] + 2.0 * g * teacher[1] + teacher[2]
    return total / (b * ct * positions)


def cell_sums(maps, grid):
    """(cells, C): the sums over the batch and each torch.chunk cell's positions of (B, C, H, W) maps, row-major."""
    layout = CellLayout(maps.shape[2], maps.shape[3], grid or (1, 1))

    def indicator(sizes, length):
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        rows = torch.zeros((len(sizes), length), dtype=maps.dtype, device=maps.device)
        for i, (start, size) in enumerate(zip(starts, sizes)):
            rows[i, start:start + size] = 1.0
        return rows

    per_position = maps.sum(0)  # (C, H, W)
    sums = torch.einsum("ih,chw,jw->ijc", indicator(layout.rows, layout.height), per_position,
                        indicator(layout.cols, layout.width))
    return sums.reshape(layout.num_cells, maps.shape[1])


def _adapted_attention(x, qk_weight, qk_bias, adapter, value_weight, value_bias, grid, temperature, backend):
    """(P, q, k, z, lse): P = W x + value_weight Z + value_bias per cell (B, C_t, H, W), Z = x A^T.

    One C++ kernel on "cpu" for small cells; else the cell projections, the
    attention, a cell projection of Z and the batched W x in turn.
    """
    b, cs, h, w = x.shape
    ct, d = adapter.shape[0], qk_weight.shape[1] // 2
    if backend == "cpu" and small_cells(x, grid):
        cells = value_weight.shape[0]
        out_weight = torch.cat([value_weight.to(x.dtype), adapter.to(x.dtype).expand(cells, -1, -1)], dim=2)
        return position_attention_adapted_forward(
            x.contiguous(), qk_weight.to(x.dtype).contiguous(), qk_bias.to(x.dtype).contiguous(), out_weight,
            value_bias.to(x.dtype).contiguous(), cell_table(h, w, grid, x.device), 1.0 / float(temperature), backend)
    q, k = run_cell_projection(x, ((qk_weight[:, :d], qk_bias[:, :d]), (qk_weight[:, d:], qk_bias[:, d:])),
                               grid, backend)
    z, lse = run_position_attention_saving(q, k, x, temperature, grid, backend)
    (p,) = run_cell_projection(z, ((value_weight, value_bias),), grid, backend)  # M Z + b_v
    p.view(b, ct, h * w).baddbmm_(adapter.expand(b, ct, cs), x.reshape(b, cs, h * w))  # + W x: P
    return p, q, k, z, lse


class _AdaptedPositionMSE(torch.autograd.Function):
    """The student's PAM MSE through a widening adapter, the adapted map never formed:

        loss = sum(weight * (P - x_t - g o_t)^2),    P = W x + g (M Z + b_v)   per cell

    with W (C_t, C_s) the adapter, Z = x A^T the student's attention applied to
    x itself (its queries and keys projected from x by the folded weights
    Wq W and Wk W, stacked in ``qk_weight``), M = Wv W (cells|1, C_t, C_s) the
    folded value weights and b_v their bias: P is the PAM output of W x
    (CSKDLoss._adapted_position_mse). One map-sized buffer: g (M Z + b_v) from
    the cell projection, made P in place by one batched product (+ W x), then
    r = 2 weight (P - x_t - g o_t) in place by the elementwise pass. The backward
    folds the output's scale s into the small weights, so it forms no map-sized
    product beyond the gradients themselves, and x's gradient in one product
    for the projections and the adapter, plus the attention's dV:

        u = s M^T r (per cell),  dZ = g u,  (dq, dk, dV) = attention backward,
        dx = [Wq W; Wk W; s W]^T [dq; dk; r] + dV,
        dg = <u, Z> + s sum_cells <sum r, b_v> - s <r, o_t>

    (the last sum taken in the forward's pass). The maps are float32 or float64
    of one dtype, on the fused backends ("cpu", "triton").
    """

    @staticmethod
    def forward(ctx, gamma, x, qk_weight, qk_bias, adapter, value_weight, value_bias, x_t, o_t, weight, grid,
                temperature, backend):
        g = gamma.detach().to(x.dtype).reshape(())
        b, cs, h, w = x.shape
        ct, positions = adapter.shape[0], h * w
        p, q, k, z, lse = _adapted_attention(x, qk_weight, qk_bias, adapter, value_weight * g, value_bias * g, grid,
                                             temperature, backend)
        p = p.view(b * ct, positions)
        total_loss, teacher_gamma = _squared_error_pass(
            p, None, x_t.reshape(b * ct, positions), o_t.reshape(b * ct, positions), g,
            _doubled_weight(weight, positions, p.dtype), p)  # r over P, in place
        ctx.save_for_backward(p.view(b, ct, h, w), q, k, z, lse, x, qk_weight, adapter, value_weight, value_bias)
        ctx.g, ctx.teacher_gamma, ctx.gamma_dtype = g, teacher_gamma.to(p.dtype), gamma.dtype
        ctx.grid, ctx.temperature, ctx.backend = grid, temperature, backend
        return 0.5 * total_loss.to(p.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        r, q, k, z, lse, x, qk_weight, adapter, value_weight, value_bias = ctx.saved_tensors
        (need_gamma, need_x, need_qk, need_qk_bias, need_adapter, need_m, need_bv, need_x_t,
         need_o_t) = ctx.needs_input_grad[:9]
        s, g, grid, backend = grad_out.to(r.dtype).reshape(()), ctx.g, ctx.grid, ctx.backend
        b, ct, h, w = r.shape
        cs, positions, cells = x.shape[1], h * w, CellLayout(h, w, grid or (1, 1)).num_cells
        grads = dict.fromkeys(("gamma", "x", "qk", "qk_bias", "adapter", "m", "bv", "x_t", "o_t"))
        weights_need = need_qk or need_qk_bias or need_adapter or need_m or need_bv
        if backend == "cpu" and small_cells(x, grid) and not weights_need:
            # x's and gamma's gradients in one kernel (the weights' gradients take the maps dq, dk, r below).
            u_weight = torch.cat([value_weight.transpose(1, 2), adapter.t().expand(value_weight.shape[0], -1, -1)],
                                 dim=1).to(r.dtype) * s  # [s M^T; s W^T]
            grad_x, parts = position_attention_adapted_backward(
                r, x, q, k, z, lse, u_weight.contiguous(), qk_weight.to(r.dtype).contiguous(),
                (value_bias * s).to(r.dtype).contiguous(), g.reshape(1), cell_table(h, w, grid, r.device),
                1.0 / float(ctx.temperature), backend)
            grads["x"] = grad_x if need_x else None
            student = parts.sum()
        else:
            u = run_cell_projection_input_grad([r], value_weight * s, grid, cs, backend)
            if need_gamma:
                sums = cell_sums(r, grid)  # (cells, C_t)
                bias_part = (sums * value_bias.to(r.dtype)).sum(dtype=torch.float64)  # b_v: (cells|1, C_t)
                student = _chunked_dot(u, z) + s.double() * bias_part
            grad_z = u.mul_(g)
            dq, dk, dv = run_position_attention_grads(q, k, x, z, lse, grad_z, ctx.temperature, grid, backend)
            if need_x:
                stacked = torch.cat([qk_weight.expand(cells, -1, -1), (adapter * s).expand(cells, -1, -1)], dim=1)
                grads["x"] = run_cell_projection_input_grad([dq, dk, r], stacked, grid, cs, backend).add_(dv)
            if need_qk or need_qk_bias:
                grads["qk"], grads["qk_bias"] = run_cell_projection_weight_grads(x, qk_weight, [dq, dk], grid,
                                                                                 need_qk, need_qk_bias)
        if need_gamma:
            grads["gamma"] = (student + (s * ctx.teacher_gamma).double()).reshape(1).to(ctx.gamma_dtype)
        if need_adapter:
            grads["adapter"] = torch.matmul(r.view(b, ct, positions),
                                            x.reshape(b, cs, positions).transpose(1, 2)).sum(0) * s
        if need_m or need_bv:
            grad_m, grad_bv = run_cell_projection_weight_grads(z, value_weight, [r], grid, need_m, need_bv)
            grads["m"], grads["bv"] = (None if t is None else t * (s * g) for t in (grad_m, grad_bv))
        if need_x_t:
            grads["x_t"] = _scaled(r, -s, r.dtype)
        if need_o_t:
            grads["o_t"] = _scaled(r, -s * g, r.dtype)
        return (*grads.values(), None, None, None, None)
