// The cell table every per-cell kernel takes: a (cells, 4) int32 tensor whose
// rows are (row start, height, column start, width) of torch.chunk's grid
// cells (cskd_kernels.ops.position_attention.cell_table), read once on the host;
// and the pieces the kernels that run one task per (cell, group of images) share.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// Positions in the largest cell of the table.
inline int64_t largest_positions(const std::vector<Cell>& cells) {
  int64_t largest = 0;
  for (const auto& cell : cells) largest = std::max(largest, cell.positions());
  return largest;
}

// Columns a task's product should have at least: above the micro tile's 32
// and enough to spread the packing of the cell's weights (R x C, packed once
// per task) over a few hundred columns. A cell of at least this many positions
// (Cityscapes' 13 x 26) runs one image per task, as before.
inline constexpr int64_t kTaskColumns = 256;

// Images per task: enough that a task's columns (images x the largest cell's positions) reach
// kTaskColumns, spread evenly over the groups (8 images in 2 groups of 4, not 5 + 3).
inline int64_t group_images(int64_t images, int64_t largest) {
  const int64_t wanted = std::clamp<int64_t>((kTaskColumns + largest - 1) / std::max<int64_t>(largest, 1), 1, images);
  const int64_t groups = (images + wanted - 1) / wanted;
  return (images + groups - 1) / groups;
}

// task(first image, images, cell index) for every cell and group of `group` images, one OpenMP task each.
template <typename Task>
void for_each_cell_task(int64_t images, int64_t group, int64_t num_cells, const Task& task) {
  const int64_t groups = (images + group - 1) / group;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < groups * num_cells; ++t) {
    const int64_t first = (t / num_cells) * group;
    task(first, std::min(group, images - first), t % num_cells);
  }
}

// The cell's pixels of one (channels, H, W) image into dst (channels x ld, row-major, a channel's
// positions row after row). Short rows a channel apart defeat the hardware prefetcher: the rows
// kAhead channels ahead are fetched while these are copied.
template <typename scalar_t>
void copy_cell(const scalar_t* image, int64_t channels, int64_t H, int64_t W, const Cell& cell, scalar_t* dst,
               int64_t ld) {
  constexpr int64_t kAhead = 2, kLine = 64 / sizeof(scalar_t);
  const int64_t hw = H * W;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t r = 0; r < cell.height; ++r) {
      const scalar_t* src = image + c * hw + (cell.row0 + r) * W + cell.col0;
      if (c + kAhead < channels) {
        for (int64_t j = 0; j < cell.width; j += kLine) __builtin_prefetch(src + kAhead * hw + j);
        __builtin_prefetch(src + kAhead * hw + cell.width - 1);
      }
      std::memcpy(dst + c * ld + r * cell.width, src, cell.width * sizeof(scalar_t));
    }
}

// The cell's pixels of `images` consecutive (channels, H, W) images from `first` into tile (channels x
// ld, row-major), image i's positions at columns [i n, (i + 1) n).
template <typename scalar_t>
void gather_images(const scalar_t* first, int64_t images, int64_t channels, int64_t H, int64_t W, const Cell& cell,
                   scalar_t* tile, int64_t ld) {
  for (int64_t i = 0; i < images; ++i)
    copy_cell(first + i * channels * H * W, channels, H, W, cell, tile + i * cell.positions(), ld);
}

}  // namespace cskd
