// The adapter part of the fused LoRA linear layer on the CPU, equal to the reference
// (python/fusedlm/reference/lora.py):
//
//   h[m, :]   = x[m, :] A_a^T                                     (shrink: K -> r, float32)
//   out[m, n] = init[m, n] + bias[n] + s_a * h[m, :] . Bt_a[:, n]   (expand, fused with the accumulation)
//
// for every row m, a = the row's adapter, s_a = scaling * gate_a. Rows are grouped by adapter by the
// caller (`rows` lists them adapter by adapter, `segments` marks where each adapter's rows start),
// so each task works on rows of one adapter and reads one A_a / Bt_a. Rows of segment 0 have no
// adapter: h = 0 and out = init + bias. The base product x W^T is torch's GEMM, run before (init =
// out) or after (init absent, then an addmm with beta = 1 adds it) this kernel; see ops/lora.py.
// The kernels are in lora_kernels.h, compiled once per ISA level; this file checks and dispatches.
#include "cpu/ops.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

#define FUSEDLM_KERNELS "cpu/lora_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

void lora_forward(const LoraArgs& a) {
  check_view(a.x, "x", kFloatTypes, {-1, -1});
  const int64_t M = a.x.size(0), K = a.x.size(1);
  require(a.x.stride(1) == 1 || K == 1, "x must have unit stride along K");
  check_contiguous(a.lora_a, "lora_a", {DType::F32}, {-1, -1, K});
  const int64_t n_adapters = a.lora_a.size(0), r = a.lora_a.size(1);
  check_contiguous(a.out, "out", kFloatTypes, {M, -1});
  const int64_t N = a.out.size(1);
  check_contiguous(a.lora_bt, "lora_bt", {DType::F32}, {n_adapters, r, N});
  check_contiguous(a.segments, "segments", {DType::I64}, {n_adapters + 2});
  if (a.rows) check_contiguous(a.rows, "rows", {DType::I64}, {M});
  check_contiguous(a.scales, "scales", {DType::F32}, {n_adapters});
  if (a.bias) check_contiguous(a.bias, "bias", {DType::F32}, {N});
  check_contiguous(a.h, "h", {DType::F32}, {M, r});
  if (a.init) check_contiguous(a.init, "init", {a.out.dtype}, {M, N});
  const int64_t* segments = a.segments.ptr<const int64_t>();
  require(segments[0] == 0 && segments[n_adapters + 1] == M, "segments must run from 0 to M");
  for (int64_t s = 0; s <= n_adapters; ++s) require(segments[s] <= segments[s + 1], "segments must not decrease");
  if (a.rows)
    for (int64_t i = 0; i < M; ++i) require(a.rows.ptr<const int64_t>()[i] >= 0 && a.rows.ptr<const int64_t>()[i] < M, "rows must lie in [0, M)");
  using Kernel = void (*)(const LoraArgs&);
  static constexpr Kernel kForward[kIsaLevels] = {scalar::forward, avx2::forward, avx512::forward, avx512bf16::forward};
  pick(kForward)(a);
}

}  // namespace fusedlm::cpu
