// Fresh output tensors backed by transparent huge pages.
//
// Outputs of tens of MiB come straight from mmap and are page-faulted in 4 KiB
// at a time on their first write, which costs more than a kernel's non-BLAS
// work (measured here: 23 ms of CPU time to fill 64 MiB, against 4 ms for the
// grid-mode position attention's softmax). Transparent huge pages cut the
// faults 512-fold; with THP in its common "madvise" mode they must be asked
// for, as torch's own THP_MEM_ALLOC_ENABLE does for every allocation. Only a
// hint: the 2 MiB-aligned interior is advised, and a system without THP
// ignores it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cskd {

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = end & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

inline at::Tensor empty_output_like(const at::Tensor& like) { return empty_output(like.sizes(), like.options()); }

}  // namespace cskd
