// Run-time CPU feature dispatch. The default build targets baseline x86-64 (or aarch64); each
// kernel is compiled once more per SIMD level (common/for_each_isa.h) and the entry points pick
// the instantiation of the level active here, so one wheel runs everywhere (DESIGN.md rule 6).
// Tests and benchmarks lower the level with set_max_isa() to run every path this CPU has.
#pragma once
#include <atomic>

#if defined(__x86_64__) || defined(_M_X64)
#define FUSEDLM_X86 1
#else
#define FUSEDLM_X86 0
#endif

// The instruction sets each level is compiled for (GCC/clang target attribute strings). AVX2
// machines without FMA or F16C do not exist in practice; they run the scalar level.
#define FUSEDLM_TARGET_AVX2 "avx2,fma,f16c"
#define FUSEDLM_TARGET_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define FUSEDLM_TARGET_AVX512BF16 "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"

namespace fusedlm {

// Levels in increasing order; a kernel table (see pick, common/for_each_isa.h) has one entry per level.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };
constexpr int kIsaLevels = 4;

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512_bf16";
  }
  return "scalar";
}

inline Isa detected_isa() {
#if FUSEDLM_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
      return Isa::Scalar;
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
      return Isa::Avx2;
    if (!__builtin_cpu_supports("avx512bf16")) return Isa::Avx512;
    return Isa::Avx512Bf16;
  }();
  return isa;
#else
  return Isa::Scalar;  // aarch64: the scalar level, which GCC auto-vectorises with NEON (baseline there)
#endif
}

// Upper bound on the level the kernels may take (for tests and benchmarks).
inline std::atomic<int>& max_isa_limit() {
  static std::atomic<int> limit{kIsaLevels - 1};
  return limit;
}

inline Isa active_isa() {
  int detected = static_cast<int>(detected_isa());
  int limit = max_isa_limit().load(std::memory_order_relaxed);
  return static_cast<Isa>(detected < limit ? detected : limit);
}

// The entry of a per-level table (one entry per Isa, lowest first) for the active level.
template <class T>
const T& pick(const T (&table)[kIsaLevels]) {
  return table[static_cast<int>(active_isa())];
}

}  // namespace fusedlm
