// Row-major products on the calling thread, shared by the kernels that run
// one small product per (image, cell) task inside their own OpenMP loops.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "simd_exp.h"

// The BLAS that libtorch links (MKL, OpenBLAS, ...) exports the Fortran
// symbols; calling them directly skips ATen's per-call dispatch, which is
// noticeable at ~1400 small products per grid-mode step. Weak: a torch built
// without BLAS leaves them null and the products go through at::mm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace cskd::blas {

template <typename scalar_t>
using fortran_gemm = void (*)(const char*, const char*, const int*, const int*, const int*, const scalar_t*,
                              const scalar_t*, const int*, const scalar_t*, const int*, const scalar_t*, scalar_t*,
                              const int*);

template <typename scalar_t>
fortran_gemm<scalar_t> blas_gemm() {
  if constexpr (std::is_same_v<scalar_t, float>) return sgemm_;
  else return dgemm_;
}

#ifdef CSKD_X86_SIMD
// Single-precision products on AVX-512 for CPUs where the linked MKL does not
// use it: MKL picks its AVX-512 kernels on Intel CPUs only and runs AVX2 ones
// on AMD (measured on an AVX-512 EPYC: ~113 GFLOP/s per core for the cell
// products, against ~230 with its AVX-512 kernels). C (m x n, row-major,
// ldc) = A B with A(i, p) at a[i * sa_i + p * sa_p] (plain or transposed) and
// B row-major (k x n, ldb). Register blocking only: a cell's operands
// (k <= 512) already sit in L2, and a 32-column panel of B in L1.
template <int MR>
CSKD_AVX512 inline void gemm_micro_avx512(int64_t k, const float* a, int64_t sa_i, int64_t sa_p, const float* b,
                                          int64_t ldb, float* c, int64_t ldc, __mmask16 m0, __mmask16 m1) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + p * ldb), b1 = _mm512_maskz_loadu_ps(m1, b + p * ldb + 16);
    const float* ap = a + p * sa_p;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(ap[r * sa_i]);
      acc0[r] = _mm512_fmadd_ps(x, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(x, b1, acc1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
  }
}

CSKD_AVX512 inline void gemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t sa_i, int64_t sa_p,
                             const float* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int64_t kMR = 8;
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t w = std::min<int64_t>(32, n - j);
    const __mmask16 m0 = w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << w) - 1);
    const __mmask16 m1 = w >= 32 ? __mmask16(0xFFFF) : w > 16 ? __mmask16((1u << (w - 16)) - 1) : __mmask16(0);
    int64_t i = 0;
    for (; i + kMR <= m; i += kMR)
      gemm_micro_avx512<kMR>(k, a + i * sa_i, sa_i, sa_p, b + j, ldb, c + i * ldc + j, ldc, m0, m1);
    const float* ai = a + i * sa_i;
    float* ci = c + i * ldc + j;
    switch (m - i) {
      case 7: gemm_micro_avx512<7>(k, ai, sa_i, sa_p, b + j, ldb, ci, ldc, m0, m1); break;
      case 6: gemm_micro_avx512<6>(k, ai, sa_i, sa_p, b + j, ldb, ci, ldc, m0, m1); break;
      case 5: gemm_micro_avx512<5>(k, ai, sa_i, sa_p, b + j, ldb, ci, ldc, m0, m1); break;
      case 4: gemm_micro_avx512<4>(k, ai, sa_i, sa_p, b + j, ldb, ci, ldc, m0, m1); break;
      case 3: gemm_micro_avx512<3>(k, ai, sa_i, sa_p, b + j, ldb, ci, ldc, m0, m1); break;
      case 2: gemm_micro_avx512<2>(k, ai, sa_i, sa_p, b + j, ldb, ci, ldc, m0, m1); break;
      case 1: gemm_micro_avx512<1>(k, ai, sa_i, sa_p, b + j, ldb, ci, ldc, m0, m1); break;
      default: break;
    }
  }
}

// True where MKL would run its AVX2 kernels although the CPU has AVX-512 (non-Intel CPUs).
inline bool use_own_avx512_gemm() {
  static const bool use = cskd::cpu::has_avx512f() && !cskd::cpu::is_intel();
  return use;
}
#endif

// Whether gemm<scalar_t>(., trans_b, ...) runs our AVX-512 kernel rather than the BLAS.
template <typename scalar_t>
bool own_kernel_runs(bool trans_b) {
#ifdef CSKD_X86_SIMD
  return std::is_same_v<scalar_t, float> && !trans_b && use_own_avx512_gemm();
#else
  (void)trans_b;
  return false;
#endif
}

// Row-major C (m x n) = op(A) op(B), op(A) m x k, op(B) k x n; a transposed
// operand is stored the other way round (A as k x m). Runs on the calling
// thread: inside our OpenMP loop the BLAS sees a parallel region and stays serial.
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc) {
#ifdef CSKD_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (own_kernel_runs<scalar_t>(trans_b)) {
      gemm_avx512(m, n, k, a, trans_a ? 1 : lda, trans_a ? lda : 1, b, ldb, c, ldc);
      return;
    }
  }
#endif
  if (const auto blas = blas_gemm<scalar_t>()) {
    // Column-major BLAS computes C^T = op(B)^T op(A)^T: the operands swap places.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = n, N = m, K = k, LDA = ldb, LDB = lda, LDC = ldc;
    const scalar_t one = 1, zero = 0;
    blas(&ta, &tb, &M, &N, &K, &one, b, &LDA, a, &LDB, &zero, c, &LDC);
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<scalar_t*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor out = view(c, m, n, ldc, false);
  at::mm_out(out, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
}

// Scratch reused by every task a thread runs (and kept for the next call):
// allocating ~1 MiB per task would page-fault it in again each time.
template <typename scalar_t>
scalar_t* workspace(int64_t count) {
  static thread_local std::vector<scalar_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

}  // namespace cskd::blas
