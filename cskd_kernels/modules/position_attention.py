"""PositionAttention: DANet's position attention module (PAM) on the fused core (SPEC section 5).

    PAM(x) = gamma * position_attention(Wq x + bq, Wk x + bk, Wv x + bv) + x

with 1x1 projections C -> C/reduction (q, k) and C -> C (v) and a learnable
gamma (initial 0, so the module starts as the identity). projection:
"resample" draws fresh default-initialised projections on every call and, in
grid mode, for every cell, as the released CSKD code does (it builds new
Conv2d layers inside forward); "fixed" draws them once at construction
(buffers); "learned" makes them parameters.
"""

import torch
from torch import nn

from cskd_kernels._validation import check_float_tensor, check_temperature
from cskd_kernels.grid import CellLayout
from cskd_kernels.modules.cskd_loss import PROJECTIONS, PositionProjection
from cskd_kernels.ops.position_attention import position_attention


def _project_map(weight, bias, x):
    """One 1x1 projection shared by the whole map: weight (1, out, in), x (B, in, H, W)."""
    return torch.nn.functional.conv2d(x, weight[0][:, :, None, None], bias[0])


def _project_cells(weight, bias, cells):
    """A different 1x1 projection per cell: weight (G, out, in), cells (G, B, in, P) -> (G, B, out, P)."""
    return weight[:, None] @ cells + bias[:, None, :, None]


class PositionAttention(nn.Module):
    """gamma * softmax(Q^T K / T) V + x over the whole map or inside each torch.chunk grid cell."""

    def __init__(self, channels, *, temperature=1.0, grid=None, projection="resample", reduction=8, backend=None,
                 generator=None):
        super().__init__()
        if not (isinstance(reduction, int) and reduction >= 1):
            raise ValueError(f"reduction={reduction!r} must be a positive int")
        if not isinstance(channels, int) or channels < reduction:
            raise ValueError(f"channels={channels!r} must be an int >= reduction ({reduction})")
        temperature = check_temperature(temperature, "PositionAttention")
        if grid is not None and (len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid)):
            raise ValueError(f"grid={grid!r} must be None or two positive ints (rows, columns)")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection={projection!r} is not one of {PROJECTIONS}")
        self.channels, self.temperature, self.reduction = channels, temperature, reduction
        self.grid = None if grid is None else tuple(grid)
        self.backend, self.generator = backend, generator
        self.gamma = nn.Parameter(torch.zeros(1))
        self.projection = PositionProjection(channels, reduction, projection)

    def forward(self, x):
        check_float_tensor("x", x)
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, H, W) for channels={self.channels}, got {tuple(x.shape)}")
        q, k, v = self._project(x)
        attention = position_attention(q, k, v, temperature=self.temperature, grid=self.grid, backend=self.backend)
        return self.gamma.to(x.dtype) * attention + x

    def _project(self, x):
        per_cell = self.projection.mode == "resample" and self.grid is not None
        if not per_cell:
            wq, bq, wk, bk, wv, bv = self.projection.weights(1, self.generator, x)
            return tuple(_project_map(w, b, x) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        layout = CellLayout(x.shape[2], x.shape[3], self.grid)
        cells = layout.to_cells(x)
        wq, bq, wk, bk, wv, bv = self.projection.weights(layout.num_cells, self.generator, x)
        return tuple(layout.from_cells(_project_cells(w, b, cells)) for w, b in ((wq, bq), (wk, bk), (wv, bv)))

    def extra_repr(self):
        return (f"channels={self.channels}, temperature={self.temperature}, grid={self.grid}, "
                f"projection={self.projection.mode!r}, reduction={self.reduction}")
