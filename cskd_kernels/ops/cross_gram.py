"""Centered cross-Gram matrices of several feature maps per grid cell: Grams of their combinations, maps never combined.

For k maps a_1..a_k of one shape (B, C, H, W) and a grid cell layout, the
result holds for every cell the k x k blocks

    K_ij = (H a_i)(H a_j)^T        (B x B, H = I - 11^T / B, features = the cell's C * positions)

as one (cells, k*B, k*B) matrix. Why: CSKD's CKA compares Grams of maps of
the form gamma * Y + X, and for a map that is linear in gamma

    K(gamma) = sum_ij c_i(gamma) c_j(gamma) K_ij

so the loss needs the k^2 small blocks, never the map gamma * Y + X itself:
the teacher's attention outputs stay transient, and the student's combined
map is never formed (its gradient is M a_i per part, M the n x n mixing).

The maps are read in channel blocks: a block of every map is cut into cells
(CellLayout, zero padding that leaves centered Grams unchanged), stacked into
one (cells, k*B, block) tensor and passed to the CKA op's centered-Gram kernel
of the requested backend. That kernel centers over all k*B rows; centering
each B-row block afterwards gives the per-map centering exactly, because
H_blocks H_all = H_blocks. Grams add up over feature blocks, so the blocks
are summed in float64. The backward is the CKA kernel's backward, M (x - x_0),
on the same stacked blocks, with M = H_blocks (G + G^T) H_blocks.

On the fused backends nothing is stacked: the kernels cskd::cell_cross_gram
and cskd::cell_cross_gram_backward read every map in place through the cell
table, and return a float64 Gram of the k*B rows that the block centering
turns into the result (centering is invariant to a common shift: the C++
kernels, csrc/cell_cross_gram.cpp, shift by row 0; the Triton kernels,
cskd_kernels/triton/cell_cross_gram.py, center over all k*B rows), and the
gradients M (x - x_0) written straight into maps shaped like the parts.
On a GPU that is one launch per pass for all cells and maps. The stacked
path above serves the "reference" backend and Triton beyond its in-place
kernels' TRITON_MAX_PARTS maps; beyond TRITON_MAX_SAMPLES rows (k * B) Triton
inputs take the reference path (the Triton Gram kernels hold every row of a
column in one register tile).
"""

import torch

from cskd_kernels import reference
from cskd_kernels._validation import accumulation_dtype, check_float_tensor, check_same_device
from cskd_kernels._library import kernel_op
from cskd_kernels.backend import kernels, resolve_backend
from cskd_kernels.grid import CellLayout
from cskd_kernels.ops.cka import TRITON_MAX_SAMPLES, centered_gram, centered_gram_backward, centering_matrix
from cskd_kernels.ops.position_attention import cell_table

# Bytes of one stacked channel block, per device type: on the CPU large enough
# for long kernel passes, small enough that the transient copies of a block
# cost next to nothing; a GPU takes the whole map in one block (launches cost
# more there than memory).
BLOCK_BYTES = {"cpu": 16 * 2**20}
DEFAULT_BLOCK_BYTES = 2**30
# Maps the Triton in-place kernels read (a pointer each); their k * B rows are at most TRITON_MAX_SAMPLES.
TRITON_MAX_PARTS = 4


def _layout(x, grid):
    return CellLayout(x.shape[2], x.shape[3], grid)


def _block_centering(k, n, dtype, device):
    """Block-diagonal centering matrix: H_n on each of the k diagonal n x n blocks."""
    return torch.block_diag(*[centering_matrix(n, dtype, device)] * k)


# The in-place kernels are PyTorch ops (cskd_kernels._library: a custom op,
# and a triton_op on the Triton backend), so torch.compile traces them with no
# graph break; CrossGramFunction calls them for autograd.


@kernel_op("cell_cross_gram")
def cell_cross_gram(parts: list[torch.Tensor], cells: torch.Tensor, backend: str) -> torch.Tensor:
    """(cells, k*B, k*B) float64: per cell a Gram of the k*B rows up to centering, maps read in place."""
    return kernels("cell_cross_gram", backend).forward(parts, cells)


@cell_cross_gram.register_fake
def _cell_cross_gram_fake(parts, cells, backend):
    n = len(parts) * parts[0].shape[0]
    return parts[0].new_empty((cells.shape[0], n, n), dtype=torch.float64)


