// Position (spatial) self-attention, SPEC section 3: softmax(Q^T K / T) V,
// globally or inside each grid cell, without ever storing the N x N map.
//
// Layout: q, k (B, d, H, W), v (B, Cv, H, W), contiguous. A cell is a
// rectangle (row0, height, col0, width) of the map; global mode is the one
// cell covering it. Position i of a cell is pixel (row0 + i / width,
// col0 + i % width). When a cell spans the full width its positions are
// contiguous in memory and the tiles are strided views of the inputs;
// otherwise the cell is gathered once per task into thread-local buffers.
//
// Two paths, chosen per cell by its size:
// - Small cells (at most kSingleBlock positions, e.g. the 13 x 26 cells of
//   the released 5 x 5 grid): one task per (image, cell) does the whole cell.
//   Its n x n score block (<= 1 MiB) lives in a reused thread-local
//   workspace, never more than one cell per thread, so memory stays linear.
//   Forward: S = Q^T K, a one-pass softmax (the row max is known), O = V P^T,
//   normalised while it is scattered back. Backward: S and dP = dO^T V,
//   P = exp(S - lse) and dS row by row (a row stays in L1), then dV, dK, dQ
//   while P and dS are hot in L2. Delta = rowsum(dO * O) = sum_j P_ij dP_ij is taken from the
//   whole rows of P and dP, so O is not read. The task owns every position
//   of its cell, so dQ needs no per-thread copies.
// - Large cells (global mode): flash-attention tiles. Forward per (image,
//   cell, query block): online softmax over key blocks; the tile products run
//   on cskd::blas::gemm on cache-sized tiles. Saves the row
//   log-sum-exp. Backward per (image, cell, key block): recompute P from the
//   log-sum-exp, accumulate dK and dV for the key block (owned by the task, no
//   race) and dQ into per-thread buffers that are summed at the end. Memory is
//   linear in N: tiles of at most kBlock x kBlock plus the per-thread dQ.
//
// Four more entry points fuse the attention with the 1x1 projections around
// it, small cells only, one task per (cell, group of images) as in
// cell_projection.cpp (see cskd_kernels/ops/projected_position_attention.py):
// position_attention_projected_forward (a side without a gradient: q, k, v
// made in the task's workspace), position_attention_projected_gram (the same
// with every image of a cell in one task, ending in the cell's cross-Gram of
// (O, x) instead of O), position_attention_adapted_forward and
// position_attention_adapted_backward (the MSE variants' student PAM through
// a widening adapter, _AdaptedPositionMSE).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cell_table.h"
#include "denormals.h"
#include "gemm.h"
#include "ops.h"
#include "output_pool.h"
#include "segment_gram.h"
#include "simd_exp.h"

namespace {

using cskd::Cell;
using cskd::empty_output;
using cskd::gather_images;
using cskd::read_cells;
using cskd::blas::gemm;
using cskd::blas::workspace;

constexpr int64_t kBlock = 256;  // tile edge: a 256 x 256 float tile is 256 KiB, L2-resident

// ---------------------------------------------------------------------------
// The softmax rows. One exp per score (N^2 per image): a scalar libm exp makes
// the kernel exp-bound, so float rows run the polynomial exp of simd_exp.h
// (relative error ~1.2e-7, float rounding level) on AVX-512 or AVX2/FMA,
// chosen at run time; GCC does not vectorise std::exp without -ffast-math.
// The small-cell path's two row functions have AVX-512 bodies (16 lanes, masked
// tails); the tiled path's backward row keeps AVX2.
// ---------------------------------------------------------------------------

#ifdef CSKD_X86_SIMD

using cskd::simd::exp256;
using cskd::simd::exp512;
using cskd::simd::horizontal_max;
using cskd::simd::horizontal_sum;

CSKD_AVX2 float online_softmax_row_avx2(float* s, int64_t n, float scale, float& m) {
  const int64_t n8 = n & ~int64_t(7);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n8; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  float row_max = horizontal_max(vmax);
  for (int64_t j = n8; j < n; ++j) row_max = std::max(row_max, s[j]);
  const float m_new = std::max(m, row_max * scale);
  const __m256 vscale = _mm256_set1_ps(scale), vm = _mm256_set1_ps(m_new);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 p = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vscale, vm));
    _mm256_storeu_ps(s + j, p);
    vsum = _mm256_add_ps(vsum, p);
  }
  float sum = horizontal_sum(vsum);
  for (int64_t j = n8; j < n; ++j) {
    s[j] = std::exp(s[j] * scale - m_new);
    sum += s[j];
  }
  m = m_new;
  return sum;
}

CSKD_AVX2 void softmax_grad_row_avx2(const float* s, float* p_out, float* dp, int64_t n, float scale, float lse,
                                     float delta) {
  const int64_t n8 = n & ~int64_t(7);
  const __m256 vscale = _mm256_set1_ps(scale), vlse = _mm256_set1_ps(lse), vdelta = _mm256_set1_ps(delta);
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 p = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vscale, vlse));
    _mm256_storeu_ps(p_out + j, p);
    const __m256 ds = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), vdelta)), vscale);
    _mm256_storeu_ps(dp + j, ds);
  }
  for (int64_t j = n8; j < n; ++j) {
    p_out[j] = std::exp(s[j] * scale - lse);
    dp[j] = p_out[j] * (dp[j] - delta) * scale;
  }
}

// A whole row of P and dP in L1. p <- exp(s * scale - lse) in place, renormalised
// to sum 1: the rounding of lse (~|lse| ulp, large for peaked rows) is a common
// factor of the row, and it cancels from P and from Delta = sum_j p dp (equal to
// rowsum(dO * O), without reading O). Then ds <- p * (dp - Delta) * scale.
CSKD_AVX2 void softmax_grad_full_row_avx2(float* s, float* dp, int64_t n, float scale, float lse) {
  const int64_t n8 = n & ~int64_t(7);
  const __m256 vscale = _mm256_set1_ps(scale), vlse = _mm256_set1_ps(lse);
  __m256 vsum = _mm256_setzero_ps(), vdot = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 p = exp256(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vscale, vlse));
    _mm256_storeu_ps(s + j, p);
    vsum = _mm256_add_ps(vsum, p);
    vdot = _mm256_fmadd_ps(p, _mm256_loadu_ps(dp + j), vdot);
  }
  float sum = horizontal_sum(vsum), dot = horizontal_sum(vdot);
  for (int64_t j = n8; j < n; ++j) {
    s[j] = std::exp(s[j] * scale - lse);
    sum += s[j];
    dot += s[j] * dp[j];
  }
  const float inv = 1.0f / sum, delta = dot * inv;
  const __m256 vinv = _mm256_set1_ps(inv), vdelta = _mm256_set1_ps(delta);
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(s + j), vinv);
    _mm256_storeu_ps(s + j, p);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), vdelta)), vscale));
  }
  for (int64_t j = n8; j < n; ++j) {
    s[j] *= inv;
    dp[j] = s[j] * (dp[j] - delta) * scale;
  }
}

// AVX-512 bodies of online_softmax_row_avx2 and softmax_grad_full_row_avx2.
CSKD_AVX512 float online_softmax_row_avx512(float* s, int64_t n, float scale, float& m) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = minus_inf;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = j + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(minus_inf, lanes, s + j));
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(vmax) * scale);
  const __m512 vscale = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m_new);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = j + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 p = exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, s + j), vscale, vm));
    _mm512_mask_storeu_ps(s + j, lanes, p);
    vsum = _mm512_mask_add_ps(vsum, lanes, vsum, p);
  }
  m = m_new;
  return _mm512_reduce_add_ps(vsum);
}

CSKD_AVX512 void softmax_grad_full_row_avx512(float* s, float* dp, int64_t n, float scale, float lse) {
  const __m512 vscale = _mm512_set1_ps(scale), vlse = _mm512_set1_ps(lse);
  __m512 vsum = _mm512_setzero_ps(), vdot = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = j + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 p = exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, s + j), vscale, vlse));
    _mm512_mask_storeu_ps(s + j, lanes, p);
    vsum = _mm512_mask_add_ps(vsum, lanes, vsum, p);
    vdot = _mm512_mask3_fmadd_ps(p, _mm512_maskz_loadu_ps(lanes, dp + j), vdot, lanes);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(vsum), delta = _mm512_reduce_add_ps(vdot) * inv;
  const __m512 vinv = _mm512_set1_ps(inv), vdelta = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = j + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, s + j), vinv);
    _mm512_mask_storeu_ps(s + j, lanes, p);
    const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, dp + j), vdelta)), vscale);
    _mm512_mask_storeu_ps(dp + j, lanes, ds);
  }
}
#endif

// One key block of the online softmax for a row of scores, in place:
// s <- exp(s * scale - m_new); returns the row sum; m is updated.
template <typename scalar_t>
scalar_t online_softmax_row_portable(scalar_t* s, int64_t n, scalar_t scale, scalar_t& m) {
  scalar_t row_max = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t j = 0; j < n; ++j) row_max = std::max(row_max, s[j]);
  const scalar_t m_new = std::max(m, row_max * scale);
  scalar_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] * scale - m_new);
    sum += s[j];
  }
  m = m_new;
  return sum;
}

// Backward, one row of a tile: p <- exp(s * scale - lse), ds <- p * (dp - delta) * scale (overwrites dp).
template <typename scalar_t>
void softmax_grad_row_portable(const scalar_t* s, scalar_t* p_out, scalar_t* dp, int64_t n, scalar_t scale,
                               scalar_t lse, scalar_t delta) {
  for (int64_t j = 0; j < n; ++j) {
    p_out[j] = std::exp(s[j] * scale - lse);
    dp[j] = p_out[j] * (dp[j] - delta) * scale;
  }
}

