// Per-cell 1x1 projections (see cskd_kernels/ops/cell_projection.py for the contract).
//
//   cell_projection_forward(x, weight, bias, cells, sizes) -> outs    outs[j][b, :, cell] = W_cell,j x[b, :, cell] + b_cell,j
//   cell_projection_backward(grads, weight, cells, channels) -> grad_x  grad_x[b, :, cell] = sum_j W_cell,j^T grads[j][b, :, cell]
//
// x (B, C, H, W) contiguous; weight (cells | 1, R, C) with R = the outputs'
// channels stacked, bias (cells | 1, R); cells the (cells, 4) int32 table
// (row0, height, col0, width) of torch.chunk's cells; outs / grads the
// contiguous (B, R_j, H, W) maps (from the output pool, output_pool.h). One task per (cell, group of
// images): the group's pixels of the cell are gathered once into a thread-local
// tile (C x images * positions, in L2), one product makes all R outputs, and
// they are scattered straight into the maps. The maps are read and written
// once, with no padded copy of the whole map, and every output pixel is
// written by exactly one task. Small cells take several images per task
// (group_images): the product packs the cell's R x C weights once per task and
// its micro tiles are 32 columns wide, so a task of one small cell (4 positions
// at the demo's 6x6 maps, 81 at CamVid's 45x45) spends its time packing and on
// padded columns rather than on arithmetic. The products run on
// cskd::blas::gemm (our AVX-512 kernel where MKL would run AVX2).
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cell_table.h"
#include "denormals.h"
#include "gemm.h"
#include "ops.h"
#include "output_pool.h"

namespace {

using cskd::Cell;
using cskd::for_each_cell_task;
using cskd::gather_images;
using cskd::group_images;
using cskd::largest_positions;
using cskd::read_cells;
using cskd::blas::gemm;
using cskd::blas::workspace;

// map[:, cell] of one image <- tile (channels x ld, the cell's positions at its first n columns)
// (+ bias per channel, if given).
template <typename scalar_t>
void scatter(const scalar_t* tile, int64_t ld, const scalar_t* bias, int64_t channels, int64_t hw, int64_t w,
             const Cell& cell, scalar_t* map) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* src = tile + c * ld;
    scalar_t* dst = map + c * hw + cell.row0 * w + cell.col0;
    const scalar_t add = bias ? bias[c] : scalar_t(0);
    for (int64_t i = 0; i < cell.height; ++i) {
      scalar_t* d = dst + i * w;
      const scalar_t* s = src + i * cell.width;
#pragma omp simd
      for (int64_t j = 0; j < cell.width; ++j) d[j] = s[j] + add;
    }
  }
}

void check_map(const torch::Tensor& t, const torch::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous() && t.size(0) == x.size(0) && t.size(2) == x.size(2) &&
                  t.size(3) == x.size(3) && t.scalar_type() == x.scalar_type() && t.device().is_cpu(),
              name, " must be a contiguous CPU map (B, channels, H, W) like x ", x.sizes(), ", got ", t.sizes());
}

// weight (cells | 1, R, C) contiguous in like's dtype, with C = like's channels and a cell count the table has.
void check_weight(const torch::Tensor& weight, const torch::Tensor& like, size_t cells) {
  TORCH_CHECK(weight.dim() == 3 && weight.is_contiguous() && weight.size(2) == like.size(1) &&
                  weight.scalar_type() == like.scalar_type(),
              "weight must be contiguous (cells | 1, R, C) in the maps' dtype, got ", weight.sizes());
  TORCH_CHECK(weight.size(0) == 1 || weight.size(0) == static_cast<int64_t>(cells), "weight has ", weight.size(0),
              " cells, the table ", cells);
}

// Every map (outputs, or their gradients) shaped like `like`, their channels stacking to weight's R rows.
void check_stacked_maps(const std::vector<torch::Tensor>& maps, const torch::Tensor& like,
                        const torch::Tensor& weight, const char* what) {
  int64_t rows = 0;
  for (const auto& m : maps) {
    check_map(m, like, what);
    rows += m.size(1);
  }
  TORCH_CHECK(rows == weight.size(1), what, ": ", rows, " channels in all, weight has ", weight.size(1), " rows");
}

// Row offsets of the maps in the stacked rows of weight.
std::vector<int64_t> row_starts(const std::vector<torch::Tensor>& maps) {
  std::vector<int64_t> starts{0};
  for (const auto& m : maps) starts.push_back(starts.back() + m.size(1));
  return starts;
}

template <typename scalar_t>
void forward_typed(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                   const std::vector<Cell>& cells, std::vector<torch::Tensor>& outs) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), hw = h * w;
  const int64_t rows = weight.size(1), num_cells = static_cast<int64_t>(cells.size());
  const bool shared = weight.size(0) == 1;
  const auto starts = row_starts(outs);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  std::vector<scalar_t*> out_ptrs;
  for (auto& o : outs) out_ptrs.push_back(o.data_ptr<scalar_t>());
  const int64_t largest = largest_positions(cells), group = group_images(b, largest);
  for_each_cell_task(b, group, num_cells, [&](int64_t first, int64_t images, int64_t k) {
    const Cell& cell = cells[k];
    const int64_t n = cell.positions(), ld = images * n;  // image i's positions at columns [i n, (i + 1) n)
    scalar_t* tile = workspace<scalar_t>((c + rows) * group * largest);
    scalar_t* y = tile + c * ld;
    gather_images(xp + first * c * hw, images, c, h, w, cell, tile, ld);
    const int64_t wk = shared ? 0 : k;
    gemm<scalar_t>(false, false, rows, ld, c, wp + wk * rows * c, c, tile, ld, y, ld);
    for (size_t j = 0; j < outs.size(); ++j) {
      const int64_t r0 = starts[j], r = starts[j + 1] - r0;
      for (int64_t i = 0; i < images; ++i)
        scatter(y + r0 * ld + i * n, ld, bp + wk * rows + r0, r, hw, w, cell, out_ptrs[j] + (first + i) * r * hw);
    }
  });
}

