// Subnormal floats flushed to zero inside the kernels, on every OpenMP thread, for one call.
//
// Why: a CKA loss's gradients are small (about 1e-9 a feature at Cityscapes'
// shapes) and softmax rows hold entries down to exp(-100), so many of their
// products fall below float's normal range (1.2e-38). On Intel cores every
// subnormal operand or result of a vector FMA takes a microcode assist: the
// student CAM's backward at Cityscapes' shapes ran in 220 ms instead of 45
// (Xeon with AVX-512, 2 threads). Flushing (MXCSR's FTZ and DAZ bits) changes
// any value by less than the smallest normal number, 1.2e-38 in float and
// 2.2e-308 in double.
//
// The caller's mode is restored on every thread when the call ends, so a
// user's own operations keep the rounding they chose (torch.set_flush_denormal
// or not). Entered calls nest: only the outermost saves and restores. On CPUs
// other than x86 this is a no-op.
#pragma once

#include <utility>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <xmmintrin.h>
#define CSKD_HAS_MXCSR 1
#endif

namespace cskd::denormals {

#ifdef CSKD_HAS_MXCSR
constexpr unsigned kFlushBits = 0x8040;  // MXCSR: FTZ (bit 15, results) | DAZ (bit 6, operands)

struct ThreadMode {
  int depth = 0;       // calls entered and not yet left on this thread
  unsigned saved = 0;  // the MXCSR the outermost call found
};

inline ThreadMode& thread_mode() {
  static thread_local ThreadMode mode;
  return mode;
}

inline void flush_on_this_thread() {
  ThreadMode& mode = thread_mode();
  if (mode.depth++ == 0) {
    mode.saved = _mm_getcsr();
    _mm_setcsr(mode.saved | kFlushBits);
  }
}

// A thread that runs the closing region without having run the opening one has nothing to restore.
inline void restore_on_this_thread() {
  ThreadMode& mode = thread_mode();
  if (mode.depth > 0 && --mode.depth == 0) _mm_setcsr(mode.saved);
}
#else
inline void flush_on_this_thread() {}
inline void restore_on_this_thread() {}
#endif

// RAII: flushing on the calling thread and the OpenMP team the kernels run on, for the guard's life.
class FlushDenormals {
 public:
  FlushDenormals() {
#pragma omp parallel
    flush_on_this_thread();
  }
  ~FlushDenormals() {
#pragma omp parallel
    restore_on_this_thread();
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// fn wrapped so that it runs under FlushDenormals: what each op file registers with pybind11.
template <typename Result, typename... Args>
auto flushing(Result (*fn)(Args...)) {
  return [fn](Args... args) -> Result {
    FlushDenormals guard;
    return fn(std::forward<Args>(args)...);
  };
}

}  // namespace cskd::denormals
