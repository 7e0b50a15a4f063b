// Entry points of the CPU kernels (one .cpp per op in this folder), each taking its op's args
// struct (common/args.h). Each checks the struct (common/checks.h) and runs the kernel of the
// active ISA level (common/for_each_isa.h).
#pragma once

#include "common/args.h"

namespace fusedlm::cpu {

// ---- nf4.cpp ----
// w -> data, absmax (writes both).
void nf4_quantize(const Nf4Args& args);
// data, absmax -> out (out's dtype: F32, BF16 or F16).
void nf4_dequantize(const Nf4Args& args);
// data, absmax -> tiles: the weight in the layout the GEMV streams (common/args.h), once per weight.
void nf4_repack(const Nf4Args& args);
// out = x @ W^T + bias for the NF4 weight W [N, K] (the tiles, else data and absmax): the fused
// GEMV, for few rows of x.
void nf4_gemv(const Nf4Args& args);
void dense_gemv(const GemvArgs& args);

// ---- attention.cpp ----
void attention_forward(const AttentionArgs& args);
void attention_backward(const AttentionArgs& args);

// ---- lora.cpp ----
void lora_forward(const LoraArgs& args);

// ---- lora_gemm.cpp ----
// out (+)= a W^T + a2 w2^T (transposed 0) or a W + a2 w2 (transposed 1): a LoRA layer's products in
// training, the base weight W dense or NF4.
void lora_gemm(const LoraGemmArgs& args);

// ---- linear_cross_entropy.cpp ----
// Per row of a chunk of logits: loss, logsumexp, argmax; with scales, the gradient in place.
void linear_cross_entropy_rows(const LinearCrossEntropyArgs& args);

// ---- sampling.cpp ----
void sampling_run(const SamplingArgs& args);

}  // namespace fusedlm::cpu
