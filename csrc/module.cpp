// The Python module cskd_kernels._C: each op's file registers its functions.
#include <torch/extension.h>

#include "ops.h"

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
}
