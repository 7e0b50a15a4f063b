// Entry points of the CUDA kernels (one .cu per op in this folder). Host functions taking raw
// device pointers, sizes, dtype codes and the cudaStream_t (as an address) to launch on; they
// return the launch's cudaError_t as an int (0 = success).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fusedlm::cuda {

// ---- nf4.cu ----  (same contract as the CPU kernels in csrc/cpu/ops.h)
int nf4_quantize(const void* w, DType dtype, int64_t n, int64_t blocksize, const float* midpoints,
                 uint8_t* data, float* absmax, std::uintptr_t stream);
int nf4_dequantize(const uint8_t* data, const float* absmax, int64_t n, int64_t blocksize,
                   const float* code, void* out, DType dtype, std::uintptr_t stream);
// out[M, N] (x's dtype) = x[M, K] @ W^T + bias; K % 32 == 0, data 16-byte aligned; bias: N floats or null.
int nf4_gemv(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t stride_xm, const uint8_t* data,
             const float* absmax, int64_t blocksize, int64_t N, const float* code, const float* bias, void* out,
             std::uintptr_t stream);

// ---- sampling ----  (sampling.cu; same contract as sampling_run in csrc/cpu/ops.h)
int sampling_run(const void* logits, DType dtype, int64_t B, int64_t V, int64_t stride_row, const float* temperature,
                 const int64_t* top_k, const double* top_p, uint64_t seed, int64_t* tokens, float* filtered,
                 int32_t* status, std::uintptr_t stream);

}  // namespace fusedlm::cuda
