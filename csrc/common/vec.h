// The one vector abstraction of the CPU kernels (DESIGN.md rule 6 and "How the code should read").
//
// A kernel is written once over the types below, and common/for_each_isa.h compiles it once per
// ISA level. Intrinsics appear only in the per-ISA headers, each defining the same names in its
// own namespace fusedlm::simd::<isa>:
//   vec_scalar.h  scalar      8 lanes in plain arrays: any CPU. The compiler vectorises the lane
//                             loops for the baseline (SSE2 on x86-64; NEON, always present on aarch64)
//   vec_avx2.h    avx2        8 lanes in __m256 (AVX2 + FMA + F16C)
//   vec_avx512.h  avx512      16 lanes in __m512 (AVX-512 F/BW/VL/DQ)
//                 avx512bf16  the same, plus the native bf16 instructions (vcvtneps2bf16, vdpbf16ps)
//
// What every ISA namespace provides (W = Vec::W lanes):
//   kIsa, kRegisters (vector registers: sizes register tiles), kNativeBf16
//   Vec   W floats. Vec(x) broadcasts; zero(); load(p) / load(p, n) (first n lanes, the rest 0,
//         reads only p[0, n)); store(p) / store(p, n); the same for bf16 (load_bf16 / store_bf16,
//         round to nearest even) and IEEE half (load_f16 / store_f16); + - * /; fma(a, b, c) =
//         a * b + c (one rounding where the ISA has FMA), fnma(a, b, c) = c - a * b; min, max, abs;
//         reduce_add, reduce_max; < <= > >= == != give a Mask; select(m, a, b) = m ? a : b;
//         round (to nearest even), to_int (rounded), trunc_int, as_int / from_int (bit casts);
//         zip(a, b, lo, hi): lo = a0 b0 a1 b1 ..., hi = the second halves interleaved.
//         sum_lanes(x[W]): lane j = the sum of the lanes of x[j].
//   IVec  W int32 lanes. IVec(x), iota(); load(p) (4W bytes), load_u8(p) (W bytes widened), load_u16(p), store(p),
//         store_u16(p) (lanes in [0, 65535]); + - & | ^; shl<N>, shr<N> (logical); min, max;
//         == and > give a Mask; select(m, a, b); to_float; mul_wide(a, m, hi, lo): the 64-bit
//         unsigned products a * m split into words.
//   Mask  W booleans. first(n) (lanes < n); & | ~; any(); bits() (lane i = bit i).
//   Lut16 a 16-entry float table times a scale, looked up by the low 4 bits of each IVec lane
//         (lookup), or by nibble J of each lane (lookup_nibble<J>: bits 4J .. 4J + 3).
//   BVec  W pairs of bf16: load(p) (4W bytes), broadcast_pair(p); dot2(acc, a, b) = acc + a.even b.even +
//         a.odd b.odd in float32: one vdpbf16ps with kNativeBf16, emulated (two FMAs) elsewhere.
//         As 2W 16-bit lanes: shr<N> (logical), and BLut16, a 16-entry table rounded to bf16,
//         looked up by the low 4 bits of each lane (vpermw on AVX-512, through memory elsewhere).
// and, written once over those in vec_common.h: exp, dtype-generic loads/stores (load_as /
// store_as) and float-buffer helpers.
//
// ODR and target attributes. The same inline function compiled with different -m flags in two
// translation units is one symbol to the linker, which keeps either copy, so an AVX-512 body could
// end up running on an AVX2 machine. Nothing here is therefore compiled with per-file -m flags.
// Each level's code lives in its own namespace (distinct symbols), inside a `#pragma GCC target`
// region that gives every function defined in it (member functions, lambdas and templates
// included) that level's target attribute. Code defined outside such regions (the standard
// library) keeps the baseline target wherever it is instantiated, so its one copy runs anywhere;
// the compiler may inline it into the ISA code, never the other way round.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/cpu_features.h"
#include "common/dtype.h"

#if FUSEDLM_X86
#include <immintrin.h>
#endif

#define FUSEDLM_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define FUSEDLM_TARGET_BEGIN(isa) \
  FUSEDLM_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define FUSEDLM_TARGET_END FUSEDLM_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define FUSEDLM_TARGET_BEGIN(isa) FUSEDLM_PRAGMA(GCC push_options) FUSEDLM_PRAGMA(GCC target(isa))
#define FUSEDLM_TARGET_END FUSEDLM_PRAGMA(GCC pop_options)
#else
#error "fusedlm's CPU kernels need GCC or clang (target attributes and __builtin_cpu_supports)"
#endif

#include "common/vec_scalar.h"
namespace fusedlm::simd::scalar {
#include "common/vec_common.h"
}

#if FUSEDLM_X86
FUSEDLM_TARGET_BEGIN(FUSEDLM_TARGET_AVX2)
#include "common/vec_avx2.h"
namespace fusedlm::simd::avx2 {
#include "common/vec_common.h"
}
FUSEDLM_TARGET_END

FUSEDLM_TARGET_BEGIN(FUSEDLM_TARGET_AVX512)
#define FUSEDLM_VEC512_NS avx512
#define FUSEDLM_VEC512_BF16 0
#include "common/vec_avx512.h"
#undef FUSEDLM_VEC512_NS
#undef FUSEDLM_VEC512_BF16
namespace fusedlm::simd::avx512 {
#include "common/vec_common.h"
}
FUSEDLM_TARGET_END

FUSEDLM_TARGET_BEGIN(FUSEDLM_TARGET_AVX512BF16)
#define FUSEDLM_VEC512_NS avx512bf16
#define FUSEDLM_VEC512_BF16 1
#include "common/vec_avx512.h"
#undef FUSEDLM_VEC512_NS
#undef FUSEDLM_VEC512_BF16
namespace fusedlm::simd::avx512bf16 {
#include "common/vec_common.h"
}
FUSEDLM_TARGET_END
#endif
