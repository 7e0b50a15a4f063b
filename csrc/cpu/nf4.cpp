// NF4 quantisation, dequantisation and the fused dequant-GEMV on the CPU, equal to the reference
// (python/fusedlm/reference/nf4.py), which documents the layout and rounding rules. The NF4 code
// table and its midpoints are arguments: they live in one place, the reference. The kernels are
// in nf4_kernels.h, compiled once per ISA level; this file checks the arguments and dispatches.
#include "cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

#define FUSEDLM_KERNELS "cpu/nf4_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

namespace {

using Kernel = void (*)(const Nf4Args&);

void check_blocks(const Nf4Args& a, int64_t n) {
  require(a.blocksize >= 32 && a.blocksize <= 4096 && (a.blocksize & (a.blocksize - 1)) == 0,
          "blocksize must be a power of two in [32, 4096], got " + std::to_string(a.blocksize));
  check_contiguous(a.data, "data", {DType::U8}, {-1});
  require(a.data.numel() == (n + 1) / 2, "data must hold " + std::to_string((n + 1) / 2) + " bytes");
  check_contiguous(a.absmax, "absmax", {DType::F32}, {(n + a.blocksize - 1) / a.blocksize});
}

}  // namespace

void nf4_quantize(const Nf4Args& a) {
  check_contiguous(a.w, "w", kFloatTypes, {-1});
  check_blocks(a, a.w.numel());
  check_contiguous(a.midpoints, "midpoints", {DType::F32}, {15});
  static constexpr Kernel kQuantize[kIsaLevels] = {scalar::quantize, avx2::quantize, avx512::quantize,
                                                   avx512bf16::quantize};
  pick(kQuantize)(a);
}

void nf4_dequantize(const Nf4Args& a) {
  check_contiguous(a.out, "out", kFloatTypes, {-1});
  check_blocks(a, a.out.numel());
  check_contiguous(a.code, "code", {DType::F32}, {16});
  static constexpr Kernel kDequantize[kIsaLevels] = {scalar::dequantize, avx2::dequantize, avx512::dequantize,
                                                     avx512bf16::dequantize};
  pick(kDequantize)(a);
}

void nf4_gemv(const Nf4Args& a) {
  check_view(a.x, "x", kFloatTypes, {-1, -1});
  const int64_t M = a.x.size(0), K = a.x.size(1);
  require(a.x.stride(1) == 1 || K == 1, "x must have unit stride along K");
  require(K % 32 == 0, "K must be a multiple of 32, got " + std::to_string(K));
  check_contiguous(a.out, "out", {a.x.dtype}, {M, -1});
  const int64_t N = a.out.size(1);
  check_blocks(a, N * K);
  check_contiguous(a.code, "code", {DType::F32}, {16});
  if (a.bias) check_contiguous(a.bias, "bias", {DType::F32}, {N});
  static constexpr Kernel kGemv[kIsaLevels] = {scalar::gemv, avx2::gemv, avx512::gemv, avx512bf16::gemv};
  pick(kGemv)(a);
}

}  // namespace fusedlm::cpu
