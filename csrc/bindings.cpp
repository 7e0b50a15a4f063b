// fusedlm._C: the one pybind11 module of the CPU kernels.
//
// Tensors cross as View structs (address, dtype code, sizes, strides: common/view.h), gathered
// per op in an args struct whose fields Python sets by name (cpu/ops.h): no torch headers here
// (DESIGN.md rule 1), and no positional lists to keep in step. Every argument was checked in
// Python first; the entry points check the views once more and throw std::invalid_argument
// (ValueError) rather than read out of bounds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "cpu/ops.h"

namespace py = pybind11;

namespace {

fusedlm::View make_view(std::uintptr_t data, int dtype, const std::vector<int64_t>& sizes,
                        const std::vector<int64_t>& strides) {
  if (dtype < 0 || dtype >= fusedlm::kDTypes) throw py::value_error("unknown dtype code " + std::to_string(dtype));
  if (sizes.size() != strides.size() || sizes.size() > static_cast<size_t>(fusedlm::View::kMaxDims))
    throw py::value_error("a view needs as many strides as sizes, at most " + std::to_string(fusedlm::View::kMaxDims));
  fusedlm::View v;
  v.data = reinterpret_cast<void*>(data);
  v.dtype = static_cast<fusedlm::DType>(dtype);
  v.ndim = static_cast<int>(sizes.size());
  for (int d = 0; d < v.ndim; ++d) {
    if (sizes[d] < 0) throw py::value_error("a view cannot have a negative size");
    v.sizes[d] = sizes[d];
    v.strides[d] = strides[d];
  }
  return v;
}

// Binds an args struct with a default constructor and one read/write attribute per field.
template <class Args, class... Fields>
void bind_args(py::module_& m, const char* name, const char* doc, Fields... fields) {
  py::class_<Args> cls(m, name, doc);
  cls.def(py::init<>());
  (cls.def_readwrite(fields.first, fields.second), ...);
}

template <class T, class C>
std::pair<const char*, T C::*> field(const char* name, T C::*member) {
  return {name, member};
}

}  // namespace

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

  py::class_<View>(m, "View", "A tensor as the kernels see it: address, dtype code, sizes, strides (elements).")
      .def(py::init(&make_view), py::arg("data"), py::arg("dtype"), py::arg("sizes"), py::arg("strides"))
      .def_property_readonly("shape", [](const View& v) { return std::vector<int64_t>(v.sizes, v.sizes + v.ndim); });

  bind_args<Nf4Args>(m, "Nf4Args", "Arguments of nf4_quantize / nf4_dequantize / nf4_gemv (cpu/ops.h).",
                     field("w", &Nf4Args::w), field("data", &Nf4Args::data), field("absmax", &Nf4Args::absmax),
                     field("code", &Nf4Args::code), field("midpoints", &Nf4Args::midpoints),
                     field("blocksize", &Nf4Args::blocksize), field("x", &Nf4Args::x), field("bias", &Nf4Args::bias),
                     field("out", &Nf4Args::out), field("num_threads", &Nf4Args::num_threads));
  m.def("nf4_quantize", &nf4_quantize, nogil);
  m.def("nf4_dequantize", &nf4_dequantize, nogil);
  m.def("nf4_gemv", &nf4_gemv, nogil);

  bind_args<AttentionArgs>(
      m, "AttentionArgs", "Arguments of attention_forward / attention_backward (cpu/ops.h).",
      field("q", &AttentionArgs::q), field("k", &AttentionArgs::k), field("v", &AttentionArgs::v),
      field("mask_mode", &AttentionArgs::mask_mode), field("prefix_len", &AttentionArgs::prefix_len),
      field("key_padding_mask", &AttentionArgs::key_padding_mask), field("bias", &AttentionArgs::bias),
      field("scale", &AttentionArgs::scale), field("dropout_threshold", &AttentionArgs::dropout_threshold),
      field("dropout_seed", &AttentionArgs::dropout_seed), field("dropout_scale", &AttentionArgs::dropout_scale),
      field("out", &AttentionArgs::out), field("lse", &AttentionArgs::lse),
      field("grad_out", &AttentionArgs::grad_out), field("dq", &AttentionArgs::dq), field("dk", &AttentionArgs::dk),
      field("dv", &AttentionArgs::dv), field("dbias", &AttentionArgs::dbias),
      field("num_threads", &AttentionArgs::num_threads));
  m.def("attention_forward", &attention_forward, nogil);
  m.def("attention_backward", &attention_backward, nogil);

  bind_args<LoraArgs>(m, "LoraArgs", "Arguments of lora_forward (cpu/ops.h).", field("x", &LoraArgs::x),
                      field("lora_a", &LoraArgs::lora_a), field("lora_bt", &LoraArgs::lora_bt),
                      field("rows", &LoraArgs::rows), field("segments", &LoraArgs::segments),
                      field("scales", &LoraArgs::scales), field("bias", &LoraArgs::bias), field("h", &LoraArgs::h),
                      field("init", &LoraArgs::init), field("out", &LoraArgs::out),
                      field("num_threads", &LoraArgs::num_threads));
  m.def("lora_forward", &lora_forward, nogil);

  bind_args<SamplingArgs>(m, "SamplingArgs", "Arguments of sampling_run (cpu/ops.h).",
                          field("logits", &SamplingArgs::logits), field("temperature", &SamplingArgs::temperature),
                          field("top_k", &SamplingArgs::top_k), field("top_p", &SamplingArgs::top_p),
                          field("seed", &SamplingArgs::seed), field("tokens", &SamplingArgs::tokens),
                          field("filtered", &SamplingArgs::filtered), field("status", &SamplingArgs::status),
                          field("num_threads", &SamplingArgs::num_threads));
  m.def("sampling_run", &sampling_run, nogil);
}
