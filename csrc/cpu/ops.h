// Entry points of the CPU kernels (one .cpp per op in this folder), each taking one args struct of
// views (common/view.h). Python fills the structs by field name (fusedlm/ops/*.py) after checking
// every argument; the entry points check the views against each other once more (a ValueError
// from C++ means a bug on the Python side) so the kernels only read within the sizes they get.
#pragma once
#include <cstdint>

#include "common/view.h"

namespace fusedlm::cpu {

// ---- nf4.cpp: the layout and rounding rules are python/fusedlm/reference/nf4.py's ----
struct Nf4Args {
  View w;          // quantize: the n weights (F32, BF16 or F16), contiguous, any shape
  View data;       // U8, ceil(n / 2) packed bytes (element 2j: high nibble of byte j)
  View absmax;     // F32 [ceil(n / blocksize)]
  View code;       // F32 [16]: the NF4 values (dequantize, matmul)
  View midpoints;  // F32 [15]: the decision boundaries between them (quantize)
  int64_t blocksize = 64;
  View x;          // matmul: [M, K] (F32, BF16 or F16), unit stride along K, K % 32 == 0
  View bias;       // matmul: F32 [N], or absent
  View out;        // dequantize: n elements, contiguous; matmul: [M, N] contiguous (x's dtype)
  int num_threads = 1;
};
// w -> data, absmax (writes both).
void nf4_quantize(const Nf4Args& args);
// data, absmax -> out (out's dtype: F32, BF16 or F16).
void nf4_dequantize(const Nf4Args& args);
// out = x @ W^T + bias for the NF4 weight W [N, K] (data, absmax): the fused GEMV, for few rows of x.
void nf4_gemv(const Nf4Args& args);

// ---- attention.cpp ----
struct AttentionArgs {
  View q, k, v;           // [B, Hq, Nq, D], [B, Hkv, Nk, D], [B, Hkv, Nk, D]: F32 or BF16, unit stride along D
  int mask_mode = 0;      // reference.attention: 0 causal, 1 prefix, 2 bidirectional
  View prefix_len;        // I64 [B] (prefix mode)
  View key_padding_mask;  // U8 [B, Nk] contiguous (nonzero = real token), or absent
  View bias;              // F32 [B, Hq, Nq, Nk] view, zero strides where broadcast, or absent
  float scale = 1.0f;
  // dropout on the probabilities (reference: dropout_keep): keep where the top 24 bits of the
  // Philox word reach dropout_threshold = ceil(p 2^24) (0: no dropout), kept ones times dropout_scale
  int64_t dropout_threshold = 0;
  uint64_t dropout_seed = 0;
  float dropout_scale = 1.0f;
  View out;               // forward out: contiguous [B, Hq, Nq, D] of q's dtype (backward: read)
  View lse;               // forward out: contiguous F32 [B, Hq, Nq], -inf for rows that see no key
  View grad_out;          // backward: contiguous [B, Hq, Nq, D] of q's dtype
  View dq;                // backward: zeroed F32 [splits, B, Hq, Nq, round_up(D, 16)], summed by the caller
  View dk, dv;            // backward: F32 [B, Hkv, Nk, D] (written)
  View dbias;             // backward: zeroed F32 [B, Hq, Nq, Nk], or absent
  int num_threads = 1;
};
void attention_forward(const AttentionArgs& args);
void attention_backward(const AttentionArgs& args);

// ---- lora.cpp ----
// The adapter part of a LoRA linear layer, fused with the accumulation into the output:
//   h[m] = x[m] A_a^T;  out[m] = init[m] + bias + scales[a] * h[m] Bt_a   (a = the row's adapter).
struct LoraArgs {
  View x;         // [M, K] (F32, BF16 or F16), unit stride along K
  View lora_a;    // F32 [A, r, K] contiguous
  View lora_bt;   // F32 [A, r, N] contiguous (B transposed)
  View rows;      // I64 [M]: the row indices grouped by adapter, or absent for 0 .. M-1
  View segments;  // I64 [A + 2] offsets into rows: segment 0 = rows without an adapter, 1 + a = adapter a
  View scales;    // F32 [A]
  View bias;      // F32 [N], or absent
  View h;         // F32 [M, r] out (0 for rows without an adapter)
  View init;      // [M, N] of out's dtype, contiguous (may be out itself), or absent
  View out;       // [M, N] contiguous (F32, BF16 or F16)
  int num_threads = 1;
};
void lora_forward(const LoraArgs& args);

// ---- sampling.cpp: semantics of python/fusedlm/reference/sampling.py ----
struct SamplingArgs {
  View logits;       // [B, V] (F32, BF16 or F16), unit stride along V
  View temperature;  // F32 [B] (0 = greedy)
  View top_k;        // I64 [B] (0 or >= V = off)
  View top_p;        // F64 [B] (1 = off)
  uint64_t seed = 0; // the call's seed (reference: row_uniforms)
  View tokens;       // I64 [B] out, or absent
  View filtered;     // F32 [B, V] contiguous out, or absent
  View status;       // I32 [B] out: 0 ok, 1 NaN, 2 +inf, 3 no finite value, 4 logits / temperature overflows
  int num_threads = 1;
};
void sampling_run(const SamplingArgs& args);

}  // namespace fusedlm::cpu
