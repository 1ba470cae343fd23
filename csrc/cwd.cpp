// Channel-wise distillation on logits (SPEC section 4), fused CPU kernel.
//
// One row = one (image, class) pair: the N = H*W logits of s and t. Per row,
// two passes:
//   1. online log-sum-exp of s/T and t/T over blocks that stay in L1 (block
//      max, rescale the running sum, add the block's exponentials);
//   2. log p_s, log p_t from the saved statistics, as (x / T - max) - log(sum):
//      never through lse = max + log(sum), whose rounding (an ulp of max / T,
//      1e-3 at |x / T| ~ 1e4) would shift every log-probability; accumulate
//      sum p_t (log p_t - log p_s) and, when the student needs a gradient,
//      write ds = grad_scale * (p_s - p_t).
// The loss is a terminal one, so its gradient is computed here and the
// autograd backward only scales it (Liger's JSD pattern).
//
// Rows run in parallel with OpenMP. float rows use AVX2/FMA when the CPU has
// them, with the shared polynomial exponential of simd_exp.h. Other cases
// (double, CPUs without AVX2) run the portable scalar loop.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "denormals.h"
#include "simd_exp.h"

namespace {

constexpr int64_t kBlock = 512;  // 2 KiB of s and of t per block: pass 1 rereads it from L1

// Running log-sum-exp statistics of one row of x / T: lse = max + log(sum).
template <typename acc_t>
struct RowStats {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;

  void merge_block(acc_t block_max, acc_t block_sum_at_block_max) {
    const acc_t new_max = std::max(max, block_max);
    sum = sum * std::exp(max - new_max) + block_sum_at_block_max * std::exp(block_max - new_max);
    max = new_max;
  }
  acc_t log_sum() const { return std::log(sum); }
};

// ---------------------------------------------------------------------------
// Portable path (double, and float on CPUs without AVX2/FMA).
// ---------------------------------------------------------------------------

template <typename scalar_t>
scalar_t block_max(const scalar_t* x, int64_t len) {
  scalar_t m = x[0];
  for (int64_t j = 1; j < len; ++j) m = std::max(m, x[j]);
  return m;
}

template <typename scalar_t>
scalar_t row_kl_scalar(const scalar_t* s, const scalar_t* t, int64_t n, scalar_t inv_t, scalar_t grad_scale,
                       scalar_t* ds) {
  RowStats<scalar_t> stats_s, stats_t;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const scalar_t* sb = s + start;
    const scalar_t* tb = t + start;
    // inv_t > 0, so the max of x / T is max(x) / T.
    const scalar_t ms = block_max(sb, len) * inv_t;
    const scalar_t mt = block_max(tb, len) * inv_t;
    scalar_t zs = 0, zt = 0;
#pragma omp simd reduction(+ : zs, zt)
    for (int64_t j = 0; j < len; ++j) {
      zs += std::exp(sb[j] * inv_t - ms);
      zt += std::exp(tb[j] * inv_t - mt);
    }
    stats_s.merge_block(ms, zs);
    stats_t.merge_block(mt, zt);
  }
  const scalar_t log_sum_s = stats_s.log_sum();
  const scalar_t log_sum_t = stats_t.log_sum();
  scalar_t kl = 0;
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t log_ps = (s[j] * inv_t - stats_s.max) - log_sum_s;
    const scalar_t log_pt = (t[j] * inv_t - stats_t.max) - log_sum_t;
    const scalar_t pt = std::exp(log_pt);
    kl += pt * (log_pt - log_ps);
    if (ds != nullptr) ds[j] = grad_scale * (std::exp(log_ps) - pt);
  }
  return kl;
}

// ---------------------------------------------------------------------------
// AVX2/FMA path for float rows.
// ---------------------------------------------------------------------------

#ifdef CSKD_X86_SIMD

using cskd::simd::exp256;
using cskd::simd::horizontal_max;
using cskd::simd::horizontal_sum;

// Lanes past the end of a row: loaded as -inf for maxima, masked out of sums.
CSKD_AVX2 inline __m256i tail_mask(int64_t remaining) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(remaining, 8))), lane);
}

CSKD_AVX2 inline __m256 load_or(const float* p, int64_t remaining, __m256 fill) {
  if (remaining >= 8) return _mm256_loadu_ps(p);
  const __m256i mask = tail_mask(remaining);
  return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
}

