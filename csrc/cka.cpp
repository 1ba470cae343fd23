// Fused linear-CKA kernels for CPU tensors (see cskd_kernels/ops/cka.py for the contract).
//
//   cka_centered_gram(x)             x (g, n, p) -> Kc (g, n, n) = Xc Xc^T per group
//   cka_centered_gram_backward(x, m) x (g, n, p), m (g, n, n) -> m (x - x[:, 0:1, :])
//
// Both are one streaming pass over x, parallel over the feature dimension p.
// The forward works on column blocks: an n x block tile of x is centered into
// a thread-local buffer that stays in L1, so the n(n+1)/2 dot products of the
// block cost no memory traffic. Centering first subtracts sample 0 of each
// column, so a constant column becomes exactly zero (CKA of a constant side is
// exactly 0, not rounding noise), and then the mean of the shifted column.
// Partial dot products are summed in the input dtype over one block only and
// then added into double per-thread accumulators, which are reduced in thread
// order: the result does not depend on scheduling.
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "ops.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// The build is portable (no -march=native): the hot loops are compiled twice,
// for the baseline ISA and for AVX2+FMA, and picked at run time.
#define CSKD_CKA_X86_DISPATCH 1
#define CSKD_CKA_INLINE inline __attribute__((always_inline))
#else
#define CSKD_CKA_INLINE inline
#endif

namespace {

// Tiles of about half an L1 data cache (32 KiB on current x86 cores), so the
// tile, the column sums and the streaming rows of x fit together.
constexpr int64_t kTileBytes = 16 * 1024;
// Block widths are multiples of this many columns: whole 64-byte lines, and
// every tile row starts aligned for any vector width up to AVX-512.
constexpr int64_t kColumnQuantum = 16;
constexpr int64_t kMaxBlock = 1024;

// A thread-local scratch buffer on a cache-line boundary.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(data_ != nullptr, "cka: cannot allocate ", bytes, " bytes of scratch");
  }
  T* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

template <typename T>
int64_t block_columns(int64_t n) {
  int64_t columns = kTileBytes / (std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)));
  columns = columns / kColumnQuantum * kColumnQuantum;
  return std::min(std::max(columns, kColumnQuantum), kMaxBlock);
}

// Thread `tid` of `threads` owns columns [begin, end) of every group; the cut
// points are multiples of kColumnQuantum so blocks start on cache lines.
std::pair<int64_t, int64_t> thread_columns(int64_t p, int tid, int threads) {
  auto cut = [&](int t) -> int64_t {
    if (t >= threads) return p;
    int64_t c = p * t / threads;
    return std::min(p, c / kColumnQuantum * kColumnQuantum);
  };
  return {cut(tid), cut(tid + 1)};
}

// x viewed as g groups of n rows of p columns, rows unit-stride.
template <typename T>
struct Rows {
  const T* data;
  int64_t g;
  int64_t n;
  int64_t p;
  int64_t group_stride;
  int64_t row_stride;
  const T* row(int64_t k, int64_t i) const { return data + k * group_stride + i * row_stride; }
};

// Centers columns [c0, c0 + w) of group k into tile (n rows of stride ld):
// tile[i][j] = (x[i][j] - x[0][j]) - mean_i(x[i][j] - x[0][j]).
template <typename T>
CSKD_CKA_INLINE void center_block(const Rows<T>& x, int64_t k, int64_t c0, int64_t w, T* tile, int64_t ld,
                                  T* mean) {
  const int64_t n = x.n;
  const T* r0 = x.row(k, 0) + c0;
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) mean[j] = T(0);
  for (int64_t i = 1; i < n; ++i) {
    const T* ri = x.row(k, i) + c0;
    T* ti = tile + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const T d = ri[j] - r0[j];
      ti[j] = d;
      mean[j] += d;
    }
  }
  const T inv_n = T(1) / static_cast<T>(n);
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    mean[j] *= inv_n;
    tile[j] = -mean[j];  // row 0 shifted is exactly zero
  }
  for (int64_t i = 1; i < n; ++i) {
    T* ti = tile + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) ti[j] -= mean[j];
  }
}

