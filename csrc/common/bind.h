// The Python side of common/view.h and common/args.h, bound the same way into both extension
// modules (bindings.cpp: fusedlm._C, cuda/module.cu: fusedlm._cuda): View, and each args struct
// with a default constructor and one read/write attribute per field, which Python sets by name
// (fusedlm/ops/_checks.py: launch). A new field of an args struct is one line here.
//
// The classes are module-local: the two modules each have their own View and args types (they
// are separate binaries), so neither registers a C++ type the other already has.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/args.h"
#include "common/view.h"

namespace fusedlm {

namespace py = pybind11;

inline View make_view(std::uintptr_t data, int dtype, const std::vector<int64_t>& sizes,
                      const std::vector<int64_t>& strides) {
  if (dtype < 0 || dtype >= kDTypes) throw py::value_error("unknown dtype code " + std::to_string(dtype));
  if (sizes.size() != strides.size() || sizes.size() > static_cast<size_t>(View::kMaxDims))
    throw py::value_error("a view needs as many strides as sizes, at most " + std::to_string(View::kMaxDims));
  View v;
  v.data = reinterpret_cast<void*>(data);
  v.dtype = static_cast<DType>(dtype);
  v.ndim = static_cast<int>(sizes.size());
  for (int d = 0; d < v.ndim; ++d) {
    if (sizes[d] < 0) throw py::value_error("a view cannot have a negative size");
    v.sizes[d] = sizes[d];
    v.strides[d] = strides[d];
  }
  return v;
}

template <class T, class C>
std::pair<const char*, T C::*> field(const char* name, T C::*member) {
  return {name, member};
}

// Binds an args struct: a default constructor, the Launch fields and one attribute per field given.
template <class Args, class... Fields>
void bind_args(py::module_& m, const char* name, const char* doc, Fields... fields) {
  py::class_<Args> cls(m, name, doc, py::module_local());
  cls.def(py::init<>());
  cls.def_readwrite("num_threads", &Args::num_threads).def_readwrite("stream", &Args::stream);
  (cls.def_readwrite(fields.first, fields.second), ...);
}

inline void bind_views_and_args(py::module_& m) {
  py::class_<View>(m, "View", "A tensor as the kernels see it: address, dtype code, sizes, strides (elements).",
                   py::module_local())
      .def(py::init(&make_view), py::arg("data"), py::arg("dtype"), py::arg("sizes"), py::arg("strides"))
      .def_property_readonly("shape", [](const View& v) { return std::vector<int64_t>(v.sizes, v.sizes + v.ndim); });

  bind_args<Nf4Args>(m, "Nf4Args", "Arguments of nf4_quantize / nf4_dequantize / nf4_repack / nf4_gemv (common/args.h).",
                     field("w", &Nf4Args::w), field("data", &Nf4Args::data), field("absmax", &Nf4Args::absmax),
                     field("code", &Nf4Args::code), field("midpoints", &Nf4Args::midpoints),
                     field("blocksize", &Nf4Args::blocksize), field("x", &Nf4Args::x), field("bias", &Nf4Args::bias),
                     field("out", &Nf4Args::out), field("tiles", &Nf4Args::tiles),
                     field("bf16_dots", &Nf4Args::bf16_dots));

  bind_args<GemvArgs>(m, "GemvArgs", "Arguments of dense_gemv (common/args.h).", field("x", &GemvArgs::x),
                      field("w", &GemvArgs::w), field("bias", &GemvArgs::bias), field("out", &GemvArgs::out));

  bind_args<AttentionArgs>(
      m, "AttentionArgs", "Arguments of attention_forward / attention_backward (common/args.h).",
      field("q", &AttentionArgs::q), field("k", &AttentionArgs::k), field("v", &AttentionArgs::v),
      field("mask_mode", &AttentionArgs::mask_mode), field("prefix_len", &AttentionArgs::prefix_len),
      field("key_padding_mask", &AttentionArgs::key_padding_mask), field("bias", &AttentionArgs::bias),
      field("scale", &AttentionArgs::scale), field("dropout_p", &AttentionArgs::dropout_p),
      field("seed", &AttentionArgs::seed), field("out", &AttentionArgs::out), field("lse", &AttentionArgs::lse),
      field("grad_out", &AttentionArgs::grad_out), field("dq", &AttentionArgs::dq), field("dk", &AttentionArgs::dk),
      field("dv", &AttentionArgs::dv), field("dbias", &AttentionArgs::dbias));

  bind_args<LoraArgs>(m, "LoraArgs", "Arguments of lora_forward (common/args.h).", field("x", &LoraArgs::x),
                      field("lora_a", &LoraArgs::lora_a), field("lora_bt", &LoraArgs::lora_bt),
                      field("rows", &LoraArgs::rows), field("segments", &LoraArgs::segments),
                      field("scales", &LoraArgs::scales), field("bias", &LoraArgs::bias), field("h", &LoraArgs::h),
                      field("init", &LoraArgs::init), field("out", &LoraArgs::out));

  bind_args<LoraGemmArgs>(m, "LoraGemmArgs", "Arguments of lora_gemm (common/args.h).", field("a", &LoraGemmArgs::a),
                          field("w", &LoraGemmArgs::w), field("data", &LoraGemmArgs::data),
                          field("absmax", &LoraGemmArgs::absmax), field("code", &LoraGemmArgs::code),
                          field("blocksize", &LoraGemmArgs::blocksize), field("n", &LoraGemmArgs::n),
                          field("k", &LoraGemmArgs::k), field("transposed", &LoraGemmArgs::transposed),
                          field("a2", &LoraGemmArgs::a2), field("w2", &LoraGemmArgs::w2),
                          field("accumulate", &LoraGemmArgs::accumulate), field("out", &LoraGemmArgs::out));

  bind_args<LinearCrossEntropyArgs>(
      m, "LinearCrossEntropyArgs", "Arguments of linear_cross_entropy_rows (common/args.h).",
      field("logits", &LinearCrossEntropyArgs::logits), field("targets", &LinearCrossEntropyArgs::targets),
      field("ignore_index", &LinearCrossEntropyArgs::ignore_index), field("scales", &LinearCrossEntropyArgs::scales),
      field("loss", &LinearCrossEntropyArgs::loss), field("lse", &LinearCrossEntropyArgs::lse),
      field("argmax", &LinearCrossEntropyArgs::argmax));

  bind_args<SamplingArgs>(m, "SamplingArgs", "Arguments of sampling_run (common/args.h).",
                          field("logits", &SamplingArgs::logits), field("temperature", &SamplingArgs::temperature),
                          field("top_k", &SamplingArgs::top_k), field("top_p", &SamplingArgs::top_p),
                          field("seed", &SamplingArgs::seed), field("tokens", &SamplingArgs::tokens),
                          field("filtered", &SamplingArgs::filtered), field("status", &SamplingArgs::status));
}

}  // namespace fusedlm
