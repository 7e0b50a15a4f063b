// Run-time CPU feature dispatch. The default build targets baseline x86-64; faster code paths
// are compiled with __attribute__((target(...))) and chosen here from what the CPU reports, so
// one wheel runs everywhere (DESIGN.md rule 6). Tests lower the level with set_max_isa() to
// check that every SIMD path equals the scalar path next to it.
#pragma once
#include <atomic>

namespace fusedlm {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

inline Isa detected_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return Isa::Scalar;
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
      return Isa::Avx2;
    if (!__builtin_cpu_supports("avx512bf16")) return Isa::Avx512;
    return Isa::Avx512Bf16;
  }();
  return isa;
#else
  return Isa::Scalar;
#endif
}

// Upper bound on the paths the kernels may take (for tests and benchmarks).
inline std::atomic<int>& max_isa_limit() {
  static std::atomic<int> limit{static_cast<int>(Isa::Avx512Bf16)};
  return limit;
}

inline Isa active_isa() {
  int detected = static_cast<int>(detected_isa());
  int limit = max_isa_limit().load(std::memory_order_relaxed);
  return static_cast<Isa>(detected < limit ? detected : limit);
}

inline bool use_avx2() { return active_isa() >= Isa::Avx2; }
inline bool use_avx512() { return active_isa() >= Isa::Avx512; }
inline bool use_avx512_bf16() { return active_isa() >= Isa::Avx512Bf16; }

}  // namespace fusedlm
