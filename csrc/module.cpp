// The Python module cskd_kernels._C: each op's file registers its functions.
#include <torch/extension.h>

#include "cpu_features.h"
#include "ops.h"

namespace {

// The widest instruction set the kernels run with here: what the CPU has, capped by CSKD_MAX_ISA.
const char* kernel_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (cskd::cpu::has_avx512_core()) return "avx512";
  if (cskd::cpu::has_avx2_fma()) return "avx2";
#endif
  cskd::cpu::isa_cap();  // refuses a bad CSKD_MAX_ISA on every CPU
  return "baseline";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cskd_kernels C++ CPU kernels";
  register_cka(m);
  register_cwd(m);
  register_channel_attention(m);
  register_position_attention(m);
  register_cell_projection(m);
  register_cell_cross_gram(m);
  register_gemm(m);
  register_output_pool(m);
  register_uniform(m);
  register_squared_error(m);
  m.def("kernel_isa", &kernel_isa, "The widest instruction set the kernels use: avx512, avx2 or baseline.");
}