template <typename scalar_t>
void softmax_grad_full_row_portable(scalar_t* s, scalar_t* dp, int64_t n, scalar_t scale, scalar_t lse) {
  scalar_t sum = 0, dot = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] * scale - lse);
    sum += s[j];
    dot += s[j] * dp[j];
  }
  const scalar_t inv = scalar_t(1) / sum, delta = dot * inv;
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= inv;
    dp[j] = s[j] * (dp[j] - delta) * scale;
  }
}

void softmax_grad_full_row(float* s, float* dp, int64_t n, float scale, float lse) {
#ifdef CSKD_X86_SIMD
  if (cskd::cpu::has_avx512f()) return softmax_grad_full_row_avx512(s, dp, n, scale, lse);
  if (cskd::cpu::has_avx2_fma()) return softmax_grad_full_row_avx2(s, dp, n, scale, lse);
#endif
  softmax_grad_full_row_portable(s, dp, n, scale, lse);
}

void softmax_grad_full_row(double* s, double* dp, int64_t n, double scale, double lse) {
  softmax_grad_full_row_portable(s, dp, n, scale, lse);
}

float online_softmax_row(float* s, int64_t n, float scale, float& m) {
#ifdef CSKD_X86_SIMD
  if (cskd::cpu::has_avx512f()) return online_softmax_row_avx512(s, n, scale, m);
  if (cskd::cpu::has_avx2_fma()) return online_softmax_row_avx2(s, n, scale, m);
#endif
  return online_softmax_row_portable(s, n, scale, m);
}

double online_softmax_row(double* s, int64_t n, double scale, double& m) {
  return online_softmax_row_portable(s, n, scale, m);
}

void softmax_grad_row(const float* s, float* p_out, float* dp, int64_t n, float scale, float lse, float delta) {
#ifdef CSKD_X86_SIMD
  if (cskd::cpu::has_avx2_fma()) return softmax_grad_row_avx2(s, p_out, dp, n, scale, lse, delta);
#endif
  softmax_grad_row_portable(s, p_out, dp, n, scale, lse, delta);
}

void softmax_grad_row(const double* s, double* p_out, double* dp, int64_t n, double scale, double lse, double delta) {
  softmax_grad_row_portable(s, p_out, dp, n, scale, lse, delta);
}

// ---------------------------------------------------------------------------
// Cells and tiles
// ---------------------------------------------------------------------------

// Near-equal blocks of at most kBlock positions (600 -> 200 x 3, not 256 + 256 + 88). A
// cell of up to kSingleBlock positions (a 13 x 26 grid cell is 338) is one block: its
// score tile still fits in L2, and the cell is then gathered, and its softmax
// normalised, once instead of once per block.
constexpr int64_t kSingleBlock = 512;

struct Blocking {
  int64_t count, size;
  Blocking(int64_t n)
      : count(n <= kSingleBlock ? 1 : (n + kBlock - 1) / kBlock), size((n + count - 1) / count) {}
  int64_t begin(int64_t i) const { return i * size; }
  int64_t length(int64_t i, int64_t n) const { return std::min(size, n - i * size); }
};

// A (channels x cell positions) matrix: element (c, i) at ptr[c * ld + i].
// Points into the input when the cell's positions are contiguous, else into
// a gathered copy owned by `storage`.
template <typename scalar_t>
struct CellMatrix {
  scalar_t* ptr;
  int64_t ld;
  std::vector<scalar_t> storage;

  CellMatrix(const scalar_t* image, int64_t channels, int64_t H, int64_t W, const Cell& cell) {
    const int64_t hw = H * W;
    if (cell.width == W) {
      ptr = const_cast<scalar_t*>(image) + cell.row0 * W;
      ld = hw;
      return;
    }
    const int64_t n = cell.positions();
    storage.resize(channels * n);
    cskd::copy_cell(image, channels, H, W, cell, storage.data(), n);
    ptr = storage.data();
    ld = n;
  }
};

// Per-position vector (the log-sum-exp, Delta) of one image restricted to a cell.
template <typename acc_t>
std::vector<acc_t> gather_positions(const acc_t* image, int64_t W, const Cell& cell) {
  std::vector<acc_t> out(cell.positions());
  for (int64_t r = 0; r < cell.height; ++r)
    std::memcpy(&out[r * cell.width], image + (cell.row0 + r) * W + cell.col0, cell.width * sizeof(acc_t));
  return out;
}

inline int64_t pixel(const Cell& cell, int64_t W, int64_t i) {
  return (cell.row0 + i / cell.width) * W + cell.col0 + i % cell.width;
}

// ---------------------------------------------------------------------------
// Small cells: the whole cell in one task (see the header comment)
// ---------------------------------------------------------------------------

// Hands out 64-byte-aligned pieces of one workspace.
template <typename scalar_t>
struct Carver {
  static constexpr int64_t kAlign = 64 / sizeof(scalar_t);
  static int64_t round_up(int64_t count) { return (count + kAlign - 1) / kAlign * kAlign; }
  std::vector<int64_t> sizes;
  int64_t add(int64_t count) {
    sizes.push_back(round_up(count));
    return sizes.size() - 1;
  }
  std::vector<scalar_t*> carve() const {
    int64_t total = kAlign;
    for (int64_t s : sizes) total += s;
    scalar_t* base = workspace<scalar_t>(total);
    base += (kAlign - (reinterpret_cast<uintptr_t>(base) / sizeof(scalar_t)) % kAlign) % kAlign;
    std::vector<scalar_t*> out;
    for (int64_t s : sizes) {
      out.push_back(base);
      base += s;
    }
    return out;
  }
};

// A (channels x n) matrix of one cell, element (c, i) at ptr[c * ld + i]:
// the image itself when the cell spans the full width (its positions are then
// contiguous), else the buffer.
template <typename scalar_t>
struct CellBlock {
  scalar_t* ptr;
  int64_t ld;
};

template <typename scalar_t>
CellBlock<scalar_t> cell_output(scalar_t* image, int64_t H, int64_t W, const Cell& cell, scalar_t* buffer) {
  if (cell.width == W) return {image + cell.row0 * W, H * W};
  return {buffer, cell.positions()};
}

// The cell of a (channels, H, W) image as a block: a view, or gathered row by row.
template <typename scalar_t>
CellBlock<scalar_t> load_cell(const scalar_t* image, int64_t channels, int64_t H, int64_t W, const Cell& cell,
                              scalar_t* buffer) {
  const CellBlock<scalar_t> block = cell_output(const_cast<scalar_t*>(image), H, W, cell, buffer);
  if (block.ptr != buffer) return block;
  cskd::copy_cell(image, channels, H, W, cell, buffer, cell.positions());
  return block;
}

// Writes a block back to the cell's pixels (a no-op for a view), times
// col_scale[i] for position i when col_scale is given.
template <typename scalar_t>
void store_cell(const CellBlock<scalar_t>& block, scalar_t* image, int64_t channels, int64_t H, int64_t W,
                const Cell& cell, const scalar_t* col_scale = nullptr) {
  const int64_t hw = H * W;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t r = 0; r < cell.height; ++r) {
      scalar_t* dst = image + c * hw + (cell.row0 + r) * W + cell.col0;
      const scalar_t* src = block.ptr + c * block.ld + r * cell.width;
      if (col_scale != nullptr) {
        const scalar_t* s = col_scale + r * cell.width;
#pragma omp simd
        for (int64_t j = 0; j < cell.width; ++j) dst[j] = src[j] * s[j];
      } else if (dst != src) {
        std::memcpy(dst, src, cell.width * sizeof(scalar_t));
      }
    }
}

template <typename scalar_t>
void forward_cell(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out, scalar_t* lse, int64_t d,
                  int64_t cv, int64_t H, int64_t W, const Cell& cell, scalar_t scale) {
  const int64_t n = cell.positions(), lds = Carver<scalar_t>::round_up(n);
  Carver<scalar_t> carver;
  const int64_t iS = carver.add(n * lds), iQ = carver.add(d * n), iK = carver.add(d * n), iV = carver.add(cv * n),
                iO = carver.add(cv * n), iInv = carver.add(n), iLse = carver.add(n);
  const std::vector<scalar_t*> ws = carver.carve();
  scalar_t* s = ws[iS];
  scalar_t* inv = ws[iInv];
  const CellBlock<scalar_t> Q = load_cell(q, d, H, W, cell, ws[iQ]), K = load_cell(k, d, H, W, cell, ws[iK]),
                            V = load_cell(v, cv, H, W, cell, ws[iV]);
  gemm<scalar_t>(true, false, n, n, d, Q.ptr, Q.ld, K.ptr, K.ld, s, lds);
  for (int64_t i = 0; i < n; ++i) {
    scalar_t m = -std::numeric_limits<scalar_t>::infinity();
    const scalar_t sum = online_softmax_row(s + i * lds, n, scale, m);  // one block: plain softmax numerators
    inv[i] = scalar_t(1) / sum;
    ws[iLse][i] = m + std::log(sum);
  }
  // O = V P^T with unnormalised P; the 1 / rowsum is applied on the way out.
  const CellBlock<scalar_t> O = cell_output(out, H, W, cell, ws[iO]);
  gemm<scalar_t>(false, true, cv, n, n, V.ptr, V.ld, s, lds, O.ptr, O.ld);
  store_cell(O, out, cv, H, W, cell, inv);
  store_cell(CellBlock<scalar_t>{ws[iLse], n}, lse, 1, H, W, cell);
}

