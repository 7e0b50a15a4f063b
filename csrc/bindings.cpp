// fusedlm._C: the one pybind11 module of the CPU kernels.
//
// Tensors cross as View structs (address, dtype code, sizes, strides: common/view.h), gathered
// per op in an args struct whose fields Python sets by name (common/args.h, bound in
// common/bind.h, as in fusedlm._cuda): no torch headers here (DESIGN.md rule 1), and no positional
// lists to keep in step. Every argument was checked in Python first; the entry points check the
// views once more (common/checks.h) and throw std::invalid_argument (ValueError) rather than read
// out of bounds.
#include <pybind11/pybind11.h>

#include <string>

#include "common/bind.h"
#include "common/cpu_features.h"
#include "common/threading.h"
#include "cpu/ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  using namespace fusedlm;
  using namespace fusedlm::cpu;
  m.doc() = "fusedlm CPU kernels (C++17). Called by fusedlm.ops; not a public API.";
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  // ---- CPU features ----
  m.def("detected_isa", [] { return isa_name(detected_isa()); },
        "The best SIMD level this CPU supports: scalar, avx2, avx512 or avx512_bf16.");
  m.def("active_isa", [] { return isa_name(active_isa()); },
        "The SIMD level the kernels use now (detected, capped by set_max_isa).");
  m.def("set_max_isa", [](const std::string& name) {
          for (int level = 0; level < kIsaLevels; ++level)
            if (name == isa_name(static_cast<Isa>(level))) return max_isa_limit().store(level);
          throw py::value_error("isa must be scalar, avx2, avx512 or avx512_bf16, got " + name);
        }, py::arg("isa"), "Caps the SIMD level (tests and benchmarks run every path a CPU has).");
  m.def("max_isa", [] { return isa_name(static_cast<Isa>(max_isa_limit().load())); }, "The cap set_max_isa set.");
  m.def("thread_runtime", &thread_runtime,
        "Where the kernels' parallel regions run: 'openmp <path>' (the runtime torch loaded) or 'std::thread pool'.");

  bind_views_and_args(m);

  // ---- entry points (cpu/ops.h) ----
  m.def("nf4_quantize", &nf4_quantize, nogil);
  m.def("nf4_dequantize", &nf4_dequantize, nogil);
  m.def("nf4_repack", &nf4_repack, nogil);
  m.def("nf4_gemv", &nf4_gemv, nogil);
  m.def("dense_gemv", &dense_gemv, nogil);
  m.def("attention_forward", &attention_forward, nogil);
  m.def("attention_backward", &attention_backward, nogil);
  m.def("lora_forward", &lora_forward, nogil);
  m.def("lora_gemm", &lora_gemm, nogil);
  m.def("linear_cross_entropy_rows", &linear_cross_entropy_rows, nogil);
  m.def("sampling_run", &sampling_run, nogil);
}
