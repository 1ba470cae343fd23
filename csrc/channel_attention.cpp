// Channel self-attention (CAM, SPEC section 2) on the CPU.
//
// Per image X (C x N): E = X X^T, A = softmax_rows(-E / T), out = gamma A X + X.
// Every product runs on cskd::blas::gemm (our AVX-512 kernel where MKL would
// run AVX2): the Grams (X X^T, its upper triangle only, and dOut X^T) one
// image per task, the products with a C x C left operand (A X, A^T dOut,
// dE X) one (image, column panel) per task with the residual added as the
// tiles are stored. Everything else is C x C algebra done in OpenMP loops, so
// the only C x N tensors ever allocated are the output of the forward and dX
// of the backward.
//
// Backward, with G = dOut X^T (C x C):
//   d gamma = sum(dOut * A X) = sum(A * G)          (no A X needed)
//   r_i     = sum_j A_ij G_ij                        (softmax's rowsum(dA * A) / gamma)
//   dE      = -(gamma / T) A * (G - r)               (softmax backward through -E/T)
//   dX      = gamma A^T dOut + (dE + dE^T) X + dOut  (two products accumulated into dX)
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "denormals.h"
#include "gemm.h"
#include "ops.h"
#include "output_pool.h"
#include "segment_gram.h"
#include "simd_exp.h"

namespace {

constexpr int64_t kColumnPanel = 1024;  // columns per task: the C x C operand's packing is shared by 1024 columns

// scale m_b (square values) in this thread's workspace, made again only when the thread moves on to
// another image or call: no B x C x C scaled copy (at the demo's 6x6 maps, C x C matrices are the
// largest tensors of the loss).
template <typename scalar_t>
const scalar_t* scaled_image(const scalar_t* m, int64_t b, int64_t square, scalar_t scale, uint64_t call) {
  static thread_local uint64_t made_call = 0;
  static thread_local int64_t made_image = -1;
  scalar_t* scaled = cskd::blas::workspace<scalar_t>(square);
  if (made_call != call || made_image != b) {
    const scalar_t* mb = m + b * square;
#pragma omp simd
    for (int64_t i = 0; i < square; ++i) scaled[i] = mb[i] * scale;
    made_call = call;
    made_image = b;
  }
  return scaled;
}

// out_b = scale op(m_b) rhs_b + residual_b for every image b, op(m) = m or m^T (m: B x C x C,
// rhs, residual, out: B x C x N contiguous; residual may be out itself). One task per
// (image, column panel); the product adds the residual as it stores its tiles.
template <typename scalar_t>
void product_plus_residual(const torch::Tensor& m, scalar_t scale, bool transpose_m, const torch::Tensor& rhs,
                           const torch::Tensor& residual, torch::Tensor& out) {
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = ++calls;
  const int64_t batch = rhs.size(0), channels = rhs.size(1), n = rhs.size(2), square = channels * channels;
  const int64_t panels = (n + kColumnPanel - 1) / kColumnPanel;
  const scalar_t* mp = m.data_ptr<scalar_t>();
  const scalar_t* rp = rhs.data_ptr<scalar_t>();
  const scalar_t* sp = residual.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < batch * panels; ++task) {
    const int64_t b = task / panels, j0 = (task % panels) * kColumnPanel;
    const int64_t offset = b * channels * n + j0;
    const scalar_t* mb = scale == scalar_t(1) ? mp + b * square : scaled_image(mp, b, square, scale, call);
    cskd::blas::gemm<scalar_t>(transpose_m, false, channels, std::min(kColumnPanel, n - j0), channels, mb, channels,
                               rp + offset, n, op + offset, n, sp + offset, n);
  }
}

