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
struct Tasks {  // n_items split into runs of `grain` (the last may be shorter)
  int64_t per_task, count;
  Tasks(int64_t n_items, int64_t grain)
      : per_task(std::max<int64_t>(grain, 1)), count((n_items + per_task - 1) / per_task) {}
  int64_t begin(int64_t task) const { return task * per_task; }
  int64_t end(int64_t task, int64_t n_items) const { return std::min(n_items, (task + 1) * per_task); }
};

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
