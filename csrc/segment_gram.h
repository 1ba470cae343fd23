// The shifted Gram of a few long rows, each made of equal segments strided in
// memory, for the kernels that take a cross-Gram in the task that made its rows
// (position_attention.cpp's projected Gram: a cell's attention outputs and
// features of every image, still in the task's workspace), so the rows are
// never written as maps and read back by cell_cross_gram.cpp.
//
// The result is cell_cross_gram's: the Gram of (row_l - row_0), row and column
// 0 zero (centering, done afterwards, is invariant to the common shift, which
// keeps float32 accurate for features with a large common mean). The shifted
// rows are packed into an L1 tile of gram_tiles.h and its register-blocked
// Gram summed into double accumulators tile by tile, as cell_cross_gram does.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_features.h"
#include "gram_tiles.h"

namespace cskd::segment_gram {

using namespace cskd::tiles;

// Row l is the concatenation of `segments` segments of `len` values, segment s at rows[l] + s * strides[l].
template <typename T>
struct Rows {
  const T* const* rows;
  const int64_t* strides;
  int64_t count;
  int64_t segments;
  int64_t len;
};

// Scratch values the tile needs for `count` rows.
template <typename T>
int64_t tile_size(int64_t count) {
  return std::max<int64_t>(count - 1, 1) * tile_ld<T>(block_columns<T>(count - 1));
}

template <int Bytes, typename T>
CSKD_TILES_INLINE void accumulate_body(const Rows<T>& in, T* tile, double* acc) {
  const int64_t r = in.count, block = block_columns<T>(r - 1), ld = tile_ld<T>(block);
  int64_t pos = 0;
  for (int64_t s = 0; s < in.segments; ++s) {
    for (int64_t done = 0; done < in.len;) {
      const int64_t take = std::min(in.len - done, block - pos);
      const T* r0 = in.rows[0] + s * in.strides[0] + done;
      for (int64_t l = 1; l < r; ++l) {
        const T* src = in.rows[l] + s * in.strides[l] + done;
        T* dst = tile + (l - 1) * ld + pos;
#pragma omp simd
        for (int64_t j = 0; j < take; ++j) dst[j] = src[j] - r0[j];
      }
      pos += take;
      done += take;
      if (pos == block) {
        gram_block<Bytes>(tile, ld, r - 1, pos, acc + r + 1, r);
        pos = 0;
      }
    }
  }
  if (pos > 0) gram_block<Bytes>(tile, ld, r - 1, pos, acc + r + 1, r);
}

template <typename T>
void accumulate_baseline(const Rows<T>& in, T* tile, double* acc) {
  accumulate_body<kBaselineBytes>(in, tile, acc);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
template <typename T>
__attribute__((target("avx2,fma"))) void accumulate_avx2(const Rows<T>& in, T* tile, double* acc) {
  accumulate_body<kAvx2Bytes>(in, tile, acc);
}

template <typename T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512"))) void accumulate_avx512(
    const Rows<T>& in, T* tile, double* acc) {
  accumulate_body<kAvx512Bytes>(in, tile, acc);
}
#endif

// acc (count x count, row-major, lower triangle) += the Gram of (row_l - row_0); tile holds tile_size<T>(count).
template <typename T>
void accumulate(const Rows<T>& in, T* tile, double* acc) {
  if (in.count < 2) return;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (cskd::cpu::has_avx512_core()) return accumulate_avx512(in, tile, acc);
  if (cskd::cpu::has_avx2_fma()) return accumulate_avx2(in, tile, acc);
#endif
  accumulate_baseline(in, tile, acc);
}

// The upper triangle of a count x count matrix from its lower one.
inline void mirror_lower(double* g, int64_t count) {
  for (int64_t a = 0; a < count; ++a)
    for (int64_t b = 0; b < a; ++b) g[b * count + a] = g[a * count + b];
}

}  // namespace cskd::segment_gram
