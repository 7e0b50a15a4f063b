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
  m.def("nf4_gemv", [](uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t stride_xm, uintptr_t data,
                       uintptr_t absmax, int64_t blocksize, int64_t N, uintptr_t code, uintptr_t bias, uintptr_t out,
                       int out_dtype, uintptr_t stream) {
    if (out_dtype != x_dtype) throw py::value_error("nf4_gemv writes x's dtype");
    check(fusedlm::cuda::nf4_gemv(ptr<const void>(x), dtype(x_dtype), M, K, stride_xm, ptr<const uint8_t>(data),
                                  ptr<const float>(absmax), blocksize, N, ptr<const float>(code), ptr<const float>(bias),
                                  ptr<void>(out), stream),
          "nf4_gemv");
  });

  // ---- sampling ----
  m.def("sampling_run", [](uintptr_t logits, int logits_dtype, int64_t B, int64_t V, int64_t stride_row,
                           uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uint64_t seed, uintptr_t tokens,
                           uintptr_t filtered, uintptr_t status, uintptr_t stream) {
    check(fusedlm::cuda::sampling_run(ptr<const void>(logits), dtype(logits_dtype), B, V, stride_row,
                                      ptr<const float>(temperature), ptr<const int64_t>(top_k), ptr<const double>(top_p),
                                      seed, ptr<int64_t>(tokens), ptr<float>(filtered), ptr<int32_t>(status), stream),
          "sampling_run");
  });
}
