// Fused linear-CKA kernels for CPU tensors (see cskd_kernels/ops/cka.py for the contract).
//
//   cka_centered_gram(x)             x (g, n, p) -> Kc (g, n, n) = Xc Xc^T per group
//   cka_centered_gram_backward(x, m) x (g, n, p), m (g, n, n) -> m (x - x[:, 0:1, :])
//
// Both are one streaming pass over x, parallel over the feature dimension p.
// The forward only shifts: it accumulates G, the Gram of the rows minus row 0
// (row 0 shifted is zero, so n - 1 rows), and centers the n x n result in
// double afterwards, Kc = H G H (centering is invariant to the shift). A
// constant column is exactly zero after the shift, so a constant side gives
// exactly Kc = 0 and CKA = 0, not rounding noise. The shift also removes any
// common offset of the features: the entries of G are at most about twice the
// largest of Kc (its diagonal), so rounding stays at the scale of Kc, and the
// separate mean pass a full centering needs is saved.
//
// Work is cut into items of (group, kItemColumns columns) that threads take
// dynamically: on a shared machine a thread slowed by another process does
// not hold the others back at a barrier. Each item accumulates its partial
// Gram in its own double slots (summed in the input dtype over at most a few
// hundred columns first), and the slots are summed in item order: the result
// depends neither on the schedule nor on the number of threads.
//
// Kernels, picked at run time (the build is portable, no -march=native):
// - AVX-512 and n <= kMaxDirectRows + 1: the shifted rows of one vector of
//   columns are held in registers and every product accumulates in registers
//   (forward), or every output row is formed from them (backward). x is read
//   once, straight from memory, with no scratch tile.
// - otherwise (AVX2+FMA or the baseline ISA, or larger n): column blocks of
//   the shifted rows go through a thread-local tile that stays in L1, and the
//   dot products read that tile.
#include <ATen/EmptyTensor.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_features.h"
#include "denormals.h"
#include "gram_tiles.h"
#include "ops.h"
#include "output_pool.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CSKD_CKA_X86_DISPATCH 1
#define CSKD_CKA_INLINE inline __attribute__((always_inline))
#define CSKD_CKA_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#include <immintrin.h>
#else
#define CSKD_CKA_INLINE inline
#endif

namespace {

using namespace cskd::tiles;

// Columns per work item: 32 KiB of each float row, so p = 2^20 gives 128 items
// (enough to balance two to a few dozen threads) and an item's slots are tiny.
constexpr int64_t kItemColumns = 8192;
static_assert(kItemColumns % kColumnQuantum == 0, "items start on whole cache lines");
// Columns summed in the input dtype before the partial goes into double.
constexpr int64_t kPartialColumns = 512;

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

// The work items of a pass: item i is columns [begin, end) of group k.
struct Item {
  int64_t k;
  int64_t begin;
  int64_t end;
};

struct Items {
  int64_t per_group;
  int64_t count;
  int64_t p;
  Items(int64_t g, int64_t p_) : per_group((p_ + kItemColumns - 1) / kItemColumns), count(g * per_group), p(p_) {}
  Item operator[](int64_t i) const {
    const int64_t c = i % per_group;
    return {i / per_group, c * kItemColumns, std::min(p, (c + 1) * kItemColumns)};
  }
};

// ---------------------------------------------------------------------------
// Tile path: any n, any ISA.

// tile[l][j] = x[l + 1][c0 + j] - x[0][c0 + j] for the n - 1 rows after row 0.
template <typename T>
CSKD_CKA_INLINE void shift_block(const Rows<T>& x, int64_t k, int64_t c0, int64_t w, T* tile, int64_t ld) {
  const T* r0 = x.row(k, 0) + c0;
  for (int64_t l = 1; l < x.n; ++l) {
    const T* rl = x.row(k, l) + c0;
    T* tl = tile + (l - 1) * ld;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) tl[j] = rl[j] - r0[j];
  }
}

// G of columns [c0, c1) of group k into acc (n x n, lower triangle; row and
// column 0 stay zero). tile: (n - 1) * block scratch.
template <int Bytes, typename T>
CSKD_CKA_INLINE void gram_tiles_body(const Rows<T>& x, int64_t k, int64_t c0, int64_t c1, int64_t block, T* tile,
                                     double* acc) {
  for (int64_t b0 = c0; b0 < c1; b0 += block) {
    const int64_t w = std::min(block, c1 - b0);
    shift_block(x, k, b0, w, tile, block);
    gram_block<Bytes>(tile, block, x.n - 1, w, acc + x.n + 1, x.n);
  }
}