template <typename scalar_t>
void backward_cell(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* dout, const scalar_t* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv, int64_t d,
                   int64_t cv, int64_t H, int64_t W, const Cell& cell, scalar_t scale) {
  const int64_t n = cell.positions(), lds = Carver<scalar_t>::round_up(n);
  Carver<scalar_t> carver;
  const int64_t iS = carver.add(n * lds), iDS = carver.add(n * lds), iQ = carver.add(d * n), iK = carver.add(d * n),
                iV = carver.add(cv * n), iDO = carver.add(cv * n), iDV = carver.add(cv * n), iDK = carver.add(d * n),
                iDQ = carver.add(d * n), iLse = carver.add(n);
  const std::vector<scalar_t*> ws = carver.carve();
  scalar_t* s = ws[iS];    // S, then P in place
  scalar_t* ds = ws[iDS];  // dP, then dS in place
  const CellBlock<scalar_t> Q = load_cell(q, d, H, W, cell, ws[iQ]), K = load_cell(k, d, H, W, cell, ws[iK]),
                            V = load_cell(v, cv, H, W, cell, ws[iV]), dO = load_cell(dout, cv, H, W, cell, ws[iDO]),
                            L = load_cell(lse, 1, H, W, cell, ws[iLse]);
  gemm<scalar_t>(true, false, n, n, d, Q.ptr, Q.ld, K.ptr, K.ld, s, lds);
  gemm<scalar_t>(true, false, n, n, cv, dO.ptr, dO.ld, V.ptr, V.ld, ds, lds);
  for (int64_t i = 0; i < n; ++i)
    softmax_grad_full_row(s + i * lds, ds + i * lds, n, scale, L.ptr[i]);
  const CellBlock<scalar_t> dV = cell_output(dv, H, W, cell, ws[iDV]), dK = cell_output(dk, H, W, cell, ws[iDK]),
                            dQ = cell_output(dq, H, W, cell, ws[iDQ]);
  gemm<scalar_t>(false, false, cv, n, n, dO.ptr, dO.ld, s, lds, dV.ptr, dV.ld);  // dV = dO P
  gemm<scalar_t>(false, false, d, n, n, Q.ptr, Q.ld, ds, lds, dK.ptr, dK.ld);    // dK = Q dS
  gemm<scalar_t>(false, true, d, n, n, K.ptr, K.ld, ds, lds, dQ.ptr, dQ.ld);     // dQ = K dS^T
  store_cell(dV, dv, cv, H, W, cell);
  store_cell(dK, dk, d, H, W, cell);
  store_cell(dQ, dq, d, H, W, cell);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename scalar_t>
void forward_tile(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out, scalar_t* lse,
                  int64_t d, int64_t cv, int64_t H, int64_t W, const Cell& cell, int64_t q0, int64_t nq,
                  scalar_t scale, const at::TensorOptions& options) {
  const int64_t n = cell.positions();
  const CellMatrix<scalar_t> Q(q, d, H, W, cell), K(k, d, H, W, cell), V(v, cv, H, W, cell);
  const Blocking keys(n);
  at::Tensor scores = at::empty({nq, keys.size}, options);
  at::Tensor acc = at::zeros({cv, nq}, options);  // output tile, transposed to the (Cv, N) layout
  std::vector<scalar_t> m(nq, -std::numeric_limits<scalar_t>::infinity()), l(nq, 0), alpha(nq);
  scalar_t* s = scores.data_ptr<scalar_t>();
  scalar_t* a = acc.data_ptr<scalar_t>();
  const int64_t ld = scores.stride(0);
  for (int64_t kb = 0; kb < keys.count; ++kb) {
    const int64_t k0 = keys.begin(kb), nk = keys.length(kb, n);
    gemm<scalar_t>(true, false, nq, nk, d, Q.ptr + q0, Q.ld, K.ptr + k0, K.ld, s, ld);  // S = Q^T K
    for (int64_t i = 0; i < nq; ++i) {
      const scalar_t m_old = m[i];
      const scalar_t row_sum = online_softmax_row(s + i * ld, nk, scale, m[i]);
      alpha[i] = std::exp(m_old - m[i]);  // 0 on the first block (m_old = -inf)
      l[i] = l[i] * alpha[i] + row_sum;
    }
    if (kb > 0) {
      for (int64_t c = 0; c < cv; ++c) {
        scalar_t* row = a + c * nq;
#pragma omp simd
        for (int64_t i = 0; i < nq; ++i) row[i] *= alpha[i];
      }
    }
    gemm<scalar_t>(false, true, cv, nq, nk, V.ptr + k0, V.ld, s, ld, a, nq, a, nq);  // acc += V P^T
  }
  const int64_t hw = H * W;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t p = pixel(cell, W, q0 + i);
    const scalar_t inv = scalar_t(1) / l[i];
    for (int64_t c = 0; c < cv; ++c) out[c * hw + p] = a[c * nq + i] * inv;
    lse[p] = m[i] + std::log(l[i]);
  }
}

// One unit of work: an image, a cell and a block [start, start + length) of its positions.
struct Task {
  int64_t b, cell, start, length;
};

template <typename scalar_t>
void run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                 const std::vector<Cell>& cells, const std::vector<Task>& tasks, double scale) {
  const int64_t d = q.size(1), H = q.size(2), W = q.size(3), cv = v.size(1), hw = H * W;
  const auto options = q.options();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* lp = lse.data_ptr<scalar_t>();
  const int64_t ntasks = tasks.size();
  // torch.set_num_threads governs this op too (the extension's OpenMP runtime may not be torch's)
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t t = 0; t < ntasks; ++t) {
    const Task& task = tasks[t];
    const Cell& cell = cells[task.cell];
    if (cell.positions() <= kSingleBlock) {
      forward_cell<scalar_t>(qp + task.b * d * hw, kp + task.b * d * hw, vp + task.b * cv * hw,
                             op + task.b * cv * hw, lp + task.b * hw, d, cv, H, W, cell, static_cast<scalar_t>(scale));
      continue;
    }
    forward_tile<scalar_t>(qp + task.b * d * hw, kp + task.b * d * hw, vp + task.b * cv * hw, op + task.b * cv * hw,
                           lp + task.b * hw, d, cv, H, W, cells[task.cell], task.start, task.length,
                           static_cast<scalar_t>(scale), options);
  }
}

std::vector<at::Tensor> position_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, const at::Tensor& cells_in,
                                                   double scale) {
  TORCH_CHECK(q_in.device().is_cpu(), "position_attention_forward: CPU tensors only");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), H = q.size(2), W = q.size(3);
  const std::vector<Cell> cells = read_cells(cells_in, H, W);
  at::Tensor out = empty_output(v.sizes(), v.options());
  at::Tensor lse = at::empty({B, H, W}, q.options());

  // Tasks: (image, cell, query block), flattened so OpenMP balances them.
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < static_cast<int64_t>(cells.size()); ++c) {
      const Blocking queries(cells[c].positions());
      for (int64_t qb = 0; qb < queries.count; ++qb)
        tasks.push_back({b, c, queries.begin(qb), queries.length(qb, cells[c].positions())});
    }

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "position_attention_forward", [&] {
    run_forward<scalar_t>(q, k, v, out, lse, cells, tasks, scale);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Forward of x's own projections, for a side that takes no gradient
// ---------------------------------------------------------------------------

// Y (2d + cv rows, ldy) = [Q; K; V] = W X + b for the columns of x_tile (C x cols, row stride ld_x): one
// product for a group of images, the bias its addend.
template <typename scalar_t>
void project_columns(const scalar_t* x_tile, int64_t ld_x, int64_t cols, const scalar_t* weight,
                     const scalar_t* bias, int64_t rows, int64_t channels, scalar_t* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) std::fill_n(y + r * ldy, cols, bias[r]);
  gemm<scalar_t>(false, false, rows, cols, channels, weight, channels, x_tile, ld_x, y, ldy, y, ldy);
}

// m[c * ld + j] *= scale[j] for c < rows, j < n: the softmax's normalisation of an unnormalised product.
template <typename scalar_t>
void scale_columns(scalar_t* m, int64_t ld, int64_t rows, int64_t n, const scalar_t* scale) {
  for (int64_t c = 0; c < rows; ++c) {
    scalar_t* row = m + c * ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= scale[j];
  }
}

// O (cv x n at o, row stride ldo) = V P^T unnormalised for one image's q = Y's columns (Q; K; V rows of
// stride ldy), inv[j] = 1 / the row sum of P's numerators (the caller normalises O's columns by it),
// and the rows' log-sum-exp into lse unless it is null.
template <typename scalar_t>
void attend_projection(const scalar_t* q, int64_t ldy, int64_t n, int64_t d, int64_t cv, scalar_t scale, scalar_t* s,
                       int64_t lds, scalar_t* inv, scalar_t* o, int64_t ldo, scalar_t* lse = nullptr) {
  gemm<scalar_t>(true, false, n, n, d, q, ldy, q + d * ldy, ldy, s, lds);  // S = Q^T K
  for (int64_t j = 0; j < n; ++j) {
    scalar_t m = -std::numeric_limits<scalar_t>::infinity();
    const scalar_t sum = online_softmax_row(s + j * lds, n, scale, m);
    inv[j] = scalar_t(1) / sum;
    if (lse != nullptr) lse[j] = m + std::log(sum);
  }
  gemm<scalar_t>(false, true, cv, n, n, q + 2 * d * ldy, ldy, s, lds, o, ldo);
}

