"""Triton kernels of the fused linear CKA (contract in cskd_kernels.ops.cka).

    centered_gram(x)             x (g, n, p) -> Kc = Xc Xc^T (g, n, n) float32
    centered_gram_backward(x, m) x (g, n, p), m (g, n, n) -> m (x - x_0), shape and dtype of x

Both are memory-bound passes over x with the n samples held in one register
tile (n <= 128): each program streams BLOCK_K-wide column tiles of all n rows.

Two kernel families, chosen by n:
- n <= 8 (the CSKD configurations: 4 or 8 samples per GPU): "few samples"
  kernels that keep every sample of a column in one thread, so centering, the
  Gram products (acc[i, j, k] += c[i, k] c[j, k]) and the backward's m (x - x_0)
  are thread-local: no shared memory and no barrier in the loop, about n
  FMAs per element loaded. The feature stride is passed unspecialized on
  purpose: it stops Triton from vectorizing four columns into one thread,
  which would quadruple the n x n accumulator per thread; a warp still reads
  128 contiguous bytes per row. Two tiles per iteration keep enough loads in
  flight. An FMA tl.dot would instead re-read its operands from shared
  memory about 24 times per element, several times the DRAM traffic.
- 8 < n <= 128: tl.dot kernels on (BLOCK_N, BLOCK_K) tiles (the arithmetic
  grows with n, and the per-thread accumulator would not fit in registers).

Forward: split-K. The columns are cut into ``splits`` contiguous ranges per
group; each program centers its tiles in registers (row 0 subtracted first, so
a constant column is exactly zero, then the mean over the n rows) and
accumulates the tile's Gram in float32: plain FMAs, or tl.dot with
input_precision="tf32x3" (3xTF32: float32 accuracy on the tensor cores; plain
TF32 would cost CKA about three digits). Each program writes its own (n, n) partial; the host
sums them in a fixed order, so the result is deterministic (no atomics).

Backward: dx = m (x - x_0) column tile by column tile; m is centered
(H (G + G^T) H), which is why subtracting the first sample is enough.
"""

import torch
import triton
import triton.language as tl

from cskd_kernels.ops.cka import TRITON_MAX_SAMPLES as MAX_SAMPLES
from cskd_kernels.triton.common import interpreted_launches, target_programs, traceable

# Up to this many samples every sample of a column lives in one thread (n * n accumulators a thread).
FEW_SAMPLES = 8
_FEW_SAMPLES_WARPS = 4
# tl.dot kernels: elements of one (BLOCK_N, BLOCK_K) float32 tile on a GPU (32 registers a thread at 4 warps),
# and under the interpreter, which pays per loop step, not per element (see _dot_blocks).
_TILE_ELEMENTS = 4096
_INTERPRETER_TILE_ELEMENTS = 8192


@triton.jit
def _centered_gram_kernel(
    x_ptr,
    partial_ptr,
    n,
    p,
    stride_xg,
    stride_xn,
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    group = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)

    rows = tl.arange(0, BLOCK_N)
    row_valid = rows < n
    cols_in_tile = tl.arange(0, BLOCK_K)
    # int64: g * n * p and n * stride_n can exceed 2**31 for large feature maps.
    group_base = x_ptr + group.to(tl.int64) * stride_xg
    row_ptrs = group_base + rows.to(tl.int64)[:, None] * stride_xn
    first_row_ptr = group_base

    n_tiles = tl.cdiv(p, BLOCK_K)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, n_tiles)

    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for tile in range(tile_begin, tile_end):
        cols = tile * BLOCK_K + cols_in_tile
        col_valid = cols < p
        block = tl.load(row_ptrs + cols[None, :], mask=row_valid[:, None] & col_valid[None, :], other=0.0)
        # Row 0 again: served from L1/L2, the only DRAM read of x is the tile above.
        first = tl.load(first_row_ptr + cols, mask=col_valid, other=0.0)
        shifted = tl.where(row_valid[:, None], block.to(tl.float32) - first.to(tl.float32)[None, :], 0.0)
        mean = tl.sum(shifted, axis=0) / n
        centered = tl.where(row_valid[:, None], shifted - mean[None, :], 0.0)
        acc += tl.dot(centered, tl.trans(centered), input_precision="tf32x3")

    out_ptrs = (
        partial_ptr
        + (group.to(tl.int64) * splits + split) * n * n
        + rows[:, None] * n
        + rows[None, :]
    )
    tl.store(out_ptrs, acc, mask=row_valid[:, None] & row_valid[None, :])


