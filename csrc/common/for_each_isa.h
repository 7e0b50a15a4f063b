// Compiles the kernels of one op once per ISA level and picks the level's kernels at run time.
// In csrc/cpu/<op>.cpp:
//
//   namespace fusedlm::cpu { namespace {
//   struct Kernels { void (*forward)(const FooArgs&); ... };  // the op's entry kernels
//   }}
//   #define FUSEDLM_KERNELS "cpu/<op>_kernels.h"
//   #include "common/for_each_isa.h"
//   ...
//   active_kernels().forward(args);
//
// This file includes the kernels file once inside each of the namespaces fusedlm::cpu::scalar,
// ::avx2, ::avx512 and ::avx512bf16, each time inside the level's target region (see common/vec.h
// on why: it keeps the copies apart for the linker) and with the level's vector types in scope.
// The kernels file therefore has no include guard and includes nothing itself: its .cpp includes
// what it needs first. Its last line names the level's entry kernels,
//
//   constexpr Kernels kernels{forward, ...};
//
// and the table below holds one such row per level, in the order of Isa (common/cpu_features.h):
// the only place the four levels are spelled. Off x86-64 only the scalar level is compiled, and
// the other three names alias it, so the table reads the same everywhere.
#ifndef FUSEDLM_KERNELS
#error "define FUSEDLM_KERNELS (the kernels file) before including common/for_each_isa.h"
#endif

#include "common/cpu_features.h"
#include "common/vec.h"

namespace fusedlm::cpu::scalar {
using namespace ::fusedlm::simd::scalar;
#include FUSEDLM_KERNELS
}  // namespace fusedlm::cpu::scalar

#if FUSEDLM_X86
FUSEDLM_TARGET_BEGIN(FUSEDLM_TARGET_AVX2)
namespace fusedlm::cpu::avx2 {
using namespace ::fusedlm::simd::avx2;
#include FUSEDLM_KERNELS
}  // namespace fusedlm::cpu::avx2
FUSEDLM_TARGET_END

FUSEDLM_TARGET_BEGIN(FUSEDLM_TARGET_AVX512)
namespace fusedlm::cpu::avx512 {
using namespace ::fusedlm::simd::avx512;
#include FUSEDLM_KERNELS
}  // namespace fusedlm::cpu::avx512
FUSEDLM_TARGET_END

FUSEDLM_TARGET_BEGIN(FUSEDLM_TARGET_AVX512BF16)
namespace fusedlm::cpu::avx512bf16 {
using namespace ::fusedlm::simd::avx512bf16;
#include FUSEDLM_KERNELS
}  // namespace fusedlm::cpu::avx512bf16
FUSEDLM_TARGET_END
#else
namespace fusedlm::cpu {
namespace avx2 = scalar;
namespace avx512 = scalar;
namespace avx512bf16 = scalar;
}  // namespace fusedlm::cpu
#endif

namespace fusedlm::cpu {
namespace {

constexpr Kernels kIsaKernels[kIsaLevels] = {scalar::kernels, avx2::kernels, avx512::kernels, avx512bf16::kernels};

// The entry kernels of the level active now (detected, capped by set_max_isa).
inline const Kernels& active_kernels() { return pick(kIsaKernels); }

}  // namespace
}  // namespace fusedlm::cpu