// out_b = lhs_b rhs_b^T for every image b (lhs, rhs: B x C x N contiguous, out B x C x C), one task per
// image. With symmetric (lhs = rhs) only the upper triangle is computed, then mirrored.
template <typename scalar_t>
void grams(const torch::Tensor& lhs, const torch::Tensor& rhs, torch::Tensor& out, bool symmetric) {
  const int64_t batch = lhs.size(0), channels = lhs.size(1), n = lhs.size(2), square = channels * channels;
  const scalar_t* lp = lhs.data_ptr<scalar_t>();
  const scalar_t* rp = rhs.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < batch; ++b) {
    scalar_t* e = op + b * square;
    cskd::blas::gemm<scalar_t>(false, true, channels, channels, n, lp + b * channels * n, n, rp + b * channels * n, n,
                               e, channels, nullptr, 0, symmetric);
    if (symmetric)
      for (int64_t r = 1; r < channels; ++r)
        for (int64_t c = 0; c < r; ++c) e[r * channels + c] = e[c * channels + r];
  }
}

#ifdef CSKD_X86_SIMD
// One row of softmax_negated_rows_ in float on AVX-512 or AVX2: the polynomial
// exp of simd_exp.h (about 1 ulp) instead of a scalar libm call per element,
// which GCC does not vectorise without -ffast-math. The B C^2 exponentials do
// not shrink with the map: at the demo's 6x6 maps (C = 128, N = 36) the scalar
// exps took longer than the two products of the forward together.
CSKD_AVX512 void softmax_negated_row_avx512(float* e, int64_t cols, float inv_t) {
  const __m512 plus_inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 vlow = plus_inf;
  for (int64_t j = 0; j < cols; j += 16)
    vlow = _mm512_min_ps(vlow, _mm512_mask_loadu_ps(plus_inf, cskd::blas::avx512::lanes(cols - j), e + j));
  const __m512 lowest = _mm512_set1_ps(_mm512_reduce_min_ps(vlow)), vinv = _mm512_set1_ps(inv_t);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 live = cskd::blas::avx512::lanes(cols - j);
    const __m512 p = cskd::simd::exp512(_mm512_mul_ps(_mm512_sub_ps(lowest, _mm512_maskz_loadu_ps(live, e + j)), vinv));
    _mm512_mask_storeu_ps(e + j, live, p);
    vsum = _mm512_mask_add_ps(vsum, live, vsum, p);
  }
  const __m512 inv_total = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 live = cskd::blas::avx512::lanes(cols - j);
    _mm512_mask_storeu_ps(e + j, live, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, e + j), inv_total));
  }
}

// The same row on AVX2 (8 lanes, a scalar tail with the same exp formula).
CSKD_AVX2 void softmax_negated_row_avx2(float* e, int64_t cols, float inv_t) {
  const int64_t cols8 = cols & ~int64_t(7);
  __m256 vlow = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < cols8; j += 8) vlow = _mm256_min_ps(vlow, _mm256_loadu_ps(e + j));
  float low = cskd::simd::horizontal_min(vlow);
  for (int64_t j = cols8; j < cols; ++j) low = std::min(low, e[j]);
  const __m256 lowest = _mm256_set1_ps(low), vinv = _mm256_set1_ps(inv_t);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < cols8; j += 8) {
    const __m256 p = cskd::simd::exp256(_mm256_mul_ps(_mm256_sub_ps(lowest, _mm256_loadu_ps(e + j)), vinv));
    _mm256_storeu_ps(e + j, p);
    vsum = _mm256_add_ps(vsum, p);
  }
  float total = cskd::simd::horizontal_sum(vsum);
  for (int64_t j = cols8; j < cols; ++j) total += (e[j] = std::exp((low - e[j]) * inv_t));
  const float inv_total = 1.0f / total;
  const __m256 vinv_total = _mm256_set1_ps(inv_total);
  for (int64_t j = 0; j < cols8; j += 8) _mm256_storeu_ps(e + j, _mm256_mul_ps(_mm256_loadu_ps(e + j), vinv_total));
  for (int64_t j = cols8; j < cols; ++j) e[j] *= inv_total;
}
#endif

// A = softmax(-E / T) row by row, in place. The row minimum of E is the row
// maximum of -E, so every exponent is <= 0 and the sum is >= 1.
template <typename scalar_t>
void softmax_negated_rows_(scalar_t* energy, int64_t rows, int64_t cols, double temperature) {
  const scalar_t inv_t = static_cast<scalar_t>(1.0 / temperature);
#ifdef CSKD_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (cskd::cpu::has_avx512f()) {
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < rows; ++row) softmax_negated_row_avx512(energy + row * cols, cols, inv_t);
      return;
    }
    if (cskd::cpu::has_avx2_fma()) {
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < rows; ++row) softmax_negated_row_avx2(energy + row * cols, cols, inv_t);
      return;
    }
  }
