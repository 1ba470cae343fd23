"""Triton kernels of position attention (SPEC section 3), flash-attention style.

What differs from the usual attention kernels: q/k width d (any d <= 128,
padded to a power of two) differs from the value width Cv (tiled over value
channels, any size); the inputs stay in their (B, C, H, W) layout (a cell
position maps to its pixel with the cell table, no transpose copy); grid mode
is block-diagonal attention over the torch.chunk cells, every cell of every
image in one launch.

    forward   grid (query blocks, cells, B * value tiles): online softmax in
              base 2 over key blocks, out tile and the row log-sum-exp.
    backward  Delta = rowsum(dO * O) (one linear pass in PyTorch), then
              _dv_kernel    grid (key blocks, cells, B * value tiles): dV
              _dkdq_kernel  grid (key blocks, cells, B): dP over all value
                            tiles, dS, dK; dQ by float32 atomic adds.
P is recomputed blockwise from the saved log-sum-exp; nothing N x N is stored.
Loads are in the input dtype, products accumulate in float32 (float32
operands: 3xTF32, or TF32 under torch.set_float32_matmul_precision("high"),
see common.dot_precision).
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from cskd_kernels.triton.common import cell_pixels, dot_precision, interpreted_launches, load_cell, traceable

LOG2E = 1.4426950408889634


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cells_ptr,
    D, CV, HW, W, qk_scale2, CV_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cell = tl.program_id(1)
    b = tl.program_id(2) // CV_TILES
    cv_tile = tl.program_id(2) % CV_TILES
    row0, col0, width, n = load_cell(cells_ptr, cell)
    m_start = pid_m * BLOCK_M
    # Query blocks past this cell's end (cells differ in size) skip the key loop.
    kv_end = tl.where(m_start < n, n, 0)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    pix_m = cell_pixels(offs_m, row0, col0, width, W)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_c = cv_tile * BLOCK_CV + tl.arange(0, BLOCK_CV)
    mask_c = offs_c < CV
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * D * HW
    k_base = k_ptr + b64 * D * HW
    v_base = v_ptr + b64 * CV * HW

    q = tl.load(q_base + offs_d[None, :] * HW + pix_m[:, None], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_CV], dtype=tl.float32)
    for j0 in range(0, kv_end, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        pix_n = cell_pixels(offs_n, row0, col0, width, W)
        kt = tl.load(k_base + offs_d[:, None] * HW + pix_n[None, :], mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_c[None, :] * HW + pix_n[:, None], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(mask_m, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_base = out_ptr + b64 * CV * HW
    tl.store(out_base + offs_c[None, :] * HW + pix_m[:, None], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_c[None, :])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(lse_ptr + b64 * HW + pix_m, lse, mask=mask_m & (cv_tile == 0))


@triton.jit
def _probabilities(q, kt, lse2, mask_m, mask_n, qk_scale2, PRECISION: tl.constexpr):
    """P of a (query block, key block) tile, recomputed from the base-2 log-sum-exp; 0 outside the cell."""
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale2
    p = tl.math.exp2(s - lse2[:, None])
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _dv_kernel(
    q_ptr, k_ptr, do_ptr, lse_ptr, dv_ptr, cells_ptr,
    D, CV, HW, W, qk_scale2, CV_TILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    cell = tl.program_id(1)
    b = tl.program_id(2) // CV_TILES
    cv_tile = tl.program_id(2) % CV_TILES
    row0, col0, width, n = load_cell(cells_ptr, cell)
    n_start = pid_n * BLOCK_N
    q_end = tl.where(n_start < n, n, 0)

    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    pix_n = cell_pixels(offs_n, row0, col0, width, W)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_c = cv_tile * BLOCK_CV + tl.arange(0, BLOCK_CV)
    mask_c = offs_c < CV
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * D * HW
    do_base = do_ptr + b64 * CV * HW

    kt = tl.load(k_ptr + b64 * D * HW + offs_d[:, None] * HW + pix_n[None, :],
                 mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    dv = tl.zeros([BLOCK_N, BLOCK_CV], dtype=tl.float32)
    for i0 in range(0, q_end, BLOCK_M):
        offs_m = i0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n
        pix_m = cell_pixels(offs_m, row0, col0, width, W)
        q = tl.load(q_base + offs_d[None, :] * HW + pix_m[:, None], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse2 = tl.load(lse_ptr + b64 * HW + pix_m, mask=mask_m, other=0.0) * 1.4426950408889634
        p = _probabilities(q, kt, lse2, mask_m, mask_n, qk_scale2, PRECISION)
        do = tl.load(do_base + offs_c[None, :] * HW + pix_m[:, None], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    tl.store(dv_ptr + b64 * CV * HW + offs_c[None, :] * HW + pix_n[:, None], dv.to(dv_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _dkdq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dq_ptr, cells_ptr,
    D, CV, HW, W, qk_scale2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_CV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    cell = tl.program_id(1)
    b = tl.program_id(2)
    row0, col0, width, n = load_cell(cells_ptr, cell)
    n_start = pid_n * BLOCK_N
    q_end = tl.where(n_start < n, n, 0)

    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    pix_n = cell_pixels(offs_n, row0, col0, width, W)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * D * HW
    v_base = v_ptr + b64 * CV * HW
    do_base = do_ptr + b64 * CV * HW
    dq_base = dq_ptr + b64 * D * HW

    kt = tl.load(k_ptr + b64 * D * HW + offs_d[:, None] * HW + pix_n[None, :],
                 mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i0 in range(0, q_end, BLOCK_M):
        offs_m = i0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n
        pix_m = cell_pixels(offs_m, row0, col0, width, W)
        q = tl.load(q_base + offs_d[None, :] * HW + pix_m[:, None], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse2 = tl.load(lse_ptr + b64 * HW + pix_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + b64 * HW + pix_m, mask=mask_m, other=0.0)
        p = _probabilities(q, kt, lse2, mask_m, mask_n, qk_scale2, PRECISION)
        # dP = dO^T V needs every value channel: accumulate it over value tiles.
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, CV, BLOCK_CV):
            offs_c = c0 + tl.arange(0, BLOCK_CV)
            mask_c = offs_c < CV
            do = tl.load(do_base + offs_c[None, :] * HW + pix_m[:, None], mask=mask_m[:, None] & mask_c[None, :],
                         other=0.0)
            vt = tl.load(v_base + offs_c[:, None] * HW + pix_n[None, :], mask=mask_c[:, None] & mask_n[None, :],
                         other=0.0)
            dp += tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
        tl.atomic_add(dq_base + offs_d[None, :] * HW + pix_m[:, None], dq, mask=mask_m[:, None] & mask_d[None, :])
    tl.store(dk_ptr + b64 * D * HW + offs_d[None, :] * HW + pix_n[:, None], dk.to(dk_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """The tunable part of a launch: tile sizes, and Triton's num_warps / num_stages (None: Triton's default)."""

    block_m: int
    block_n: int
    block_cv: int
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None


def _block_d(q):
    """BLOCK_D: the q/k width d padded to a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(q.shape[1]))