// One task: a cell of a group of images. Y = W X + b for the group, then per image the small-cell
// forward of forward_cell on Y's columns.
template <typename scalar_t>
void projected_forward_task(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, scalar_t* out,
                            int64_t images, int64_t channels, int64_t d, int64_t cv, int64_t H, int64_t W,
                            const Cell& cell, scalar_t scale) {
  const int64_t n = cell.positions(), lds = Carver<scalar_t>::round_up(n), cols = images * n, rows = 2 * d + cv;
  const int64_t hw = H * W;
  Carver<scalar_t> carver;
  const int64_t iS = carver.add(n * lds), iX = carver.add(channels * cols), iY = carver.add(rows * cols),
                iO = carver.add(cv * n), iInv = carver.add(n);
  const std::vector<scalar_t*> ws = carver.carve();
  gather_images(x, images, channels, H, W, cell, ws[iX], cols);
  project_columns(ws[iX], cols, cols, weight, bias, rows, channels, ws[iY], cols);
  for (int64_t i = 0; i < images; ++i) {
    scalar_t* image_out = out + i * cv * hw;
    const CellBlock<scalar_t> O = cell_output(image_out, H, W, cell, ws[iO]);
    attend_projection(ws[iY] + i * n, cols, n, d, cv, scale, ws[iS], lds, ws[iInv], O.ptr, O.ld);
    store_cell(O, image_out, cv, H, W, cell, ws[iInv]);
  }
}

// A cell's maps of every image in one workspace tile, in groups of `group` images: group g's block
// (channels x its images' columns, images side by side) follows group g - 1's, so one product serves a
// group (at least kTaskColumns columns) while an image's rows stay about a cell apart (a whole-batch
// row of 8 x 338 values would put a 256-channel image's rows 2.7 MiB apart, past the L2 for every product).
template <typename scalar_t>
struct GroupedTile {
  scalar_t* base;
  int64_t channels, n, group, images;
  int64_t first_of(int64_t i) const { return i / group * group; }
  int64_t ld_of(int64_t i) const { return std::min(group, images - first_of(i)) * n; }
  // Group g's block (first image `first`): channels x ld_of(first), row stride ld_of(first).
  scalar_t* block(int64_t first) const { return base + first * channels * n; }
  // Image i's channels x n matrix: row stride ld_of(i).
  scalar_t* image(int64_t i) const { return block(first_of(i)) + (i - first_of(i)) * n; }
};

// The cell's pixels of every image into a grouped tile.
template <typename scalar_t>
void gather_grouped(const scalar_t* x, const GroupedTile<scalar_t>& tile, int64_t H, int64_t W, const Cell& cell) {
  for (int64_t first = 0; first < tile.images; first += tile.group)
    gather_images(x + first * tile.channels * H * W, std::min(tile.group, tile.images - first), tile.channels, H, W,
                  cell, tile.block(first), tile.ld_of(first));
}

// The rows (O_0 .. O_{B-1}, X_0 .. X_{B-1}) of a cell's Gram from two grouped tiles, one segment of n
// values per channel.
template <typename scalar_t>
struct CellRows {
  std::vector<const scalar_t*> ptrs;
  std::vector<int64_t> strides;
  CellRows(const GroupedTile<scalar_t>& o, const GroupedTile<scalar_t>& x) : ptrs(2 * x.images), strides(2 * x.images) {
    for (int64_t i = 0; i < x.images; ++i) {
      ptrs[i] = o.image(i);
      ptrs[x.images + i] = x.image(i);
      strides[i] = strides[x.images + i] = x.ld_of(i);
    }
  }
  cskd::segment_gram::Rows<scalar_t> rows(int64_t channels, int64_t n) const {
    return {ptrs.data(), strides.data(), static_cast<int64_t>(ptrs.size()), channels, n};
  }
};

// One task: a cell of every image. O of every image into a grouped tile (groups of `group` images
// share a projection product), then the shifted Gram (2B x 2B) of the rows O_0 .. O_{B-1},
// X_0 .. X_{B-1} over the cell's features into gram (lower triangle mirrored): cell_cross_gram of (O, x)
// without O written as a map and read back. The tile is the workspace's, or with kept_o and kept_lse
// (else null) the cell's block of the kept O, and the rows' log-sum-exp goes to kept_lse (images x n):
// what the backward (projected_gram_backward_task) reads, in the layout it reads, never scattered to
// a map's short rows and gathered back.
template <typename scalar_t>
void projected_gram_task(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, double* gram,
                         scalar_t* kept_o, scalar_t* kept_lse, int64_t images, int64_t group, int64_t channels,
                         int64_t d, int64_t H, int64_t W, const Cell& cell, scalar_t scale) {
  const int64_t n = cell.positions(), lds = Carver<scalar_t>::round_up(n), cols = images * n, cv = channels;
  const int64_t rows = 2 * d + cv, count = 2 * images;
  Carver<scalar_t> carver;
  const int64_t iS = carver.add(n * lds), iX = carver.add(channels * cols), iY = carver.add(rows * group * n),
                iO = carver.add(kept_o != nullptr ? 0 : cv * cols), iInv = carver.add(n),
                iTile = carver.add(cskd::segment_gram::tile_size<scalar_t>(count));
  const std::vector<scalar_t*> ws = carver.carve();
  scalar_t* inv = ws[iInv];
  const GroupedTile<scalar_t> xt{ws[iX], channels, n, group, images},
      ot{kept_o != nullptr ? kept_o : ws[iO], cv, n, group, images};
  gather_grouped(x, xt, H, W, cell);
  for (int64_t first = 0; first < images; first += group) {
    const int64_t group_cols = xt.ld_of(first);
    project_columns(xt.block(first), group_cols, group_cols, weight, bias, rows, channels, ws[iY], group_cols);
    for (int64_t i = first; i < first + group_cols / n; ++i) {
      scalar_t* oi = ot.image(i);
      attend_projection(ws[iY] + (i - first) * n, group_cols, n, d, cv, scale, ws[iS], lds, inv, oi, group_cols,
                        kept_lse != nullptr ? kept_lse + i * n : nullptr);
      scale_columns(oi, group_cols, cv, n, inv);
    }
  }
  const CellRows<scalar_t> cell_rows(ot, xt);
  cskd::segment_gram::accumulate<scalar_t>(cell_rows.rows(channels, n), ws[iTile], gram);
  cskd::segment_gram::mirror_lower(gram, count);
}

// dx of one cell of every image from m (2B x 2B, centered: the Gram's gradient mixing, as
// cell_cross_gram_backward takes it) and the forward's kept O and lse (the cell's blocks, as
// projected_gram_task wrote them; read only, so a second backward finds them intact): [dO; dx] = m's
// combination of the rows (O, X); U = Wv^T dO; per image the attention's backward without V (dP = U^T X:
// V = Wv X + b_v, and b_v adds a constant to each row of dP, which the softmax's backward cancels),
// dx += U P (the values' part, Wv^T dV), then dx += Wqk^T [dQ; dK] (Q, K made again from X), scattered
// once. The whole-cell products run per group of images (grouped tiles, as the forward's).
template <typename scalar_t>
void projected_gram_backward_task(const scalar_t* m, const scalar_t* x, const scalar_t* kept_o,
                                  const scalar_t* kept_lse, const scalar_t* weight, const scalar_t* bias, scalar_t* dx,
                                  int64_t images, int64_t group, int64_t channels, int64_t d, int64_t H, int64_t W,
                                  const Cell& cell, scalar_t scale) {
  const int64_t n = cell.positions(), lds = Carver<scalar_t>::round_up(n), cols = images * n, hw = H * W;
  const int64_t count = 2 * images, tile = cskd::segment_gram::tile_size<scalar_t>(count);
  Carver<scalar_t> carver;
  const int64_t iS = carver.add(n * lds), iDS = carver.add(n * lds), iX = carver.add(channels * cols),
                iDO = carver.add(channels * cols), iU = carver.add(channels * group * n),
                iDX = carver.add(channels * cols), iQK = carver.add(2 * d * group * n),
                iDQK = carver.add(2 * d * group * n), iTile = carver.add(tile);
  const std::vector<scalar_t*> ws = carver.carve();
  scalar_t *s = ws[iS], *ds = ws[iDS], *u = ws[iU], *qk = ws[iQK], *dqk = ws[iDQK];
  const GroupedTile<scalar_t> xt{ws[iX], channels, n, group, images},
      ot{const_cast<scalar_t*>(kept_o), channels, n, group, images}, dot{ws[iDO], channels, n, group, images},
      dxt{ws[iDX], channels, n, group, images};
  gather_grouped(x, xt, H, W, cell);
  const CellRows<scalar_t> cell_rows(ot, xt);
  std::vector<scalar_t*> outs(count);
  for (int64_t i = 0; i < images; ++i) {
    outs[i] = dot.image(i);
    outs[images + i] = dxt.image(i);
  }
  cskd::segment_gram::combine<scalar_t>(m, cell_rows.rows(channels, n), outs.data(), cell_rows.strides.data(),
                                        ws[iTile]);
  for (int64_t first = 0; first < images; first += group) {
    const int64_t gc = xt.ld_of(first);
    const scalar_t* d_out = dot.block(first);
    scalar_t* dx_block = dxt.block(first);
    gemm<scalar_t>(true, false, channels, gc, channels, weight + 2 * d * channels, channels, d_out, gc, u, gc);  // U
    project_columns(xt.block(first), gc, gc, weight, bias, 2 * d, channels, qk, gc);
    for (int64_t j = 0; j < gc / n; ++j) {
      const scalar_t *qi = qk + j * n, *ki = qk + d * gc + j * n, *ui = u + j * n, *xi = xt.block(first) + j * n;
      const scalar_t* lse = kept_lse + (first + j) * n;
      gemm<scalar_t>(true, false, n, n, d, qi, gc, ki, gc, s, lds);          // S = Q^T K
      gemm<scalar_t>(true, false, n, n, channels, ui, gc, xi, gc, ds, lds);  // dP = U^T X (+ a row constant)
      for (int64_t r = 0; r < n; ++r) softmax_grad_full_row(s + r * lds, ds + r * lds, n, scale, lse[r]);
      scalar_t* dxi = dx_block + j * n;
      gemm<scalar_t>(false, false, channels, n, n, ui, gc, s, lds, dxi, gc, dxi, gc);  // dx += U P
      gemm<scalar_t>(false, false, d, n, n, qi, gc, ds, lds, dqk + d * gc + j * n, gc);  // dK = Q dS
      gemm<scalar_t>(false, true, d, n, n, ki, gc, ds, lds, dqk + j * n, gc);            // dQ = K dS^T
    }
    gemm<scalar_t>(true, false, channels, gc, 2 * d, weight, channels, dqk, gc, dx_block, gc, dx_block, gc);
    for (int64_t j = 0; j < gc / n; ++j)
      store_cell(CellBlock<scalar_t>{dx_block + j * n, gc}, dx + (first + j) * channels * hw, channels, H, W, cell);
  }
}

