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
#include <memory>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CSKD_TILES_INLINE inline __attribute__((always_inline))
#else
#define CSKD_TILES_INLINE inline
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

// acc[a * acc_ld + b] += <tile_a, tile_b> for b <= a < r (lower triangle).
// Four dot products share each load of row a: 5 loads per 4 FMAs instead of 2 per 1.
template <typename T>
CSKD_TILES_INLINE void gram_block(const T* tile, int64_t ld, int64_t r, int64_t w, double* acc, int64_t acc_ld) {
  for (int64_t a = 0; a < r; ++a) {
    const T* ta = tile + a * ld;
    double* acc_a = acc + a * acc_ld;
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

// Lanes of output columns kept in registers while the n-term sums run.
template <typename T>
constexpr int64_t kGradLanes = 64 / sizeof(T) * 2;

// out[v] = sum_{l >= 1} m_i[l] * shifted[l - 1][v] for v < L: L output columns
// stay in registers while the n-term sums run.
template <typename T, int64_t L>
CSKD_TILES_INLINE void grad_lanes(const T* m_i, const T* shifted, int64_t ld, int64_t n, T* out) {
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
CSKD_TILES_INLINE void grad_tail(const T* m_i, const T* shifted, int64_t ld, int64_t n, int64_t w, T* out) {
  for (int64_t v = 0; v < w; ++v) {
    T s = 0;
    for (int64_t l = 1; l < n; ++l) s += m_i[l] * shifted[(l - 1) * ld + v];
    out[v] = s;
  }
}

}  // namespace cskd::tiles
