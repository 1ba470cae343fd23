"""Triton kernels of the per-cell cross-Grams (contract in cskd_kernels.ops.cross_gram), maps read in place.

    forward(parts, cells)      k maps (B, C, H, W) -> (cells, k*B, k*B) float64:
                               per cell the Gram of the k*B rows centered over all k*B rows
    backward(parts, cells, m)  per part a: grad[b, :, cell] = sum_j m[cell][a*B + b, j] (row_j - row_0)[:, cell]

Row r of a cell is image r % B of part r // B; its features are the cell's
pixels of every channel. The kernels gather them through the cell table
(cskd_kernels.triton.common): no stacked or padded copy of the maps, one
launch per pass for all cells and all k maps (up to MAX_PARTS, each its own
pointer, rows routed by masked loads and stores).

Forward: split-K, as the CKA's Gram kernel: each program takes a contiguous
range of one cell's feature tiles, centers each (k*B, BLOCK_F) tile over its
rows in float32 (row 0 subtracted first, so a constant column is exactly
zero) and accumulates tile tile^T with tl.dot (3xTF32: float32 accuracy).
Centering over all k*B rows is enough: the caller centers each B-row block
(H_blocks H_all = H_blocks). Every program writes its own partial; the host
sums them in float64 in a fixed order (deterministic, no atomics).

Backward: m is centered (H (G + G^T) H), so m x = m (x - x_0); one
tl.dot per feature tile, the k*B result rows stored straight into the k
gradient maps.
"""

import torch
import triton
import triton.language as tl

from cskd_kernels.ops.cka import TRITON_MAX_SAMPLES as MAX_ROWS
from cskd_kernels.ops.cross_gram import TRITON_MAX_PARTS as MAX_PARTS
from cskd_kernels.triton.common import cell_pixels, interpreted_launches, load_cell, target_programs, traceable

# Elements of one (BLOCK_N, BLOCK_F) float32 tile: 16 registers a thread at 4 warps (see _blocks).
_TILE_ELEMENTS = 2048


@triton.jit
def _feature_offsets(tile, BLOCK_F: tl.constexpr, features, positions, row0, col0, width, W, HW):
    """Element offsets within one image of the cell's features [tile * BLOCK_F, +BLOCK_F), and their mask."""
    f = tile * BLOCK_F + tl.arange(0, BLOCK_F)
    channel = f // positions
    offsets = channel.to(tl.int64) * HW + cell_pixels(f % positions, row0, col0, width, W)
    return offsets, f < features


