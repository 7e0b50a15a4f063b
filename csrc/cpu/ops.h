// Entry points of the CPU kernels (one .cpp per op in this folder). They take raw pointers,
// sizes, strides and dtype codes; the Python side (python/fusedlm/ops/) has checked every
// argument, so the kernels only read within the sizes they are given.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace fusedlm::cpu {

// ---- nf4.cpp ----
// w: n elements of `dtype`; midpoints: the 15 NF4 decision boundaries (float32).
// data: ceil(n/2) bytes out; absmax: ceil(n/blocksize) floats out.
void nf4_quantize(const void* w, DType dtype, int64_t n, int64_t blocksize, const float* midpoints,
                  uint8_t* data, float* absmax, int num_threads);
// code: the 16 NF4 values (float32); out: n elements of `dtype`.
void nf4_dequantize(const uint8_t* data, const float* absmax, int64_t n, int64_t blocksize,
                    const float* code, void* out, DType dtype, int num_threads);

}  // namespace fusedlm::cpu