// acc[a * n + b] += <tile_a, tile_b> for b <= a (lower triangle).
// Four dot products share each load of row a: 5 loads per 4 FMAs instead of 2 per 1.
template <typename T>
CSKD_CKA_INLINE void gram_block(const T* tile, int64_t ld, int64_t n, int64_t w, double* acc) {
  for (int64_t a = 0; a < n; ++a) {
    const T* ta = tile + a * ld;
    double* acc_a = acc + a * n;
    int64_t b = 0;
    for (; b + 4 <= a + 1; b += 4) {
      const T* t0 = tile + b * ld;
      const T* t1 = t0 + ld;
      const T* t2 = t1 + ld;
      const T* t3 = t2 + ld;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < w; ++j) {
        const T v = ta[j];
        s0 += v * t0[j];
        s1 += v * t1[j];
        s2 += v * t2[j];
        s3 += v * t3[j];
      }
      acc_a[b] += s0;
      acc_a[b + 1] += s1;
      acc_a[b + 2] += s2;
      acc_a[b + 3] += s3;
    }
    for (; b <= a; ++b) {
      const T* tb = tile + b * ld;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < w; ++j) s += ta[j] * tb[j];
      acc_a[b] += s;
    }
  }
}

// One thread's share of the forward: its columns of every group.
// acc: g * n * n doubles (lower triangles), tile: n * block, mean: block.
template <typename T>
CSKD_CKA_INLINE void gram_columns_body(const Rows<T>& x, int64_t c_begin, int64_t c_end, int64_t block, T* tile,
                                       T* mean, double* acc) {
  const int64_t n = x.n;
  for (int64_t k = 0; k < x.g; ++k) {
    double* acc_k = acc + k * n * n;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += block) {
      const int64_t w = std::min(block, c_end - c0);
      center_block(x, k, c0, w, tile, block, mean);
      gram_block(tile, block, n, w, acc_k);
    }
  }
}

// Lanes of output columns kept in registers while the n-term sums run.
template <typename T>
constexpr int64_t kGradLanes = 64 / sizeof(T) * 2;

// out[v] = sum_{l >= 1} m_i[l] * shifted[l - 1][v] for v < L: L output columns
// stay in registers while the n-term sums run.
template <typename T, int64_t L>
CSKD_CKA_INLINE void grad_lanes(const T* m_i, const T* shifted, int64_t ld, int64_t n, T* out) {
  T s[L] = {};
  for (int64_t l = 1; l < n; ++l) {
    const T coef = m_i[l];
    const T* t = shifted + (l - 1) * ld;
#pragma omp simd
    for (int64_t v = 0; v < L; ++v) s[v] += coef * t[v];
  }
#pragma omp simd
  for (int64_t v = 0; v < L; ++v) out[v] = s[v];
}

// The same for the last w < L columns of a range.
template <typename T>
CSKD_CKA_INLINE void grad_tail(const T* m_i, const T* shifted, int64_t ld, int64_t n, int64_t w, T* out) {
  for (int64_t v = 0; v < w; ++v) {
    T s = 0;
    for (int64_t l = 1; l < n; ++l) s += m_i[l] * shifted[(l - 1) * ld + v];
    out[v] = s;
  }
}

// One thread's share of the backward. tile: (n - 1) * block shifted rows 1..n-1
// (row 0 shifted is zero and drops out of the sum).
template <typename T>
CSKD_CKA_INLINE void grad_columns_body(const Rows<T>& x, const T* m, T* dx, int64_t c_begin, int64_t c_end,
                                       int64_t block, T* tile) {
  constexpr int64_t L = kGradLanes<T>;
  const int64_t n = x.n;
  const int64_t p = x.p;
  for (int64_t k = 0; k < x.g; ++k) {
    const T* m_k = m + k * n * n;
    T* dx_k = dx + k * n * p;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += block) {
      const int64_t w = std::min(block, c_end - c0);
      const T* r0 = x.row(k, 0) + c0;
      for (int64_t l = 1; l < n; ++l) {
        const T* rl = x.row(k, l) + c0;
        T* tl = tile + (l - 1) * block;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) tl[j] = rl[j] - r0[j];
      }
      for (int64_t i = 0; i < n; ++i) {
        T* out = dx_k + i * p + c0;
        int64_t j = 0;
        for (; j + L <= w; j += L) grad_lanes<T, L>(m_k + i * n, tile + j, block, n, out + j);
        if (j < w) grad_tail(m_k + i * n, tile + j, block, n, w - j, out + j);
      }
    }
  }
}

