// Python access to cskd::blas::gemm, the product every kernel here runs on, so
// the tests can check it on its own against torch.mm (all operand layouts, odd
// sizes) and the benchmarks can measure its rate (the floors use the faster of
// it and torch.mm).
#include <torch/extension.h>

#include <algorithm>

#include "denormals.h"
#include "gemm.h"
#include "ops.h"

namespace {

template <typename scalar_t>
void parallel_gemm(const torch::Tensor& a, const torch::Tensor& b, bool trans_a, bool trans_b,
                   const torch::Tensor& addend, bool upper, torch::Tensor& out) {
  const int64_t m = out.size(0), n = out.size(1), k = trans_a ? a.size(0) : a.size(1);
  constexpr int64_t kQuantum = 32;  // panel edges on whole micro tiles
  const int64_t panels = upper ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kQuantum));
  const int64_t width = ((n + panels - 1) / panels + kQuantum - 1) / kQuantum * kQuantum;
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const scalar_t* bp = b.data_ptr<scalar_t>();
  const scalar_t* dp = addend.defined() ? addend.data_ptr<scalar_t>() : nullptr;
  const int64_t ldd = addend.defined() ? addend.stride(0) : 0;
  scalar_t* op = out.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static, 1) num_threads(panels)
  for (int64_t panel = 0; panel < panels; ++panel) {
    const int64_t j0 = std::min(n, panel * width), columns = std::min(n, j0 + width) - j0;
    if (columns == 0 && panel > 0) continue;
    // Column j0 of op(b) starts j0 rows down b when b is stored transposed.
    cskd::blas::gemm<scalar_t>(trans_a, trans_b, m, columns, k, ap, a.stride(0), bp + j0 * (trans_b ? b.stride(0) : 1),
                               b.stride(0), op + j0, n, dp ? dp + j0 : nullptr, ldd, upper);
  }
}

// op(a) op(b) (+ addend), a and b stored as given (row-major, any leading dimension of a
// contiguous last axis). With upper the product is taken as symmetric and only its
// upper triangle (j >= i) is returned, the rest zero. Without upper, column panels run
// in parallel on torch's thread count (the kernels call gemm one task per thread).
torch::Tensor gemm(const torch::Tensor& a, const torch::Tensor& b, bool trans_a, bool trans_b,
                   const c10::optional<torch::Tensor>& addend, bool upper) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1 && a.device().is_cpu() &&
                  a.scalar_type() == b.scalar_type(),
              "gemm: a and b must be 2-D CPU matrices of one dtype with contiguous rows");
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t n = trans_b ? b.size(0) : b.size(1);
  TORCH_CHECK((trans_b ? b.size(1) : b.size(0)) == k, "gemm: inner sizes differ");
  auto out = at::zeros({m, n}, a.options());
  if (addend) {
    TORCH_CHECK(addend->sizes() == out.sizes() && addend->stride(1) == 1 && addend->scalar_type() == a.scalar_type(),
                "gemm: addend must be (m, n) with contiguous rows");
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gemm", [&] {
    parallel_gemm<scalar_t>(a, b, trans_a, trans_b, addend ? *addend : torch::Tensor(), upper, out);
  });
  return upper ? out.triu() : out;
}

}  // namespace

void register_gemm(pybind11::module& m) {
  m.def("gemm", cskd::denormals::flushing(&gemm),
        "op(a) op(b) (+ addend) on the kernels' own product routine", pybind11::arg("a"),
        pybind11::arg("b"), pybind11::arg("trans_a"), pybind11::arg("trans_b"), pybind11::arg("addend") = pybind11::none(),
        pybind11::arg("upper") = false);
  m.def("gemm_runs_own_kernel", [] { return cskd::blas::own_kernel_runs<float>(); },
        "whether float32 products run on the package's AVX-512 kernel (else the BLAS torch links)");
}