#endif
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    scalar_t* e = energy + row * cols;
    scalar_t lowest = e[0];
    for (int64_t j = 1; j < cols; ++j) lowest = e[j] < lowest ? e[j] : lowest;
    scalar_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < cols; ++j) {
      const scalar_t p = std::exp((lowest - e[j]) * inv_t);
      e[j] = p;
      total += p;
    }
    const scalar_t inv_total = scalar_t(1) / total;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) e[j] *= inv_total;
  }
}

// From G (overwritten) and A: r_i = sum_j A_ij G_ij into row_dots, then
// G <- dE = -(gamma / T) A * (G - r) (B x C x C, row-parallel).
template <typename scalar_t>
void softmax_backward_rows_(scalar_t* grad_gram, const scalar_t* attention, scalar_t* row_dots, int64_t rows,
                            int64_t cols, scalar_t scale) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    scalar_t* g = grad_gram + row * cols;
    const scalar_t* a = attention + row * cols;
    scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < cols; ++j) dot += a[j] * g[j];
    row_dots[row] = dot;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) g[j] = scale * a[j] * (g[j] - dot);
  }
}

// D <- D + D^T per image (B x C x C), in place: the Gram's gradient, symmetric because E is. Row i
// of an image sums the pairs (i, j > i), which no other row touches.
template <typename scalar_t>
void symmetrize_(scalar_t* d, int64_t batch, int64_t channels) {
  const int64_t square = channels * channels;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < channels; ++i) {
      scalar_t* db = d + b * square;
      db[i * channels + i] *= 2;
      for (int64_t j = i + 1; j < channels; ++j) {
        const scalar_t sum = db[i * channels + j] + db[j * channels + i];
        db[i * channels + j] = sum;
        db[j * channels + i] = sum;
      }
    }
  }
}

// E = X X^T per image: the upper triangle, mirrored (C^2 N / 2 multiply-adds plus the diagonal tiles).
torch::Tensor symmetric_gram(const torch::Tensor& x) {
  auto gram = at::empty({x.size(0), x.size(1), x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "symmetric_gram", [&] { grams<scalar_t>(x, x, gram, true); });
  return gram;
}

void check_features(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(),
              "channel_attention (cpu): expected contiguous CPU features (B, C, N), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble,
              "channel_attention (cpu): float32 or float64 only, got ", x.scalar_type());
}

// A (B, C, C) contiguous, in x's dtype, for features x (B, C, N).
void check_attention(const torch::Tensor& x, const torch::Tensor& attention) {
  TORCH_CHECK(attention.dim() == 3 && attention.is_contiguous() && attention.size(0) == x.size(0) &&
                  attention.size(1) == x.size(1) && attention.size(2) == x.size(1) &&
                  attention.scalar_type() == x.scalar_type(),
              "channel_attention (cpu): attention must be contiguous (B, C, C) like x ", x.sizes(), ", got ",
              attention.sizes());
}

// gamma lives on the CPU here, so reading it is a memory load, not a device sync.
double scalar_of(const torch::Tensor& gamma) {
  TORCH_CHECK(gamma.numel() == 1, "channel_attention (cpu): gamma must have one element, got ", gamma.sizes());
  return gamma.to(torch::kDouble).item<double>();
}

}  // namespace

// out = gamma A x + x for x (B, C, N) and A (B, C, C) contiguous: one product, the residual added panel by panel.
torch::Tensor channel_attention_apply(const torch::Tensor& x, const torch::Tensor& attention,
                                      const torch::Tensor& gamma) {
  check_features(x);
  check_attention(x, attention);
  const double g = scalar_of(gamma);
  auto out = cskd::empty_output_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_attention_apply", [&] {
    product_plus_residual<scalar_t>(attention, static_cast<scalar_t>(g), false, x, x, out);
  });
  return out;
}

