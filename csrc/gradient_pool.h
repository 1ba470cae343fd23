// Memory for large gradients written once (defined in cka.cpp, whose backward
// introduced it): buffers of 8 MiB or more come from a small pool of
// huge-page-backed buffers kept for reuse, so a backward of the same size
// finds its pages mapped instead of faulting in and zeroing fresh ones.
#pragma once
#include <torch/extension.h>

namespace cskd {

// An empty contiguous tensor shaped like `like` (from the pool when large).
torch::Tensor empty_gradient(const torch::Tensor& like);

}  // namespace cskd
