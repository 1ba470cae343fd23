"""Per-cell 1x1 projections of a feature map (PAM's q, k, v with per-cell weights), one image at a time.

    out_j[b, :, cell] = W_cell,j x[b, :, cell] + b_cell,j        for each output j (q, k, v)

with the cells cut as torch.chunk cuts the map (CellLayout). CSKD's released
code draws fresh projections for every cell, so this is not one convolution.
The work runs image by image: only one image's padded cells are ever held,
the outputs are written straight into contiguous (B, out_j, H, W) maps, and
the backward saves just x and the weights (not the padded cells, nor the
weights expanded over the batch as a broadcast batched product would).
Plain PyTorch batched products: any device.
"""

import torch

from cskd_kernels.grid import CellLayout


def _image_cells(layout, x, index):
    """(cells, C, cell positions) of image ``index``, zero-padded to one cell size."""
    return layout.to_cells(x[index:index + 1])[:, 0]


class CellProjectionFunction(torch.autograd.Function):
    """Outputs (B, out_j, H, W) for the row blocks ``sizes`` of weight (cells|1, sum(sizes), C)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layout, sizes):
        b, _, h, w = x.shape
        outs = [x.new_empty((b, size, h, w)) for size in sizes]
        weight_cells = weight.expand(layout.num_cells, -1, -1)
        for i in range(b):
            y = torch.baddbmm(bias[:, :, None], weight_cells, _image_cells(layout, x, i))
            for out, part in zip(outs, y.split(sizes, dim=1)):
                layout.cells_into(part[:, None], out[i:i + 1])
        ctx.layout, ctx.sizes = layout, sizes
        ctx.save_for_backward(x, weight)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        layout, sizes = ctx.layout, ctx.sizes
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(x[:1, :1]).expand(x.shape[0], size, *x.shape[2:]) if g is None else g
                 for g, size in zip(grads, sizes)]
        grad_x = torch.empty_like(x) if need_x else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = weight.new_zeros(weight.shape[:2]) if need_bias else None
        shared = weight.shape[0] == 1 and layout.num_cells > 1
        weight_t = weight.transpose(1, 2).expand(layout.num_cells, -1, -1)
        for i in range(x.shape[0]):
            # Padded positions get zero gradient, so they add nothing to the weight gradients.
            g = x.new_empty((layout.num_cells, sum(sizes), layout.cell_h * layout.cell_w))
            for grad, part in zip(grads, g.split(sizes, dim=1)):
                layout.to_cells(grad[i:i + 1], out=part[:, None])
            if need_x:
                layout.cells_into(torch.bmm(weight_t, g)[:, None], grad_x[i:i + 1])
            if need_weight:
                dw = torch.bmm(g, _image_cells(layout, x, i).transpose(1, 2))
                grad_weight += dw.sum(0, keepdim=True) if shared else dw
            if need_bias:
                db = g.sum(-1)
                grad_bias += db.sum(0, keepdim=True) if shared else db
        return grad_x, grad_weight, grad_bias, None, None


def cell_projection(x, projections, grid=None):
    """Per-cell 1x1 projections of x (B, C, H, W): one (B, out_j, H, W) map per (weight, bias) pair.

    ``projections``: pairs (weight (cells|1, out_j, C), bias (cells|1, out_j)),
    a leading 1 meaning one projection shared by every cell. Cells as
    torch.chunk cuts the map (grid=None: one cell). Differentiable in x and
    every weight and bias.
    """
    layout = CellLayout(x.shape[2], x.shape[3], grid or (1, 1))
    for weight, bias in projections:
        if weight.dim() != 3 or weight.shape[0] not in (1, layout.num_cells) or weight.shape[2] != x.shape[1] \
                or bias.shape != weight.shape[:2]:
            raise ValueError(f"projection weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit "
                             f"x {tuple(x.shape)} with {layout.num_cells} cells")
    weight = torch.cat([w.to(x.dtype) for w, _ in projections], dim=1)
    bias = torch.cat([b.to(x.dtype) for _, b in projections], dim=1)
    sizes = [w.shape[1] for w, _ in projections]
    return CellProjectionFunction.apply(x, weight, bias, layout, sizes)
