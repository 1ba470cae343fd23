// One registration function per op file in csrc/.
#pragma once
#include <torch/extension.h>

void register_cka(pybind11::module& m);
void register_cwd(pybind11::module& m);
void register_channel_attention(pybind11::module& m);
void register_position_attention(pybind11::module& m);
void register_cell_projection(pybind11::module& m);
void register_cell_cross_gram(pybind11::module& m);
void register_gemm(pybind11::module& m);
void register_output_pool(pybind11::module& m);
void register_uniform(pybind11::module& m);
void register_squared_error(pybind11::module& m);