template <typename T>
void gram_columns_baseline(const Rows<T>& x, int64_t c_begin, int64_t c_end, int64_t block, T* tile, T* mean,
                           double* acc) {
  gram_columns_body(x, c_begin, c_end, block, tile, mean, acc);
}

template <typename T>
void grad_columns_baseline(const Rows<T>& x, const T* m, T* dx, int64_t c_begin, int64_t c_end, int64_t block,
                           T* tile) {
  grad_columns_body(x, m, dx, c_begin, c_end, block, tile);
}

#ifdef CSKD_CKA_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void gram_columns_avx2(const Rows<T>& x, int64_t c_begin, int64_t c_end,
                                                           int64_t block, T* tile, T* mean, double* acc) {
  gram_columns_body(x, c_begin, c_end, block, tile, mean, acc);
}

template <typename T>
__attribute__((target("avx2,fma"))) void grad_columns_avx2(const Rows<T>& x, const T* m, T* dx, int64_t c_begin,
                                                           int64_t c_end, int64_t block, T* tile) {
  grad_columns_body(x, m, dx, c_begin, c_end, block, tile);
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

template <typename T>
void gram_columns(const Rows<T>& x, int64_t c_begin, int64_t c_end, int64_t block, T* tile, T* mean, double* acc) {
#ifdef CSKD_CKA_X86_DISPATCH
  if (cpu_has_avx2_fma()) return gram_columns_avx2(x, c_begin, c_end, block, tile, mean, acc);
#endif
  gram_columns_baseline(x, c_begin, c_end, block, tile, mean, acc);
}

template <typename T>
void grad_columns(const Rows<T>& x, const T* m, T* dx, int64_t c_begin, int64_t c_end, int64_t block, T* tile) {
#ifdef CSKD_CKA_X86_DISPATCH
  if (cpu_has_avx2_fma()) return grad_columns_avx2(x, m, dx, c_begin, c_end, block, tile);
#endif
  grad_columns_baseline(x, m, dx, c_begin, c_end, block, tile);
}

// Threads for a pass over p columns: no more than there are column quanta.
int pass_threads(int64_t p) {
  const int64_t quanta = (p + kColumnQuantum - 1) / kColumnQuantum;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), quanta)));
}

// x as (g, n, p) rows with unit stride in p; copies only when the layout demands it.
torch::Tensor unit_stride_rows(const torch::Tensor& x) {
  return x.stride(2) == 1 ? x : x.contiguous();
}

template <typename T>
Rows<T> rows_of(const torch::Tensor& x) {
  return Rows<T>{x.data_ptr<T>(), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1)};
}

void check_features(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must have shape (g, n, p), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", x.scalar_type());
}

// Forward on x (g, n, p) with unit-stride rows into out (g, n, n).
template <typename T>
void centered_gram_typed(const torch::Tensor& x, torch::Tensor& out) {
  const Rows<T> rows = rows_of<T>(x);
  const int64_t g = rows.g, n = rows.n, p = rows.p;
  const int64_t block = block_columns<T>(n);
  const int threads = pass_threads(p);
  const int64_t acc_size = g * n * n;
  const int64_t scratch_size = (n + 1) * block;  // tile, then column means; a multiple of 16 elements
  // Per-thread double accumulators, reduced below in thread order.
  std::vector<double> acc(static_cast<size_t>(threads) * acc_size, 0.0);
  AlignedBuffer<T> scratch(threads * scratch_size);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    const std::pair<int64_t, int64_t> columns = thread_columns(p, tid, omp_get_num_threads());
    if (columns.first < columns.second) {
      T* tile = scratch.data() + tid * scratch_size;
      gram_columns(rows, columns.first, columns.second, block, tile, tile + n * block, acc.data() + tid * acc_size);
    }
  }
  T* o = out.data_ptr<T>();
  for (int64_t k = 0; k < g; ++k) {
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = 0; b <= a; ++b) {
        const int64_t e = k * n * n + a * n + b;
        double s = 0.0;
        for (int t = 0; t < threads; ++t) s += acc[t * acc_size + e];
        o[e] = static_cast<T>(s);
        o[k * n * n + b * n + a] = static_cast<T>(s);
      }
    }
  }
}

