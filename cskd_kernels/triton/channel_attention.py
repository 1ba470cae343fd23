"""Triton kernels of channel self-attention, CAM (contract in cskd_kernels.ops.channel_attention).

    channel_attention_forward(x, gamma, temperature)
        x (B, C, N) contiguous -> (out (B, C, N) in x's dtype, A (B, C, C) float32)
    channel_attention_backward(grad_out, x, A, gamma, temperature, need_x)
        -> (dx or None, dgamma shaped like gamma)

Forward, three launches:
1. Gram E = X X^T on the tensor cores, split over N (split-K): the C x C
   output is small (a few tiles per image), so the N = H*W reduction is what
   fills the GPU. E is symmetric: only tiles on and above the diagonal are
   computed and each is stored twice (itself and its transpose), half the
   flops of a general product. Every split writes its own partial; the next
   kernel sums them in a fixed order (deterministic, no atomics).
2. One small kernel per row: the sum of the partials, then the stable
   softmax of -E/T (the row minimum of E is the maximum of -E/T) in float32.
3. Y = A X tile by tile with the residual in the epilogue: out = gamma Y + X,
   so Y never reaches memory.

Backward, with G = dOut X^T (see the op module for the algebra):
1. G split over N (the same kernel as the Gram, not symmetric).
2. One small kernel per row: r = rowsum(A * G) (its sum over rows is d gamma)
   and dE = -(gamma / T) A * (G - r).
3. dX = (gamma A^T) dOut + (dE + dE^T) X + dOut as one tiled product over
   [A^T | M] and [dOut; X], M = dE + dE^T formed while loading its tiles, the
   + dOut in the epilogue. Two passes over dOut and X (steps 1 and 3), the
   least the math allows: G needs all of N before dX can start.

float32 inputs use 3xTF32 dots ("tf32x3": float32 accuracy on the tensor
cores; plain TF32 would cost the softmax about three digits, and IEEE float32
dots run on the FMA units, about 20x slower on an H100); float16/bfloat16 operands go to the tensor cores as they are,
with A and M cast to the input dtype; every accumulator is float32.
"""

import torch
import triton
import triton.language as tl

from cskd_kernels.triton.common import interpreted_launches, target_programs, traceable

