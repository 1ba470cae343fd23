// torch.rand(n) for float32 on the CPU, bit for bit, several times faster.
//
//   uniform_float_(outs, generator)   fills each float32 tensor of outs in turn, in its logical order,
//                                     with the values successive torch.rand(out.shape, generator=generator)
//                                     calls give, and leaves the generator in the state they leave it in
//                                     (outs may be row slices of larger tensors: a stacked weight is
//                                     drawn in place, part by part)
//
// CSKD's released code draws fresh 1x1 projections for every grid cell and
// every call (millions of values a step at the released shapes); PyTorch's CPU
// uniform_ produces them one virtual call at a time. This draws the same
// Mersenne Twister stream (at::mt19937, the CPU generator's engine) in bulk: the
// state regenerated 624 words at a time in plain loops the compiler vectorises,
// each word tempered and made a float as at::uniform_real_distribution<float>
// does: (word & (2^24 - 1)) * 2^-24, exact in float32.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "cpu_features.h"
#include "ops.h"
#include "simd_exp.h"

namespace {

constexpr int kN = 624, kM = 397;
constexpr uint32_t kMatrixA = 0x9908b0df, kUpper = 0x80000000, kLower = 0x7fffffff;

// The bodies are inlined into a baseline and an AVX2 entry point each (GCC vectorises them for the
// target it compiles them for: 4 lanes with SSE2, 8 with AVX2).
#define CSKD_UNIFORM_INLINE inline __attribute__((always_inline))

CSKD_UNIFORM_INLINE uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & kUpper) | (v & kLower)) >> 1) ^ (-(v & 1u) & kMatrixA);
}

// at::mt19937's next_state(), the same three loops: the second reads words the first wrote, at least
// 227 apart, so each loop vectorises.
CSKD_UNIFORM_INLINE void regenerate_body(uint32_t* s) {
  for (int i = 0; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
  s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

CSKD_UNIFORM_INLINE float to_float(uint32_t y) {
  y ^= (y >> 11);
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= (y >> 18);
  return static_cast<float>(y & ((1u << 24) - 1)) * (1.0f / static_cast<float>(1u << 24));
}

// Words state[first, last) as floats into out.
CSKD_UNIFORM_INLINE void emit_body(const uint32_t* state, int first, int last, float* out) {
  for (int i = first; i < last; ++i) out[i - first] = to_float(state[i]);
}

void regenerate_baseline(uint32_t* s) { regenerate_body(s); }
void emit_baseline(const uint32_t* state, int first, int last, float* out) { emit_body(state, first, last, out); }
#ifdef CSKD_X86_SIMD
CSKD_AVX2 void regenerate_avx2(uint32_t* s) { regenerate_body(s); }
// emit_body in 8 lanes (GCC leaves that loop scalar): the same shifts and masks, and the same exact
// conversion (a 24-bit integer to float, times 2^-24).
CSKD_AVX2 void emit_avx2(const uint32_t* state, int first, int last, float* out) {
  const __m256i mask_b = _mm256_set1_epi32(static_cast<int>(0x9d2c5680u));
  const __m256i mask_c = _mm256_set1_epi32(static_cast<int>(0xefc60000u));
  const __m256i low_bits = _mm256_set1_epi32((1 << 24) - 1);
  const __m256 scale = _mm256_set1_ps(1.0f / static_cast<float>(1u << 24));
  int i = first;
  for (; i + 8 <= last; i += 8) {
    __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(state + i));
    y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
    y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), mask_b));
    y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), mask_c));
    y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
    _mm256_storeu_ps(out + (i - first), _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(y, low_bits)), scale));
  }
  emit_body(state, i, last, out + (i - first));
}
#endif

void regenerate(uint32_t* s) {
#ifdef CSKD_X86_SIMD
  if (cskd::cpu::has_avx2_fma()) return regenerate_avx2(s);
#endif
  regenerate_baseline(s);
}

void emit(const uint32_t* state, int first, int last, float* out) {
#ifdef CSKD_X86_SIMD
  if (cskd::cpu::has_avx2_fma()) return emit_avx2(state, first, last, out);
#endif
  emit_baseline(state, first, last, out);
}

// The generator's Mersenne Twister, taken out of it under its lock and put back when done: draws in
// between continue one stream, as successive torch.rand calls would.
class LockedStream {
 public:
  explicit LockedStream(std::optional<at::Generator> generator)
      : gen_(at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator())),
        lock_(gen_->mutex_),
        engine_(gen_->engine()),
        data_(engine_.data()) {}
  ~LockedStream() {
    engine_.set_data(data_);
    gen_->set_engine(engine_);
  }

  // The next n values of the stream into out[0, n).
  void draw(float* out, int64_t n) {
    uint32_t* state = data_.state_.data();
    // at::mt19937::operator(): left_ -= 1; if it reaches 0, regenerate (left_ = 624, next_ = 0); then read
    // state[next_++]. So left_ - 1 words remain before the next regeneration.
    int64_t done = 0;
    while (done < n) {
      if (data_.left_ == 1) {
        regenerate(state);
        data_.left_ = kN + 1;  // the read below takes one, as operator() does after regenerating
        data_.next_ = 0;
      }
      const int64_t take = std::min<int64_t>(n - done, data_.left_ - 1);
      emit(state, static_cast<int>(data_.next_), static_cast<int>(data_.next_ + take), out + done);
      data_.next_ += take;
      data_.left_ -= static_cast<int>(take);
      done += take;
    }
  }

 private:
  at::CPUGeneratorImpl* gen_;
  std::lock_guard<std::mutex> lock_;
  at::mt19937 engine_;
  at::mt19937_data_pod data_;
};

// The next values of the stream into out in its logical (row-major) order, whatever its row strides:
// out may be a slice of a larger tensor (one projection's rows of every cell in a stacked weight).
void draw_rows(LockedStream& stream, const torch::Tensor& out) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat32,
              "uniform_float_: needs float32 CPU tensors, got ", out.scalar_type(), " on ", out.device());
  if (out.numel() == 0) return;
  if (out.is_contiguous()) return stream.draw(out.data_ptr<float>(), out.numel());
  const int64_t dims = out.dim(), row = out.size(dims - 1);
  TORCH_CHECK(out.stride(dims - 1) == 1 || row == 1,
              "uniform_float_: the last dimension must be contiguous, got strides ", out.strides());
  std::vector<int64_t> index(dims, 0);  // of the current row; index[dims - 1] stays 0
  float* base = out.data_ptr<float>();
  for (int64_t r = 0, rows = out.numel() / row; r < rows; ++r) {
    int64_t offset = 0;
    for (int64_t d = 0; d + 1 < dims; ++d) offset += index[d] * out.stride(d);
    stream.draw(base + offset, row);
    for (int64_t d = dims - 2; d >= 0 && ++index[d] == out.size(d); --d) index[d] = 0;
  }
}
}  // namespace

void uniform_float_(const std::vector<torch::Tensor>& outs, std::optional<at::Generator> generator) {
  LockedStream stream(generator);
  for (const auto& out : outs) draw_rows(stream, out);
}

void register_uniform(pybind11::module& m) {
  m.def("uniform_float_", &uniform_float_, pybind11::arg("outs"), pybind11::arg("generator") = std::nullopt,
        "Fills each float32 CPU tensor of outs in turn, in its logical order, with the values successive "
        "torch.rand calls of their sizes would give (outs may be row slices of larger tensors)");
}