// The first position of each cell when the cells' positions are counted cell after cell: cell k's
// block of a per-cell buffer (every image's positions of the cell together) starts at starts[k] times
// the values per position.
std::vector<int64_t> cell_starts(const std::vector<Cell>& cells) {
  std::vector<int64_t> starts(cells.size());
  int64_t next = 0;
  for (size_t k = 0; k < cells.size(); ++k) {
    starts[k] = next;
    next += cells[k].positions();
  }
  return starts;
}

// The checked inputs of the projected kernels: x (B, C, H, W) contiguous, weight (cells | 1, 2d + Cv, C)
// stacking [Wq; Wk; Wv] and bias (cells | 1, 2d + Cv) likewise, the cells (all small).
struct ProjectedInputs {
  at::Tensor x, weight, bias;
  std::vector<Cell> cells;
  int64_t rows, cv, largest;
  bool shared;
};

ProjectedInputs check_projected(const char* name, const at::Tensor& x_in, const at::Tensor& weight_in,
                                const at::Tensor& bias_in, const at::Tensor& cells_in, int64_t d) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.device().is_cpu(), "x must be a CPU (B, C, H, W) map");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, "x must be float32 or float64");
  ProjectedInputs in{x_in.contiguous(), weight_in.contiguous(), bias_in.contiguous(), {}, 0, 0, 0, false};
  const int64_t C = in.x.size(1);
  in.cells = read_cells(cells_in, in.x.size(2), in.x.size(3));
  const int64_t num_cells = static_cast<int64_t>(in.cells.size());
  in.rows = in.weight.dim() == 3 ? in.weight.size(1) : 0;
  TORCH_CHECK(in.weight.dim() == 3 && in.weight.size(2) == C &&
                  (in.weight.size(0) == 1 || in.weight.size(0) == num_cells) &&
                  in.weight.scalar_type() == in.x.scalar_type(),
              "weight must be (cells | 1, 2d + Cv, C) in x's dtype, got ", in.weight.sizes());
  TORCH_CHECK(in.bias.dim() == 2 && in.bias.size(0) == in.weight.size(0) && in.bias.size(1) == in.rows &&
                  in.bias.scalar_type() == in.x.scalar_type(), "bias must be (cells | 1, 2d + Cv) like weight");
  TORCH_CHECK(d > 0 && in.rows > 2 * d, "weight's ", in.rows, " rows leave no values after q and k of ", d, " each");
  in.largest = cskd::largest_positions(in.cells);
  TORCH_CHECK(in.largest <= kSingleBlock, name, " takes cells of at most ", kSingleBlock, " positions, got one of ",
              in.largest);
  in.cv = in.rows - 2 * d;
  in.shared = in.weight.size(0) == 1;
  return in;
}

// out (B, cv, H, W) = the cell-wise attention of (Wq x + bq, Wk x + bk, Wv x + bv), weight (cells | 1,
// 2d + cv, C) stacking [Wq; Wk; Wv] and bias (cells | 1, 2d + cv) likewise: position_attention_forward
// of cell_projection_forward's maps, without the maps. The projections stay in the task's workspace
// (never written and gathered again: 80 MiB each way for the Cityscapes teacher's q, k, v) and no
// log-sum-exp is kept, so it serves sides without a gradient. Cells of at most kSingleBlock positions.
at::Tensor position_attention_projected_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                const at::Tensor& bias_in, const at::Tensor& cells_in, int64_t d,
                                                double scale) {
  const ProjectedInputs in = check_projected("position_attention_projected_forward", x_in, weight_in, bias_in,
                                             cells_in, d);
  const int64_t B = in.x.size(0), C = in.x.size(1), H = in.x.size(2), W = in.x.size(3), rows = in.rows, cv = in.cv;
  const int64_t group = cskd::group_images(B, in.largest);
  at::Tensor out = empty_output({B, cv, H, W}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "position_attention_projected_forward", [&] {
    const scalar_t* xp = in.x.data_ptr<scalar_t>();
    const scalar_t* wp = in.weight.data_ptr<scalar_t>();
    const scalar_t* bp = in.bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    cskd::for_each_cell_task(B, group, static_cast<int64_t>(in.cells.size()), [&](int64_t first, int64_t images,
                                                                                   int64_t k) {
      const int64_t wk = in.shared ? 0 : k;
      projected_forward_task<scalar_t>(xp + first * C * H * W, wp + wk * rows * C, bp + wk * rows,
                                       op + first * cv * H * W, images, C, d, cv, H, W, in.cells[k],
                                       static_cast<scalar_t>(scale));
    });
  });
  return out;
}

// G (cells, 2B, 2B) float64: per cell the Gram of the rows (O_b for b < B, then x_b) shifted by row 0,
// O = position_attention_projected_forward's output (Cv = C): cell_cross_gram_forward([O, x], cells)
// with O made, used and dropped in the task of its cell (every image of a cell in one task). For a
// side without a gradient (CSKDLoss's teacher). Cells of at most kSingleBlock positions. With keep, O
// (B C H W values) and its log-sum-exp (B H W) are kept for the backward cell by cell, cell k's blocks
// at cell_starts' start of k times B C (O: C x B n_k, the task's grouped tile) and times B (B x n_k).
std::vector<at::Tensor> position_attention_projected_gram(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                          const at::Tensor& bias_in, const at::Tensor& cells_in,
                                                          int64_t d, double scale, bool keep) {
  const ProjectedInputs in = check_projected("position_attention_projected_gram", x_in, weight_in, bias_in,
                                             cells_in, d);
  const int64_t B = in.x.size(0), C = in.x.size(1), H = in.x.size(2), W = in.x.size(3), rows = in.rows;
  TORCH_CHECK(in.cv == C, "position_attention_projected_gram: the values must have x's ", C, " channels, got ",
              in.cv);
  const int64_t num_cells = static_cast<int64_t>(in.cells.size()), group = cskd::group_images(B, in.largest);
  const std::vector<int64_t> starts = cell_starts(in.cells);
  at::Tensor gram = at::zeros({num_cells, 2 * B, 2 * B}, in.x.options().dtype(at::kDouble));
  at::Tensor out = keep ? empty_output({B * C * H * W}, in.x.options()) : at::empty({0}, in.x.options());
  at::Tensor lse = keep ? at::empty({B * H * W}, in.x.options()) : at::empty({0}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "position_attention_projected_gram", [&] {
    const scalar_t* xp = in.x.data_ptr<scalar_t>();
    const scalar_t* wp = in.weight.data_ptr<scalar_t>();
    const scalar_t* bp = in.bias.data_ptr<scalar_t>();
    scalar_t* op = keep ? out.data_ptr<scalar_t>() : nullptr;
    scalar_t* lp = keep ? lse.data_ptr<scalar_t>() : nullptr;
    double* gp = gram.data_ptr<double>();
    cskd::for_each_cell_task(1, 1, num_cells, [&](int64_t, int64_t, int64_t k) {
      if (in.cells[k].positions() == 0) return;
      const int64_t wk = in.shared ? 0 : k;
      projected_gram_task<scalar_t>(xp, wp + wk * rows * C, bp + wk * rows, gp + k * 4 * B * B,
                                    keep ? op + starts[k] * B * C : nullptr, keep ? lp + starts[k] * B : nullptr, B,
                                    group, C, d, H, W, in.cells[k], static_cast<scalar_t>(scale));
    });
  });
  return {gram, out, lse};
}