// dx is written once, into fresh memory: at the sizes that matter (tens of MiB)
// the first-touch page faults cost as much as the writes themselves. Asking for
// transparent huge pages before the first touch takes 512 times fewer faults
// (Linux with THP in "madvise" mode; elsewhere, or if refused, nothing changes).
void prefer_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Backward on x (g, n, p) with unit-stride rows and contiguous m (g, n, n) into contiguous dx.
template <typename T>
void centered_gram_backward_typed(const torch::Tensor& x, const torch::Tensor& m, torch::Tensor& dx) {
  const Rows<T> rows = rows_of<T>(x);
  const int64_t n = rows.n, p = rows.p;
  const T* m_data = m.data_ptr<T>();
  T* dx_data = dx.data_ptr<T>();
  const int64_t block = block_columns<T>(n);
  const int threads = pass_threads(p);
  const int64_t scratch_size = std::max<int64_t>(n - 1, 1) * block;
  AlignedBuffer<T> scratch(threads * scratch_size);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    const std::pair<int64_t, int64_t> columns = thread_columns(p, tid, omp_get_num_threads());
    if (columns.first < columns.second) {
      grad_columns(rows, m_data, dx_data, columns.first, columns.second, block, scratch.data() + tid * scratch_size);
    }
  }
}

torch::Tensor centered_gram(const torch::Tensor& x_in) {
  check_features(x_in, "x");
  const torch::Tensor x = unit_stride_rows(x_in);
  torch::Tensor out = at::empty({x.size(0), x.size(1), x.size(1)}, x.options());
  if (x.numel() == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cka_centered_gram", [&] { centered_gram_typed<scalar_t>(x, out); });
  return out;
}

torch::Tensor centered_gram_backward(const torch::Tensor& x_in, const torch::Tensor& m_in) {
  check_features(x_in, "x");
  TORCH_CHECK(m_in.dim() == 3 && m_in.size(0) == x_in.size(0) && m_in.size(1) == x_in.size(1) &&
                  m_in.size(2) == x_in.size(1),
              "m must have shape (g, n, n) = (", x_in.size(0), ", ", x_in.size(1), ", ", x_in.size(1),
              ") for x of shape ", x_in.sizes(), ", got ", m_in.sizes());
  TORCH_CHECK(m_in.device().is_cpu(), "m must be a CPU tensor, got one on ", m_in.device());
  TORCH_CHECK(m_in.is_floating_point(), "m must be a floating-point tensor, got ", m_in.scalar_type());
  const torch::Tensor x = unit_stride_rows(x_in);
  // m is n x n per group: converting it to x's dtype costs nothing and keeps
  // one kernel per dtype (float32 x with float64 m happens for mixed inputs).
  const torch::Tensor m = m_in.to(x.scalar_type()).contiguous();
  torch::Tensor dx = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  prefer_huge_pages(dx.data_ptr(), dx.nbytes());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cka_centered_gram_backward",
                             [&] { centered_gram_backward_typed<scalar_t>(x, m, dx); });
  return dx;
}

}  // namespace

void register_cka(pybind11::module& m) {
  m.def("cka_centered_gram", &centered_gram, pybind11::arg("x"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Kc = Xc Xc^T per group for x (g, n, p), Xc = x centered over the n samples; float32 or float64 "
        "(float64 accumulation across column blocks).");
  m.def("cka_centered_gram_backward", &centered_gram_backward, pybind11::arg("x"), pybind11::arg("m"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "dx = m @ (x - x[:, 0:1, :]) for x (g, n, p) and m (g, n, n); shape and dtype of x.");
}
