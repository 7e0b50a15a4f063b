// The row pass of the fused linear cross-entropy on the CPU, equal to the reference
// (python/fusedlm/reference/linear_cross_entropy.py): for each row of a chunk of logits, its loss
// (logsumexp - the target's logit), logsumexp and argmax, and, when scales are given, its
// gradient written over the logits. The chunk loop and the head GEMMs around it are
// python/fusedlm/ops/linear_cross_entropy.py's. The kernels are in linear_cross_entropy_kernels.h,
// compiled once per ISA level; this file checks and dispatches.
#include "cpu/ops.h"

#include <cmath>
#include <limits>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

namespace fusedlm::cpu {
namespace {
struct Kernels {  // the entry kernels of one ISA level (the last line of linear_cross_entropy_kernels.h)
  void (*rows)(const LinearCrossEntropyArgs&);
};
}  // namespace
}  // namespace fusedlm::cpu

#define FUSEDLM_KERNELS "cpu/linear_cross_entropy_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

void linear_cross_entropy_rows(const LinearCrossEntropyArgs& a) {
  check_linear_cross_entropy(a);
  active_kernels().rows(a);
}

}  // namespace fusedlm::cpu