// x (B, C, N) contiguous -> (out (B, C, N), attention A (B, C, C)).
std::vector<torch::Tensor> channel_attention_forward(const torch::Tensor& x, const torch::Tensor& gamma,
                                                     double temperature) {
  check_features(x);
  scalar_of(gamma);  // gamma checked before any work
  auto attention = symmetric_gram(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_attention_forward", [&] {
    softmax_negated_rows_<scalar_t>(attention.data_ptr<scalar_t>(), x.size(0) * x.size(1), x.size(1), temperature);
  });
  return {channel_attention_apply(x, attention, gamma), attention};
}

namespace {

// Columns of every image per task of channel_attention_gram: the B panels of A X (B x C x 256 values,
// 2 MiB at the Cityscapes teacher's 8 x 256 channels) stay in the cache for their Gram. At least C
// columns, so that packing each image's C x C attention for the task's product stays a small part of it.
int64_t gram_panel_width(int64_t channels) { return std::max<int64_t>(256, (channels + 63) / 64 * 64); }

// count rounded up to 16 values (whole cache lines): where the Gram's tile starts after the panels.
constexpr int64_t round_to_lines(int64_t count) { return (count + 15) / 16 * 16; }

// Image b's C x width block of y (images' blocks C rows apart, rows ld_y apart) = A_b X_b[:, j0 : j0 + width]
// for every image b.
template <typename scalar_t>
void attention_panel(const scalar_t* x, const scalar_t* attention, int64_t batch, int64_t channels, int64_t n,
                     int64_t j0, int64_t width, scalar_t* y, int64_t ld_y) {
  for (int64_t b = 0; b < batch; ++b)
    cskd::blas::gemm<scalar_t>(false, false, channels, width, channels, attention + b * channels * channels, channels,
                               x + b * channels * n + j0, n, y + b * channels * ld_y, ld_y);
}

// task(p, first column, panel width) for every column panel of an (image, C, N) map, one OpenMP task each.
template <typename Task>
void for_each_panel(int64_t channels, int64_t n, const Task& task) {
  const int64_t panel = gram_panel_width(channels), panels = (n + panel - 1) / panel;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t p = 0; p < panels; ++p) task(p, p * panel, panel);
}

// Panel p's part of the shifted Gram of (A X, X) into partial (2B x 2B, lower triangle). The panel of
// A X is made in the workspace, or with product (B x C x N, else null) in its columns of product, kept.
template <typename scalar_t>
void gram_panel(const scalar_t* x, const scalar_t* attention, int64_t batch, int64_t channels, int64_t n, int64_t j0,
                int64_t panel, double* partial, scalar_t* product) {
  const int64_t width = std::min(panel, n - j0), count = 2 * batch;
  // A X into the kept product's columns, or into the workspace ahead of the Gram's tile.
  const bool kept = product != nullptr;
  const int64_t ld_y = kept ? n : width, tile_offset = kept ? 0 : round_to_lines(batch * channels * width);
  scalar_t* work = cskd::blas::workspace<scalar_t>(tile_offset + cskd::segment_gram::tile_size<scalar_t>(count));
  scalar_t* y = kept ? product + j0 : work;
  std::vector<const scalar_t*> rows(count);
  std::vector<int64_t> strides(count);
  attention_panel(x, attention, batch, channels, n, j0, width, y, ld_y);
  for (int64_t b = 0; b < batch; ++b) {
    rows[b] = y + b * channels * ld_y;
    strides[b] = ld_y;
    rows[batch + b] = x + b * channels * n + j0;
    strides[batch + b] = n;
  }
  cskd::segment_gram::accumulate<scalar_t>({rows.data(), strides.data(), count, channels, width}, work + tile_offset,
                                           partial);
}

