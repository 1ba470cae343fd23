// The elementwise pass of the MSE between attention outputs (see
// cskd_kernels/modules/attention_mse.py, _squared_error_pass, for the contract):
//
//   d = x_s - x_t + g (o_s - o_t)        (without o_s: x_s - x_t - g o_t)
//   r = w d                              (w a scalar or one weight per position)
//   returns (sum d r, sum r (o_s - o_t))  (without o_s: -sum r o_t), in float64
//
// over (rows, positions) maps of one dtype. One read of each map and one write
// of r (which may be x_s itself: each element is read before it is written),
// where the chunked PyTorch pass made about eight passes over cache-sized
// chunks, ~1000 small ops a Cityscapes step. Each row's sums are taken in
// float64 and the rows added in order, so the result does not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "denormals.h"
#include "ops.h"

namespace {

template <typename scalar_t>
void squared_error_rows(const scalar_t* x_s, const scalar_t* o_s, const scalar_t* x_t, const scalar_t* o_t,
                        scalar_t g, const scalar_t* weight, scalar_t scalar_weight, scalar_t* r, int64_t rows,
                        int64_t positions, double* loss_rows, double* gamma_rows) {
  // The extension's OpenMP, as its other kernels (torch's thread pool may be another runtime's).
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t row = 0; row < rows; ++row) {
    {
      const int64_t base = row * positions;
      double loss = 0, gamma = 0;
      if (o_s != nullptr) {
#pragma omp simd reduction(+ : loss, gamma)
        for (int64_t i = 0; i < positions; ++i) {
          const scalar_t e = o_s[base + i] - o_t[base + i];
          const scalar_t d = x_s[base + i] - x_t[base + i] + g * e;
          const scalar_t ri = (weight ? weight[i] : scalar_weight) * d;
          r[base + i] = ri;
          loss += static_cast<double>(d) * ri;
          gamma += static_cast<double>(e) * ri;
        }
      } else {
#pragma omp simd reduction(+ : loss, gamma)
        for (int64_t i = 0; i < positions; ++i) {
          const scalar_t ot = o_t[base + i];
          const scalar_t d = x_s[base + i] - x_t[base + i] - g * ot;
          const scalar_t ri = (weight ? weight[i] : scalar_weight) * d;
          r[base + i] = ri;
          loss += static_cast<double>(d) * ri;
          gamma -= static_cast<double>(ot) * ri;
        }
      }
      loss_rows[row] = loss;
      gamma_rows[row] = gamma;
    }
  }
}

void check_map(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == like.sizes(),
              "squared_error_pass: ", name, " must be a contiguous CPU tensor ", like.sizes(), " ",
              like.scalar_type(), " like r, got ", t.sizes(), " ", t.scalar_type());
}

// (sum d r, sum r (o_s - o_t)) as a float64 tensor of 2; r written in place. g is a one-element
// tensor (read here: no host value for torch.compile to trace). o_s and weight may be None, and x_s
// None when r holds it; weight, when given, holds one value per position (the maps' last dimension).
at::Tensor squared_error_pass(const c10::optional<at::Tensor>& x_s_in, const c10::optional<at::Tensor>& o_s, const at::Tensor& x_t,
                              const at::Tensor& o_t, const at::Tensor& g, const c10::optional<at::Tensor>& weight,
                              double scalar_weight, at::Tensor r) {
  TORCH_CHECK(r.dim() == 2 && (r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble),
              "squared_error_pass: r must be a (rows, positions) float32 or float64 map, got ", r.sizes(), " ",
              r.scalar_type());
  check_map(r, r, "r");
  const at::Tensor x_s = x_s_in.has_value() && x_s_in->defined() ? *x_s_in : r;  // None: r holds x_s (in place)
  check_map(x_s, r, "x_s");
  check_map(x_t, r, "x_t");
  check_map(o_t, r, "o_t");
  const bool has_o_s = o_s.has_value() && o_s->defined(), has_weight = weight.has_value() && weight->defined();
  if (has_o_s) check_map(*o_s, r, "o_s");
  TORCH_CHECK(g.numel() == 1 && g.device().is_cpu(), "squared_error_pass: g must be a one-element CPU tensor");
  const int64_t rows = r.size(0), positions = r.size(1);
  if (has_weight)
    TORCH_CHECK(weight->is_contiguous() && weight->numel() == positions && weight->scalar_type() == r.scalar_type(),
                "squared_error_pass: weight must hold one ", r.scalar_type(), " per position (", positions,
                "), got ", weight->sizes(), " ", weight->scalar_type());
  std::vector<double> loss_rows(rows), gamma_rows(rows);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "squared_error_pass", [&] {
    squared_error_rows<scalar_t>(x_s.data_ptr<scalar_t>(), has_o_s ? o_s->data_ptr<scalar_t>() : nullptr,
                                 x_t.data_ptr<scalar_t>(), o_t.data_ptr<scalar_t>(), g.item<scalar_t>(),
                                 has_weight ? weight->data_ptr<scalar_t>() : nullptr,
                                 static_cast<scalar_t>(scalar_weight), r.data_ptr<scalar_t>(), rows, positions,
                                 loss_rows.data(), gamma_rows.data());
  });
  double loss = 0, gamma = 0;
  for (int64_t row = 0; row < rows; ++row) {
    loss += loss_rows[row];
    gamma += gamma_rows[row];
  }
  return at::tensor({loss, gamma}, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

void register_squared_error(pybind11::module& m) {
  m.def("squared_error_pass", cskd::denormals::flushing(&squared_error_pass),
        "The MSE's elementwise pass: r = w d in place, returns (sum d r, sum r (o_s - o_t)) in float64",
        pybind11::arg("x_s"), pybind11::arg("o_s"), pybind11::arg("x_t"), pybind11::arg("o_t"), pybind11::arg("g"),
        pybind11::arg("weight"), pybind11::arg("scalar_weight"), pybind11::arg("r"));
}
