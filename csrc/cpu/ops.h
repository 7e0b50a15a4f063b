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
// out[M, N] (out_dtype) = x[M, K] @ W^T + bias for the NF4 weight W [N, K] (data, absmax, blocksize).
// x: rows stride_xm elements apart, unit stride along K; K % 32 == 0; bias: N floats or null.
void nf4_gemv(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t stride_xm, const uint8_t* data,
              const float* absmax, int64_t blocksize, int64_t N, const float* code, const float* bias, void* out,
              DType out_dtype, int num_threads);

// ---- attention.cpp ----
// q [B, Hq, Nq, D], k / v [B, Hkv, Nk, D] of `dtype` (F32 or BF16) with element strides *_strides[4]
// (unit stride along D); mask_mode 0 causal, 1 prefix (prefix_len: B int64), 2 bidirectional;
// key_padding_mask: [B, Nk] bytes (nonzero = real token) or null; bias: float32 [B, Hq, Nq, Nk] view
// with bias_strides (zero where broadcast) or null. out: contiguous [B, Hq, Nq, D] of `dtype`;
// lse: contiguous [B, Hq, Nq] float32 (-inf for rows that see no key).
void attention_forward(const void* q, const void* k, const void* v, DType dtype, int64_t B, int64_t Hq, int64_t Hkv,
                       int64_t Nq, int64_t Nk, int64_t D, const int64_t* q_strides, const int64_t* k_strides,
                       const int64_t* v_strides, int mask_mode, const int64_t* prefix_len,
                       const uint8_t* key_padding_mask, const float* bias, const int64_t* bias_strides, float scale,
                       void* out, float* lse, int num_threads);
// grad_out, out: contiguous [B, Hq, Nq, D] of `dtype`; lse as the forward wrote it. dq: zeroed float32
// [splits, B, Hq, Nq, round_up(D, 16)] (one buffer per split of the key tiles, summed by the caller);
// dk, dv: float32 [B, Hkv, Nk, D] (written); dbias: zeroed float32 [B, Hq, Nq, Nk] or null.
void attention_backward(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                        const float* lse, DType dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Nq, int64_t Nk,
                        int64_t D, const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                        int mask_mode, const int64_t* prefix_len, const uint8_t* key_padding_mask, const float* bias,
                        const int64_t* bias_strides, float scale, float* dq, float* dk, float* dv, float* dbias,
                        int64_t splits, int num_threads);

// ---- lora.cpp ----
// The adapter part of a LoRA linear layer, fused with the accumulation into the output:
//   h[m] = x[m] A_a^T;  out[m] = init[m] + bias + scales[a] * h[m] Bt_a   (a = the row's adapter).
// x: [M, K] of x_dtype, rows stride_xm apart, unit stride along K. lora_a: float32 [n_adapters, r, K];
// lora_bt: float32 [n_adapters, r, N] (B transposed). rows: the M row indices grouped by adapter, or
// null for 0..M-1; segments: n_adapters + 2 offsets into rows (segment 0: rows without an adapter,
// segment 1 + a: adapter a). scales: n_adapters floats; bias: N floats or null. h: float32 [M, r] out
// (0 for rows without an adapter). init: [M, N] of out_dtype (may equal out) or null; out: [M, N].
void lora_forward(const void* x, DType x_dtype, int64_t stride_xm, int64_t M, int64_t K, const float* lora_a,
                  const float* lora_bt, int64_t n_adapters, int64_t r, int64_t N, const int64_t* rows,
                  const int64_t* segments, const float* scales, const float* bias, float* h, const void* init,
                  void* out, DType out_dtype, int num_threads);

// ---- sampling ----
// sampling.cpp: temperature -> top-k -> top-p -> draw, per row of logits [B, V] (`dtype`, rows
// stride_row elements apart, unit stride along V). temperature / top_k / top_p: B values each
// (temperature 0 = greedy, top_k 0 or >= V = off, top_p 1 = off). tokens: B int64 out or null;
// filtered: contiguous float32 [B, V] out or null. status: B int32 out (0 ok, 1 NaN, 2 +inf,
// 3 no finite value, 4 logits / temperature overflows). seed: the call's seed (see the reference).
void sampling_run(const void* logits, DType dtype, int64_t B, int64_t V, int64_t stride_row, const float* temperature,
                  const int64_t* top_k, const double* top_p, uint64_t seed, int64_t* tokens, float* filtered,
                  int32_t* status, int num_threads);

}  // namespace fusedlm::cpu
