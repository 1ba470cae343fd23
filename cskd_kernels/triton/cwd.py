"""Channel-wise distillation on logits (SPEC section 4): the Triton kernel.

One program per row, a row being one (image, class) pair: the N = H*W logits
of s and of t. A row of up to 8192 logits (64x128, the released
configuration) is loaded once and kept in registers. Longer rows take two
passes in blocks:

1. online log-sum-exp of s/T and t/T (block max, rescale the running sum);
2. log p_s and log p_t from those statistics, as (x/T - max) - log(sum), not
   x/T - lse: lse = max + log(sum) rounds to an ulp of max/T (1e-3 at
   |x/T| ~ 1e4), an error every log-probability would inherit; accumulate
   sum p_t (log p_t - log p_s) and, when the student needs a gradient, write
   ds = grad_scale * (p_s - p_t).

The second pass rereads a row the same program has just read (on a GPU it
mostly hits L2), so the traffic stays close to one read of s and t and one
write of ds. The math is float32 in base 2 (exp2/log2 are the native instructions);
the inputs may be float32, float16 or bfloat16 and ds takes the dtype of s.

Contract (shared with the C++ kernel):
    cwd_forward(s, t, temperature, grad_scale, compute_grad)
        s, t (R, N) contiguous -> (kl_rows (R,) float32, ds (R, N) or None)
"""

import torch
import triton
import triton.language as tl

from cskd_kernels.triton.common import traceable

_LOG2E = 1.4426950408889634
# Read inside the kernels: compiled Triton reads only constexpr globals (the interpreter reads any).
_LN2 = tl.constexpr(0.6931471805599453)
_MAX_SINGLE_BLOCK = 8192  # 2 x 8192 float32 over 16 warps: 32 values a thread per input
_LOOP_BLOCK = 4096


@triton.jit
def _cwd_forward_kernel(
    s_ptr,
    t_ptr,
    ds_ptr,
    kl_rows_ptr,
    n_cols,
    scale2,  # log2(e) / T: x * scale2 is x / T in base 2
    grad_scale,
    COMPUTE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * n_cols
    t_row = t_ptr + row * n_cols
    if SINGLE_BLOCK:
        _cwd_row_in_registers(s_row, t_row, ds_ptr + row * n_cols, kl_rows_ptr + row, n_cols, scale2, grad_scale,
                              COMPUTE_GRAD, BLOCK)
    else:
        _cwd_row_in_blocks(s_row, t_row, ds_ptr + row * n_cols, kl_rows_ptr + row, n_cols, scale2, grad_scale,
                           COMPUTE_GRAD, BLOCK)


@triton.jit
def _cwd_row_in_registers(s_row, t_row, ds_row, kl_out, n_cols, scale2, grad_scale,
                          COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """The whole row fits one block: s and t are read once and stay in registers."""
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n_cols
    xs = tl.load(s_row + offsets, mask=mask, other=float("-inf")).to(tl.float32) * scale2
    xt = tl.load(t_row + offsets, mask=mask, other=float("-inf")).to(tl.float32) * scale2
    max_s = tl.max(xs, axis=0)
    max_t = tl.max(xt, axis=0)
    log2_sum_s = tl.log2(tl.sum(tl.exp2(xs - max_s), axis=0))
    log2_sum_t = tl.log2(tl.sum(tl.exp2(xt - max_t), axis=0))
    # Padding lanes: finite values from here on (no -inf - -inf), and p_t = 0 there.
    log2_ps = (tl.where(mask, xs, max_s) - max_s) - log2_sum_s
    log2_pt = (tl.where(mask, xt, max_t) - max_t) - log2_sum_t
    pt = tl.where(mask, tl.exp2(log2_pt), 0.0)
    kl = tl.sum(pt * (log2_pt - log2_ps), axis=0)
    if COMPUTE_GRAD:
        grad = grad_scale * (tl.exp2(log2_ps) - pt)
        tl.store(ds_row + offsets, grad.to(ds_row.dtype.element_ty), mask=mask)
    tl.store(kl_out, kl * _LN2)


@triton.jit
def _cwd_row_in_blocks(s_row, t_row, ds_row, kl_out, n_cols, scale2, grad_scale,
                       COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Rows longer than one block: two passes (the second mostly rereads from L2)."""
    # Pass 1: online log-sum-exp (base 2) of both rows.
    max_s = float("-inf")
    max_t = float("-inf")
    sum_s = 0.0
    sum_t = 0.0
    for start in range(0, n_cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_cols
        xs = tl.load(s_row + offsets, mask=mask, other=float("-inf")).to(tl.float32) * scale2
        xt = tl.load(t_row + offsets, mask=mask, other=float("-inf")).to(tl.float32) * scale2
        # Every block holds at least one valid lane, so the new maxima are finite.
        new_max_s = tl.maximum(max_s, tl.max(xs, axis=0))
        new_max_t = tl.maximum(max_t, tl.max(xt, axis=0))
        sum_s = sum_s * tl.exp2(max_s - new_max_s) + tl.sum(tl.exp2(xs - new_max_s), axis=0)
        sum_t = sum_t * tl.exp2(max_t - new_max_t) + tl.sum(tl.exp2(xt - new_max_t), axis=0)
        max_s = new_max_s
        max_t = new_max_t
    log2_sum_s = tl.log2(sum_s)
    log2_sum_t = tl.log2(sum_t)

    # Pass 2: KL terms and the student gradient.
    kl = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n_cols
        log2_ps = (tl.load(s_row + offsets, mask=mask, other=0.0).to(tl.float32) * scale2 - max_s) - log2_sum_s
        log2_pt = (tl.load(t_row + offsets, mask=mask, other=0.0).to(tl.float32) * scale2 - max_t) - log2_sum_t
        pt = tl.where(mask, tl.exp2(log2_pt), 0.0)
        kl += pt * (log2_pt - log2_ps)
        if COMPUTE_GRAD:
            grad = grad_scale * (tl.exp2(log2_ps) - pt)
            tl.store(ds_row + offsets, grad.to(ds_row.dtype.element_ty), mask=mask)
    tl.store(kl_out, tl.sum(kl, axis=0) * _LN2)


def _launch_config(n_cols):
    """(block, single_block, num_warps): rows up to 8192 are held whole in registers."""
    if n_cols <= _MAX_SINGLE_BLOCK:
        block = triton.next_power_of_2(n_cols)
        return block, True, 16 if block >= 8192 else 8 if block >= 2048 else 4
    return _LOOP_BLOCK, False, 8


def cwd_forward(s, t, temperature, grad_scale, compute_grad):
    """Per-row KL (float32, unscaled) and ds = grad_scale * (p_s - p_t) when compute_grad."""
    rows, n_cols = s.shape
    kl_rows = torch.empty(rows, dtype=torch.float32, device=s.device)
    ds = torch.empty_like(s) if compute_grad else None
    block, single_block, num_warps = _launch_config(n_cols)
    traceable(_cwd_forward_kernel)[(rows,)](
        s,
        t,
        ds if compute_grad else kl_rows,  # an unused pointer argument when no gradient is written
        kl_rows,
        n_cols,
        _LOG2E / temperature,
        grad_scale,
        COMPUTE_GRAD=compute_grad,
        SINGLE_BLOCK=single_block,
        BLOCK=block,
        num_warps=num_warps,
    )
    return kl_rows, ds
