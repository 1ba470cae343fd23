// The cell table every per-cell kernel takes: a (cells, 4) int32 tensor whose
// rows are (row start, height, column start, width) of torch.chunk's grid
// cells (cskd_kernels.ops.position_attention.cell_table), read once on the host.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace cskd {

struct Cell {
  int64_t row0, height, col0, width;
  int64_t positions() const { return height * width; }
};

// The table's cells, each checked to lie inside a height x width map.
inline std::vector<Cell> read_cells(const at::Tensor& cells, int64_t height, int64_t width) {
  TORCH_CHECK(cells.dim() == 2 && cells.size(1) == 4 && cells.scalar_type() == at::kInt && cells.device().is_cpu(),
              "cells must be a (cells, 4) int32 CPU tensor, got ", cells.sizes(), " ", cells.scalar_type());
  const at::Tensor table = cells.contiguous();
  const int32_t* t = table.data_ptr<int32_t>();
  std::vector<Cell> out;
  for (int64_t q = 0; q < table.size(0); ++q) {
    const Cell c{t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]};
    TORCH_CHECK(c.row0 >= 0 && c.height >= 0 && c.row0 + c.height <= height && c.col0 >= 0 && c.width >= 0 &&
                    c.col0 + c.width <= width,
                "cell ", q, " [", c.row0, ", ", c.height, ", ", c.col0, ", ", c.width, "] is outside the ", height,
                " x ", width, " map");
    out.push_back(c);
  }
  return out;
}

}  // namespace cskd
