// Entry points of the CUDA kernels (one .cu per op in this folder), each taking its op's args
// struct (common/args.h: views of device memory, and the stream to launch on). Each checks the
// struct as the CPU entry point does (common/checks.h) and returns the launch's cudaError_t as
// an int (0 = success). Same contracts as the CPU entry points in cpu/ops.h.
#pragma once

#include "common/args.h"

namespace fusedlm::cuda {

// ---- nf4.cu ----
int nf4_quantize(const Nf4Args& args);
int nf4_dequantize(const Nf4Args& args);
// out[M, N] (x's dtype) = x[M, K] @ W^T + bias; K % 32 == 0 (data at any address: 16-byte loads when aligned).
int nf4_gemv(const Nf4Args& args);

// ---- sampling.cu ----
int sampling_run(const SamplingArgs& args);

}  // namespace fusedlm::cuda
