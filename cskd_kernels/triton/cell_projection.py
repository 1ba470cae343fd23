"""Triton kernels of the per-cell 1x1 projections (contract in cskd_kernels.ops.cell_projection), maps read in place.

    forward(x, weight, bias, cells, sizes)  out_j[b, :, cell] = W_cell,j x[b, :, cell] + b_cell,j
                                            (W_j the row block j of weight (cells|1, sum(sizes), C))
    backward(grads, weight, cells, channels) grad_x[b, :, cell] = sum_j W_cell,j^T grads_j[b, :, cell]

One launch per pass for every image, cell and output (up to MAX_OUTPUTS, each
its own pointer): a program owns a block of weight rows (or of input
channels, backward) of one cell of one image and walks its cell's pixels in
BLOCK_P tiles, gathered through the cell table (cskd_kernels.triton.common),
so the maps are neither cut into padded cells nor copied back. Products run
on tl.dot with float32 accumulation (float32 inputs: common.dot_precision).
A weight with a leading 1 (one projection for every cell) is read with a
zero cell stride.
Weight and bias gradients (projection "learned") stay on the PyTorch path.
"""

import torch
import triton
import triton.language as tl

from cskd_kernels.ops.cell_projection import TRITON_MAX_OUTPUTS as MAX_OUTPUTS
from cskd_kernels.triton.common import cell_pixels, dot_precision, interpreted_launches, load_cell, traceable


@triton.jit
def _store_output(out_ptr, first_row, rows_out, acc, rows, mask_r, b, pix, mask_p, HW):
    """The tile rows that fall in output [first_row, first_row + rows_out) into that (B, rows_out, H, W) map."""
    local = rows - first_row
    mask = mask_r & (local >= 0) & (local < rows_out)
    pointers = out_ptr + (b * rows_out + local).to(tl.int64)[:, None] * HW + pix[None, :]
    tl.store(pointers, acc.to(out_ptr.dtype.element_ty), mask=mask[:, None] & mask_p[None, :])


@triton.jit
def _program_cell(cells_ptr, PIXEL_SPLITS):
    """This program's image, first pixel tile (it takes every PIXEL_SPLITS-th), and cell (table entry)."""
    b = tl.program_id(2) // PIXEL_SPLITS
    row0, col0, width, positions = load_cell(cells_ptr, tl.program_id(1))
    return b, tl.program_id(2) % PIXEL_SPLITS, row0, col0, width, positions


@triton.jit
def _pixel_tile(tile, BLOCK_P: tl.constexpr, positions, row0, col0, width, W):
    """Pixel offsets of the cell's positions [tile * BLOCK_P, +BLOCK_P), and their mask."""
    index = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    return cell_pixels(index, row0, col0, width, W), index < positions


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, o0, o1, o2, cells_ptr,
    C, HW, W, R, S0, S1, S2, w_cell_stride, bias_cell_stride, PIXEL_SPLITS,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, OUTPUTS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    cell = tl.program_id(1)
    b, pixel_split, row0, col0, width, positions = _program_cell(cells_ptr, PIXEL_SPLITS)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    w_rows = w_ptr + cell.to(tl.int64) * w_cell_stride + rows[:, None] * C
    bias = tl.load(bias_ptr + cell.to(tl.int64) * bias_cell_stride + rows, mask=mask_r, other=0.0).to(tl.float32)
    x_image = x_ptr + b.to(tl.int64) * C * HW

    for tile in range(pixel_split, tl.cdiv(positions, BLOCK_P), PIXEL_SPLITS):
        pix, mask_p = _pixel_tile(tile, BLOCK_P, positions, row0, col0, width, W)
        acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + tl.arange(0, BLOCK_C)
            mask_c = channels < C
            w = tl.load(w_rows + channels[None, :], mask=mask_r[:, None] & mask_c[None, :], other=0.0)
            x = tl.load(x_image + channels.to(tl.int64)[:, None] * HW + pix[None, :],
                        mask=mask_c[:, None] & mask_p[None, :], other=0.0)
            acc += tl.dot(w, x, input_precision=PRECISION)
        acc += bias[:, None]
        _store_output(o0, 0, S0, acc, rows, mask_r, b, pix, mask_p, HW)
        if OUTPUTS > 1:
            _store_output(o1, S0, S1, acc, rows, mask_r, b, pix, mask_p, HW)
        if OUTPUTS > 2:
            _store_output(o2, S0 + S1, S2, acc, rows, mask_r, b, pix, mask_p, HW)


