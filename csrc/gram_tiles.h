// Pieces shared by the tiled Gram kernels (cka.cpp, cell_cross_gram.cpp): scratch
// buffers, the deterministic item loop, and the register-blocked Gram and
// gradient loops over a packed tile. Everything is inline or a template, so
// each file compiles it into its own target-attribute variants.
#pragma once

#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CSKD_TILES_INLINE inline __attribute__((always_inline))
// For the lambdas of a kernel body: GCC compiles a lambda that it does not
// inline as a function of its own, without the target attributes (AVX-512,
// AVX2) of the function it was written in, i.e. for plain x86-64 (SSE2, no FMA).
#define CSKD_TILES_LAMBDA __attribute__((always_inline))
#else
#define CSKD_TILES_INLINE inline
#define CSKD_TILES_LAMBDA
#endif

namespace cskd::tiles {

// Tiles of about half an L1 data cache (32 KiB on current x86 cores), so the
// tile and the streaming rows of the input fit together.
constexpr int64_t kTileBytes = 16 * 1024;
// Block widths and item cuts are multiples of this many columns: whole 64-byte
// lines, and every tile row starts aligned for any vector width up to AVX-512.
constexpr int64_t kColumnQuantum = 16;
constexpr int64_t kMaxBlock = 1024;

// Columns of a tile of `rows` rows: the tile fits kTileBytes, in whole quanta, at most kMaxBlock.
template <typename T>
int64_t block_columns(int64_t rows) {
  int64_t columns = kTileBytes / (std::max<int64_t>(rows, 1) * static_cast<int64_t>(sizeof(T)));
  columns = columns / kColumnQuantum * kColumnQuantum;
  return std::min(std::max(columns, kColumnQuantum), kMaxBlock);
}

// A thread-local scratch buffer on a cache-line boundary.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(data_ != nullptr, "cskd: cannot allocate ", bytes, " bytes of scratch");
  }
  T* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

// Threads for `count` items: a single item runs on the calling thread.
inline int item_threads(int64_t count) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count)));
}

// Calls work(item index, thread index) for every item, threads taking items dynamically.
template <typename Work>
void for_each_item(int64_t count, int threads, const Work& work) {
  if (threads <= 1) {
    for (int64_t i = 0; i < count; ++i) work(i, 0);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < count; ++i) work(i, omp_get_thread_num());
}

// Vector widths of the three builds of every kernel body (the body is inlined
// into a function compiled for that target).
constexpr int kBaselineBytes = 16;
constexpr int kAvx2Bytes = 32;
constexpr int kAvx512Bytes = 64;

// Columns of the widest vector: tile rows are padded to whole vectors.
template <typename T>
constexpr int64_t kTileLanes = kAvx512Bytes / sizeof(T);

// The row stride of a tile of `block` columns: whole vectors of the widest width.
template <typename T>
int64_t tile_ld(int64_t block) {
  constexpr int64_t L = kTileLanes<T>;
  return (block + L - 1) / L * L;
}

// A vector of Bytes / sizeof(T) lanes (GCC / Clang vector extension).
template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int64_t lanes = Bytes / static_cast<int64_t>(sizeof(T));
};

template <typename V, typename T>
CSKD_TILES_INLINE V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Adjacent lanes of a then b summed: (a0 + a1, a2 + a3, ..., b0 + b1, ...).
template <typename V, size_t... I>
CSKD_TILES_INLINE V pair_sums(V a, V b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (2 * I)...) + __builtin_shufflevector(a, b, (2 * I + 1)...);
}

// sums[e] = the sum of the L lanes of s[e], e < C (C a multiple of L, both powers of two), by a tree
// of pair sums: log2(L) levels of C / 2, C / 4, ... vector shuffles and adds instead of C * L scalar adds.
template <typename T, typename V, int64_t L, int C>
CSKD_TILES_INLINE void lane_sums(V* s, T* sums) {
  static_assert(C % L == 0, "every vector of the last level holds L whole sums");
  int count = C;
#pragma GCC unroll 8
  for (int64_t width = L; width > 1; width /= 2) {
#pragma GCC unroll 16
    for (int e = 0; e < count / 2; ++e) s[e] = pair_sums(s[2 * e], s[2 * e + 1], std::make_index_sequence<L>{});
    count /= 2;
  }
#pragma GCC unroll 16
  for (int e = 0; e < C; ++e) sums[e] = s[e / L][e % L];
}