// dx (B, C, H, W) of the projected Gram from m (cells, 2B, 2B) = the Gram's gradient mixing H (dG + dG^T) H
// in x's dtype, and the forward's x, out (O) and lse with the same weight, bias, cells, d and scale: the
// gradient through O and through x's own rows. The weights take no gradient (resampled or fixed).
at::Tensor position_attention_projected_gram_backward(const at::Tensor& m_in, const at::Tensor& x_in,
                                                      const at::Tensor& out_in, const at::Tensor& lse_in,
                                                      const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                      const at::Tensor& cells_in, int64_t d, double scale) {
  const ProjectedInputs in = check_projected("position_attention_projected_gram_backward", x_in, weight_in, bias_in,
                                             cells_in, d);
  const int64_t B = in.x.size(0), C = in.x.size(1), H = in.x.size(2), W = in.x.size(3), rows = in.rows;
  const int64_t num_cells = static_cast<int64_t>(in.cells.size());
  TORCH_CHECK(in.cv == C, "position_attention_projected_gram_backward: the values must have x's ", C,
              " channels, got ", in.cv);
  const at::Tensor m = m_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  TORCH_CHECK(m.sizes() == at::IntArrayRef({num_cells, 2 * B, 2 * B}) && m.scalar_type() == in.x.scalar_type(),
              "m must be (cells, 2B, 2B) = (", num_cells, ", ", 2 * B, ", ", 2 * B, ") in x's dtype, got ", m.sizes());
  TORCH_CHECK(out.dim() == 1 && out.numel() == B * C * H * W && out.scalar_type() == in.x.scalar_type(),
              "out must be the forward's kept O (", B * C * H * W, " values in x's dtype), got ", out.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.numel() == B * H * W && lse.scalar_type() == in.x.scalar_type(),
              "lse must be the forward's kept log-sum-exp (", B * H * W, " values in x's dtype), got ", lse.sizes());
  at::Tensor dx = empty_output({B, C, H, W}, in.x.options());
  const int64_t group = cskd::group_images(B, in.largest);
  const std::vector<int64_t> starts = cell_starts(in.cells);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "position_attention_projected_gram_backward", [&] {
    const scalar_t *mp = m.data_ptr<scalar_t>(), *xp = in.x.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>(),
                   *lp = lse.data_ptr<scalar_t>(), *wp = in.weight.data_ptr<scalar_t>(),
                   *bp = in.bias.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    cskd::for_each_cell_task(1, 1, num_cells, [&](int64_t, int64_t, int64_t k) {
      if (in.cells[k].positions() == 0) return;
      const int64_t wk = in.shared ? 0 : k;
      projected_gram_backward_task<scalar_t>(mp + k * 4 * B * B, xp, op + starts[k] * B * C, lp + starts[k] * B,
                                             wp + wk * rows * C, bp + wk * rows, dxp, B, group, C, d, H, W,
                                             in.cells[k], static_cast<scalar_t>(scale));
    });
  });
  return dx;
}

// ---------------------------------------------------------------------------
// The student's PAM through a widening adapter (modules/attention_mse.py, _AdaptedPositionMSE)
// ---------------------------------------------------------------------------

// One task: a cell of a group of images. [Q; K] = Wqk X + b_qk; per image the attention of x itself,
// Z = X P^T (normalised); then P = A [Z; X] + c, A (R x 2C) = [g M | W], c = g b_v.
template <typename scalar_t>
void adapted_forward_task(const scalar_t* x, const scalar_t* qk_weight, const scalar_t* qk_bias,
                          const scalar_t* out_weight, const scalar_t* out_bias, scalar_t* p, scalar_t* q, scalar_t* k,
                          scalar_t* z, scalar_t* lse, int64_t images, int64_t channels, int64_t d, int64_t rows,
                          int64_t H, int64_t W, const Cell& cell, scalar_t scale) {
  const int64_t n = cell.positions(), lds = Carver<scalar_t>::round_up(n), cols = images * n, hw = H * W;
  Carver<scalar_t> carver;
  // Z and X stacked in one (2C x cols) tile: P = A [Z; X] is then one product of depth 2C.
  const int64_t iS = carver.add(n * lds), iZX = carver.add(2 * channels * cols), iQK = carver.add(2 * d * cols),
                iP = carver.add(rows * cols), iInv = carver.add(n), iL = carver.add(n);
  const std::vector<scalar_t*> ws = carver.carve();
  scalar_t *s = ws[iS], *zt = ws[iZX], *xt = zt + channels * cols, *qk = ws[iQK], *pt = ws[iP], *inv = ws[iInv];
  gather_images(x, images, channels, H, W, cell, xt, cols);
  project_columns(xt, cols, cols, qk_weight, qk_bias, 2 * d, channels, qk, cols);
  for (int64_t i = 0; i < images; ++i) {
    gemm<scalar_t>(true, false, n, n, d, qk + i * n, cols, qk + d * cols + i * n, cols, s, lds);  // S = Q^T K
    for (int64_t j = 0; j < n; ++j) {
      scalar_t m = -std::numeric_limits<scalar_t>::infinity();
      const scalar_t sum = online_softmax_row(s + j * lds, n, scale, m);
      inv[j] = scalar_t(1) / sum;
      ws[iL][j] = m + std::log(sum);
    }
    scalar_t* zi = zt + i * n;
    gemm<scalar_t>(false, true, channels, n, n, xt + i * n, cols, s, lds, zi, cols);  // Z = X P^T, unnormalised
    scale_columns(zi, cols, channels, n, inv);
    store_cell(CellBlock<scalar_t>{ws[iL], n}, lse + i * hw, 1, H, W, cell);
  }
  project_columns(zt, cols, cols, out_weight, out_bias, rows, 2 * channels, pt, cols);
  for (int64_t i = 0; i < images; ++i) {
    store_cell(CellBlock<scalar_t>{qk + i * n, cols}, q + i * d * hw, d, H, W, cell);
    store_cell(CellBlock<scalar_t>{qk + d * cols + i * n, cols}, k + i * d * hw, d, H, W, cell);
    store_cell(CellBlock<scalar_t>{zt + i * n, cols}, z + i * channels * hw, channels, H, W, cell);
    store_cell(CellBlock<scalar_t>{pt + i * n, cols}, p + i * rows * hw, rows, H, W, cell);
  }
}

// (P, q, k, z, lse) of the student's PAM through a widening adapter, for _AdaptedPositionMSE:
// q, k = the folded projections qk_weight (cells | 1, 2d, C) of x, z = their attention applied to x
// itself, P = out_weight [z; x] + out_bias (out_weight (cells | 1, R, 2C), out_bias (cells | 1, R)).
// The unfused chain (cell projection, attention, cell projection, the batched W x) wrote and read
// q, k, z and P once more each and gathered x three times; here every map is written once. Cells of
// at most kSingleBlock positions.
std::vector<at::Tensor> position_attention_adapted_forward(const at::Tensor& x_in, const at::Tensor& qk_weight_in,
                                                           const at::Tensor& qk_bias_in,
                                                           const at::Tensor& out_weight_in,
                                                           const at::Tensor& out_bias_in, const at::Tensor& cells_in,
                                                           double scale) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.device().is_cpu(), "x must be a CPU (B, C, H, W) map");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, "x must be float32 or float64");
  const at::Tensor x = x_in.contiguous(), qk_weight = qk_weight_in.contiguous(), qk_bias = qk_bias_in.contiguous();
  const at::Tensor out_weight = out_weight_in.contiguous(), out_bias = out_bias_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  const std::vector<Cell> cells = read_cells(cells_in, H, W);
  const int64_t num_cells = static_cast<int64_t>(cells.size());
  const auto fits = [&](const at::Tensor& t, int64_t dims, int64_t last) {
    return t.dim() == dims && (t.size(0) == 1 || t.size(0) == num_cells) && (dims == 2 || t.size(2) == last) &&
           t.scalar_type() == x.scalar_type();
  };
  TORCH_CHECK(fits(qk_weight, 3, C) && qk_weight.size(1) % 2 == 0 && qk_weight.size(1) > 0,
              "qk_weight must be (cells | 1, 2d, C) in x's dtype, got ", qk_weight.sizes());
  TORCH_CHECK(fits(out_weight, 3, 2 * C), "out_weight must be (cells | 1, R, 2C) in x's dtype, got ",
              out_weight.sizes());
  TORCH_CHECK(fits(qk_bias, 2, 0) && qk_bias.size(1) == qk_weight.size(1) && fits(out_bias, 2, 0) &&
                  out_bias.size(1) == out_weight.size(1),
              "the biases must be (cells | 1, rows) like their weights");
  const int64_t largest = cskd::largest_positions(cells);
  TORCH_CHECK(largest <= kSingleBlock, "position_attention_adapted_forward takes cells of at most ", kSingleBlock,
              " positions, got one of ", largest);
  const int64_t d = qk_weight.size(1) / 2, rows = out_weight.size(1), group = cskd::group_images(B, largest);
  at::Tensor p = empty_output({B, rows, H, W}, x.options()), q = empty_output({B, d, H, W}, x.options());
  at::Tensor k = empty_output({B, d, H, W}, x.options()), z = empty_output({B, C, H, W}, x.options());
  at::Tensor lse = at::empty({B, H, W}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "position_attention_adapted_forward", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *qkw = qk_weight.data_ptr<scalar_t>(),
                   *qkb = qk_bias.data_ptr<scalar_t>(), *ow = out_weight.data_ptr<scalar_t>(),
                   *ob = out_bias.data_ptr<scalar_t>();
    scalar_t *pp = p.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
             *zp = z.data_ptr<scalar_t>(), *lp = lse.data_ptr<scalar_t>();
    const bool shared_qk = qk_weight.size(0) == 1, shared_out = out_weight.size(0) == 1;
    cskd::for_each_cell_task(B, group, num_cells, [&](int64_t first, int64_t images, int64_t c) {
      const int64_t cq = shared_qk ? 0 : c, co = shared_out ? 0 : c;
      adapted_forward_task<scalar_t>(xp + first * C * hw, qkw + cq * 2 * d * C, qkb + cq * 2 * d,
                                     ow + co * rows * 2 * C, ob + co * rows, pp + first * rows * hw,
                                     qp + first * d * hw, kp + first * d * hw, zp + first * C * hw,
                                     lp + first * hw, images, C, d, rows, H, W, cells[c],
                                     static_cast<scalar_t>(scale));
    });
  });
  return {p, q, k, z, lse};
}

