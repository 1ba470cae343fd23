// Vectorised float exp, shared by the kernels whose inner loop is one
// exponential per element (position and channel attention's softmax rows,
// CWD's log-sum-exp), and the horizontal reductions around it. glibc's expf has no SIMD variant without -ffast-math, and the
// extension is built for baseline x86-64, so the AVX2 and AVX-512 bodies are
// compiled with target attributes and chosen at run time by the caller.
//
// exp(x) = 2^n exp(r): n = round(x log2 e), r = x - n ln 2 (ln 2 in two
// parts), exp(r) by Cephes' degree-6 polynomial (about 1 ulp), 2^n built in
// the exponent bits.
// Range, chosen explicitly:
// - underflow: arguments below -87.3 (exp under FLT_MIN) give exactly 0, never
//   a denormal; in particular -inf (padding lanes) gives 0;
// - overflow: arguments are clamped to 88 (exp(88) ~ 1.65e38 < FLT_MAX); the
//   callers subtract a maximum first, so their arguments are <= 0;
// - NaN gives NaN (the clamps take x as their second operand, which min/max
//   return when either is NaN): a NaN or Inf in the kernels' input reaches
//   their sums and outputs instead of turning into a finite exp(-87.3).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "cpu_features.h"

#define CSKD_X86_SIMD 1
#define CSKD_AVX2 __attribute__((target("avx2,fma")))
#define CSKD_AVX512 __attribute__((target("avx512f,avx2,fma")))

namespace cskd::simd {

constexpr float kExpLowest = -87.3f;
constexpr float kExpHighest = 88.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f;     // exact in a few bits: n * kLn2High has no rounding
constexpr float kLn2Low = -2.12194440e-4f;   // ln 2 - kLn2High
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

CSKD_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(kExpLowest);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(kExpHighest), _mm256_max_ps(lowest, x));  // NaN passes both
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[i]));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// The same operations as exp256, on 16 lanes.
CSKD_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(kExpLowest);
  const __mmask16 in_range = _mm512_cmp_ps_mask(x, lowest, _CMP_NLT_UQ);  // NaN is kept, as in exp256
  x = _mm512_min_ps(_mm512_set1_ps(kExpHighest), _mm512_max_ps(lowest, x));  // NaN passes both
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[i]));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(in_range, p, _mm512_castsi512_ps(bits));
}

// The sum, maximum and minimum of 8 lanes: the row statistics around the exps (softmax rows' sums and
// extremes, CWD's log-sum-exp).
CSKD_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

CSKD_AVX2 inline float horizontal_max(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

CSKD_AVX2 inline float horizontal_min(__m256 v) {
  __m128 x = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_min_ps(x, _mm_movehl_ps(x, x));
  x = _mm_min_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

}  // namespace cskd::simd

#endif