// dx of columns [c0, c1) of group k. tile: (n - 1) * block shifted rows 1..n-1
// (row 0 shifted is zero and drops out of the sum).
template <int Bytes, typename T>
CSKD_CKA_INLINE void grad_tiles_body(const Rows<T>& x, const T* m_k, T* dx_k, int64_t k, int64_t c0, int64_t c1,
                                     int64_t block, T* tile) {
  const int64_t n = x.n;
  for (int64_t b0 = c0; b0 < c1; b0 += block) {
    const int64_t w = std::min(block, c1 - b0);
    shift_block(x, k, b0, w, tile, block);
    // m_k[i][l] for l >= 1 weighs tile row l - 1.
    combine_rows<Bytes>(m_k + 1, n, tile, block, n - 1, n, w, dx_k + b0, x.p);
  }
}

template <typename T>
void gram_tiles_baseline(const Rows<T>& x, int64_t k, int64_t c0, int64_t c1, int64_t block, T* tile, double* acc) {
  gram_tiles_body<kBaselineBytes>(x, k, c0, c1, block, tile, acc);
}

template <typename T>
void grad_tiles_baseline(const Rows<T>& x, const T* m_k, T* dx_k, int64_t k, int64_t c0, int64_t c1, int64_t block,
                         T* tile) {
  grad_tiles_body<kBaselineBytes>(x, m_k, dx_k, k, c0, c1, block, tile);
}

#ifdef CSKD_CKA_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void gram_tiles_avx2(const Rows<T>& x, int64_t k, int64_t c0, int64_t c1,
                                                         int64_t block, T* tile, double* acc) {
  gram_tiles_body<kAvx2Bytes>(x, k, c0, c1, block, tile, acc);
}

template <typename T>
__attribute__((target("avx2,fma"))) void grad_tiles_avx2(const Rows<T>& x, const T* m_k, T* dx_k, int64_t k,
                                                         int64_t c0, int64_t c1, int64_t block, T* tile) {
  grad_tiles_body<kAvx2Bytes>(x, m_k, dx_k, k, c0, c1, block, tile);
}

// ---------------------------------------------------------------------------
// Direct path: AVX-512, n <= kMaxDirectRows + 1 (the released configuration has n = 8, or 4).

// Shifted rows held in registers: R(R+1)/2 accumulators plus R rows fit the 32
// vector registers up to R = 7 with a few spills; R = 8 (n = 9) still runs at
// memory speed with more.
constexpr int kMaxDirectRows = 8;

// One zmm register of T (gram_tiles.h's vector type).
template <typename T>
using Zmm = Vec<T, kAvx512Bytes>;

// Non-temporal stores: dx is written once and not read back by this pass, so
// it skips the read-for-ownership of every line.
CSKD_CKA_AVX512 CSKD_CKA_INLINE void stream_zmm(float* p, Zmm<float>::type v) { _mm512_stream_ps(p, (__m512)v); }
CSKD_CKA_AVX512 CSKD_CKA_INLINE void stream_zmm(double* p, Zmm<double>::type v) { _mm512_stream_pd(p, (__m512d)v); }

// G of columns [c0, c1) of group k for n = R + 1, as gram_tiles_body.
template <typename T, int R>
CSKD_CKA_AVX512 void gram_direct_avx512(const Rows<T>& x, int64_t k, int64_t c0, int64_t c1, double* acc) {
  using V = typename Zmm<T>::type;
  constexpr int64_t kLanes = Zmm<T>::lanes;
  constexpr int kPairs = R * (R + 1) / 2;
  const int64_t n = R + 1;
  const T* r0 = x.row(k, 0);
  const T* rows[R];
  for (int l = 0; l < R; ++l) rows[l] = x.row(k, l + 1);
  for (int64_t b0 = c0; b0 < c1; b0 += kPartialColumns) {
    const int64_t b1 = std::min(c1, b0 + kPartialColumns);
    V s[kPairs] = {};
    int64_t j = b0;
    for (; j + kLanes <= b1; j += kLanes) {
      const V base = load_vec<V>(r0 + j);
      V d[R];
#pragma GCC unroll 16
      for (int l = 0; l < R; ++l) d[l] = load_vec<V>(rows[l] + j) - base;
      int e = 0;
#pragma GCC unroll 16
      for (int a = 0; a < R; ++a) {
#pragma GCC unroll 16
        for (int b = 0; b <= a; ++b) s[e++] += d[a] * d[b];
      }
    }
    T tail[kPairs] = {};
    for (; j < b1; ++j) {
      T d[R];
      for (int l = 0; l < R; ++l) d[l] = rows[l][j] - r0[j];
      int e = 0;
      for (int a = 0; a < R; ++a)
        for (int b = 0; b <= a; ++b) tail[e++] += d[a] * d[b];
    }
    int e = 0;
    for (int a = 0; a < R; ++a) {
      for (int b = 0; b <= a; ++b, ++e) {
        double sum = tail[e];
        for (int64_t v = 0; v < kLanes; ++v) sum += s[e][v];
        acc[(a + 1) * n + b + 1] += sum;
      }
    }
  }
}