def default_config(q, v):
    """The forward's and _dv_kernel's configuration unless ``config`` is given (tune_position_attention sweeps it).

    On a GPU: tiles with which neither kernel spills registers on sm_90, in
    float32 (3xTF32 or TF32) and 16-bit, by ptxas's count (python -m
    benchmarks.gpu_compile); 64 x 64 x 128 with Triton's defaults (4 warps,
    3 stages) spilled, and 128 x 32 x 128 spilled in _dv_kernel. Not yet
    timed on a GPU (tune_position_attention).
    """
    value_tile = max(16, triton.next_power_of_2(v.shape[1]))
    if interpreted_launches():
        return LaunchConfig(16, 16, min(64, value_tile))
    if _block_d(q) >= 128:
        return LaunchConfig(32, 32, min(64, value_tile), num_warps=8, num_stages=2)
    return LaunchConfig(64, 32, min(128, value_tile), num_warps=8, num_stages=2)


def _dkdq_config(q, config):
    """_dkdq_kernel's configuration: its own on a GPU, where it holds the most tiles at once.

    It accumulates dP = dO V^T over value tiles and holds P, dS and dK
    besides: with the forward's tiles it spilled kilobytes of registers
    and, Triton's 3 stages, needed 244 KiB of shared memory (sm_90 has
    227). BLOCK_CV here is the dP reduction step, not an output tile.
    """
    if interpreted_launches():
        return config
    if _block_d(q) >= 128:
        return LaunchConfig(16, 32, 32, num_warps=8, num_stages=1)
    if _block_d(q) >= 32:
        return LaunchConfig(32, 32, 32, num_warps=8, num_stages=1)
    return LaunchConfig(64, 32, 32, num_warps=4, num_stages=1 if dot_precision(q.dtype) == "tf32x3" else 2)


def _options(q, config):
    """Launch options of ``config``: every kernel's constexprs (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_CV, the tl.dot
    precision) and the config's num_warps / num_stages where set."""
    # float32: 3xTF32 (float32 accuracy) unless torch.set_float32_matmul_precision allows TF32.
    constants = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=_block_d(q), BLOCK_CV=config.block_cv,
                     PRECISION=dot_precision(q.dtype))
    launch = {name: value for name, value in (("num_warps", config.num_warps), ("num_stages", config.num_stages))
              if value is not None}
    return {**constants, **launch}


def position_attention_forward(q, k, v, cells, largest_cell, scale, config=None):
    """(out (B, Cv, H, W) in the input dtype, lse (B, H, W) float32, natural log)."""
    b, d, h, w = q.shape
    cv = v.shape[1]
    if d > 128:
        raise ValueError(f"the Triton position attention supports q/k width d <= 128, got q {tuple(q.shape)}")
    config = config or default_config(q, v)
    options = _options(q, config)
    out = torch.empty_like(v)
    lse = torch.empty((b, h, w), device=q.device, dtype=torch.float32)
    cv_tiles = triton.cdiv(cv, config.block_cv)
    grid = (triton.cdiv(largest_cell, config.block_m), cells.shape[0], b * cv_tiles)
    traceable(_forward_kernel)[grid](q, k, v, out, lse, cells, d, cv, h * w, w, scale * LOG2E, cv_tiles, **options)
    return out, lse


def position_attention_backward(q, k, v, out, lse, grad_out, cells, largest_cell, scale, config=None):
    """(dq, dk, dv) in the input dtype, by blockwise recomputation of P."""
    b, d, h, w = q.shape
    cv = v.shape[1]
    config = config or default_config(q, v)
    delta = (grad_out.float() * out.float()).sum(1)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    cv_tiles = triton.cdiv(cv, config.block_cv)
    traceable(_dv_kernel)[(triton.cdiv(largest_cell, config.block_n), cells.shape[0], b * cv_tiles)](
        q, k, grad_out, lse, dv, cells, d, cv, h * w, w, scale * LOG2E, cv_tiles, **_options(q, config))
    dkdq = _dkdq_config(q, config)
    traceable(_dkdq_kernel)[(triton.cdiv(largest_cell, dkdq.block_n), cells.shape[0], b)](
        q, k, v, grad_out, lse, delta, dk, dq, cells, d, cv, h * w, w, scale * LOG2E, scale, **_options(q, dkdq))
    return dq.to(q.dtype), dk, dv
