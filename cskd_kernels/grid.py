"""Grid cells exactly as torch.chunk cuts a feature map, and a padded cell layout for batched work.

torch.chunk(x, parts, dim) makes chunks of ceil(size / parts) elements, the
last one shorter, and fewer than ``parts`` chunks when that rounding leaves
nothing for the rest (e.g. 6 rows in 5 parts gives 3 chunks of 2).
"""

import math

import torch.nn.functional as F


def chunk_sizes(size, parts):
    """The sizes of torch.chunk(range(size), parts)."""
    step = math.ceil(size / parts)
    count = math.ceil(size / step)
    return [step] * (count - 1) + [size - step * (count - 1)]


class CellLayout:
    """Cuts (B, C, H, W) maps into the grid's cells, padded to one cell size, and back.

    ``to_cells`` gives (cells, B, C, cell_h * cell_w) with zeros at the padded
    positions, so every cell is one slice of one tensor and the per-cell work
    runs as batched products. Zero padding leaves per-pixel operations and the
    centered Gram matrices of the cells unchanged: a padded position is the
    same constant (zero) for every sample.
    """

    def __init__(self, height, width, grid):
        self.height, self.width = height, width
        self.rows = chunk_sizes(height, grid[0])
        self.cols = chunk_sizes(width, grid[1])
        self.cell_h, self.cell_w = self.rows[0], self.cols[0]
        self.num_cells = len(self.rows) * len(self.cols)

    def to_cells(self, x):
        b, c, h, w = x.shape
        nr, nc = len(self.rows), len(self.cols)
        padded = F.pad(x, (0, nc * self.cell_w - w, 0, nr * self.cell_h - h))
        cells = padded.reshape(b, c, nr, self.cell_h, nc, self.cell_w).permute(2, 4, 0, 1, 3, 5)
        return cells.reshape(nr * nc, b, c, self.cell_h * self.cell_w)

    def from_cells(self, cells):
        nr, nc = len(self.rows), len(self.cols)
        _, b, c, _ = cells.shape
        x = cells.reshape(nr, nc, b, c, self.cell_h, self.cell_w).permute(2, 3, 0, 4, 1, 5)
        x = x.reshape(b, c, nr * self.cell_h, nc * self.cell_w)
        return x[:, :, : self.height, : self.width]
