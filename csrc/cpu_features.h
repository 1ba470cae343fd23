// What the CPU running the extension can do, asked once per process. The
// extension is built for baseline x86; the kernels compile their AVX2 and
// AVX-512 bodies with target attributes and pick one with these at run time.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))

namespace cskd::cpu {

inline bool has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

inline bool has_avx512f() {
  static const bool has = has_avx2_fma() && __builtin_cpu_supports("avx512f");
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
