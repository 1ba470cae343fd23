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

// The Gram's backward: out row i (at outs[i], segments out_strides[i] apart) = sum_{l >= 1} m[i][l] (row_l - row_0)
// for m (count x count, centered: its rows sum to zero, so this is m's combination of the rows
// themselves, the shift only keeping float32 accurate). The shifted rows are packed a tile at a time and
// combine_rows_to writes the tile's output pieces straight to outs (an out row may be an input row: the
// tile holds every input's piece before any output piece is written).
template <int Bytes, typename T>
CSKD_TILES_INLINE void combine_body(const T* m, const Rows<T>& in, T* const* outs, const int64_t* out_strides,
                                    T* tile) {
  const int64_t r = in.count, block = block_columns<T>(r - 1), ld = tile_ld<T>(block);
  for (int64_t s = 0; s < in.segments; ++s) {
    for (int64_t done = 0; done < in.len;) {
      const int64_t take = std::min(in.len - done, block);
      const T* r0 = in.rows[0] + s * in.strides[0] + done;
      for (int64_t l = 1; l < r; ++l) {
        const T* src = in.rows[l] + s * in.strides[l] + done;
        T* dst = tile + (l - 1) * ld;
#pragma omp simd
        for (int64_t j = 0; j < take; ++j) dst[j] = src[j] - r0[j];
      }
      combine_rows_to<Bytes>(m + 1, r, tile, ld, r - 1, r, take,
                             [&](int64_t i) { return outs[i] + s * out_strides[i] + done; });
      done += take;
    }
  }
}

template <typename T>
void accumulate_baseline(const Rows<T>& in, T* tile, double* acc) {
  accumulate_body<kBaselineBytes>(in, tile, acc);
}

template <typename T>
void combine_baseline(const T* m, const Rows<T>& in, T* const* outs, const int64_t* out_strides, T* tile) {
  combine_body<kBaselineBytes>(m, in, outs, out_strides, tile);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CSKD_SEGMENT_AVX2 __attribute__((target("avx2,fma")))
#define CSKD_SEGMENT_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")))

template <typename T>
CSKD_SEGMENT_AVX2 void accumulate_avx2(const Rows<T>& in, T* tile, double* acc) {
  accumulate_body<kAvx2Bytes>(in, tile, acc);
}

template <typename T>
CSKD_SEGMENT_AVX512 void accumulate_avx512(const Rows<T>& in, T* tile, double* acc) {
  accumulate_body<kAvx512Bytes>(in, tile, acc);
}

template <typename T>
CSKD_SEGMENT_AVX2 void combine_avx2(const T* m, const Rows<T>& in, T* const* outs, const int64_t* out_strides,
                                    T* tile) {
  combine_body<kAvx2Bytes>(m, in, outs, out_strides, tile);
}

template <typename T>
CSKD_SEGMENT_AVX512 void combine_avx512(const T* m, const Rows<T>& in, T* const* outs, const int64_t* out_strides,
                                        T* tile) {
  combine_body<kAvx512Bytes>(m, in, outs, out_strides, tile);
}
#define CSKD_SEGMENT_DISPATCH(name, ...)                                   \
  do {                                                                     \
    if (cskd::cpu::has_avx512_core()) return name##_avx512(__VA_ARGS__);   \
    if (cskd::cpu::has_avx2_fma()) return name##_avx2(__VA_ARGS__);        \
    return name##_baseline(__VA_ARGS__);                                   \
  } while (0)
#else
#define CSKD_SEGMENT_DISPATCH(name, ...) return name##_baseline(__VA_ARGS__)
#endif

// acc (count x count, row-major, lower triangle) += the Gram of (row_l - row_0); tile holds tile_size<T>(count).
template <typename T>
void accumulate(const Rows<T>& in, T* tile, double* acc) {
  if (in.count < 2) return;
  CSKD_SEGMENT_DISPATCH(accumulate, in, tile, acc);
}

// outs[i] (segment s at outs[i] + s * out_strides[i]) = sum_l m[i][l] (row_l - row_0), m (count x count)
// centered; tile holds tile_size<T>(count) values.
template <typename T>
void combine(const T* m, const Rows<T>& in, T* const* outs, const int64_t* out_strides, T* tile) {
  CSKD_SEGMENT_DISPATCH(combine, m, in, outs, out_strides, tile);
}

// The upper triangle of a count x count matrix from its lower one.
inline void mirror_lower(double* g, int64_t count) {
  for (int64_t a = 0; a < count; ++a)
    for (int64_t b = 0; b < a; ++b) g[b * count + a] = g[a * count + b];
}

}  // namespace cskd::segment_gram
