// Device-side element access for the dtype codes of csrc/common/dtype.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/dtype.h"

namespace fusedlm::cuda {

// Element i of a buffer of `dtype`, widened to float.
__device__ __forceinline__ float load(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
  }
  return 0.0f;
}

// Stores float v as element i of a buffer of `dtype` (rounded to nearest even).
__device__ __forceinline__ void store(void* p, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
  }
}

}  // namespace fusedlm::cuda