@triton.jit
def _load_rows(p0, p1, p2, p3, rows, batch, image_stride, offsets, mask_f, K: tl.constexpr):
    """(BLOCK_N, BLOCK_F) float32 tile: row r is image r % batch of part r // batch (zero past k*batch rows)."""
    part = rows // batch
    pointers = (rows % batch).to(tl.int64)[:, None] * image_stride + offsets[None, :]
    tile = tl.load(p0 + pointers, mask=(part == 0)[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
    if K > 1:
        tile += tl.load(p1 + pointers, mask=(part == 1)[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
    if K > 2:
        tile += tl.load(p2 + pointers, mask=(part == 2)[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
    if K > 3:
        tile += tl.load(p3 + pointers, mask=(part == 3)[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
    return tile


@triton.jit
def _store_rows(g0, g1, g2, g3, tile, rows, batch, image_stride, offsets, mask_f, K: tl.constexpr):
    """Row r of ``tile`` into image r % batch of gradient map r // batch."""
    part = rows // batch
    pointers = (rows % batch).to(tl.int64)[:, None] * image_stride + offsets[None, :]
    tl.store(g0 + pointers, tile.to(g0.dtype.element_ty), mask=(part == 0)[:, None] & mask_f[None, :])
    if K > 1:
        tl.store(g1 + pointers, tile.to(g1.dtype.element_ty), mask=(part == 1)[:, None] & mask_f[None, :])
    if K > 2:
        tl.store(g2 + pointers, tile.to(g2.dtype.element_ty), mask=(part == 2)[:, None] & mask_f[None, :])
    if K > 3:
        tl.store(g3 + pointers, tile.to(g3.dtype.element_ty), mask=(part == 3)[:, None] & mask_f[None, :])


@triton.jit
def _program_tiles(cells_ptr, channels, BLOCK_F: tl.constexpr):
    """This program's cell (row start, column start, width, positions, features) and feature tiles [begin, end)."""
    split = tl.program_id(1)
    row0, col0, width, positions = load_cell(cells_ptr, tl.program_id(0))
    features = channels * positions
    tiles = tl.cdiv(features, BLOCK_F)
    per_split = tl.cdiv(tiles, tl.num_programs(1))
    return row0, col0, width, positions, features, split * per_split, tl.minimum(split * per_split + per_split, tiles)


@triton.jit
def _shifted_rows(p0, p1, p2, p3, rows, n, batch, image_stride, offsets, mask_f, K: tl.constexpr):
    """The (BLOCK_N, BLOCK_F) tile of all k*B rows minus row 0, float32, zero past row n."""
    block = _load_rows(p0, p1, p2, p3, rows, batch, image_stride, offsets, mask_f, K)
    # Row 0 again: an L1/L2 hit, the tile above is the only DRAM read.
    first = tl.load(p0 + offsets, mask=mask_f, other=0.0).to(tl.float32)
    return tl.where((rows < n)[:, None], block - first[None, :], 0.0)


@triton.jit
def _forward_kernel(
    p0, p1, p2, p3, partial_ptr, cells_ptr,
    batch, n, channels, HW, W,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, K: tl.constexpr,
):
    row0, col0, width, positions, features, begin, end = _program_tiles(cells_ptr, channels, BLOCK_F)
    rows = tl.arange(0, BLOCK_N)
    row_valid = rows < n
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for tile in range(begin, end):
        offsets, mask_f = _feature_offsets(tile, BLOCK_F, features, positions, row0, col0, width, W, HW)
        shifted = _shifted_rows(p0, p1, p2, p3, rows, n, batch, channels * HW, offsets, mask_f, K)
        mean = tl.sum(shifted, axis=0) / n
        centered = tl.where(row_valid[:, None], shifted - mean[None, :], 0.0)
        acc += tl.dot(centered, tl.trans(centered), input_precision="tf32x3")

    partial = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * n * n
    tl.store(partial_ptr + partial + rows[:, None] * n + rows[None, :], acc, mask=row_valid[:, None] & row_valid[None, :])


@triton.jit
def _backward_kernel(
    p0, p1, p2, p3, g0, g1, g2, g3, m_ptr, cells_ptr,
    batch, n, channels, HW, W,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, K: tl.constexpr,
):
    row0, col0, width, positions, features, begin, end = _program_tiles(cells_ptr, channels, BLOCK_F)
    rows = tl.arange(0, BLOCK_N)
    square = (rows < n)[:, None] & (rows < n)[None, :]
    m = tl.load(m_ptr + tl.program_id(0).to(tl.int64) * n * n + rows[:, None] * n + rows[None, :], mask=square,
                other=0.0)
    for tile in range(begin, end):
        offsets, mask_f = _feature_offsets(tile, BLOCK_F, features, positions, row0, col0, width, W, HW)
        shifted = _shifted_rows(p0, p1, p2, p3, rows, n, batch, channels * HW, offsets, mask_f, K)
        grad = tl.dot(m, shifted, input_precision="tf32x3")
        _store_rows(g0, g1, g2, g3, grad, rows, batch, channels * HW, offsets, mask_f, K)


def _check(parts):
    if len(parts) > MAX_PARTS or len(parts) * parts[0].shape[0] > MAX_ROWS:
        raise ValueError(f"the Triton cross-Gram kernels take at most {MAX_PARTS} maps and {MAX_ROWS} rows, "
                         f"got {len(parts)} maps of batch {parts[0].shape[0]}")
    for i, p in enumerate(parts):
        if p.shape != parts[0].shape or p.dtype != parts[0].dtype or not p.is_contiguous():
            raise ValueError(f"parts[{i}] {tuple(p.shape)} {p.dtype}: the maps must be contiguous, "
                             f"of one shape and one dtype")


def _blocks(n):
    """(BLOCK_N, BLOCK_F, launch options) for n rows.

    The interpreter pays per loop step, not per element: wide tiles. On a
    GPU no launch spills registers on sm_90 in float32 (python -m
    benchmarks.gpu_compile): 128 features spilled at 16 rows; at 128 rows 64
    features needed more shared memory than sm_90 has, and 16 features with
    Triton's 3 stages more than sm_80 (A100) has.
    """
    block_n = max(16, triton.next_power_of_2(n))
    if interpreted_launches():
        return block_n, 256, {}
    options = {"num_warps": 8, "num_stages": 2} if block_n >= 64 else {"num_warps": 4}
    return block_n, max(16, min(64, _TILE_ELEMENTS // block_n)), options


def _splits(parts, cells, block_f):
    """Programs per cell: enough to fill the device, at most the feature tiles of an average cell."""
    batch, channels, h, w = parts[0].shape
    tiles = triton.cdiv(channels * triton.cdiv(h * w, cells.shape[0]), block_f)
    return max(1, min(tiles, triton.cdiv(target_programs(parts[0].device), cells.shape[0])))


def _padded(parts):
    """The k pointers the kernels take, unused ones repeating the first (never read)."""
    return list(parts) + [parts[0]] * (MAX_PARTS - len(parts))


def forward(parts, cells):
    _check(parts)
    batch, channels, h, w = parts[0].shape
    n = len(parts) * batch
    block_n, block_f, options = _blocks(n)
    splits = _splits(parts, cells, block_f)
    partial = torch.empty((cells.shape[0], splits, n, n), dtype=torch.float32, device=parts[0].device)
    traceable(_forward_kernel)[(cells.shape[0], splits)](
        *_padded(parts), partial, cells, batch, n, channels, h * w, w,
        BLOCK_N=block_n, BLOCK_F=block_f, K=len(parts), **options,
    )
    return partial.sum(dim=1, dtype=torch.float64)


def backward(parts, cells, m):
    _check(parts)
    batch, channels, h, w = parts[0].shape
    n = len(parts) * batch
    if m.shape != (cells.shape[0], n, n):
        raise ValueError(f"m {tuple(m.shape)} does not fit {len(parts)} maps of batch {batch} in {cells.shape[0]} cells")
    block_n, block_f, options = _blocks(n)
    grads = [torch.empty_like(p) for p in parts]
    traceable(_backward_kernel)[(cells.shape[0], _splits(parts, cells, block_f))](
        *_padded(parts), *_padded(grads), m.to(torch.float32).contiguous(), cells, batch, n, channels, h * w, w,
        BLOCK_N=block_n, BLOCK_F=block_f, K=len(parts), **options,
    )
    return grads