@triton.jit
def _add_transposed_product(acc, w_cell, first_row, rows_out, g_ptr, b, channels, mask_c, pix, mask_p, C, HW,
                            BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc + W_j^T g_j on one (channels, pixels) tile, W_j the weight rows [first_row, first_row + rows_out)."""
    g_image = g_ptr + (b * rows_out).to(tl.int64) * HW
    for r0 in range(0, rows_out, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < rows_out
        wt = tl.load(w_cell + (first_row + rows)[None, :] * C + channels[:, None],
                     mask=mask_c[:, None] & mask_r[None, :], other=0.0)
        g = tl.load(g_image + rows.to(tl.int64)[:, None] * HW + pix[None, :],
                    mask=mask_r[:, None] & mask_p[None, :], other=0.0)
        acc += tl.dot(wt, g, input_precision=PRECISION)
    return acc


@triton.jit
def _input_grad_kernel(
    g0, g1, g2, w_ptr, dx_ptr, cells_ptr,
    C, HW, W, S0, S1, S2, w_cell_stride, PIXEL_SPLITS,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, OUTPUTS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    cell = tl.program_id(1)
    b, pixel_split, row0, col0, width, positions = _program_cell(cells_ptr, PIXEL_SPLITS)
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = channels < C
    w_cell = w_ptr + cell.to(tl.int64) * w_cell_stride
    dx_rows = dx_ptr + (b.to(tl.int64) * C + channels)[:, None] * HW

    for tile in range(pixel_split, tl.cdiv(positions, BLOCK_P), PIXEL_SPLITS):
        pix, mask_p = _pixel_tile(tile, BLOCK_P, positions, row0, col0, width, W)
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        acc = _add_transposed_product(acc, w_cell, 0, S0, g0, b, channels, mask_c, pix, mask_p, C, HW,
                                      BLOCK_R, PRECISION)
        if OUTPUTS > 1:
            acc = _add_transposed_product(acc, w_cell, S0, S1, g1, b, channels, mask_c, pix, mask_p, C, HW,
                                          BLOCK_R, PRECISION)
        if OUTPUTS > 2:
            acc = _add_transposed_product(acc, w_cell, S0 + S1, S2, g2, b, channels, mask_c, pix, mask_p, C, HW,
                                          BLOCK_R, PRECISION)
        tl.store(dx_rows + pix[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def _launch(backward):
    """BLOCK_R (weight rows), BLOCK_C (channels), BLOCK_P (pixels) and the warps / stages options of a pass.

    The GPU launches do not spill registers on sm_90 in float32 (3xTF32 or
    TF32) and 16-bit, by ptxas's count (python -m benchmarks.gpu_compile):
    with Triton's default 4 warps and 3 stages the same tiles spilled 1 KiB
    (forward) and 4 KiB (backward) per thread.
    """
    if interpreted_launches():
        return dict(BLOCK_R=32, BLOCK_C=32, BLOCK_P=64)  # the interpreter pays per program and loop step
    if backward:  # BLOCK_C is the output tile here, BLOCK_R the reduction step
        return dict(BLOCK_R=32, BLOCK_C=64, BLOCK_P=64, num_warps=8, num_stages=2)
    return dict(BLOCK_R=64, BLOCK_C=32, BLOCK_P=64, num_warps=8, num_stages=2)


def _pixel_splits(height, width, cells, block_p):
    """Programs per (image, cell) along the pixels: the pixel tiles of an average cell."""
    return max(1, triton.cdiv(triton.cdiv(height * width, cells), block_p))


def _sizes_and_pointers(tensors, sizes):
    """The three size arguments and three pointers the kernels take (unused ones: size 0, first tensor)."""
    if not 1 <= len(sizes) <= MAX_OUTPUTS or len(tensors) != len(sizes):
        raise ValueError(f"the Triton cell projection takes 1 to {MAX_OUTPUTS} outputs, got sizes {list(sizes)}")
    padding = MAX_OUTPUTS - len(sizes)
    return list(sizes) + [0] * padding, list(tensors) + [tensors[0]] * padding


def _check(x, weight, cells):
    if not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("the Triton cell projection takes contiguous x and weight")
    if weight.shape[0] not in (1, cells.shape[0]) or weight.shape[2] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} with {cells.shape[0]} cells")


def forward(x, weight, bias, cells, sizes):
    """The (B, size_j, H, W) maps of the row blocks ``sizes`` of weight, in the dtype of x."""
    _check(x, weight, cells)
    b, c, h, w = x.shape
    outs = [x.new_empty((b, size, h, w)) for size in sizes]
    launch = _launch(backward=False)
    splits = _pixel_splits(h, w, cells.shape[0], launch["BLOCK_P"])
    (s0, s1, s2), (o0, o1, o2) = _sizes_and_pointers(outs, sizes)
    rows = weight.shape[1]
    traceable(_forward_kernel)[(triton.cdiv(rows, launch["BLOCK_R"]), cells.shape[0], b * splits)](
        x, weight, bias, o0, o1, o2, cells, c, h * w, w, rows, s0, s1, s2,
        0 if weight.shape[0] == 1 else weight.stride(0), 0 if bias.shape[0] == 1 else bias.stride(0), splits,
        OUTPUTS=len(sizes), PRECISION=dot_precision(x.dtype), **launch,
    )
    return outs


def backward(grads, weight, cells, channels):
    """grad_x (B, channels, H, W) from the outputs' gradients grads_j (B, size_j, H, W)."""
    b, _, h, w = grads[0].shape
    sizes = [g.shape[1] for g in grads]
    if sum(sizes) != weight.shape[1] or any(not g.is_contiguous() for g in grads):
        raise ValueError(f"gradients of sizes {sizes} (contiguous) do not fit weight {tuple(weight.shape)}")
    weight = weight.contiguous()
    dx = grads[0].new_empty((b, channels, h, w))
    launch = _launch(backward=True)
    splits = _pixel_splits(h, w, cells.shape[0], launch["BLOCK_P"])
    (s0, s1, s2), (g0, g1, g2) = _sizes_and_pointers(grads, sizes)
    traceable(_input_grad_kernel)[(triton.cdiv(channels, launch["BLOCK_C"]), cells.shape[0], b * splits)](
        g0, g1, g2, weight, dx, cells, channels, h * w, w, s0, s1, s2,
        0 if weight.shape[0] == 1 else weight.stride(0), splits,
        OUTPUTS=len(sizes), PRECISION=dot_precision(dx.dtype), **launch,
    )
    return dx
