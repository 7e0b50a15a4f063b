// fusedlm._cuda: the one pybind11 module of the CUDA kernels. Same conventions as
// csrc/bindings.cpp (raw addresses, no torch headers); a failed launch raises RuntimeError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda/ops.h"

namespace py = pybind11;
using std::uintptr_t;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

fusedlm::DType dtype(int code) {
  if (code < 0 || code > 2) throw py::value_error("unknown dtype code " + std::to_string(code));
  return static_cast<fusedlm::DType>(code);
}

void check(int status, const char* what) {
  if (status != 0)
    throw std::runtime_error(std::string("fusedlm._cuda.") + what + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(status)));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedlm CUDA kernels. Called by fusedlm.ops; not a public API.";

  m.def("nf4_quantize", [](uintptr_t w, int w_dtype, int64_t n, int64_t blocksize, uintptr_t midpoints,
                           uintptr_t data, uintptr_t absmax, uintptr_t stream) {
    check(fusedlm::cuda::nf4_quantize(ptr<const void>(w), dtype(w_dtype), n, blocksize, ptr<const float>(midpoints),
                                      ptr<uint8_t>(data), ptr<float>(absmax), stream),
          "nf4_quantize");
  });
  m.def("nf4_dequantize", [](uintptr_t data, uintptr_t absmax, int64_t n, int64_t blocksize, uintptr_t code,
                             uintptr_t out, int out_dtype, uintptr_t stream) {
    check(fusedlm::cuda::nf4_dequantize(ptr<const uint8_t>(data), ptr<const float>(absmax), n, blocksize,
                                        ptr<const float>(code), ptr<void>(out), dtype(out_dtype), stream),
          "nf4_dequantize");
  });
}
