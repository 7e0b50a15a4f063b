// fusedlm._C: the one pybind11 module of the CPU kernels.
//
// Tensors cross as raw addresses (std::uintptr_t) with their sizes, strides and dtype codes:
// no torch headers here (DESIGN.md rule 1). Every argument was checked in Python first.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/cpu_features.h"
#include "cpu/ops.h"

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

const char* isa_name(fusedlm::Isa isa) {
  switch (isa) {
    case fusedlm::Isa::Scalar: return "scalar";
    case fusedlm::Isa::Avx2: return "avx2";
    case fusedlm::Isa::Avx512: return "avx512";
    case fusedlm::Isa::Avx512Bf16: return "avx512_bf16";
  }
  return "scalar";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedlm CPU kernels (C++17). Called by fusedlm.ops; not a public API.";
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  // ---- CPU features ----
  m.def("detected_isa", [] { return isa_name(fusedlm::detected_isa()); },
        "The best SIMD level this CPU supports: scalar, avx2, avx512 or avx512_bf16.");
  m.def("active_isa", [] { return isa_name(fusedlm::active_isa()); },
        "The SIMD level the kernels use now (detected, capped by set_max_isa).");
  m.def("set_max_isa", [](const std::string& name) {
          int level = name == "scalar" ? 0 : name == "avx2" ? 1 : name == "avx512" ? 2
                    : name == "avx512_bf16" ? 3 : -1;
          if (level < 0) throw py::value_error("isa must be scalar, avx2, avx512 or avx512_bf16, got " + name);
          fusedlm::max_isa_limit().store(level);
        }, py::arg("isa"), "Caps the SIMD level (tests use it to compare SIMD paths with scalar ones).");

  // ---- nf4 ----
  m.def("nf4_quantize",
        [](uintptr_t w, int w_dtype, int64_t n, int64_t blocksize, uintptr_t midpoints, uintptr_t data,
           uintptr_t absmax, int num_threads) {
          fusedlm::cpu::nf4_quantize(ptr<const void>(w), dtype(w_dtype), n, blocksize, ptr<const float>(midpoints),
                                     ptr<uint8_t>(data), ptr<float>(absmax), num_threads);
        }, nogil);
  m.def("nf4_dequantize",
        [](uintptr_t data, uintptr_t absmax, int64_t n, int64_t blocksize, uintptr_t code, uintptr_t out,
           int out_dtype, int num_threads) {
          fusedlm::cpu::nf4_dequantize(ptr<const uint8_t>(data), ptr<const float>(absmax), n, blocksize,
                                       ptr<const float>(code), ptr<void>(out), dtype(out_dtype), num_threads);
        }, nogil);
}