@kernel_op("cell_cross_gram_backward")
def cell_cross_gram_backward(parts: list[torch.Tensor], cells: torch.Tensor, m: torch.Tensor,
                             backend: str) -> list[torch.Tensor]:
    """Per part a: grad[b, :, cell] = sum_j m[cell][a*B + b, j] (row_j - row_0)[:, cell], m centered."""
    return kernels("cell_cross_gram", backend).backward(parts, cells, m)


@cell_cross_gram_backward.register_fake
def _cell_cross_gram_backward_fake(parts, cells, m, backend):
    return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in parts]


def _in_place(parts, backend):
    """Whether ``backend`` has kernels that read these maps in place (else the stacked path).

    Triton inputs of more than TRITON_MAX_SAMPLES rows never get here: centered_cross_grams sends
    them to the reference.
    """
    return backend == "cpu" or (backend == "triton" and len(parts) <= TRITON_MAX_PARTS)


def _in_place_parts(parts):
    """The parts as the in-place kernels take them: one dtype, contiguous."""
    dtype = parts[0].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return [p.to(dtype).contiguous() for p in parts]


def _cells(parts, grid):
    return cell_table(parts[0].shape[2], parts[0].shape[3], tuple(grid), parts[0].device)


def _whole(layout, k):
    """One map, one cell: the map itself is the (1, B, features) input of the Gram kernel, no copy."""
    return k == 1 and layout.num_cells == 1


