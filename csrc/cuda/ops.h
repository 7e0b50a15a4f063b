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

}  // namespace fusedlm::cuda
