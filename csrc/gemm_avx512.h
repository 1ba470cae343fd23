// Packed single-precision products on AVX-512, for CPUs where the linked MKL
// runs its AVX2 kernels (it picks AVX-512 on Intel CPUs only). Measured on an
// AVX-512 AMD EPYC: FMA peak 255 GFLOP/s per core with zmm registers, 124
// with ymm, and MKL's sgemm reaches 108 per core.
//
// The layout is GotoBLAS/BLIS's: a kKC-deep block of op(B) is packed into
// kNR-column panels (p-major, kNR values per p), a block of op(A) into
// kMR-row panels (kMR values per p), and a register micro-kernel computes a
// kMR x kNR tile of C from one panel of each: 16 zmm accumulators, two vector
// loads of B and kMR broadcasts of A per step of p. Packing makes every
// operand layout (plain or transposed, any leading dimension) look the same
// to the micro-kernel, and reads rows that lie a power of two apart (which
// share cache sets) once instead of once per tile. The packing transposes
// run 16 x 16 in registers.
#pragma once

#include "simd_exp.h"

#ifdef CSKD_X86_SIMD
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

// GCC 12 reports the AVX-512 shuffle intrinsics' own undefined pass-through
// operands as "may be used uninitialized" once they are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace cskd::blas::avx512 {

constexpr int64_t kMR = 8;     // rows of a micro tile (broadcast from packed A)
constexpr int64_t kNR = 32;    // columns of a micro tile (two zmm of packed B)
constexpr int64_t kKC = 256;   // depth of a packed block: a B panel (32 KiB) stays in L1 across A's panels
constexpr int64_t kMC = 512;   // rows of op(A) packed at once (512 KiB): C x C attention matrices in one block
constexpr int64_t kNC = 512;   // columns of op(B) packed at once (512 KiB, with A's block within L2 + L3)

// Element (i, p) of a matrix view at ptr[i * row + p * depth].
struct View {
  const float* ptr;
  int64_t row, depth;
};

// A thread's packing buffer, 64-byte aligned, kept for the next product.
inline float* pack_buffer(int which, int64_t count) {
  struct Buffer {
    std::unique_ptr<float, decltype(&std::free)> data{nullptr, &std::free};
    int64_t size = 0;
  };
  static thread_local Buffer buffers[2];
  Buffer& b = buffers[which];
  if (b.size < count) {
    const size_t bytes = (static_cast<size_t>(count) * sizeof(float) + 63) / 64 * 64;
    b.data.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!b.data) throw std::bad_alloc();
    b.size = count;
  }
  return b.data.get();
}

inline __mmask16 lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// In-register transpose of a 16 x 16 block: r[i] lane j <- r[j] lane i.
CSKD_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4g + c], 128-bit lane L: rows 4g..4g+3 of column 4L + c.
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // t[c] (c < 8): rows 0-3 and 4-7 of columns c and c + 8; t[8 + c] the same for rows 8-15.
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[c + 4] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
  }
}

// dst <- rows [0, rows) x depth [0, kc) of src as R-row panels: panel q holds
// dst[q * kc * R + p * R + r] = src(q * R + r, p), zero for rows past `rows`.
template <int64_t R>
CSKD_AVX512 void pack_panels(View src, int64_t rows, int64_t kc, float* dst) {
  static_assert(R % 8 == 0 && (R <= 16 || R % 16 == 0), "panels of 8, 16 or a multiple of 16 rows");
  const int64_t padded = (rows + R - 1) / R * R;
  if (src.row == 1) {
    // Each p holds R consecutive rows: masked vector copies, p by p, so that src is read in order
    // (its p lie src.depth apart, often a power of two: panel by panel, every panel's kc short reads
    // would fall into the same cache sets and be evicted before the next panel reads their neighbours).
    for (int64_t p = 0; p < kc; ++p) {
      const float* s = src.ptr + p * src.depth;
      for (int64_t q = 0; q < padded; q += R) {
        float* out = dst + q * kc + p * R;
        for (int64_t l = 0; l < R; l += 16)
          _mm512_mask_storeu_ps(out + l, lanes(R - l), _mm512_maskz_loadu_ps(lanes(rows - q - l), s + q + l));
      }
    }
    return;
  }
  if (src.depth != 1) {
    for (int64_t i = 0; i < padded; ++i)
      for (int64_t p = 0; p < kc; ++p)
        dst[(i / R) * kc * R + p * R + i % R] = i < rows ? src.ptr[i * src.row + p * src.depth] : 0.0f;
    return;
  }
  // Each row is contiguous in p: 16 rows x 16 p are loaded, transposed in registers, stored p by p.
  for (int64_t r0 = 0; r0 < padded; r0 += 16) {
    const int64_t live = std::min<int64_t>(16, padded - r0);  // 8 when R = 8 and the last panel is odd
    for (int64_t p0 = 0; p0 < kc; p0 += 16) {
      const int64_t width = std::min<int64_t>(16, kc - p0);
      __m512 v[16];
      for (int64_t i = 0; i < 16; ++i)
        v[i] = r0 + i < rows ? _mm512_maskz_loadu_ps(lanes(width), src.ptr + (r0 + i) * src.row + p0)
                             : _mm512_setzero_ps();
      transpose16(v);
      for (int64_t j = 0; j < width; ++j) {
        const int64_t p = p0 + j;
        if constexpr (R >= 16) {
          _mm512_storeu_ps(dst + (r0 / R) * kc * R + p * R + r0 % R, v[j]);
        } else {
          _mm256_storeu_ps(dst + (r0 / R) * kc * R + p * R, _mm512_castps512_ps256(v[j]));
          if (live > 8)
            _mm256_storeu_ps(dst + (r0 / R + 1) * kc * R + p * R,
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[j]), 1)));
        }
      }
    }
  }
}

