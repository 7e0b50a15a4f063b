// The adapter part of the fused LoRA linear layer on the CPU, equal to the reference
// (python/fusedlm/reference/lora.py):
//
//   h[m, :]   = x[m, :] A_a^T                                     (shrink: K -> r, float32)
//   out[m, n] = init[m, n] + bias[n] + s_a * h[m, :] . Bt_a[:, n]   (expand, fused with the accumulation)
//
// for every row m, a = the row's adapter, s_a = scaling * gate_a. Rows are grouped by adapter by the
// caller (`rows` lists them adapter by adapter, `segments` marks where each adapter's rows start),
// so each task works on rows of one adapter and reads one A_a / Bt_a. Rows of segment 0 have no
// adapter: h = 0 and out = init + bias. The base product x W^T is torch's GEMM, which an addmm with
// beta = 1 accumulates onto out after this kernel (init absent); for an NF4 weight, nf4_matmul
// computes it first and it comes in as init. See ops/lora.py.
// The kernels are in lora_kernels.h, compiled once per ISA level; this file checks and dispatches.
#include "cpu/ops.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

namespace fusedlm::cpu {
namespace {
struct Kernels {  // the entry kernels of one ISA level (the last line of lora_kernels.h)
  void (*forward)(const LoraArgs&);
};
}  // namespace
}  // namespace fusedlm::cpu

#define FUSEDLM_KERNELS "cpu/lora_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

void lora_forward(const LoraArgs& a) {
  check_lora(a);
  active_kernels().forward(a);
}

}  // namespace fusedlm::cpu
