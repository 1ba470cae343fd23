// Channel self-attention (CAM, SPEC section 2) on the CPU.
//
// Per image X (C x N): E = X X^T, A = softmax_rows(-E / T), out = gamma A X + X.
// The Gram products (X X^T, dOut X^T) run on the BLAS that PyTorch links
// (at::bmm); the products with a C x C left operand (A X, A^T dOut, dE X) run
// panel by panel on cskd::blas::gemm (our AVX-512 kernel where MKL would run
// AVX2), the residual added while the panel is in cache. Everything else is
// C x C algebra done in OpenMP loops, so the only C x N tensors ever allocated
// are the output of the forward and dX of the backward.
//
// Backward, with G = dOut X^T (C x C):
//   d gamma = sum(dOut * A X) = sum(A * G)          (no A X needed)
//   r_i     = sum_j A_ij G_ij                        (softmax's rowsum(dA * A) / gamma)
//   dE      = -(gamma / T) A * (G - r)               (softmax backward through -E/T)
//   dX      = gamma A^T dOut + (dE + dE^T) X + dOut  (two products accumulated into dX)
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gemm.h"
#include "ops.h"

namespace {

constexpr int64_t kColumnPanel = 256;  // a C x 256 float panel of the product: L2-resident up to C = 512
constexpr int64_t kPackPad = 16;       // packed rows 272 values apart: consecutive rows in different cache sets

// out_b = op(m_b) rhs_b + residual_b for every image b, op(m) = m or m^T (m: B x C x C,
// rhs, residual, out: B x C x N contiguous; residual may be out itself). One task per
// (image, column panel); the product lands in a thread-local panel, then the residual is added.
template <typename scalar_t>
void product_plus_residual(const torch::Tensor& m, bool transpose_m, const torch::Tensor& rhs,
                           const torch::Tensor& residual, torch::Tensor& out) {
  const int64_t batch = rhs.size(0), channels = rhs.size(1), n = rhs.size(2);
  const int64_t panels = (n + kColumnPanel - 1) / kColumnPanel;
  const scalar_t* mp = m.data_ptr<scalar_t>();
  const scalar_t* rp = rhs.data_ptr<scalar_t>();
  const scalar_t* sp = residual.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < batch * panels; ++task) {
    const int64_t b = task / panels, j0 = (task % panels) * kColumnPanel;
    const int64_t width = std::min(kColumnPanel, n - j0);
    scalar_t* panel = cskd::blas::workspace<scalar_t>(channels * (2 * kColumnPanel + kPackPad));
    scalar_t* packed = panel + channels * kColumnPanel;
    const int64_t offset = b * channels * n + j0;
    // The rhs panel's rows lie n apart (a power of two at the usual map sizes): read in place, every
    // row falls in the same cache sets and the product runs from L3. Packed with a padded stride first.
    const int64_t ld = kColumnPanel + kPackPad;
    for (int64_t i = 0; i < channels; ++i) std::copy_n(rp + offset + i * n, width, packed + i * ld);
    cskd::blas::gemm<scalar_t>(transpose_m, false, channels, width, channels, mp + b * channels * channels,
                               channels, packed, ld, panel, width);
    for (int64_t i = 0; i < channels; ++i) {
      const scalar_t* pi = panel + i * width;
      const scalar_t* si = sp + offset + i * n;
      scalar_t* oi = op + offset + i * n;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) oi[j] = pi[j] + si[j];
    }
  }
}

// A = softmax(-E / T) row by row, in place. The row minimum of E is the row
// maximum of -E, so every exponent is <= 0 and the sum is >= 1.
template <typename scalar_t>
void softmax_negated_rows_(scalar_t* energy, int64_t rows, int64_t cols, double temperature) {
  const scalar_t inv_t = static_cast<scalar_t>(1.0 / temperature);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    scalar_t* e = energy + row * cols;
    scalar_t lowest = e[0];
    for (int64_t j = 1; j < cols; ++j) lowest = e[j] < lowest ? e[j] : lowest;
    scalar_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < cols; ++j) {
      const scalar_t p = std::exp((lowest - e[j]) * inv_t);
      e[j] = p;
      total += p;
    }
    const scalar_t inv_total = scalar_t(1) / total;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) e[j] *= inv_total;
  }
}