// Panel p of dOut = M (out - out_0), out = g A X + X made for every image in the workspace from the kept
// product A X (B x C x N) and mixed there.
template <typename scalar_t>
void output_grad_panel(const scalar_t* x, const scalar_t* product, scalar_t g, const scalar_t* m, int64_t batch,
                       int64_t channels, int64_t n, int64_t j0, int64_t panel, scalar_t* grad) {
  const int64_t width = std::min(panel, n - j0), tile_offset = round_to_lines(batch * channels * width);
  scalar_t* y = cskd::blas::workspace<scalar_t>(tile_offset + cskd::segment_gram::tile_size<scalar_t>(batch));
  std::vector<const scalar_t*> rows(batch);
  std::vector<scalar_t*> outs(batch);
  const std::vector<int64_t> strides(batch, width), out_strides(batch, n);
  for (int64_t b = 0; b < batch; ++b) {
    scalar_t* yb = y + b * channels * width;
    const scalar_t* xb = x + b * channels * n + j0;
    const scalar_t* pb = product + b * channels * n + j0;
    for (int64_t c = 0; c < channels; ++c) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) yb[c * width + j] = g * pb[c * n + j] + xb[c * n + j];
    }
    rows[b] = yb;
    outs[b] = grad + b * channels * n + j0;
  }
  cskd::segment_gram::combine<scalar_t>(m, {rows.data(), strides.data(), batch, channels, width}, outs.data(),
                                        out_strides.data(), y + tile_offset);
}

}  // namespace

// dOut = M (out - out_0) (B, C, N) for out = gamma A X + X, x (B, C, N) and the product A X kept by
// channel_attention_gram (B, C, N) contiguous, M (B, B) centered in x's dtype: the gradient of out's
// centered Gram (ChannelGramFunction's backward), out made panel by panel for every image and mixed in
// the cache instead of written, read back and mixed.
torch::Tensor channel_attention_output_grad(const torch::Tensor& x, const torch::Tensor& product,
                                            const torch::Tensor& gamma, const torch::Tensor& m) {
  check_features(x);
  TORCH_CHECK(product.sizes() == x.sizes() && product.is_contiguous() && product.scalar_type() == x.scalar_type(),
              "channel_attention (cpu): the product A x must be contiguous and shaped like x ", x.sizes(), ", got ",
              product.sizes());
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2);
  TORCH_CHECK(m.dim() == 2 && m.size(0) == batch && m.size(1) == batch && m.is_contiguous() &&
                  m.scalar_type() == x.scalar_type(),
              "channel_attention (cpu): m must be a contiguous (B, B) matrix in x's dtype, got ", m.sizes());
  const double g = scalar_of(gamma);
  auto grad = cskd::empty_output_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_attention_output_grad", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *pp = product.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    for_each_panel(channels, n, [&](int64_t, int64_t j0, int64_t panel) {
      output_grad_panel<scalar_t>(xp, pp, static_cast<scalar_t>(g), mp, batch, channels, n, j0, panel, gp);
    });
  });
  return grad;
}

// (G (1, 2B, 2B) float64, A (B, C, C), P) for x (B, C, N) contiguous: A is channel_attention_forward's
// attention and G the Gram of the rows (A_b X_b for b < B, then X_b) shifted by row 0, i.e.
// cell_cross_gram_forward([A X, x]) over the whole map: one task per column panel of every image makes
// the panel's A X and adds its part of the Gram while it is in the cache. P is empty, A X never a map,
// unless keep_product: then P = A X (B, C, N), written as the panels are made, for
// channel_attention_output_grad. CAM(x) = gamma A X + x, so its centered Gram is the (gamma, 1)
// combination of G's centered blocks (cskd_kernels/ops/channel_gram.py). Panels' parts are summed in
// panel order: the result does not depend on the thread count.
std::vector<torch::Tensor> channel_attention_gram(const torch::Tensor& x, double temperature, bool keep_product) {
  check_features(x);
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2), count = 2 * batch;
  auto attention = symmetric_gram(x);
  auto gram = at::zeros({1, count, count}, x.options().dtype(at::kDouble));
  auto product = keep_product ? cskd::empty_output_like(x) : at::empty({0}, x.options());
  const int64_t panel = gram_panel_width(channels), panels = (n + panel - 1) / panel;
  std::vector<double> partial(static_cast<size_t>(panels * count * count), 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_attention_gram", [&] {
    softmax_negated_rows_<scalar_t>(attention.data_ptr<scalar_t>(), batch * channels, channels, temperature);
    const scalar_t *xp = x.data_ptr<scalar_t>(), *ap = attention.data_ptr<scalar_t>();
    scalar_t* pp = keep_product ? product.data_ptr<scalar_t>() : nullptr;
    for_each_panel(channels, n, [&](int64_t p, int64_t j0, int64_t panel) {
      gram_panel<scalar_t>(xp, ap, batch, channels, n, j0, panel, partial.data() + p * count * count, pp);
    });
  });
  double* g = gram.data_ptr<double>();
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t i = 0; i < count * count; ++i) g[i] += partial[p * count * count + i];
  cskd::segment_gram::mirror_lower(g, count);
  return {gram, attention, product};
}