// The gradients of one task of adapted_forward_task, given r = dLoss/dP (scaled): [u; w] = U r with
// U (2C x R) = [s M^T; s W^T]; gamma's part <u, z> + <rowsums of r, bias>; dZ = g u; per image the
// attention's backward (backward_cell's steps) with dV added onto w; then dx = w + Wqk^T [dQ; dK].
template <typename scalar_t>
double adapted_backward_task(const scalar_t* r, const scalar_t* x, const scalar_t* q, const scalar_t* k,
                             const scalar_t* z, const scalar_t* lse, const scalar_t* u_weight, const scalar_t* qk_weight,
                             const scalar_t* bias, scalar_t g, scalar_t* dx, int64_t images, int64_t channels,
                             int64_t d, int64_t rows, int64_t H, int64_t W, const Cell& cell, scalar_t scale) {
  const int64_t n = cell.positions(), lds = Carver<scalar_t>::round_up(n), cols = images * n, hw = H * W;
  Carver<scalar_t> carver;
  const int64_t iS = carver.add(n * lds), iDS = carver.add(n * lds), iR = carver.add(rows * cols),
                iX = carver.add(channels * cols), iQK = carver.add(2 * d * cols), iZ = carver.add(channels * cols),
                iUW = carver.add(2 * channels * cols), iDQK = carver.add(2 * d * cols), iL = carver.add(n);
  const std::vector<scalar_t*> ws = carver.carve();
  scalar_t *s = ws[iS], *ds = ws[iDS], *rt = ws[iR], *xt = ws[iX], *qk = ws[iQK], *zt = ws[iZ], *uw = ws[iUW],
           *dqk = ws[iDQK];
  gather_images(r, images, rows, H, W, cell, rt, cols);
  gather_images(x, images, channels, H, W, cell, xt, cols);
  gather_images(q, images, d, H, W, cell, qk, cols);
  gather_images(k, images, d, H, W, cell, qk + d * cols, cols);
  gather_images(z, images, channels, H, W, cell, zt, cols);
  gemm<scalar_t>(false, false, 2 * channels, cols, rows, u_weight, rows, rt, cols, uw, cols);  // [u; w] = U r
  double gamma = 0;
  for (int64_t c = 0; c < rows; ++c) {
    double sum = 0;
    const scalar_t* row = rt + c * cols;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += row[j];
    gamma += sum * bias[c];
  }
  for (int64_t c = 0; c < channels; ++c) {
    double dot = 0;
    scalar_t* u = uw + c * cols;
    const scalar_t* zr = zt + c * cols;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < cols; ++j) {
      dot += static_cast<double>(u[j]) * zr[j];
      u[j] *= g;  // dZ = g u
    }
    gamma += dot;
  }
  scalar_t* w = uw + channels * cols;
  for (int64_t i = 0; i < images; ++i) {
    const scalar_t *qi = qk + i * n, *ki = qk + d * cols + i * n, *dz = uw + i * n, *xi = xt + i * n;
    const CellBlock<scalar_t> L = load_cell(lse + i * hw, 1, H, W, cell, ws[iL]);
    gemm<scalar_t>(true, false, n, n, d, qi, cols, ki, cols, s, lds);                // S = Q^T K
    gemm<scalar_t>(true, false, n, n, channels, dz, cols, xi, cols, ds, lds);        // dP = dZ^T X
    for (int64_t j = 0; j < n; ++j) softmax_grad_full_row(s + j * lds, ds + j * lds, n, scale, L.ptr[j]);
    gemm<scalar_t>(false, false, channels, n, n, dz, cols, s, lds, w + i * n, cols, w + i * n, cols);  // w += dZ P
    gemm<scalar_t>(false, false, d, n, n, qi, cols, ds, lds, dqk + d * cols + i * n, cols);   // dK = Q dS
    gemm<scalar_t>(false, true, d, n, n, ki, cols, ds, lds, dqk + i * n, cols);               // dQ = K dS^T
  }
  // dx = w + Wqk^T [dQ; dK]
  gemm<scalar_t>(true, false, channels, cols, 2 * d, qk_weight, channels, dqk, cols, w, cols, w, cols);
  for (int64_t i = 0; i < images; ++i)
    store_cell(CellBlock<scalar_t>{w + i * n, cols}, dx + i * channels * hw, channels, H, W, cell);
  return gamma;
}

// (dx, gamma's parts) of _AdaptedPositionMSE from r (B, R, H, W) and the forward's (x, q, k, z, lse):
// u_weight (cells | 1, 2C, R) = [s M^T; s W^T], qk_weight (cells | 1, 2d, C), bias (cells | 1, R) = s b_v,
// g = gamma. gamma's parts (B * cells, float64: one per task, at its first image) sum to <u, z> + <cell sums of r, bias>.
// r is gathered once (the unfused backward gathered it twice and wrote u, dq, dk and dv as maps).
std::vector<at::Tensor> position_attention_adapted_backward(
    const at::Tensor& r_in, const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& z_in, const at::Tensor& lse_in, const at::Tensor& u_weight_in, const at::Tensor& qk_weight_in,
    const at::Tensor& bias_in, const at::Tensor& g, const at::Tensor& cells_in, double scale) {
  const at::Tensor r = r_in.contiguous(), x = x_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor z = z_in.contiguous(), lse = lse_in.contiguous(), u_weight = u_weight_in.contiguous();
  const at::Tensor qk_weight = qk_weight_in.contiguous(), bias = bias_in.contiguous();
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "x must be a float32 or float64 CPU (B, C, H, W) map");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), hw = H * W;
  const int64_t rows = r.dim() == 4 ? r.size(1) : 0, d = q.dim() == 4 ? q.size(1) : 0;
  for (const auto& [t, name, channels] : {std::tuple<const at::Tensor&, const char*, int64_t>{r, "r", rows},
                                          {q, "q", d}, {k, "k", d}, {z, "z", C}})
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == channels && t.size(2) == H && t.size(3) == W &&
                    t.scalar_type() == x.scalar_type() && t.device().is_cpu(),
                name, " must be a CPU map like x with ", channels, " channels, got ", t.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, W}) && lse.scalar_type() == x.scalar_type(),
              "lse must be (B, H, W) in x's dtype");
  const std::vector<Cell> cells = read_cells(cells_in, H, W);
  const int64_t num_cells = static_cast<int64_t>(cells.size());
  const auto per_cell = [&](const at::Tensor& t) {
    return (t.size(0) == 1 || t.size(0) == num_cells) && t.scalar_type() == x.scalar_type();
  };
  TORCH_CHECK(u_weight.dim() == 3 && per_cell(u_weight) && u_weight.size(1) == 2 * C && u_weight.size(2) == rows,
              "u_weight must be (cells | 1, 2C, R), got ", u_weight.sizes());
  TORCH_CHECK(qk_weight.dim() == 3 && per_cell(qk_weight) && qk_weight.size(1) == 2 * d && qk_weight.size(2) == C,
              "qk_weight must be (cells | 1, 2d, C), got ", qk_weight.sizes());
  TORCH_CHECK(bias.dim() == 2 && per_cell(bias) && bias.size(1) == rows, "bias must be (cells | 1, R)");
  TORCH_CHECK(g.numel() == 1 && g.device().is_cpu(), "g must be a one-element CPU tensor");
  const int64_t largest = cskd::largest_positions(cells);
  TORCH_CHECK(largest <= kSingleBlock, "position_attention_adapted_backward takes cells of at most ", kSingleBlock,
              " positions, got one of ", largest);
  const int64_t group = cskd::group_images(B, largest);
  at::Tensor dx = empty_output({B, C, H, W}, x.options());
  // One part per (group's first image, cell); zero at the other images.
  at::Tensor gamma_parts = at::zeros({B * num_cells}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "position_attention_adapted_backward", [&] {
    const scalar_t *rp = r.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>(),
                   *kp = k.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>(), *lp = lse.data_ptr<scalar_t>(),
                   *uwp = u_weight.data_ptr<scalar_t>(), *qkw = qk_weight.data_ptr<scalar_t>(),
                   *bp = bias.data_ptr<scalar_t>();
    const scalar_t gv = g.item<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    double* parts = gamma_parts.data_ptr<double>();
    const bool shared_u = u_weight.size(0) == 1, shared_qk = qk_weight.size(0) == 1, shared_b = bias.size(0) == 1;
    cskd::for_each_cell_task(B, group, num_cells, [&](int64_t first, int64_t images, int64_t c) {
      parts[first * num_cells + c] = adapted_backward_task<scalar_t>(
          rp + first * rows * hw, xp + first * C * hw, qp + first * d * hw, kp + first * d * hw, zp + first * C * hw,
          lp + first * hw, uwp + (shared_u ? 0 : c) * 2 * C * rows, qkw + (shared_qk ? 0 : c) * 2 * d * C,
          bp + (shared_b ? 0 : c) * rows, gv, dxp + first * C * hw, images, C, d, rows, H, W, cells[c],
          static_cast<scalar_t>(scale));
    });
  });
  return {dx, gamma_parts};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename scalar_t>