// From G (overwritten) and A: r_i = sum_j A_ij G_ij into row_dots, then
// G <- dE = -(gamma / T) A * (G - r) (B x C x C, row-parallel).
template <typename scalar_t>
void softmax_backward_rows_(scalar_t* grad_gram, const scalar_t* attention, scalar_t* row_dots, int64_t rows,
                            int64_t cols, scalar_t scale) {
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    scalar_t* g = grad_gram + row * cols;
    const scalar_t* a = attention + row * cols;
    scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < cols; ++j) dot += a[j] * g[j];
    row_dots[row] = dot;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) g[j] = scale * a[j] * (g[j] - dot);
  }
}

// M = D + D^T per image (B x C x C): the Gram's gradient, symmetric because E is.
template <typename scalar_t>
void symmetrize(const scalar_t* d, scalar_t* m, int64_t batch, int64_t channels) {
  const int64_t square = channels * channels;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < channels; ++i) {
      const scalar_t* db = d + b * square;
      scalar_t* mi = m + b * square + i * channels;
      for (int64_t j = 0; j < channels; ++j) mi[j] = db[i * channels + j] + db[j * channels + i];
    }
  }
}

// Row r's columns left of its panel are E[c, r] with c in an earlier panel:
// computed by the panel products, never written here, so rows run in parallel.
template <typename scalar_t>
void mirror_lower_panels(scalar_t* gram, int64_t batch, int64_t channels, const std::vector<int64_t>& starts) {
  const int64_t square = channels * channels;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < channels; ++r) {
      const int64_t first = *(std::upper_bound(starts.begin(), starts.end(), r) - 1);  // r's panel start
      scalar_t* e = gram + b * square;
      for (int64_t c = 0; c < first; ++c) e[r * channels + c] = e[c * channels + r];
    }
  }
}

// Panels of at least this many channels keep each product large enough for the BLAS to run at speed.
constexpr int64_t kGramPanel = 64;

// E = X X^T computed on and above the diagonal panel by panel, then mirrored:
// with P panels the products do C^2 N (P + 1) / (2P) multiply-adds instead of
// C^2 N (3/4 of it at C = 128, 5/8 at 256, 9/16 at 512; 64-row panels measured
// faster than 128-row ones at the released sizes).
torch::Tensor symmetric_gram(const torch::Tensor& x) {
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t panels = std::max<int64_t>(1, channels / kGramPanel);
  if (panels == 1) return at::bmm(x, x.transpose(1, 2));
  auto gram = at::empty({batch, channels, channels}, x.options());
  std::vector<int64_t> starts(panels + 1);
  for (int64_t p = 0; p <= panels; ++p) starts[p] = p * channels / panels;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t begin = starts[p], end = starts[p + 1];
    auto rows = x.narrow(1, begin, end - begin);
    auto rest = x.narrow(1, begin, channels - begin);
    gram.narrow(1, begin, end - begin).narrow(2, begin, channels - begin).copy_(at::bmm(rows, rest.transpose(1, 2)));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "symmetric_gram", [&] {
    mirror_lower_panels<scalar_t>(gram.data_ptr<scalar_t>(), batch, channels, starts);
  });
  return gram;
}

void check_features(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(),
              "channel_attention (cpu): expected contiguous CPU features (B, C, N), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble,
              "channel_attention (cpu): float32 or float64 only, got ", x.scalar_type());
}

// gamma lives on the CPU here, so reading it is a memory load, not a device sync.
double scalar_of(const torch::Tensor& gamma) {
  TORCH_CHECK(gamma.numel() == 1, "channel_attention (cpu): gamma must have one element, got ", gamma.sizes());
  return gamma.to(torch::kDouble).item<double>();
}

}  // namespace

