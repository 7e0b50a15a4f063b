// fusedlm._cuda: the one pybind11 module of the CUDA kernels. The same View and args structs as
// fusedlm._C (common/args.h, bound in common/bind.h), with views of device memory and the stream
// set; no torch headers. A failed launch raises RuntimeError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common/bind.h"
#include "cuda/ops.h"

namespace py = pybind11;

namespace {

// Wraps an entry point of cuda/ops.h: runs it, raises on a failed launch.
template <class Args>
auto raising(int (*entry)(const Args&), const char* name) {
  return [entry, name](const Args& args) {
    const int status = entry(args);
    if (status != 0)
      throw std::runtime_error(std::string("fusedlm._cuda.") + name + ": " +
                               cudaGetErrorString(static_cast<cudaError_t>(status)));
  };
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  using namespace fusedlm;
  using namespace fusedlm::cuda;
  m.doc() = "fusedlm CUDA kernels. Called by fusedlm.ops; not a public API.";

  bind_views_and_args(m);

  // ---- entry points (cuda/ops.h) ----
  m.def("nf4_quantize", raising(&nf4_quantize, "nf4_quantize"));
  m.def("nf4_dequantize", raising(&nf4_dequantize, "nf4_dequantize"));
  m.def("nf4_gemv", raising(&nf4_gemv, "nf4_gemv"));
  m.def("sampling_run", raising(&sampling_run, "sampling_run"));
}
