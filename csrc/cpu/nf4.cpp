// NF4 quantisation, dequantisation and the fused dequant-GEMV on the CPU, equal to the reference
// (python/fusedlm/reference/nf4.py), which documents the layout and rounding rules. The NF4 code
// table and its midpoints are arguments: they live in one place, the reference. The kernels are
// in nf4_kernels.h, compiled once per ISA level; this file checks the arguments and dispatches.
#include "cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

namespace fusedlm::cpu {
namespace {
struct Kernels {  // the entry kernels of one ISA level (the last line of nf4_kernels.h)
  void (*quantize)(const Nf4Args&);
  void (*dequantize)(const Nf4Args&);
  void (*repack)(const Nf4Args&);
  void (*gemv)(const Nf4Args&);
};
}  // namespace
}  // namespace fusedlm::cpu

#define FUSEDLM_KERNELS "cpu/nf4_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

void nf4_quantize(const Nf4Args& a) {
  check_nf4_quantize(a);
  active_kernels().quantize(a);
}

void nf4_dequantize(const Nf4Args& a) {
  check_nf4_dequantize(a);
  active_kernels().dequantize(a);
}

void nf4_repack(const Nf4Args& a) {
  check_nf4_repack(a);
  active_kernels().repack(a);
}

void nf4_gemv(const Nf4Args& a) {
  check_nf4_gemv(a);
  active_kernels().gemv(a);
}

}  // namespace fusedlm::cpu
