// Python access to cskd::blas::gemm, the product every kernel here runs on, so
// the tests can check it on its own against torch.mm (all operand layouts, odd sizes).
#include <torch/extension.h>

#include "gemm.h"
#include "ops.h"

namespace {

// op(a) op(b) (+ addend), a and b stored as given (row-major, any leading dimension of a
// contiguous last axis). With upper the product is taken as symmetric and only its
// upper triangle (j >= i) is returned, the rest zero.
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
    cskd::blas::gemm<scalar_t>(trans_a, trans_b, m, n, k, a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(),
                               b.stride(0), out.data_ptr<scalar_t>(), n,
                               addend ? addend->data_ptr<scalar_t>() : nullptr, addend ? addend->stride(0) : 0, upper);
  });
  return upper ? out.triu() : out;
}

}  // namespace

void register_gemm(pybind11::module& m) {
  m.def("gemm", &gemm, "op(a) op(b) (+ addend) on the kernels' own product routine", pybind11::arg("a"),
        pybind11::arg("b"), pybind11::arg("trans_a"), pybind11::arg("trans_b"), pybind11::arg("addend") = pybind11::none(),
        pybind11::arg("upper") = false);
  m.def("gemm_runs_own_kernel", [] { return cskd::blas::own_kernel_runs<float>(); },
        "whether float32 products run on the package's AVX-512 kernel (else the BLAS torch links)");
}