// Gradients (dx or an undefined tensor when need_x is false, d gamma shaped like gamma).
std::vector<torch::Tensor> channel_attention_backward(const torch::Tensor& grad_out, const torch::Tensor& x,
                                                      const torch::Tensor& attention, const torch::Tensor& gamma,
                                                      double temperature, bool need_x) {
  check_features(x);
  check_features(grad_out);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "channel_attention (cpu): grad ", grad_out.sizes(), " vs x ", x.sizes());
  const double g = scalar_of(gamma);
  const int64_t batch = x.size(0), channels = x.size(1);
  auto grad_gram = at::empty({batch, channels, channels}, x.options());  // G = dOut X^T, becomes dE in place
  auto row_dots = at::empty({batch, channels}, x.options());
  torch::Tensor grad_x;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_attention_backward", [&] {
    grams<scalar_t>(grad_out, x, grad_gram, false);
    const auto scale = static_cast<scalar_t>(-g / temperature);
    softmax_backward_rows_<scalar_t>(grad_gram.data_ptr<scalar_t>(), attention.data_ptr<scalar_t>(),
                                     row_dots.data_ptr<scalar_t>(), batch * channels, channels, scale);
    if (need_x) {
      symmetrize_<scalar_t>(grad_gram.data_ptr<scalar_t>(), batch, channels);
      // dX = (gamma A)^T dOut + dOut, then dX += (dE + dE^T) X in place.
      grad_x = cskd::empty_output_like(x);
      product_plus_residual<scalar_t>(attention, static_cast<scalar_t>(g), true, grad_out, grad_out, grad_x);
      product_plus_residual<scalar_t>(grad_gram, scalar_t(1), false, x, grad_x, grad_x);
    }
  });
  // sum_i r_i = sum(A * G) = d gamma; accumulated in float64 (B*C terms).
  auto grad_gamma = row_dots.sum(torch::kDouble).to(gamma.scalar_type()).reshape(gamma.sizes());
  return {grad_x, grad_gamma};
}

void register_channel_attention(pybind11::module& m) {
  m.def("channel_attention_forward", cskd::denormals::flushing(&channel_attention_forward),
        "CAM forward: (out, attention) for contiguous x (B, C, N), gamma (1 element), temperature",
        pybind11::arg("x"), pybind11::arg("gamma"), pybind11::arg("temperature"));
  m.def("channel_attention_apply", cskd::denormals::flushing(&channel_attention_apply),
        "gamma A x + x for contiguous x (B, C, N) and attention A (B, C, C)", pybind11::arg("x"),
        pybind11::arg("attention"), pybind11::arg("gamma"));
  m.def("channel_attention_gram", cskd::denormals::flushing(&channel_attention_gram),
        "(G (1, 2B, 2B) float64, A, P): the shifted Gram of the rows (A x, x), the attention, and P = A x kept "
        "(else empty), for contiguous x (B, C, N), a temperature and keep_product",
        pybind11::arg("x"), pybind11::arg("temperature"), pybind11::arg("keep_product"));
  m.def("channel_attention_output_grad", cskd::denormals::flushing(&channel_attention_output_grad),
        "M (out - out_0) for out = gamma A x + x, never a map: (x, the kept product A x, gamma, m) -> dOut",
        pybind11::arg("x"), pybind11::arg("product"), pybind11::arg("gamma"), pybind11::arg("m"));
  m.def("channel_attention_backward", cskd::denormals::flushing(&channel_attention_backward),
        "CAM backward: (dx or None, dgamma) from grad_out, x, attention, gamma, temperature",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("attention"), pybind11::arg("gamma"),
        pybind11::arg("temperature"), pybind11::arg("need_x"));
}
