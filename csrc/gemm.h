// Row-major products on the calling thread, shared by the kernels that run
// one small product per (image, cell) task inside their own OpenMP loops.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "gemm_avx512.h"

// The BLAS that libtorch links (MKL, OpenBLAS, ...) exports the Fortran
// symbols; calling them directly skips ATen's per-call dispatch, which is
// noticeable at ~1400 small products per grid-mode step. Weak: a torch built
// without BLAS leaves them null and the products go through at::addmm_out.
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
// True where MKL would run its AVX2 kernels although the CPU has AVX-512 (non-Intel CPUs),
// unless the environment sets CSKD_OWN_GEMM=0 (the tests use it to run the BLAS path here).
inline bool use_own_avx512_gemm() {
  static const bool use = [] {
    const char* setting = std::getenv("CSKD_OWN_GEMM");
    const bool allowed = setting == nullptr || std::string(setting) != "0";
    return allowed && cskd::cpu::has_avx512f() && !cskd::cpu::is_intel();
  }();
  return use;
}
#endif

// Whether gemm<scalar_t> runs our AVX-512 kernel rather than the BLAS.
template <typename scalar_t>
bool own_kernel_runs() {
#ifdef CSKD_X86_SIMD
  return std::is_same_v<scalar_t, float> && use_own_avx512_gemm();
#else
  return false;
#endif
}

// Symmetric products on the BLAS (upper): row panels of this many rows from the diagonal rightwards,
// where the depth pays for the extra calls. Measured (MKL, AVX2 EPYC, one thread): X X^T for X 256 x 2025
// 2.8 ms whole, 2.0 ms in panels of 64; 256 x 8192 11.9 -> 8.9 ms; at depth 36 the panels cost more.
constexpr int64_t kSymmetricPanel = 64;
constexpr int64_t kSymmetricPanelDepth = 256;

// Row-major C (m x n) = op(A) op(B) (+ addend, m x n with leading dimension
// ld_addend; it may be C itself), op(A) m x k, op(B) k x n; a transposed
// operand is stored the other way round (A as k x m). With upper, C is
// symmetric (op(A) op(B) = (op(A) op(B))^T, e.g. X X^T) and only elements on
// or above the diagonal are guaranteed written. Runs on the calling thread:
// inside our OpenMP loop the BLAS sees a parallel region and stays serial.
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc, const scalar_t* addend = nullptr,
          int64_t ld_addend = 0, bool upper = false) {
#ifdef CSKD_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (own_kernel_runs<scalar_t>()) {
      avx512::gemm(m, n, k, {a, trans_a ? 1 : lda, trans_a ? lda : 1}, {b, trans_b ? ldb : 1, trans_b ? 1 : ldb}, c,
                   ldc, addend, ld_addend, upper);
      return;
    }
  }
#endif
  if (upper && k >= kSymmetricPanelDepth && m >= 2 * kSymmetricPanel && m == n) {
    // The BLAS has no upper-triangle product (the syrk of the torch we link is not exported): row
    // panels of kSymmetricPanel rows, each from the diagonal rightwards, skip most of the lower triangle.
    for (int64_t i0 = 0; i0 < m; i0 += kSymmetricPanel) {
      gemm<scalar_t>(trans_a, trans_b, std::min(kSymmetricPanel, m - i0), n - i0, k, a + i0 * (trans_a ? 1 : lda), lda,
                     b + i0 * (trans_b ? ldb : 1), ldb, c + i0 * ldc + i0, ldc,
                     addend ? addend + i0 * ld_addend + i0 : nullptr, ld_addend);
    }
    return;
  }
  if (addend && addend != c)
    for (int64_t i = 0; i < m; ++i) std::copy_n(addend + i * ld_addend, n, c + i * ldc);
  const scalar_t beta = addend ? 1 : 0;
  if (const auto blas = blas_gemm<scalar_t>()) {
    // Column-major BLAS computes C^T = op(B)^T op(A)^T: the operands swap places.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = n, N = m, K = k, LDA = ldb, LDB = lda, LDC = ldc;
    const scalar_t one = 1;
    blas(&ta, &tb, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<scalar_t*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor out = view(c, m, n, ldc, false);
  at::addmm_out(out, out, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, 1);
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