// dx of columns [c0, c1) of group k for n = R + 1, as grad_tiles_body.
// kStream: dx rows start on 64-byte lines (then every full vector store is aligned).
template <typename T, int R, bool kStream>
CSKD_CKA_AVX512 void grad_direct_avx512(const Rows<T>& x, const T* m_k, T* dx_k, int64_t k, int64_t c0,
                                        int64_t c1) {
  using V = typename Zmm<T>::type;
  constexpr int64_t kLanes = Zmm<T>::lanes;
  const int64_t n = R + 1;
  const int64_t p = x.p;
  const T* r0 = x.row(k, 0);
  const T* rows[R];
  for (int l = 0; l < R; ++l) rows[l] = x.row(k, l + 1);
  int64_t j = c0;
  for (; j + kLanes <= c1; j += kLanes) {
    const V base = load_vec<V>(r0 + j);
    V d[R];
#pragma GCC unroll 16
    for (int l = 0; l < R; ++l) d[l] = load_vec<V>(rows[l] + j) - base;
#pragma GCC unroll 16
    for (int i = 0; i <= R; ++i) {
      const T* m_i = m_k + i * n + 1;
      V o = d[0] * m_i[0];
#pragma GCC unroll 16
      for (int l = 1; l < R; ++l) o += d[l] * m_i[l];
      T* out = dx_k + i * p + j;
      if constexpr (kStream) {
        stream_zmm(out, o);
      } else {
        std::memcpy(out, &o, sizeof(o));
      }
    }
  }
  for (; j < c1; ++j) {
    T d[R];
    for (int l = 0; l < R; ++l) d[l] = rows[l][j] - r0[j];
    for (int i = 0; i <= R; ++i) {
      const T* m_i = m_k + i * n + 1;
      T o = d[0] * m_i[0];
      for (int l = 1; l < R; ++l) o += d[l] * m_i[l];
      dx_k[i * p + j] = o;
    }
  }
  if constexpr (kStream) _mm_sfence();  // the streamed lines are visible before the pass returns
}

// The direct kernel for n = R + 1 if there is one (R from 1 to kMaxDirectRows); false otherwise.
template <typename T, int R = 1>
bool gram_direct(const Rows<T>& x, int64_t k, int64_t c0, int64_t c1, double* acc) {
  if constexpr (R > kMaxDirectRows) {
    return false;
  } else {
    if (x.n != R + 1) return gram_direct<T, R + 1>(x, k, c0, c1, acc);
    gram_direct_avx512<T, R>(x, k, c0, c1, acc);
    return true;
  }
}

template <typename T, int R = 1>
bool grad_direct(const Rows<T>& x, const T* m_k, T* dx_k, int64_t k, int64_t c0, int64_t c1, bool stream) {
  if constexpr (R > kMaxDirectRows) {
    return false;
  } else {
    if (x.n != R + 1) return grad_direct<T, R + 1>(x, m_k, dx_k, k, c0, c1, stream);
    if (stream) {
      grad_direct_avx512<T, R, true>(x, m_k, dx_k, k, c0, c1);
    } else {
      grad_direct_avx512<T, R, false>(x, m_k, dx_k, k, c0, c1);
    }
    return true;
  }
}

#endif

// Whether the pass over x (g, n, p) runs the direct kernels (then it needs no tile).
bool uses_direct_kernels(int64_t n) {
#ifdef CSKD_CKA_X86_DISPATCH
  return n >= 2 && n <= kMaxDirectRows + 1 && cskd::cpu::has_avx512_core();
#else
  (void)n;
  return false;
#endif
}

// G of one item into acc (n x n).
template <typename T>
void gram_item(const Rows<T>& x, const Item& item, int64_t block, T* tile, double* acc) {
#ifdef CSKD_CKA_X86_DISPATCH
  if (uses_direct_kernels(x.n) && gram_direct(x, item.k, item.begin, item.end, acc)) return;
  if (cskd::cpu::has_avx2_fma()) return gram_tiles_avx2(x, item.k, item.begin, item.end, block, tile, acc);
#endif
  gram_tiles_baseline(x, item.k, item.begin, item.end, block, tile, acc);
}