template <typename scalar_t>
void backward_typed(const std::vector<torch::Tensor>& grads, const torch::Tensor& weight,
                    const std::vector<Cell>& cells, torch::Tensor& grad_x) {
  const int64_t b = grad_x.size(0), c = grad_x.size(1), h = grad_x.size(2), w = grad_x.size(3), hw = h * w;
  const int64_t rows = weight.size(1), num_cells = static_cast<int64_t>(cells.size());
  const bool shared = weight.size(0) == 1;
  const auto starts = row_starts(grads);
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  std::vector<const scalar_t*> grad_ptrs;
  for (const auto& g : grads) grad_ptrs.push_back(g.data_ptr<scalar_t>());
  scalar_t* dxp = grad_x.data_ptr<scalar_t>();
  const int64_t largest = largest_positions(cells), group = group_images(b, largest);
  for_each_cell_task(b, group, num_cells, [&](int64_t first, int64_t images, int64_t k) {
    const Cell& cell = cells[k];
    const int64_t n = cell.positions(), ld = images * n;  // image i's positions at columns [i n, (i + 1) n)
    scalar_t* g = workspace<scalar_t>((c + rows) * group * largest);
    scalar_t* dx = g + rows * ld;
    for (size_t j = 0; j < grads.size(); ++j) {
      const int64_t r0 = starts[j], r = starts[j + 1] - r0;
      gather_images(grad_ptrs[j] + first * r * hw, images, r, h, w, cell, g + r0 * ld, ld);
    }
    // dx (C x ld) = W^T (C x R) g (R x ld); W stored R x C, so op(A) = W^T reads it transposed.
    gemm<scalar_t>(true, false, c, ld, rows, wp + (shared ? 0 : k) * rows * c, c, g, ld, dx, ld);
    for (int64_t i = 0; i < images; ++i)
      scatter<scalar_t>(dx + i * n, ld, nullptr, c, hw, w, cell, dxp + (first + i) * c * hw);
  });
}

}  // namespace

std::vector<torch::Tensor> cell_projection_forward(const torch::Tensor& x, const torch::Tensor& weight,
                                                   const torch::Tensor& bias, const torch::Tensor& cells,
                                                   const std::vector<int64_t>& sizes) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU (B, C, H, W) map");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  const auto table = read_cells(cells, x.size(2), x.size(3));
  check_weight(weight, x, table.size());
  TORCH_CHECK(bias.is_contiguous() && bias.dim() == 2 && bias.size(0) == weight.size(0) &&
                  bias.size(1) == weight.size(1) && bias.scalar_type() == x.scalar_type(),
              "bias must be contiguous (cells | 1, R) like weight");
  std::vector<torch::Tensor> outs;
  for (const int64_t size : sizes) {
    TORCH_CHECK(size > 0, "output sizes must be positive, got ", size);
    outs.push_back(cskd::empty_output({x.size(0), size, x.size(2), x.size(3)}, x.options()));
  }
  check_stacked_maps(outs, x, weight, "the outputs");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cell_projection_forward",
                             [&] { forward_typed<scalar_t>(x, weight, bias, table, outs); });
  return outs;
}

torch::Tensor cell_projection_backward(std::vector<torch::Tensor> grads, const torch::Tensor& weight,
                                       const torch::Tensor& cells, int64_t channels) {
  TORCH_CHECK(!grads.empty(), "cell_projection_backward needs the outputs' gradients");
  const auto& like = grads[0];
  TORCH_CHECK(like.dim() == 4 && like.device().is_cpu(), "the output gradients must be CPU (B, R_j, H, W) maps");
  auto grad_x = cskd::empty_output({like.size(0), channels, like.size(2), like.size(3)}, like.options());
  const auto table = read_cells(cells, like.size(2), like.size(3));
  check_weight(weight, grad_x, table.size());
  check_stacked_maps(grads, grad_x, weight, "the output gradients");
  AT_DISPATCH_FLOATING_TYPES(grad_x.scalar_type(), "cell_projection_backward",
                             [&] { backward_typed<scalar_t>(grads, weight, table, grad_x); });
  return grad_x;
}

void register_cell_projection(pybind11::module& m) {
  m.def("cell_projection_forward", cskd::denormals::flushing(&cell_projection_forward),
        "the maps outs[j][b, :, cell] = W_cell,j x[b, :, cell] + b_cell,j of the row blocks `sizes` of weight");
  m.def("cell_projection_backward", cskd::denormals::flushing(&cell_projection_backward),
        "grad_x[b, :, cell] = sum_j W_cell,j^T grads[j][b, :, cell], with `channels` channels");
}