def _channel_blocks(layout, k, n, channels, like):
    if _whole(layout, k):
        return [(0, channels)]
    per_channel = layout.num_cells * k * n * layout.cell_h * layout.cell_w * like.element_size()
    step = max(1, BLOCK_BYTES.get(like.device.type, DEFAULT_BLOCK_BYTES) // per_channel)
    return [(c0, min(c0 + step, channels)) for c0 in range(0, channels, step)]


def _stacked_cells(parts, layout, c0, c1):
    """(cells, k*B, (c1 - c0) * cell positions): channel block [c0, c1) of every part, cut into cells."""
    n = parts[0].shape[0]
    if _whole(layout, len(parts)):
        return parts[0].reshape(1, n, -1).contiguous()
    cells = parts[0].new_empty((layout.num_cells, len(parts) * n, c1 - c0, layout.cell_h * layout.cell_w))
    for i, p in enumerate(parts):
        layout.to_cells(p[:, c0:c1], out=cells[:, i * n:(i + 1) * n])
    return cells.reshape(cells.shape[0], cells.shape[1], -1)


def _gram(stacked, backend):
    if backend == "reference":
        return reference.centered_gram(stacked.to(accumulation_dtype(stacked.dtype)))
    return centered_gram(stacked, backend)


def _gram_backward(stacked, m, backend):
    if backend == "reference":
        # M is centered (M 1 = 0), so M x = M (x - x_0); the shift keeps float32 accurate for large means.
        return m.to(stacked.dtype) @ (stacked - stacked[:, :1])
    return centered_gram_backward(stacked, m.to(accumulation_dtype(stacked.dtype)).contiguous(), backend)


def center_blocks(gram, k):
    """The (cells, k*B, k*B) Grams with each B x B block centered: what the in-place kernels' Grams become."""
    h = _block_centering(k, gram.shape[-1] // k, gram.dtype, gram.device)
    return h @ gram @ h


def gram_mixing(grad_gram, k):
    """M = H (dG + dG^T) H (block centering H): the rows' gradient is M (rows - row_0), from the gradient of the
    block-centered Grams (cells, k*B, k*B)."""
    h = _block_centering(k, grad_gram.shape[-1] // k, grad_gram.dtype, grad_gram.device)
    return h @ (grad_gram + grad_gram.transpose(1, 2)) @ h


def _cross_grams(parts, grid, backend):
    """The block-centered Grams of ``parts`` per cell, and the channel blocks they were read in."""
    k, n = len(parts), parts[0].shape[0]
    if _in_place(parts, backend):
        return center_blocks(cell_cross_gram(_in_place_parts(parts), _cells(parts, grid), backend), k), None
    layout = _layout(parts[0], grid)
    channels = parts[0].shape[1]
    blocks = _channel_blocks(layout, k, n, channels, parts[0])
    gram = None
    for c0, c1 in blocks:
        block = _gram(_stacked_cells(parts, layout, c0, c1), backend).double()
        gram = block if gram is None else gram + block
    return center_blocks(gram, k), blocks


class CrossGramFunction(torch.autograd.Function):
    """(cells, k*B, k*B) float64 block-centered Gram of the stacked cells of k maps."""

    @staticmethod
    def forward(ctx, grid_rows, grid_cols, backend, *parts):
        # The grid travels as plain ints and the layout is rebuilt in the backward:
        # torch.compile traces an autograd Function's arguments, and a layout object
        # does not survive that.
        gram, blocks = _cross_grams(parts, (grid_rows, grid_cols), backend)
        ctx.grid, ctx.backend, ctx.blocks = (grid_rows, grid_cols), backend, blocks
        ctx.save_for_backward(*parts)
        return gram

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gram):
        parts = ctx.saved_tensors
        layout, k, n = _layout(parts[0], ctx.grid), len(parts), parts[0].shape[0]
        m = gram_mixing(grad_gram, k)
        if _in_place(parts, ctx.backend):
            same = _in_place_parts(parts)
            m = m.to(accumulation_dtype(same[0].dtype)).contiguous()
            grads = cell_cross_gram_backward(same, _cells(same, ctx.grid), m, ctx.backend)
            grads = [g.to(p.dtype) if need else None for g, p, need in zip(grads, parts, ctx.needs_input_grad[3:])]
            return (None, None, None, *grads)
        if _whole(layout, k):
            return None, None, None, _gram_backward(_stacked_cells(parts, layout, 0, 0), m, ctx.backend).view(parts[0].shape)
        grads = [torch.empty_like(p) if need else None for p, need in zip(parts, ctx.needs_input_grad[3:])]
        for c0, c1 in ctx.blocks:
            stacked = _stacked_cells(parts, layout, c0, c1)
            grad = _gram_backward(stacked, m, ctx.backend).reshape(stacked.shape[0], k * n, c1 - c0, -1)
            for i, g in enumerate(grads):
                if g is not None:
                    layout.cells_into(grad[:, i * n:(i + 1) * n], g[:, c0:c1])
        return (None, None, None, *grads)


def centered_cross_grams(*parts, grid=None, backend=None):
    """Block-centered Grams of k maps (B, C, H, W) per grid cell: (cells, k*B, k*B), float64.

    Block (i, j) of cell c is (H a_i,c)(H a_j,c)^T over the cell's features,
    cells cut as torch.chunk cuts them (grid=None: one cell, the whole map).
    Differentiable in every part that requires grad.
    """
    for i, p in enumerate(parts):
        check_float_tensor(f"parts[{i}]", p)
        if p.dim() != 4 or p.shape != parts[0].shape:
            raise ValueError(f"parts must be 4-D maps of one shape, got {[tuple(q.shape) for q in parts]}")
    check_same_device(**{f"parts[{i}]": p for i, p in enumerate(parts)})
    return run_centered_cross_grams(parts, grid, resolve_backend(backend, *parts))


def run_centered_cross_grams(parts, grid, backend):
    """centered_cross_grams on checked parts and a resolved backend name (for callers that checked once)."""
    if backend == "triton" and len(parts) * parts[0].shape[0] > TRITON_MAX_SAMPLES:
        # More rows than a Triton Gram kernel holds (in place or stacked): the PyTorch path, same device.
        backend = "reference"
    grid = tuple(grid or (1, 1))
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in parts)):
        # No graph to record (the teacher's transients). Also, torch.compile
        # mis-binds an autograd Function's arguments under no_grad.
        return _cross_grams(parts, grid, backend)[0]
    return CrossGramFunction.apply(*grid, backend, *parts)


def combine_grams(grams, coefficients):
    """sum_ij c_i c_j K_ij: the (cells, B, B) centered Gram of the map sum_i c_i a_i.

    ``grams`` (cells, k*B, k*B) from centered_cross_grams; ``coefficients`` k
    scalars or 1-element tensors (differentiable: the gammas).
    """
    k = len(coefficients)
    n = grams.shape[-1] // k
    # One vector of coefficients, numbers filled in on the device (no host-to-device copy,
    # which would wait for the GPU), then a single contraction: a handful of launches.
    c = torch.cat([ci.reshape(1).to(grams.dtype) if isinstance(ci, torch.Tensor) else grams.new_full((1,), ci)
                   for ci in coefficients])
    weights = torch.outer(c, c).reshape(1, k, 1, k, 1)
    return (grams.reshape(grams.shape[0], k, n, k, n) * weights).sum((1, 3))