@triton.jit
def _centered_gram_backward_kernel(
    x_ptr,
    m_ptr,
    dx_ptr,
    n,
    p,
    stride_xg,
    stride_xn,
    stride_dg,
    stride_dn,
    tiles_per_program,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    group = tl.program_id(0)
    block_id = tl.program_id(1)

    rows = tl.arange(0, BLOCK_N)
    row_valid = rows < n
    cols_in_tile = tl.arange(0, BLOCK_K)

    m_ptrs = m_ptr + group.to(tl.int64) * n * n + rows[:, None] * n + rows[None, :]
    m = tl.load(m_ptrs, mask=row_valid[:, None] & row_valid[None, :], other=0.0)

    x_base = x_ptr + group.to(tl.int64) * stride_xg
    x_rows = x_base + rows.to(tl.int64)[:, None] * stride_xn
    dx_rows = dx_ptr + group.to(tl.int64) * stride_dg + rows.to(tl.int64)[:, None] * stride_dn

    n_tiles = tl.cdiv(p, BLOCK_K)
    tile_begin = block_id * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    for tile in range(tile_begin, tile_end):
        cols = tile * BLOCK_K + cols_in_tile
        col_valid = cols < p
        mask = row_valid[:, None] & col_valid[None, :]
        block = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        first = tl.load(x_base + cols, mask=col_valid, other=0.0)
        shifted = tl.where(row_valid[:, None], block.to(tl.float32) - first.to(tl.float32)[None, :], 0.0)
        dx = tl.dot(m, shifted, input_precision="tf32x3")
        tl.store(dx_rows + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _centered_columns(row_ptrs, cols, stride_xp, n, p, rows, row_valid):
    """The (BLOCK_N, BLOCK_K) tile of columns ``cols``, centered in float32 (zero outside the valid rows/columns)."""
    col_valid = cols < p
    block = tl.load(
        row_ptrs + (cols * stride_xp)[None, :], mask=row_valid[:, None] & col_valid[None, :], other=0.0
    ).to(tl.float32)
    # Row 0 from the tile itself: every sample of a column is in one thread here.
    first = tl.sum(tl.where(rows[:, None] == 0, block, 0.0), axis=0)
    shifted = tl.where(row_valid[:, None], block - first[None, :], 0.0)
    mean = tl.sum(shifted, axis=0) / n
    return tl.where(row_valid[:, None], shifted - mean[None, :], 0.0)


@triton.jit(do_not_specialize=["stride_xp"])
def _centered_gram_few_samples_kernel(
    x_ptr,
    partial_ptr,
    n,
    p,
    stride_xg,
    stride_xn,
    stride_xp,
    chunks_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    group = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)

    rows = tl.arange(0, BLOCK_N)
    row_valid = rows < n
    cols_in_tile = tl.arange(0, BLOCK_K)
    row_ptrs = x_ptr + group.to(tl.int64) * stride_xg + rows.to(tl.int64)[:, None] * stride_xn

    # A chunk is two tiles: both loads are issued before either is used.
    n_chunks = tl.cdiv(p, 2 * BLOCK_K)
    chunk_begin = split * chunks_per_split
    chunk_end = tl.minimum(chunk_begin + chunks_per_split, n_chunks)

    acc = tl.zeros((BLOCK_N, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for chunk in range(chunk_begin, chunk_end):
        cols = chunk * (2 * BLOCK_K) + cols_in_tile
        a = _centered_columns(row_ptrs, cols, stride_xp, n, p, rows, row_valid)
        b = _centered_columns(row_ptrs, cols + BLOCK_K, stride_xp, n, p, rows, row_valid)
        acc += a[:, None, :] * a[None, :, :] + b[:, None, :] * b[None, :, :]
    gram = tl.sum(acc, axis=2)

    out_ptrs = (
        partial_ptr
        + (group.to(tl.int64) * splits + split) * n * n
        + rows[:, None] * n
        + rows[None, :]
    )
    tl.store(out_ptrs, gram, mask=row_valid[:, None] & row_valid[None, :])


@triton.jit
def _shifted_columns(x_rows, cols, stride_xp, n, p, rows, row_valid):
    """(x - x_0) on the columns ``cols`` in float32, zero outside the valid rows and columns."""
    col_valid = cols < p
    block = tl.load(
        x_rows + (cols * stride_xp)[None, :], mask=row_valid[:, None] & col_valid[None, :], other=0.0
    ).to(tl.float32)
    first = tl.sum(tl.where(rows[:, None] == 0, block, 0.0), axis=0)
    return tl.where(row_valid[:, None], block - first[None, :], 0.0)


@triton.jit
def _store_m_times(m, shifted, dx_rows, cols, stride_dp, p, row_valid):
    dx = tl.sum(m[:, :, None] * shifted[None, :, :], axis=1)
    mask = row_valid[:, None] & (cols < p)[None, :]
    tl.store(dx_rows + (cols * stride_dp)[None, :], dx.to(dx_rows.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["stride_xp", "stride_dp"])
def _centered_gram_backward_few_samples_kernel(
    x_ptr,
    m_ptr,
    dx_ptr,
    n,
    p,
    stride_xg,
    stride_xn,
    stride_xp,
    stride_dg,
    stride_dn,
    stride_dp,
    chunks_per_program,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    group = tl.program_id(0)
    block_id = tl.program_id(1)

    rows = tl.arange(0, BLOCK_N)
    row_valid = rows < n
    cols_in_tile = tl.arange(0, BLOCK_K)

    m_ptrs = m_ptr + group.to(tl.int64) * n * n + rows[:, None] * n + rows[None, :]
    m = tl.load(m_ptrs, mask=row_valid[:, None] & row_valid[None, :], other=0.0)
    x_rows = x_ptr + group.to(tl.int64) * stride_xg + rows.to(tl.int64)[:, None] * stride_xn
    dx_rows = dx_ptr + group.to(tl.int64) * stride_dg + rows.to(tl.int64)[:, None] * stride_dn

    n_chunks = tl.cdiv(p, 2 * BLOCK_K)
    chunk_begin = block_id * chunks_per_program
    chunk_end = tl.minimum(chunk_begin + chunks_per_program, n_chunks)
    for chunk in range(chunk_begin, chunk_end):
        cols = chunk * (2 * BLOCK_K) + cols_in_tile
        # Both loads before either store: the compiler cannot move a load above a
        # store it cannot prove disjoint, and one tile of loads in flight is too few.
        a = _shifted_columns(x_rows, cols, stride_xp, n, p, rows, row_valid)
        b = _shifted_columns(x_rows, cols + BLOCK_K, stride_xp, n, p, rows, row_valid)
        _store_m_times(m, a, dx_rows, cols, stride_dp, p, row_valid)
        _store_m_times(m, b, dx_rows, cols + BLOCK_K, stride_dp, p, row_valid)


# ------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------


def _check_samples(x):
    if x.dim() != 3:
        raise ValueError(f"the Triton CKA kernels take x of shape (g, n, p), got {tuple(x.shape)}")
    n = x.shape[1]
    if n > MAX_SAMPLES:
        raise ValueError(
            f"backend='triton' holds the n samples of a CKA in one register tile and supports "
            f"n <= {MAX_SAMPLES}; got x of shape {tuple(x.shape)} (n = {n}). "
            "Use backend='reference' (or 'cpu') for more samples."
        )


def _few_samples(n):
    return n <= FEW_SAMPLES


def _readable(x):
    """x itself when the kernels can read it with its strides, else a contiguous copy.

    The few-samples kernels take any feature stride (32-bit column offsets);
    the tl.dot kernels need unit stride along the features for wide loads.
    """
    g, n, p = x.shape
    if _few_samples(n):
        return x if (p - 1) * x.stride(2) < 2**31 else x.contiguous()
    return x if x.stride(2) == 1 or p == 1 else x.contiguous()


def _few_samples_blocks(n):
    """One column per thread (BLOCK_K = 32 * num_warps), see the module docstring.

    The interpreter has no threads or layouts; wider tiles only mean fewer
    Python-level loop iterations there, the arithmetic is the same.
    """
    block_k = 512 if interpreted_launches() else 32 * _FEW_SAMPLES_WARPS
    return triton.next_power_of_2(n), block_k, _FEW_SAMPLES_WARPS


def _dot_blocks(n):
    """(BLOCK_N, BLOCK_K, launch options) of the tl.dot Gram kernels for n samples.

    On a GPU at most 128 columns a tile: more spilled registers on sm_90 at
    16 samples, and needed more shared memory than an A100 (sm_80) has at 64
    (python -m benchmarks.gpu_compile); at 128 samples the backward's
    128 x 128 M leaves room for one pipeline stage there.
    """
    block_n = max(16, triton.next_power_of_2(n))
    options = {"num_warps": 4 if block_n <= 32 else 8}
    if interpreted_launches():
        return block_n, max(64, min(512, _INTERPRETER_TILE_ELEMENTS // block_n)), options
    if block_n >= 128:
        options["num_stages"] = 1
    return block_n, max(32, min(128, _TILE_ELEMENTS // block_n)), options


def _column_split(g, p, chunk, device):
    """(programs per group, chunks per program): enough programs to fill the device, whole chunks each."""
    n_chunks = triton.cdiv(p, chunk)
    wanted = max(1, min(n_chunks, triton.cdiv(target_programs(device), g)))
    chunks_per_program = triton.cdiv(n_chunks, wanted)
    return triton.cdiv(n_chunks, chunks_per_program), chunks_per_program


def centered_gram(x):
    """Kc = Xc Xc^T (g, n, n) float32 of x (g, n, p), Xc = x centered over its n samples."""
    _check_samples(x)
    x = _readable(x)
    g, n, p = x.shape
    if _few_samples(n):
        block_n, block_k, num_warps = _few_samples_blocks(n)
        splits, chunks = _column_split(g, p, 2 * block_k, x.device)
        partial = torch.empty((g, splits, n, n), dtype=torch.float32, device=x.device)
        traceable(_centered_gram_few_samples_kernel)[(g, splits)](
            x, partial, n, p, x.stride(0), x.stride(1), x.stride(2), chunks,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        )
    else:
        block_n, block_k, options = _dot_blocks(n)
        splits, chunks = _column_split(g, p, block_k, x.device)
        partial = torch.empty((g, splits, n, n), dtype=torch.float32, device=x.device)
        traceable(_centered_gram_kernel)[(g, splits)](
            x, partial, n, p, x.stride(0), x.stride(1), chunks,
            BLOCK_N=block_n, BLOCK_K=block_k, **options,
        )
    # A fixed-order sum over the splits: deterministic, unlike atomics.
    return partial[:, 0] if splits == 1 else partial.sum(dim=1)


def centered_gram_backward(x, m):
    """dx = m (x - x_0) for x (g, n, p) and m (g, n, n): the shape and dtype of x."""
    _check_samples(x)
    g, n, p = x.shape
    if m.shape != (g, n, n):
        raise ValueError(f"m of shape {tuple(m.shape)} does not match x of shape {tuple(x.shape)}: expected {(g, n, n)}")
    x = _readable(x)
    m = m.to(torch.float32).contiguous()
    dx = torch.empty((g, n, p), dtype=x.dtype, device=x.device)
    if _few_samples(n):
        block_n, block_k, num_warps = _few_samples_blocks(n)
        programs, chunks = _column_split(g, p, 2 * block_k, x.device)
        traceable(_centered_gram_backward_few_samples_kernel)[(g, programs)](
            x, m, dx, n, p, x.stride(0), x.stride(1), x.stride(2), dx.stride(0), dx.stride(1), dx.stride(2), chunks,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        )
    else:
        block_n, block_k, options = _dot_blocks(n)
        programs, chunks = _column_split(g, p, block_k, x.device)
        traceable(_centered_gram_backward_kernel)[(g, programs)](
            x, m, dx, n, p, x.stride(0), x.stride(1), dx.stride(0), dx.stride(1), chunks,
            BLOCK_N=block_n, BLOCK_K=block_k, **options,
        )
    return dx
