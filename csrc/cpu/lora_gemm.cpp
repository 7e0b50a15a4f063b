// The GEMMs of a LoRA layer in training on the CPU: the base product with the frozen weight (dense
// or NF4, python/fusedlm/reference/nf4.py's layout) and the adapter's term in one accumulation,
// forward (out = a Wᵀ + a2 w2ᵀ) and for the input's gradient (out = a W + a2 w2); out float32 or bf16.
// bf16 a runs on bf16 dot products (vdpbf16ps), float32 a on FMAs; the caller
// (python/fusedlm/ops/_gemm.py) gives bf16 a only where the CPU has the native instructions. The
// kernels are in lora_gemm_kernels.h, compiled once per ISA level; this file checks and dispatches.
#include "cpu/ops.h"

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

namespace fusedlm::cpu {
namespace {
struct Kernels {  // the entry kernels of one ISA level (the last line of lora_gemm_kernels.h)
  void (*gemm)(const LoraGemmArgs&);
};
}  // namespace
}  // namespace fusedlm::cpu

#define FUSEDLM_KERNELS "cpu/lora_gemm_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

void lora_gemm(const LoraGemmArgs& a) {
  check_lora_gemm(a);
  require(a.a.dtype != DType::BF16 || active_isa() == Isa::Avx512Bf16,
          "a must be float32 where the CPU has no native bf16 dot products");
  active_kernels().gemm(a);
}

}  // namespace fusedlm::cpu
