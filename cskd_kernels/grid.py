"""Grid cells exactly as torch.chunk cuts a feature map, and a padded cell layout for batched work.

torch.chunk(x, parts, dim) makes chunks of ceil(size / parts) elements, the
last one shorter, and fewer than ``parts`` chunks when that rounding leaves
nothing for the rest (e.g. 6 rows in 5 parts gives 3 chunks of 2).
"""

import math


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

    def _groups(self, sizes, step):
        """(first cell, cells, cell size) runs of equal-sized cells: the full ones, then a shorter last one."""
        full = len(sizes) if sizes[-1] == step else len(sizes) - 1
        runs = [(0, full, step)] if full else []
        return runs + ([(full, 1, sizes[-1])] if full < len(sizes) else [])

    def _run_views(self, x, cells):
        """Pairs (map view, cells view) of one shape, one per run of equal-sized cells (at most four).

        x (B, C, H, W), cells (cells, B, C, cell_h * cell_w): copying between
        the two views of a pair moves that run of cells in or out, padding left alone.
        """
        nr, nc, ch, cw = len(self.rows), len(self.cols), self.cell_h, self.cell_w
        grid_view = cells.unflatten(0, (nr, nc)).unflatten(-1, (ch, cw))  # (nr, nc, B, C, ch, cw)
        for r0, rn, rh in self._groups(self.rows, ch):
            for c0, cn, cwid in self._groups(self.cols, cw):
                src = x[:, :, r0 * ch: r0 * ch + rn * rh, c0 * cw: c0 * cw + cn * cwid]
                src = src.unflatten(2, (rn, rh)).unflatten(4, (cn, cwid)).permute(2, 4, 0, 1, 3, 5)
                yield src, grid_view[r0: r0 + rn, c0: c0 + cn, :, :, :rh, :cwid]

    def to_cells(self, x, out=None):
        """(cells, B, C, cell_h * cell_w): the cells of x (B, C, H, W), zero at the padded positions.

        ``out``, if given, is a (cells, B, C, cell_h * cell_w) view to fill.
        One strided copy per run of equal-sized cells, and only the padding
        strips of the shorter last row and column zeroed: no padded copy of
        the whole map.
        """
        b, c = x.shape[:2]
        if out is None:
            out = x.new_empty((self.num_cells, b, c, self.cell_h * self.cell_w))
        for map_view, cells_view in self._run_views(x, out):
            cells_view.copy_(map_view)
        grid_view = out.unflatten(0, (len(self.rows), len(self.cols))).unflatten(-1, (self.cell_h, self.cell_w))
        if self.rows[-1] < self.cell_h:
            grid_view[-1, :, :, :, self.rows[-1]:, :].zero_()
        if self.cols[-1] < self.cell_w:
            grid_view[:, -1, :, :, :, self.cols[-1]:].zero_()
        return out

    def cells_into(self, cells, out):
        """Write (cells, B, C, cell positions) back into the map ``out`` (B, C, H, W), padding dropped.

        The same run views as to_cells, copied the other way: one strided copy
        per run (from_cells's reshape would copy the whole padded grid first).
        """
        for map_view, cells_view in self._run_views(out, cells):
            map_view.copy_(cells_view)

    def from_cells(self, cells):
        nr, nc = len(self.rows), len(self.cols)
        _, b, c, _ = cells.shape
        x = cells.reshape(nr, nc, b, c, self.cell_h, self.cell_w).permute(2, 3, 0, 4, 1, 5)
        x = x.reshape(b, c, nr * self.cell_h, nc * self.cell_w)
        return x[:, :, : self.height, : self.width]
