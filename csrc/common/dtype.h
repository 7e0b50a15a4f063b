// Element types crossing the Python/C++ boundary, and scalar conversions between them.
#pragma once
#include <cstdint>
#include <cstring>

namespace fusedlm {

// Dtype codes passed from Python (fusedlm/ops/_checks.py: DTYPE_CODES must match). The float
// types are the ones kernels compute on; the others describe index, mask and parameter buffers.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, U8 = 3, I32 = 4, I64 = 5, F64 = 6 };

constexpr int kDTypes = 7;

inline int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::U8: return 1;
    case DType::BF16: case DType::F16: return 2;
    case DType::F32: case DType::I32: return 4;
    case DType::I64: case DType::F64: return 8;
  }
  return 1;
}

inline const char* dtype_name(DType dtype) {
  static const char* names[kDTypes] = {"float32", "bfloat16", "float16", "uint8", "int32", "int64", "float64"};
  return names[static_cast<int>(dtype)];
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest, ties to even: the same rounding as torch's float -> bfloat16 cast.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays a (quiet) NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// IEEE half: the compiler's own type (aarch64 names it __fp16), converted with round to nearest even.
#if defined(__aarch64__)
using half_t = __fp16;
#else
using half_t = _Float16;
#endif

inline float f16_to_float(uint16_t h) {
  half_t v;
  std::memcpy(&v, &h, sizeof(v));
  return static_cast<float>(v);
}

inline uint16_t float_to_f16(float f) {
  half_t v = static_cast<half_t>(f);
  uint16_t h;
  std::memcpy(&h, &v, sizeof(h));
  return h;
}

// Element i of a buffer of `dtype`, widened to float.
inline float load_as_float(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(data)[i];
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::F16: return f16_to_float(static_cast<const uint16_t*>(data)[i]);
    default: return 0.0f;  // not a float type: the boundary checks keep these out
  }
}

// Stores float v as element i of a buffer of `dtype` (rounded to nearest even).
inline void store_from_float(void* data, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::F32: static_cast<float*>(data)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(data)[i] = float_to_bf16(v); break;
    case DType::F16: static_cast<uint16_t*>(data)[i] = float_to_f16(v); break;
    default: break;
  }
}

}  // namespace fusedlm
