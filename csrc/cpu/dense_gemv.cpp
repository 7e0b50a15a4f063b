// The dense decode GEMV on the CPU: x W^T + b for a few rows of x and a float32 or bf16 weight,
// the product python/fusedlm/ops/_gemv.py documents (its reference: torch.nn.functional.linear in
// float64). The kernel is in dense_gemv_kernels.h, compiled once per ISA level; this file checks the
// arguments and dispatches.
#include "cpu/ops.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

namespace fusedlm::cpu {
namespace {

struct Kernels {  // the entry kernels of one ISA level (the last line of dense_gemv_kernels.h)
  void (*gemv)(const GemvArgs&);
};
}  // namespace
}  // namespace fusedlm::cpu

#define FUSEDLM_KERNELS "cpu/dense_gemv_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

void dense_gemv(const GemvArgs& a) {
  check_dense_gemv(a);
  active_kernels().gemv(a);
}

}  // namespace fusedlm::cpu
