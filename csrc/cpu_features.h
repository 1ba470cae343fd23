// What the CPU running the extension can do, asked once per process. The
// extension is built for baseline x86; the kernels compile their AVX2 and
// AVX-512 bodies with target attributes and pick one with these at run time.
// CSKD_MAX_ISA=baseline or avx2 caps what they may pick (avx512, empty or unset:
// all the CPU has), so that one machine runs every build of a kernel: the tests
// use it for the AVX2 and baseline bodies an AVX-512 CPU would never run.
#pragma once

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace cskd::cpu {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

// The cap CSKD_MAX_ISA sets (read once; an unknown value is refused at the first call that asks).
inline Isa isa_cap() {
  static const Isa cap = [] {
    const char* setting = std::getenv("CSKD_MAX_ISA");
    const std::string value = setting == nullptr || *setting == '\0' ? "avx512" : setting;
    if (value == "baseline") return Isa::baseline;
    if (value == "avx2") return Isa::avx2;
    if (value == "avx512") return Isa::avx512;
    throw std::invalid_argument("CSKD_MAX_ISA must be baseline, avx2 or avx512, got '" + value + "'");
  }();
  return cap;
}

}  // namespace cskd::cpu

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))

namespace cskd::cpu {

inline bool has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return isa_cap() >= Isa::avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

inline bool has_avx512f() {
  static const bool has = has_avx2_fma() && isa_cap() >= Isa::avx512 && __builtin_cpu_supports("avx512f");
  return has;
}

// AVX-512 F, DQ, VL and BW: what the CKA register kernels are compiled for.
inline bool has_avx512_core() {
  static const bool has = has_avx512f() && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return has;
}

inline bool is_intel() {
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel");
  }();
  return intel;
}

}  // namespace cskd::cpu

#endif
