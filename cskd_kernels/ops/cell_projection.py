"""Per-cell 1x1 projections of a feature map (PAM's q, k, v with per-cell weights), a few images at a time.

    out_j[b, :, cell] = W_cell,j x[b, :, cell] + b_cell,j        for each output j (q, k, v)

with the cells cut as torch.chunk cuts the map (CellLayout). CSKD's released
code draws fresh projections for every cell, so this is not one convolution.
The work runs in chunks of images (chunk_images: one image per chunk at the
released size on the CPU, the whole batch on a GPU, where launches cost more
than memory): only one chunk's padded cells are ever held, in buffers reused
from chunk to chunk (fresh large buffers cost page faults on the CPU), the
outputs are written straight into contiguous (B, out_j, H, W) maps, and the
backward saves just x and the weights (not the padded cells).

Two paths, the same contract:
- the fused backends, maps read and written once, no padding: "cpu" (the
  C++ extension, csrc/cell_projection.cpp: one task per (image, cell)
  gathers the cell's pixels in cache, one product, the outputs scattered into
  the maps) and "triton" (cskd_kernels/triton/cell_projection.py: one launch
  per pass for every image, cell and output, up to TRITON_MAX_OUTPUTS outputs).
  Weight and bias gradients (projection "learned") take the PyTorch path.
- otherwise: PyTorch batched products on padded cells, any device.
"""

import torch

from cskd_kernels._library import kernel_op
from cskd_kernels.backend import kernels, resolve_backend
from cskd_kernels.grid import CellLayout
from cskd_kernels.ops.position_attention import cell_table

# Bytes of padded cells one chunk may hold, per device type: the CPU keeps a
# chunk cache-sized, a GPU takes the whole batch in one launch per product.
CHUNK_BYTES = {"cpu": 16 * 2**20}
DEFAULT_CHUNK_BYTES = 2**30
# Outputs one launch of the Triton kernels writes (q, k, v: CSKD needs three).
TRITON_MAX_OUTPUTS = 3