// acc[a * acc_ld + b] += <tile_a, tile_b> over columns [0, w) for b <= a < r (lower triangle).
// Register blocks of RA x RB row pairs (their products share each load: RA + RB loads per RA * RB
// products), summed across the lanes once per block. Columns [w, w rounded up to a vector) of the
// tile are zeroed first: ld must hold them.
template <int Bytes, typename T>
CSKD_TILES_INLINE void gram_block(T* tile, int64_t ld, int64_t r, int64_t w, double* acc, int64_t acc_ld) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int64_t L = Vec<T, Bytes>::lanes;
  // Accumulators plus the loaded rows fit the registers: 16 + 8 of 32 zmm, 8 + 6 of 16 ymm / xmm.
  constexpr int RA = Bytes == kAvx512Bytes ? 4 : 2;
  constexpr int RB = 4;
  const int64_t wv = (w + L - 1) / L * L;
  for (int64_t a = 0; a < r; ++a) std::fill(tile + a * ld + w, tile + a * ld + wv, T(0));
  for (int64_t a0 = 0; a0 < r; a0 += RA) {
    // Rows past r repeat row r - 1: their products are computed and dropped.
    const T* ta[RA];
    for (int i = 0; i < RA; ++i) ta[i] = tile + std::min(a0 + i, r - 1) * ld;
    for (int64_t b0 = 0; b0 <= std::min(a0 + RA - 1, r - 1); b0 += RB) {
      const T* tb[RB];
      for (int k = 0; k < RB; ++k) tb[k] = tile + std::min(b0 + k, r - 1) * ld;
      V s[RA * RB] = {};
      for (int64_t j = 0; j < wv; j += L) {
        V va[RA], vb[RB];
#pragma GCC unroll 4
        for (int i = 0; i < RA; ++i) va[i] = load_vec<V>(ta[i] + j);
#pragma GCC unroll 4
        for (int k = 0; k < RB; ++k) vb[k] = load_vec<V>(tb[k] + j);
#pragma GCC unroll 4
        for (int i = 0; i < RA; ++i) {
#pragma GCC unroll 4
          for (int k = 0; k < RB; ++k) s[i * RB + k] += va[i] * vb[k];
        }
      }
      T sums[RA * RB];
      lane_sums<T, V, L, RA * RB>(s, sums);
      for (int i = 0; i < RA; ++i) {
        for (int k = 0; k < RB; ++k) {
          const int64_t a = a0 + i, b = b0 + k;
          if (a < r && b <= a) acc[a * acc_ld + b] += sums[i * RB + k];
        }
      }
    }
  }
}

// row_out(i)[v] = sum_{l < r} m[i * m_ld + l] * tile[l * ld + v] for i < rows, v < w: the
// m-combinations of the tile rows, output row i wherever row_out(i) points. Register blocks of 8
// output rows x one vector of columns (8 accumulators; each tile load serves 8 products); the last
// w % L columns scalar.
template <int Bytes, typename T, typename RowOut>
CSKD_TILES_INLINE void combine_rows_to(const T* m, int64_t m_ld, const T* tile, int64_t ld, int64_t r, int64_t rows,
                                       int64_t w, const RowOut& row_out) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int64_t L = Vec<T, Bytes>::lanes;
  constexpr int RI = 8;
  for (int64_t i0 = 0; i0 < rows; i0 += RI) {
    // Rows past `rows` repeat the last one: computed, not stored.
    const T* mi[RI];
    T* oi[RI];
    for (int i = 0; i < RI; ++i) mi[i] = m + std::min(i0 + i, rows - 1) * m_ld;
    const int ri = static_cast<int>(std::min<int64_t>(RI, rows - i0));
    for (int i = 0; i < ri; ++i) oi[i] = row_out(i0 + i);
    int64_t j = 0;
    for (; j + L <= w; j += L) {
      V o[RI] = {};
      for (int64_t l = 0; l < r; ++l) {
        const V t = load_vec<V>(tile + l * ld + j);
#pragma GCC unroll 8
        for (int i = 0; i < RI; ++i) o[i] += t * mi[i][l];
      }
      for (int i = 0; i < ri; ++i) std::memcpy(oi[i] + j, &o[i], sizeof(V));
    }
    for (int i = 0; i < ri; ++i) {
      for (int64_t v = j; v < w; ++v) {
        T sum = 0;
        for (int64_t l = 0; l < r; ++l) sum += mi[i][l] * tile[l * ld + v];
        oi[i][v] = sum;
      }
    }
  }
}

// combine_rows_to with output row i at out + i * out_ld.
template <int Bytes, typename T>
CSKD_TILES_INLINE void combine_rows(const T* m, int64_t m_ld, const T* tile, int64_t ld, int64_t r, int64_t rows,
                                    int64_t w, T* out, int64_t out_ld) {
  combine_rows_to<Bytes>(m, m_ld, tile, ld, r, rows, w, [out, out_ld](int64_t i) { return out + i * out_ld; });
}

}  // namespace cskd::tiles