// C tile (rows x columns of kMR x kNR) = A panel B panel + addend (addend may be c itself, or null).
CSKD_AVX512 inline void micro_kernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                                     const float* addend, int64_t ld_addend, int64_t rows, __mmask16 m0,
                                     __mmask16 m1) {
  __m512 acc0[kMR], acc1[kMR];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_load_ps(b + p * kNR), b1 = _mm512_load_ps(b + p * kNR + 16);
    const float* ap = a + p * kMR;
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512 x = _mm512_set1_ps(ap[r]);
      acc0[r] = _mm512_fmadd_ps(x, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(x, b1, acc1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    if (r >= rows) break;
    float* cr = c + r * ldc;
    if (addend) {
      const float* ar = addend + r * ld_addend;
      acc0[r] = _mm512_add_ps(acc0[r], _mm512_maskz_loadu_ps(m0, ar));
      acc1[r] = _mm512_add_ps(acc1[r], _mm512_maskz_loadu_ps(m1, ar + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, acc0[r]);
    _mm512_mask_storeu_ps(cr + 16, m1, acc1[r]);
  }
}

// C (m x n, row-major, ldc) = op(A) op(B) + addend (m x n, ld_addend; may be C itself; null for none).
// With upper, only tiles that reach the diagonal or above it are computed (a symmetric product's
// upper triangle, every element j >= i written; some below it too).
CSKD_AVX512 inline void gemm(int64_t m, int64_t n, int64_t k, View a, View b, float* c, int64_t ldc,
                             const float* addend, int64_t ld_addend, bool upper) {
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = addend ? addend[i * ld_addend + j] : 0.0f;
    return;
  }
  float* packed_b = pack_buffer(0, kKC * ((std::min(n, kNC) + kNR - 1) / kNR * kNR));
  float* packed_a = pack_buffer(1, kKC * ((std::min(m, kMC) + kMR - 1) / kMR * kMR));
  for (int64_t jc = 0; jc < n; jc += kNC) {
    const int64_t nc = std::min(kNC, n - jc);
    for (int64_t pc = 0; pc < k; pc += kKC) {
      const int64_t kc = std::min(kKC, k - pc);
      pack_panels<kNR>({b.ptr + jc * b.row + pc * b.depth, b.row, b.depth}, nc, kc, packed_b);
      // The first block adds the addend, the later ones what the earlier wrote.
      const float* add = pc == 0 ? addend : c;
      const int64_t ld_add = pc == 0 ? ld_addend : ldc;
      for (int64_t ic = 0; ic < m; ic += kMC) {
        const int64_t mc = std::min(kMC, m - ic);
        if (upper && ic > jc + nc - 1) break;
        pack_panels<kMR>({a.ptr + ic * a.row + pc * a.depth, a.row, a.depth}, mc, kc, packed_a);
        for (int64_t jr = 0; jr < nc; jr += kNR) {
          const int64_t columns = std::min(kNR, nc - jr), j0 = jc + jr;
          const __mmask16 m0 = lanes(columns), m1 = lanes(columns - 16);
          for (int64_t ir = 0; ir < mc; ir += kMR) {
            const int64_t i0 = ic + ir;
            if (upper && i0 > j0 + columns - 1) break;
            const int64_t offset = i0 * ldc + j0;
            micro_kernel(kc, packed_a + ir * kc, packed_b + jr * kc, c + offset, ldc,
                         add ? add + (add == c ? offset : i0 * ld_add + j0) : nullptr, add == c ? ldc : ld_add,
                         std::min(kMR, mc - ir), m0, m1);
          }
        }
      }
    }
  }
}

}  // namespace cskd::blas::avx512

#pragma GCC diagnostic pop

#endif
