// Memory for the large outputs the kernels write once (attention outputs,
// projections, gradients).
//
// Fresh outputs of tens of MiB come straight from mmap: the kernel zeroes
// every page at its first touch and, with 4 KiB pages, takes a fault per page,
// which costs as much as writing the output (measured here: 23 ms of CPU time
// to fill 64 MiB, against 4 ms for the grid-mode position attention's
// softmax). So outputs of kPooledBytes (2 MiB) or more come from a pool:
// fresh buffers on 2 MiB boundaries with transparent huge pages requested
// (Linux, THP in "madvise" mode), freed ones kept for the next output of the same rounded size,
// which then finds its pages mapped, as with a caching allocator. Kept ones
// are freed before a new mapping would take the pool past the most its
// tensors ever held at once, so keeping never raises its peak. The cost
// is that memory: up to 192 MiB (the environment variable
// CSKD_OUTPUT_CACHE_MB sets another amount) stay allocated after their tensors
// are gone, until cskd_kernels._C.empty_cache() frees them (as
// torch.cuda.empty_cache does). Python code takes pooled tensors through
// cskd_kernels._C.empty_output (cskd_kernels.backend.empty_output).
#pragma once
#include <torch/extension.h>

namespace cskd {

// An empty contiguous CPU tensor (from the pool when large).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

inline at::Tensor empty_output_like(const at::Tensor& like) { return empty_output(like.sizes(), like.options()); }

// Frees the buffers the pool keeps (those of live tensors stay).
void empty_output_cache();

}  // namespace cskd