void backward_tile(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* dout,
                   const scalar_t* lse, const scalar_t* delta, scalar_t* dq_acc, scalar_t* dk, scalar_t* dv,
                   int64_t d, int64_t cv, int64_t H, int64_t W, const Cell& cell, int64_t k0, int64_t nk,
                   scalar_t scale, const at::TensorOptions& options) {
  const int64_t n = cell.positions(), hw = H * W;
  const CellMatrix<scalar_t> Q(q, d, H, W, cell), K(k, d, H, W, cell), V(v, cv, H, W, cell),
      dO(dout, cv, H, W, cell);
  const std::vector<scalar_t> cell_lse = gather_positions(lse, W, cell);
  const std::vector<scalar_t> cell_delta = gather_positions(delta, W, cell);
  const Blocking queries(n);
  at::Tensor scores = at::empty({queries.size, nk}, options);
  at::Tensor probs = at::empty({queries.size, nk}, options);
  at::Tensor dscores = at::empty({queries.size, nk}, options);
  at::Tensor dq_tile = at::empty({d, queries.size}, options);
  at::Tensor dk_acc = at::zeros({d, nk}, options);
  at::Tensor dv_acc = at::zeros({cv, nk}, options);
  scalar_t* sp = scores.data_ptr<scalar_t>();
  scalar_t* pp = probs.data_ptr<scalar_t>();
  scalar_t* dsp = dscores.data_ptr<scalar_t>();
  scalar_t* part = dq_tile.data_ptr<scalar_t>();
  scalar_t* dka = dk_acc.data_ptr<scalar_t>();
  scalar_t* dva = dv_acc.data_ptr<scalar_t>();
  const int64_t ldp = dq_tile.stride(0);
  for (int64_t qb = 0; qb < queries.count; ++qb) {
    const int64_t q0 = queries.begin(qb), nq = queries.length(qb, n);
    gemm<scalar_t>(true, false, nq, nk, d, Q.ptr + q0, Q.ld, K.ptr + k0, K.ld, sp, nk);     // S
    gemm<scalar_t>(true, false, nq, nk, cv, dO.ptr + q0, dO.ld, V.ptr + k0, V.ld, dsp, nk);  // dP, dS below
    for (int64_t i = 0; i < nq; ++i)
      softmax_grad_row(sp + i * nk, pp + i * nk, dsp + i * nk, nk, scale, cell_lse[q0 + i], cell_delta[q0 + i]);
    gemm<scalar_t>(false, false, cv, nk, nq, dO.ptr + q0, dO.ld, pp, nk, dva, nk, dva, nk);  // dV += dO P
    gemm<scalar_t>(false, false, d, nk, nq, Q.ptr + q0, Q.ld, dsp, nk, dka, nk, dka, nk);    // dK += Q dS
    gemm<scalar_t>(false, true, d, nq, nk, K.ptr + k0, K.ld, dsp, nk, part, ldp, nullptr, 0);  // dQ part = K dS^T
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t px = pixel(cell, W, q0 + i);
      for (int64_t c = 0; c < d; ++c) dq_acc[c * hw + px] += part[c * ldp + i];
    }
  }
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t px = pixel(cell, W, k0 + j);
    for (int64_t c = 0; c < d; ++c) dk[c * hw + px] = dka[c * nk + j];
    for (int64_t c = 0; c < cv; ++c) dv[c * hw + px] = dva[c * nk + j];
  }
}

template <typename scalar_t>
void run_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                  const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq_partials, at::Tensor& dk,
                  at::Tensor& dv, const std::vector<Cell>& cells, const std::vector<Task>& tasks, double scale,
                  int threads) {
  const int64_t B = q.size(0), d = q.size(1), H = q.size(2), W = q.size(3), cv = v.size(1), hw = H * W;
  const auto options = q.options();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* dop = dout.data_ptr<scalar_t>();
  const scalar_t* lp = lse.data_ptr<scalar_t>();
  const scalar_t* dp = delta.defined() ? delta.data_ptr<scalar_t>() : nullptr;
  scalar_t* dqp = dq_partials.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  const int64_t ntasks = tasks.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < ntasks; ++t) {
    const Task& task = tasks[t];
    const Cell& cell = cells[task.cell];
    if (cell.positions() <= kSingleBlock) {
      // The task owns all of its cell's positions: dQ goes straight into slice 0 (the other
      // slices, if any, hold only large cells' positions).
      backward_cell<scalar_t>(qp + task.b * d * hw, kp + task.b * d * hw, vp + task.b * cv * hw,
                              dop + task.b * cv * hw, lp + task.b * hw, dqp + task.b * d * hw,
                              dkp + task.b * d * hw, dvp + task.b * cv * hw, d, cv, H, W, cell,
                              static_cast<scalar_t>(scale));
      continue;
    }
    scalar_t* dq_acc = dqp + (static_cast<int64_t>(omp_get_thread_num()) * B + task.b) * d * hw;
    backward_tile<scalar_t>(qp + task.b * d * hw, kp + task.b * d * hw, vp + task.b * cv * hw,
                            dop + task.b * cv * hw, lp + task.b * hw, dp + task.b * hw, dq_acc,
                            dkp + task.b * d * hw, dvp + task.b * cv * hw, d, cv, H, W, cells[task.cell], task.start,
                            task.length, static_cast<scalar_t>(scale), options);
  }
}

std::vector<at::Tensor> position_attention_backward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, const at::Tensor& out_in,
                                                    const at::Tensor& lse_in, const at::Tensor& grad_in,
                                                    const at::Tensor& cells_in, double scale) {
  TORCH_CHECK(q_in.device().is_cpu(), "position_attention_backward: CPU tensors only");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous(), dout = grad_in.contiguous();
  const int64_t B = q.size(0), d = q.size(1), H = q.size(2), W = q.size(3);
  const std::vector<Cell> cells = read_cells(cells_in, H, W);
  at::Tensor dk = empty_output(k.sizes(), k.options()), dv = empty_output(v.sizes(), v.options());
  const bool any_large = std::any_of(cells.begin(), cells.end(), [](const Cell& c) { return c.positions() > kSingleBlock; });
  // Delta_i = sum_c dO[c, i] O[c, i] for the large cells' tiles: one linear pass, accumulated in
  // the compute dtype (small cells take it from their whole rows of P and dP).
  const at::Tensor delta = any_large ? (dout * out).sum(1).contiguous() : at::Tensor();
  const int threads = at::get_num_threads();
  // Large cells: each thread accumulates dQ for the query blocks it visits, summed after the
  // loop. Small cells write their dQ once, into slice 0; with small cells only, that is dq.
  const int slices = any_large ? threads : 1;
  at::Tensor dq_partials = empty_output({slices, B, d, H, W}, q.options());
  if (any_large) dq_partials.zero_();

  // Tasks: (image, cell, key block); each key position belongs to exactly one task.
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < static_cast<int64_t>(cells.size()); ++c) {
      const Blocking keys(cells[c].positions());
      for (int64_t kb = 0; kb < keys.count; ++kb)
        tasks.push_back({b, c, keys.begin(kb), keys.length(kb, cells[c].positions())});
    }

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "position_attention_backward", [&] {
    run_backward<scalar_t>(q, k, v, dout, lse, delta, dq_partials, dk, dv, cells, tasks, scale, threads);
  });
  at::Tensor dq = slices == 1 ? dq_partials[0] : dq_partials.sum(0);
  return {dq, dk, dv};
}

}  // namespace

void register_position_attention(pybind11::module& m) {
  m.def("position_attention_forward", cskd::denormals::flushing(&position_attention_forward),
        "Fused position attention forward: (q, k, v, cells, scale) -> (out, lse)", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cells"), pybind11::arg("scale"));
  m.def("position_attention_backward", cskd::denormals::flushing(&position_attention_backward),
        "Fused position attention backward by recomputation: -> (dq, dk, dv)", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("grad_out"), pybind11::arg("cells"), pybind11::arg("scale"));
  m.def("position_attention_projected_forward", cskd::denormals::flushing(&position_attention_projected_forward),
        "The attention of x's own per-cell projections, no gradient: (x, weight, bias, cells, d, scale) -> out",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("cells"), pybind11::arg("d"),
        pybind11::arg("scale"));
  m.def("position_attention_projected_gram", cskd::denormals::flushing(&position_attention_projected_gram),
        "Per cell the shifted Gram (cells, 2B, 2B) float64 of the rows (O, x), O the attention of x's own per-cell "
        "projections: (x, weight, bias, cells, d, scale, keep) -> (G, O, lse), O and lse empty unless keep, else "
        "flat and cell by cell, for position_attention_projected_gram_backward",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("cells"), pybind11::arg("d"),
        pybind11::arg("scale"), pybind11::arg("keep"));
  m.def("position_attention_projected_gram_backward",
        cskd::denormals::flushing(&position_attention_projected_gram_backward),
        "dx of the projected Gram: (m, x, out, lse, weight, bias, cells, d, scale) -> dx", pybind11::arg("m"),
        pybind11::arg("x"), pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("cells"), pybind11::arg("d"), pybind11::arg("scale"));
  m.def("position_attention_adapted_forward", cskd::denormals::flushing(&position_attention_adapted_forward),
        "The student's PAM through a widening adapter: (x, qk_weight, qk_bias, out_weight, out_bias, cells, scale) "
        "-> (P, q, k, z, lse)",
        pybind11::arg("x"), pybind11::arg("qk_weight"), pybind11::arg("qk_bias"), pybind11::arg("out_weight"),
        pybind11::arg("out_bias"), pybind11::arg("cells"), pybind11::arg("scale"));
  m.def("position_attention_adapted_backward", cskd::denormals::flushing(&position_attention_adapted_backward),
        "(dx, gamma's parts per task) of the adapted PAM from r: (r, x, q, k, z, lse, u_weight, qk_weight, bias, g, "
        "cells, scale)",
        pybind11::arg("r"), pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("z"),
        pybind11::arg("lse"), pybind11::arg("u_weight"), pybind11::arg("qk_weight"), pybind11::arg("bias"),
        pybind11::arg("g"), pybind11::arg("cells"), pybind11::arg("scale"));
}