CSKD_AVX2 float row_kl_avx2(const float* s, const float* t, int64_t n, float inv_t, float grad_scale, float* ds) {
  const __m256 vinv_t = _mm256_set1_ps(inv_t);
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 zero = _mm256_setzero_ps();
  RowStats<float> stats_s, stats_t;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(start + kBlock, n);
    __m256 vms = neg_inf, vmt = neg_inf;
    for (int64_t j = start; j < end; j += 8) {
      vms = _mm256_max_ps(vms, load_or(s + j, end - j, neg_inf));
      vmt = _mm256_max_ps(vmt, load_or(t + j, end - j, neg_inf));
    }
    const float ms = horizontal_max(vms) * inv_t;
    const float mt = horizontal_max(vmt) * inv_t;
    const __m256 vms_b = _mm256_set1_ps(ms), vmt_b = _mm256_set1_ps(mt);
    __m256 vzs = zero, vzt = zero;
    for (int64_t j = start; j < end; j += 8) {
      // Padding lanes load -inf: exp256 maps them to exactly 0.
      const __m256 xs = load_or(s + j, end - j, neg_inf);
      const __m256 xt = load_or(t + j, end - j, neg_inf);
      vzs = _mm256_add_ps(vzs, exp256(_mm256_fmsub_ps(xs, vinv_t, vms_b)));
      vzt = _mm256_add_ps(vzt, exp256(_mm256_fmsub_ps(xt, vinv_t, vmt_b)));
    }
    stats_s.merge_block(ms, horizontal_sum(vzs));
    stats_t.merge_block(mt, horizontal_sum(vzt));
  }
  const __m256 max_s = _mm256_set1_ps(stats_s.max), log_sum_s = _mm256_set1_ps(stats_s.log_sum());
  const __m256 max_t = _mm256_set1_ps(stats_t.max), log_sum_t = _mm256_set1_ps(stats_t.log_sum());
  const __m256 vscale = _mm256_set1_ps(grad_scale);
  __m256 vkl = zero;
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t remaining = n - j;
    const __m256 log_ps = _mm256_sub_ps(_mm256_fmsub_ps(load_or(s + j, remaining, zero), vinv_t, max_s), log_sum_s);
    const __m256 log_pt = _mm256_sub_ps(_mm256_fmsub_ps(load_or(t + j, remaining, zero), vinv_t, max_t), log_sum_t);
    __m256 pt = exp256(log_pt);
    if (remaining < 8) pt = _mm256_and_ps(pt, _mm256_castsi256_ps(tail_mask(remaining)));
    vkl = _mm256_fmadd_ps(pt, _mm256_sub_ps(log_pt, log_ps), vkl);
    if (ds != nullptr) {
      const __m256 grad = _mm256_mul_ps(vscale, _mm256_sub_ps(exp256(log_ps), pt));
      if (remaining >= 8) {
        _mm256_storeu_ps(ds + j, grad);
      } else {
        _mm256_maskstore_ps(ds + j, tail_mask(remaining), grad);
      }
    }
  }
  return horizontal_sum(vkl);
}

#endif  // CSKD_X86_SIMD

template <typename scalar_t>
scalar_t row_kl(const scalar_t* s, const scalar_t* t, int64_t n, scalar_t inv_t, scalar_t grad_scale, scalar_t* ds) {
#ifdef CSKD_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (cskd::cpu::has_avx2_fma()) return row_kl_avx2(s, t, n, inv_t, grad_scale, ds);
  }
#endif
  return row_kl_scalar(s, t, n, inv_t, grad_scale, ds);
}

// One row per iteration; a row is independent of the others.
template <typename scalar_t>
void run_rows(const scalar_t* s, const scalar_t* t, int64_t rows, int64_t n, double temperature, double grad_scale,
              scalar_t* ds, scalar_t* kl_rows) {
  const scalar_t inv_t = static_cast<scalar_t>(1.0 / temperature);
  const scalar_t scale = static_cast<scalar_t>(grad_scale);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    kl_rows[r] = row_kl<scalar_t>(s + r * n, t + r * n, n, inv_t, scale, ds == nullptr ? nullptr : ds + r * n);
  }
}

// s, t: (R, N) contiguous, same dtype. Returns (kl_rows (R,), ds (R, N) or an
// empty tensor): kl_rows[r] = sum p_t (log p_t - log p_s) of row r (unscaled),
// ds = grad_scale * (p_s - p_t).
std::vector<at::Tensor> cwd_forward(const at::Tensor& s, const at::Tensor& t, double temperature, double grad_scale,
                                    bool compute_grad) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2 && s.sizes() == t.sizes(),
              "cwd_forward: s and t must be (R, N) of one shape, got ", s.sizes(), " and ", t.sizes());
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "cwd_forward: s and t must have one dtype");
  TORCH_CHECK(s.is_contiguous() && t.is_contiguous(), "cwd_forward: s and t must be contiguous");
  TORCH_CHECK(temperature > 0, "cwd_forward: temperature must be > 0");
  const int64_t rows = s.size(0);
  const int64_t n = s.size(1);
  at::Tensor kl_rows = at::empty({rows}, s.options());
  at::Tensor ds = compute_grad ? at::empty_like(s) : at::empty({0}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "cwd_forward", [&] {
    run_rows<scalar_t>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), rows, n, temperature, grad_scale,
                       compute_grad ? ds.data_ptr<scalar_t>() : nullptr, kl_rows.data_ptr<scalar_t>());
  });
  return {kl_rows, ds};
}

}  // namespace

void register_cwd(pybind11::module& m) {
  m.def("cwd_forward", cskd::denormals::flushing(&cwd_forward),
        "CWD per-row KL and (optionally) the student gradient", pybind11::arg("s"),
        pybind11::arg("t"), pybind11::arg("temperature"), pybind11::arg("grad_scale"), pybind11::arg("compute_grad"));
}