// out = gamma A x + x for x (B, C, N) and A (B, C, C) contiguous: one product, the residual added panel by panel.
torch::Tensor channel_attention_apply(const torch::Tensor& x, const torch::Tensor& attention,
                                      const torch::Tensor& gamma) {
  check_features(x);
  TORCH_CHECK(attention.dim() == 3 && attention.is_contiguous() && attention.size(0) == x.size(0) &&
                  attention.size(1) == x.size(1) && attention.size(2) == x.size(1) &&
                  attention.scalar_type() == x.scalar_type(),
              "channel_attention (cpu): attention must be contiguous (B, C, C) like x ", x.sizes(), ", got ",
              attention.sizes());
  auto scaled = attention * scalar_of(gamma);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_attention_apply",
                             [&] { product_plus_residual<scalar_t>(scaled, false, x, x, out); });
  return out;
}

// x (B, C, N) contiguous -> (out (B, C, N), attention A (B, C, C)).
std::vector<torch::Tensor> channel_attention_forward(const torch::Tensor& x, const torch::Tensor& gamma,
                                                     double temperature) {
  check_features(x);
  const double g = scalar_of(gamma);
  auto attention = symmetric_gram(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_attention_forward", [&] {
    softmax_negated_rows_<scalar_t>(attention.data_ptr<scalar_t>(), x.size(0) * x.size(1), x.size(1), temperature);
  });
  return {channel_attention_apply(x, attention, gamma), attention};
}

// Gradients (dx or an undefined tensor when need_x is false, d gamma shaped like gamma).
std::vector<torch::Tensor> channel_attention_backward(const torch::Tensor& grad_out, const torch::Tensor& x,
                                                      const torch::Tensor& attention, const torch::Tensor& gamma,
                                                      double temperature, bool need_x) {
  check_features(x);
  check_features(grad_out);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "channel_attention (cpu): grad ", grad_out.sizes(), " vs x ", x.sizes());
  const double g = scalar_of(gamma);
  const int64_t batch = x.size(0), channels = x.size(1);
  auto grad_gram = at::bmm(grad_out, x.transpose(1, 2));  // G = dOut X^T, becomes dE in place
  auto row_dots = at::empty({batch, channels}, x.options());
  torch::Tensor grad_x;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_attention_backward", [&] {
    const auto scale = static_cast<scalar_t>(-g / temperature);
    softmax_backward_rows_<scalar_t>(grad_gram.data_ptr<scalar_t>(), attention.data_ptr<scalar_t>(),
                                     row_dots.data_ptr<scalar_t>(), batch * channels, channels, scale);
    if (need_x) {
      auto symmetric = at::empty_like(grad_gram);
      symmetrize<scalar_t>(grad_gram.data_ptr<scalar_t>(), symmetric.data_ptr<scalar_t>(), batch, channels);
      // dX = (gamma A)^T dOut + dOut, then dX += (dE + dE^T) X in place.
      grad_x = at::empty_like(x);
      product_plus_residual<scalar_t>(attention * g, true, grad_out, grad_out, grad_x);
      product_plus_residual<scalar_t>(symmetric, false, x, grad_x, grad_x);
    }
  });
  // sum_i r_i = sum(A * G) = d gamma; accumulated in float64 (B*C terms).
  auto grad_gamma = row_dots.sum(torch::kDouble).to(gamma.scalar_type()).reshape(gamma.sizes());
  return {grad_x, grad_gamma};
}

void register_channel_attention(pybind11::module& m) {
  m.def("channel_attention_forward", &channel_attention_forward,
        "CAM forward: (out, attention) for contiguous x (B, C, N), gamma (1 element), temperature",
        pybind11::arg("x"), pybind11::arg("gamma"), pybind11::arg("temperature"));
  m.def("channel_attention_apply", &channel_attention_apply,
        "gamma A x + x for contiguous x (B, C, N) and attention A (B, C, C)", pybind11::arg("x"),
        pybind11::arg("attention"), pybind11::arg("gamma"));
  m.def("channel_attention_backward", &channel_attention_backward,
        "CAM backward: (dx or None, dgamma) from grad_out, x, attention, gamma, temperature",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("attention"), pybind11::arg("gamma"),
        pybind11::arg("temperature"), pybind11::arg("need_x"));
}