# The interpreter runs every program in Python: small tiles, few splits, still
# more than one so the cross-split reduction is exercised.
_INTERPRETER_SPLITS = 2


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation; UPCAST multiplies in float32 (the interpreter's bfloat16 dot is wrong)."""
    if UPCAST:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        product = tl.dot(a, b, input_precision="tf32x3")
    return product


@triton.jit
def _nt_product_kernel(
    a_ptr,
    b_ptr,
    partial_ptr,
    rows,
    cols,
    n,
    tiles_per_split,
    SYMMETRIC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """partial[split, image] = A[:, cols of split] B[:, cols of split]^T, with A and B (rows, n) per image.

    SYMMETRIC (A is B): only tiles with tile_j >= tile_i do work, each stored
    at (i, j) and transposed at (j, i).
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    image = tl.program_id(2)
    splits = tl.num_programs(1)
    tiles = tl.cdiv(rows, BLOCK_M)
    tile_i = tile // tiles
    tile_j = tile % tiles
    # SYMMETRIC: tiles below the diagonal do no work (an empty loop, a fully masked store).
    live = (tile_j >= tile_i) | (not SYMMETRIC)

    offs_i = tile_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tile_j * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    valid_i = offs_i < rows
    valid_j = offs_j < rows
    image_offset = image.to(tl.int64) * rows * n
    a_rows = a_ptr + image_offset + offs_i.to(tl.int64)[:, None] * n
    b_rows = b_ptr + image_offset + offs_j.to(tl.int64)[:, None] * n

    n_tiles = tl.cdiv(n, BLOCK_K)
    k_begin = split * tiles_per_split
    k_end = tl.where(live, tl.minimum(k_begin + tiles_per_split, n_tiles), k_begin)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k_tile in range(k_begin, k_end):
        ks = k_tile * BLOCK_K + offs_k
        valid_k = ks < n
        a = tl.load(a_rows + ks[None, :], mask=valid_i[:, None] & valid_k[None, :], other=0.0)
        b = tl.load(b_rows + ks[None, :], mask=valid_j[:, None] & valid_k[None, :], other=0.0)
        acc += _dot(a, tl.trans(b), UPCAST)

    out = partial_ptr + (split.to(tl.int64) * tl.num_programs(2) + image) * rows * cols
    mask = valid_i[:, None] & valid_j[None, :] & live
    tl.store(out + offs_i[:, None] * cols + offs_j[None, :], acc, mask=mask)
    if SYMMETRIC:
        tl.store(out + offs_j[None, :] * cols + offs_i[:, None], acc, mask=mask & (tile_j > tile_i))


@triton.jit
def _softmax_rows_kernel(
    partial_ptr,
    attention_ptr,
    channels,
    splits,
    split_stride,
    inv_temperature,
    BLOCK_C: tl.constexpr,
):
    """A[row] = softmax(-E[row] / T), E[row] the sum of the splits' partial rows."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    valid = offs < channels
    energy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for split in range(splits):
        energy += tl.load(partial_ptr + split * split_stride + row * channels + offs, mask=valid, other=0.0)
    logits = tl.where(valid, -energy * inv_temperature, float("-inf"))
    weights = tl.exp(logits - tl.max(logits, axis=0))
    tl.store(attention_ptr + row * channels + offs, weights / tl.sum(weights, axis=0), mask=valid)


@triton.jit
def _attend_residual_kernel(
    attention_ptr,
    x_ptr,
    gamma_ptr,
    out_ptr,
    channels,
    n,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = gamma * (A X) + X for one (BLOCK_M, BLOCK_N) tile of one image."""
    col_block = tl.program_id(0)
    row_block = tl.program_id(1)
    image = tl.program_id(2).to(tl.int64)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    valid_m = offs_m < channels
    valid_n = offs_n < n
    x_image = x_ptr + image * channels * n
    a_rows = attention_ptr + image * channels * channels + offs_m[:, None] * channels

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        ks = k0 + offs_k
        valid_k = ks < channels
        a = tl.load(a_rows + ks[None, :], mask=valid_m[:, None] & valid_k[None, :], other=0.0)
        xk = tl.load(x_image + ks.to(tl.int64)[:, None] * n + offs_n[None, :], mask=valid_k[:, None] & valid_n[None, :], other=0.0)
        acc += _dot(a.to(xk.dtype), xk, UPCAST)

    gamma = tl.load(gamma_ptr)
    tile = offs_m.to(tl.int64)[:, None] * n + offs_n[None, :]
    mask = valid_m[:, None] & valid_n[None, :]
    residual = tl.load(x_image + tile, mask=mask, other=0.0)
    out = gamma * acc + residual.to(tl.float32)
    tl.store(out_ptr + image * channels * n + tile, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_backward_rows_kernel(
    partial_ptr,
    attention_ptr,
    gamma_ptr,
    grad_energy_ptr,
    row_dots_ptr,
    channels,
    splits,
    split_stride,
    inv_temperature,
    WRITE_GRAD_ENERGY: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """r = rowsum(A * G) and dE = -(gamma / T) A * (G - r) for one row, G the sum of the partials."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    valid = offs < channels
    grad_gram = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for split in range(splits):
        grad_gram += tl.load(partial_ptr + split * split_stride + row * channels + offs, mask=valid, other=0.0)
    attention = tl.load(attention_ptr + row * channels + offs, mask=valid, other=0.0)
    row_dot = tl.sum(attention * grad_gram, axis=0)
    tl.store(row_dots_ptr + row, row_dot)
    if WRITE_GRAD_ENERGY:
        scale = -tl.load(gamma_ptr) * inv_temperature
        grad_energy = scale * attention * (grad_gram - row_dot)
        tl.store(grad_energy_ptr + row * channels + offs, grad_energy, mask=valid)


@triton.jit
def _input_grad_kernel(
    attention_ptr,
    grad_energy_ptr,
    grad_out_ptr,
    x_ptr,
    gamma_ptr,
    grad_x_ptr,
    channels,
    n,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dX = (gamma A^T) dOut + (dE + dE^T) X + dOut for one (BLOCK_M, BLOCK_N) tile of one image."""
    col_block = tl.program_id(0)
    row_block = tl.program_id(1)
    image = tl.program_id(2).to(tl.int64)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    valid_m = offs_m < channels
    valid_n = offs_n < n
    square = image * channels * channels
    attention = attention_ptr + square
    grad_energy = grad_energy_ptr + square
    grad_out_image = grad_out_ptr + image * channels * n
    x_image = x_ptr + image * channels * n
    gamma = tl.load(gamma_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        ks = k0 + offs_k
        valid_k = ks < channels
        mk = valid_m[:, None] & valid_k[None, :]
        direct = offs_m[:, None] * channels + ks[None, :]  # [m, k]
        transposed = ks[None, :] * channels + offs_m[:, None]  # [k, m] read as [m, k]
        a_t = tl.load(attention + transposed, mask=mk, other=0.0) * gamma
        m_sym = tl.load(grad_energy + direct, mask=mk, other=0.0) + tl.load(grad_energy + transposed, mask=mk, other=0.0)
        kn = ks.to(tl.int64)[:, None] * n + offs_n[None, :]
        kn_mask = valid_k[:, None] & valid_n[None, :]
        grad_k = tl.load(grad_out_image + kn, mask=kn_mask, other=0.0)
        x_k = tl.load(x_image + kn, mask=kn_mask, other=0.0)
        acc += _dot(a_t.to(grad_k.dtype), grad_k, UPCAST)
        acc += _dot(m_sym.to(x_k.dtype), x_k, UPCAST)

    tile = offs_m.to(tl.int64)[:, None] * n + offs_n[None, :]
    mask = valid_m[:, None] & valid_n[None, :]
    residual = tl.load(grad_out_image + tile, mask=mask, other=0.0)
    grad_x = acc + residual.to(tl.float32)
    tl.store(grad_x_ptr + image * channels * n + tile, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------


def _upcast(x):
    """Only under the interpreter, whose bfloat16 tl.dot returns garbage; GPUs multiply bfloat16 natively."""
    return interpreted_launches() and x.dtype == torch.bfloat16


def _product_tiles(x):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the (C x C) @ (C x N) products."""
    if interpreted_launches():
        return 16, 32, 16, 4
    if x.dtype == torch.float32:
        return 64, 64, 32, 4
    return 64, 128, 32, 4


def _gram_tiles(x):
    """(BLOCK_M, BLOCK_K, num_warps) of the split-K C x C products."""
    if interpreted_launches():
        return 16, 32, 4
    if x.dtype == torch.float32:
        return 64, 32, 4
    return 64, 64, 4


def _splits(x, tile_programs):
    """How many N ranges the Gram-like products are cut into: enough programs to fill the GPU."""
    batch, _, n = x.shape
    _, block_k, _ = _gram_tiles(x)
    k_tiles = triton.cdiv(n, block_k)
    if interpreted_launches():
        wanted = _INTERPRETER_SPLITS
    else:
        wanted = triton.cdiv(target_programs(x.device), batch * tile_programs)
    splits = max(1, min(wanted, k_tiles))
    tiles_per_split = triton.cdiv(k_tiles, splits)
    return triton.cdiv(k_tiles, tiles_per_split), tiles_per_split


def _nt_product_partials(a, b, symmetric):
    """Per-split partials of A B^T (splits, B, C, C) float32 for A, B (B, C, N)."""
    batch, channels, n = a.shape
    block_m, block_k, warps = _gram_tiles(a)
    tiles = triton.cdiv(channels, block_m)
    live_tiles = tiles * (tiles + 1) // 2 if symmetric else tiles * tiles
    splits, tiles_per_split = _splits(a, live_tiles)
    partials = torch.empty((splits, batch, channels, channels), dtype=torch.float32, device=a.device)
    traceable(_nt_product_kernel)[(tiles * tiles, splits, batch)](
        a, b, partials, channels, channels, n, tiles_per_split,
        SYMMETRIC=symmetric, UPCAST=_upcast(a), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )
    return partials


def _row_block(channels):
    return max(16, triton.next_power_of_2(channels))


def channel_attention_forward(x, gamma, temperature):
    batch, channels, n = x.shape
    partials = _nt_product_partials(x, x, symmetric=True)
    attention = torch.empty((batch, channels, channels), dtype=torch.float32, device=x.device)
    traceable(_softmax_rows_kernel)[(batch * channels,)](
        partials, attention, channels, partials.shape[0], batch * channels * channels, 1.0 / temperature,
        BLOCK_C=_row_block(channels),
    )
    out = torch.empty_like(x)
    block_m, block_n, block_k, warps = _product_tiles(x)
    grid = (triton.cdiv(n, block_n), triton.cdiv(channels, block_m), batch)
    traceable(_attend_residual_kernel)[grid](
        attention, x, gamma, out, channels, n,
        UPCAST=_upcast(x), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return out, attention


def channel_attention_backward(grad_out, x, attention, gamma, temperature, need_x):
    batch, channels, n = x.shape
    partials = _nt_product_partials(grad_out, x, symmetric=False)
    row_dots = torch.empty((batch, channels), dtype=torch.float32, device=x.device)
    # dE overwrites the first split's partial rows: each row reads all its partials before writing.
    grad_energy = partials[0]
    traceable(_softmax_backward_rows_kernel)[(batch * channels,)](
        partials, attention, gamma, grad_energy, row_dots, channels, partials.shape[0],
        batch * channels * channels, 1.0 / temperature,
        WRITE_GRAD_ENERGY=need_x, BLOCK_C=_row_block(channels),
    )
    grad_gamma = row_dots.sum().to(gamma.dtype).reshape(gamma.shape)
    if not need_x:
        return None, grad_gamma
    grad_x = torch.empty_like(x)
    block_m, block_n, block_k, warps = _product_tiles(x)
    grid = (triton.cdiv(n, block_n), triton.cdiv(channels, block_m), batch)
    traceable(_input_grad_kernel)[grid](
        attention, grad_energy, grad_out, x, gamma, grad_x, channels, n,
        UPCAST=_upcast(x), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return grad_x, grad_gamma
