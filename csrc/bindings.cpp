// fusedlm._C: the one pybind11 module of the CPU kernels.
//
// Tensors cross as raw addresses (std::uintptr_t) with their sizes, strides and dtype codes:
// no torch headers here (DESIGN.md rule 1). Every argument was checked in Python first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::array strides (attention)

#include <array>
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

  // ---- attention ----
  using Strides = std::array<int64_t, 4>;
  m.def("attention_forward",
        [](uintptr_t q, uintptr_t k, uintptr_t v, int q_dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Nq,
           int64_t Nk, int64_t D, Strides sq, Strides sk, Strides sv, int mask_mode, uintptr_t prefix_len,
           uintptr_t key_padding_mask, uintptr_t bias, Strides sb, float scale, uintptr_t out, uintptr_t lse,
           int num_threads) {
          fusedlm::cpu::attention_forward(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), dtype(q_dtype), B,
                                          Hq, Hkv, Nq, Nk, D, sq.data(), sk.data(), sv.data(), mask_mode,
                                          ptr<const int64_t>(prefix_len), ptr<const uint8_t>(key_padding_mask),
                                          ptr<const float>(bias), sb.data(), scale, ptr<void>(out), ptr<float>(lse),
                                          num_threads);
        }, nogil);
  m.def("attention_backward",
        [](uintptr_t grad_out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, int q_dtype,
           int64_t B, int64_t Hq, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D, Strides sq, Strides sk, Strides sv,
           int mask_mode, uintptr_t prefix_len, uintptr_t key_padding_mask, uintptr_t bias, Strides sb, float scale,
           uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t dbias, int64_t splits, int num_threads) {
          fusedlm::cpu::attention_backward(
              ptr<const void>(grad_out), ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<const void>(out),
              ptr<const float>(lse), dtype(q_dtype), B, Hq, Hkv, Nq, Nk, D, sq.data(), sk.data(), sv.data(), mask_mode,
              ptr<const int64_t>(prefix_len), ptr<const uint8_t>(key_padding_mask), ptr<const float>(bias), sb.data(),
              scale, ptr<float>(dq), ptr<float>(dk), ptr<float>(dv), ptr<float>(dbias), splits, num_threads);
        }, nogil);

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
  m.def("nf4_gemv",
        [](uintptr_t x, int x_dtype, int64_t M, int64_t K, int64_t stride_xm, uintptr_t data, uintptr_t absmax,
           int64_t blocksize, int64_t N, uintptr_t code, uintptr_t bias, uintptr_t out, int out_dtype, int num_threads) {
          fusedlm::cpu::nf4_gemv(ptr<const void>(x), dtype(x_dtype), M, K, stride_xm, ptr<const uint8_t>(data),
                                 ptr<const float>(absmax), blocksize, N, ptr<const float>(code), ptr<const float>(bias),
                                 ptr<void>(out), dtype(out_dtype), num_threads);
        }, nogil);

  // ---- sampling ----
  m.def("sampling_run",
        [](uintptr_t logits, int logits_dtype, int64_t B, int64_t V, int64_t stride_row, uintptr_t temperature,
           uintptr_t top_k, uintptr_t top_p, uint64_t seed, uintptr_t tokens, uintptr_t filtered, uintptr_t status,
           int num_threads) {
          fusedlm::cpu::sampling_run(ptr<const void>(logits), dtype(logits_dtype), B, V, stride_row,
                                     ptr<const float>(temperature), ptr<const int64_t>(top_k), ptr<const double>(top_p),
                                     seed, ptr<int64_t>(tokens), ptr<float>(filtered), ptr<int32_t>(status),
                                     num_threads);
        }, nogil);

  // ---- lora ----
  m.def("lora_forward",
        [](uintptr_t x, int x_dtype, int64_t stride_xm, int64_t M, int64_t K, uintptr_t lora_a, uintptr_t lora_bt,
           int64_t n_adapters, int64_t r, int64_t N, uintptr_t rows, uintptr_t segments, uintptr_t scales,
           uintptr_t bias, uintptr_t h, uintptr_t init, uintptr_t out, int out_dtype, int num_threads) {
          fusedlm::cpu::lora_forward(ptr<const void>(x), dtype(x_dtype), stride_xm, M, K, ptr<const float>(lora_a),
                                     ptr<const float>(lora_bt), n_adapters, r, N, ptr<const int64_t>(rows),
                                     ptr<const int64_t>(segments), ptr<const float>(scales), ptr<const float>(bias),
                                     ptr<float>(h), ptr<const void>(init), ptr<void>(out), dtype(out_dtype),
                                     num_threads);
        }, nogil);
}