def chunk_images(x, layout, channels):
    """Images per chunk: as many as fit the device's budget of padded (cells, channels) data, at least one."""
    per_image = layout.num_cells * channels * layout.cell_h * layout.cell_w * x.element_size()
    return max(1, min(x.shape[0], CHUNK_BYTES.get(x.device.type, DEFAULT_CHUNK_BYTES) // per_image))


def _chunks(batch, step):
    return [(i, min(i + step, batch)) for i in range(0, batch, step)]


class _Buffer:
    """One allocation reused by every chunk: contiguous tensors of any shape up to its size."""

    def __init__(self, like, shape):
        self.flat = like.new_empty(torch.Size(shape).numel())

    def take(self, *shape):
        return self.flat[:torch.Size(shape).numel()].view(shape)


def _batched(weight, layout, images):
    """(cells * images, rows, cols) view of weight (cells|1, rows, cols): one matrix per (cell, image)."""
    return weight.expand(layout.num_cells, -1, -1)[:, None].expand(-1, images, -1, -1).reshape(
        layout.num_cells * images, *weight.shape[1:])


@kernel_op("cell_projection_forward")
def cell_projection_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cells: torch.Tensor, sizes: list[int], backend: str
) -> list[torch.Tensor]:
    """The fused forward: the (B, size_j, H, W) maps of the row blocks ``sizes`` of weight."""
    return kernels("cell_projection", backend).forward(x, weight, bias, cells, list(sizes))


@cell_projection_forward.register_fake
def _cell_projection_forward_fake(x, weight, bias, cells, sizes, backend):
    return _output_maps(x, sizes)


@kernel_op("cell_projection_backward")
def cell_projection_backward(grads: list[torch.Tensor], weight: torch.Tensor, cells: torch.Tensor,
                             channels: int, backend: str) -> torch.Tensor:
    """The fused input gradient: (B, channels, H, W) from the outputs' gradients."""
    return kernels("cell_projection", backend).backward(grads, weight, cells, channels)


@cell_projection_backward.register_fake
def _cell_projection_backward_fake(grads, weight, cells, channels, backend):
    return _input_map(grads[0], channels)


def _output_maps(x, sizes):
    return [x.new_empty((x.shape[0], size, *x.shape[2:])) for size in sizes]


def _input_map(like, channels):
    return like.new_empty((like.shape[0], channels, *like.shape[2:]))


def _table(layout, grid, device):
    return cell_table(layout.height, layout.width, grid, device)


class CellProjectionFunction(torch.autograd.Function):
    """Outputs (B, out_j, H, W) for the row blocks ``sizes`` of weight (cells|1, sum(sizes), C)."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid_rows, grid_cols, sizes, fused):
        # The grid travels as plain ints (torch.compile traces the arguments); the layout is rebuilt.
        grid = (grid_rows, grid_cols)
        layout = CellLayout(x.shape[2], x.shape[3], grid)
        ctx.layout, ctx.grid, ctx.sizes, ctx.fused = layout, grid, sizes, fused
        ctx.save_for_backward(x, weight)
        if fused:
            return tuple(cell_projection_forward(x, weight.contiguous(), bias.contiguous(),
                                                 _table(layout, grid, x.device), list(sizes), fused))
        return tuple(_padded_forward(x, weight, bias, layout, sizes))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        layout, sizes = ctx.layout, ctx.sizes
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(x[:1, :1]).expand(x.shape[0], size, *x.shape[2:]) if g is None else g
                 for g, size in zip(grads, sizes)]
        grad_x = None
        if need_x and ctx.fused:
            grad_x = cell_projection_backward([g.contiguous() for g in grads], weight.contiguous(),
                                              _table(layout, ctx.grid, x.device), x.shape[1], ctx.fused)
            need_x = False
        grad_x_padded = grad_weight = grad_bias = None
        if need_x or need_weight or need_bias:  # what the C++ kernels did not already give
            grad_x_padded, grad_weight, grad_bias = _padded_backward(x, weight, grads, layout, sizes,
                                                                     need_x, need_weight, need_bias)
        return (grad_x if grad_x is not None else grad_x_padded), grad_weight, grad_bias, None, None, None, None


def _padded_forward(x, weight, bias, layout, sizes):
    """The PyTorch path: chunks of images cut into padded cells, one batched product per chunk."""
    b, c, h, w = x.shape
    outs = [x.new_empty((b, size, h, w)) for size in sizes]
    step = chunk_images(x, layout, c + weight.shape[1])
    positions, rows = layout.cell_h * layout.cell_w, weight.shape[1]
    cells_buffer = _Buffer(x, (layout.num_cells, step, c, positions))
    y_buffer = _Buffer(x, (layout.num_cells, step, rows, positions))
    for i0, i1 in _chunks(b, step):
        n = i1 - i0
        cells = layout.to_cells(x[i0:i1], out=cells_buffer.take(layout.num_cells, n, c, positions))
        y = y_buffer.take(layout.num_cells, n, rows, positions)
        torch.baddbmm(_batched(bias[:, :, None], layout, n), _batched(weight, layout, n),
                      cells.view(-1, c, positions), out=y.view(-1, rows, positions))
        for out, part in zip(outs, y.split(sizes, dim=2)):
            layout.cells_into(part, out[i0:i1])
    return outs


def _padded_backward(x, weight, grads, layout, sizes, need_x, need_weight, need_bias):
    """The PyTorch path's (grad_x, grad_weight, grad_bias), each None where not needed."""
    b, c = x.shape[:2]
    grad_x = torch.empty_like(x) if need_x else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_bias = weight.new_zeros(weight.shape[:2]) if need_bias else None
    shared = weight.shape[0] == 1 and layout.num_cells > 1
    positions = layout.cell_h * layout.cell_w
    step = chunk_images(x, layout, c + weight.shape[1])
    g_buffer = _Buffer(x, (layout.num_cells, step, sum(sizes), positions))
    cells_buffer = _Buffer(x, (layout.num_cells, step, c, positions)) if need_weight else None
    dx_buffer = _Buffer(x, (layout.num_cells, step, c, positions)) if need_x else None
    for i0, i1 in _chunks(b, step):
        n = i1 - i0
        # Padded positions get zero gradient, so they add nothing to the weight gradients.
        g = g_buffer.take(layout.num_cells, n, sum(sizes), positions)
        for grad, part in zip(grads, g.split(sizes, dim=2)):
            layout.to_cells(grad[i0:i1], out=part)
        g_rows = g.reshape(-1, sum(sizes), positions)
        if need_x:
            dx = dx_buffer.take(layout.num_cells, n, c, positions)
            torch.bmm(_batched(weight.transpose(1, 2), layout, n), g_rows, out=dx.view(-1, c, positions))
            layout.cells_into(dx, grad_x[i0:i1])
        if need_weight:
            cells = layout.to_cells(x[i0:i1], out=cells_buffer.take(layout.num_cells, n, c, positions))
            cells = cells.view(-1, c, positions)
            dw = torch.bmm(g_rows, cells.transpose(1, 2)).view(layout.num_cells, n, *weight.shape[1:]).sum(1)
            grad_weight += dw.sum(0, keepdim=True) if shared else dw
        if need_bias:
            db = g.sum((1, 3))
            grad_bias += db.sum(0, keepdim=True) if shared else db
    return grad_x, grad_weight, grad_bias


def cell_projection(x, projections, grid=None, backend=None):
    """Per-cell 1x1 projections of x (B, C, H, W): one (B, out_j, H, W) map per (weight, bias) pair.

    ``projections``: pairs (weight (cells|1, out_j, C), bias (cells|1, out_j)),
    a leading 1 meaning one projection shared by every cell. Cells as
    torch.chunk cuts the map (grid=None: one cell). Differentiable in x and
    every weight and bias. ``backend``: "cpu" runs the C++ kernels (float32 /
    float64 CPU tensors), "triton" the Triton kernels (up to TRITON_MAX_OUTPUTS
    pairs), anything else the PyTorch path; None picks as the ops do.
    """
    layout = CellLayout(x.shape[2], x.shape[3], grid or (1, 1))
    for weight, bias in projections:
        if weight.dim() != 3 or weight.shape[0] not in (1, layout.num_cells) or weight.shape[2] != x.shape[1] \
                or bias.shape != weight.shape[:2]:
            raise ValueError(f"projection weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit "
                             f"x {tuple(x.shape)} with {layout.num_cells} cells")
    return run_cell_projection(x, projections, grid, resolve_backend(backend, x))


def stacked_rows(parts, dtype):
    """torch.cat(parts, dim=1) in ``dtype``: a view, no copy, when the parts are adjacent row slices of one tensor.

    draw_projections draws its six parts as such slices of a stacked weight
    and bias; copying them (0.7 MiB per side at the demo's shape, 7 MiB at
    the released one) was the largest transient of a small step.
    """
    if torch.compiler.is_compiling() or not _adjacent_row_slices(parts, dtype):  # storage offsets do not trace
        return torch.cat([part.to(dtype) for part in parts], dim=1)
    first = parts[0]
    size = (first.shape[0], sum(part.shape[1] for part in parts), *first.shape[2:])
    return first._base.as_strided(size, first.stride(), first.storage_offset())


def _adjacent_row_slices(parts, dtype):
    """Whether parts are, in order, back-to-back slices along dim 1 of one tensor of dtype (none needing grad)."""
    first = parts[0]
    if first._base is None or first.dtype != dtype or any(part.requires_grad for part in parts):
        return False
    offset = first.storage_offset()
    for part in parts:
        other_dims = part.shape[:1] + part.shape[2:] == first.shape[:1] + first.shape[2:]
        same_layout = other_dims and part.stride() == first.stride()
        if part._base is not first._base or part.storage_offset() != offset or not same_layout:
            return False
        offset += part.shape[1] * part.stride(1)
    return True


def run_cell_projection(x, projections, grid, backend):
    """cell_projection on checked projections and a resolved backend name (for callers that checked once)."""
    weight = stacked_rows([w for w, _ in projections], x.dtype)
    bias = stacked_rows([b for _, b in projections], x.dtype)
    sizes = [w.shape[1] for w, _ in projections]
    fused = backend if backend == "cpu" or (backend == "triton" and len(sizes) <= TRITON_MAX_OUTPUTS) else ""
    if fused:
        x = x.contiguous()
    return CellProjectionFunction.apply(x, weight, bias, *(grid or (1, 1)), sizes, fused)


def run_cell_projection_input_grad(grads, weight, grid, channels, backend):
    """The input gradient of cell_projection alone: sum_j W_cell,j^T grads[j] per cell, (B, channels, H, W).

    ``weight`` is the projections' stacked (cells|1, sum R_j, channels); for
    autograd Functions of their own, which fold scales into the small weights
    rather than into map-sized gradients (modules/attention_mse.py).
    """
    like = grads[0]
    b, _, h, w = like.shape
    layout = CellLayout(h, w, grid or (1, 1))
    weight = weight.to(like.dtype)
    if backend == "cpu" or (backend == "triton" and len(grads) <= TRITON_MAX_OUTPUTS):
        return cell_projection_backward([g.contiguous() for g in grads], weight.contiguous(),
                                        _table(layout, grid or (1, 1), like.device), channels, backend)
    shape_only = like.new_empty(()).expand(b, channels, h, w)  # only its shape is read
    return _padded_backward(shape_only, weight, grads, layout, [g.shape[1] for g in grads], True, False, False)[0]


def run_cell_projection_weight_grads(x, weight, grads, grid, need_weight, need_bias):
    """(grad_weight, grad_bias) of cell_projection from its outputs' gradients (None where not needed).

    The PyTorch path's (padded cells), as CellProjectionFunction takes them; for autograd Functions of their own.
    """
    layout = CellLayout(x.shape[2], x.shape[3], grid or (1, 1))
    _, grad_weight, grad_bias = _padded_backward(x, weight, grads, layout, [g.shape[1] for g in grads], False,
                                                 need_weight, need_bias)
    return grad_weight, grad_bias