// dx of one item.
template <typename T>
void grad_item(const Rows<T>& x, const T* m, T* dx, const Item& item, int64_t block, T* tile, bool stream) {
  const T* m_k = m + item.k * x.n * x.n;
  T* dx_k = dx + item.k * x.n * x.p;
#ifdef CSKD_CKA_X86_DISPATCH
  if (uses_direct_kernels(x.n) && grad_direct(x, m_k, dx_k, item.k, item.begin, item.end, stream)) return;
  if (cskd::cpu::has_avx2_fma()) return grad_tiles_avx2(x, m_k, dx_k, item.k, item.begin, item.end, block, tile);
#endif
  (void)stream;
  grad_tiles_baseline(x, m_k, dx_k, item.k, item.begin, item.end, block, tile);
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

// Kc = H G H for one group, in double, from the lower triangle of G (n x n).
// Both triangles of Kc get the same value, and G = 0 gives exactly Kc = 0.
template <typename T>
void center_gram(const double* gram, int64_t n, T* out) {
  auto g = [&](int64_t a, int64_t b) { return a >= b ? gram[a * n + b] : gram[b * n + a]; };
  std::vector<double> row_mean(static_cast<size_t>(n), 0.0);
  double mean = 0.0;
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < n; ++b) row_mean[a] += g(a, b);
    row_mean[a] /= static_cast<double>(n);
    mean += row_mean[a];
  }
  mean /= static_cast<double>(n);
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b <= a; ++b) {
      const T v = static_cast<T>(g(a, b) - row_mean[a] - row_mean[b] + mean);
      out[a * n + b] = v;
      out[b * n + a] = v;
    }
  }
}

// Forward on x (g, n, p) with unit-stride rows into out (g, n, n).
template <typename T>
void centered_gram_typed(const torch::Tensor& x, torch::Tensor& out) {
  const Rows<T> rows = rows_of<T>(x);
  const int64_t g = rows.g, n = rows.n;
  const Items items(g, rows.p);
  const int threads = item_threads(items.count);
  const int64_t block = block_columns<T>(n);
  const int64_t tile_size = uses_direct_kernels(n) ? 0 : std::max<int64_t>(n - 1, 1) * block;
  const int64_t slot = n * n;
  // One slot of double accumulators per item, summed below in item order.
  std::vector<double> partial(static_cast<size_t>(items.count * slot), 0.0);
  AlignedBuffer<T> scratch(threads * tile_size);
  for_each_item(items.count, threads, [&](int64_t i, int tid) {
    gram_item(rows, items[i], block, scratch.data() + tid * tile_size, partial.data() + i * slot);
  });
  std::vector<double> gram(static_cast<size_t>(slot));
  T* o = out.data_ptr<T>();
  for (int64_t k = 0; k < g; ++k) {
    std::fill(gram.begin(), gram.end(), 0.0);
    for (int64_t c = 0; c < items.per_group; ++c) {
      const double* s = partial.data() + (k * items.per_group + c) * slot;
      for (int64_t e = 0; e < slot; ++e) gram[e] += s[e];
    }
    center_gram(gram.data(), n, o + k * slot);
  }
}

// Backward on x (g, n, p) with unit-stride rows and contiguous m (g, n, n) into contiguous dx.
template <typename T>
void centered_gram_backward_typed(const torch::Tensor& x, const torch::Tensor& m, torch::Tensor& dx) {
  const Rows<T> rows = rows_of<T>(x);
  const int64_t n = rows.n;
  const T* m_data = m.data_ptr<T>();
  T* dx_data = dx.data_ptr<T>();
  const Items items(rows.g, rows.p);
  const int threads = item_threads(items.count);
  const int64_t block = block_columns<T>(n);
  const int64_t tile_size = uses_direct_kernels(n) ? 0 : std::max<int64_t>(n - 1, 1) * block;
  // Streaming stores need every row of dx to start on a 64-byte line.
  const bool stream = reinterpret_cast<uintptr_t>(dx_data) % 64 == 0 && (rows.p * sizeof(T)) % 64 == 0;
  AlignedBuffer<T> scratch(threads * tile_size);
  for_each_item(items.count, threads, [&](int64_t i, int tid) {
    grad_item(rows, m_data, dx_data, items[i], block, scratch.data() + tid * tile_size, stream);
  });
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
  torch::Tensor dx = cskd::empty_output_like(x);
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cka_centered_gram_backward",
                             [&] { centered_gram_backward_typed<scalar_t>(x, m, dx); });
  return dx;
}

}  // namespace

void register_cka(pybind11::module& m) {
  m.def("cka_centered_gram", cskd::denormals::flushing(&centered_gram), pybind11::arg("x"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Kc = Xc Xc^T per group for x (g, n, p), Xc = x centered over the n samples; float32 or float64 "
        "(float64 accumulation across column blocks).");
  m.def("cka_centered_gram_backward", cskd::denormals::flushing(&centered_gram_backward),
        pybind11::arg("x"), pybind11::arg("m"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "dx = m @ (x - x[:, 0:1, :]) for x (g, n, p) and m (g, n, n); shape and dtype of x.");
}
