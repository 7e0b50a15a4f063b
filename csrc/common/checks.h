// The boundary checks of each args struct (common/args.h), run by every entry point, CPU
// (cpu/<op>.cpp) and CUDA (cuda/<op>.cu) alike, before a kernel reads a pointer. Python checked
// every argument first, so a failure here (std::invalid_argument, a ValueError in Python) means a
// bug on the Python side; what they guarantee is that the kernels read and write only within the
// sizes they get. They read the views' sizes and strides, never the memory behind them, except
// check_lora, which reads the row grouping, and check_linear_cross_entropy, which reads the targets
// (the CPU-only ops' host buffers).
#pragma once
#include <cstdint>
#include <string>

#include "common/args.h"
#include "common/view.h"

namespace fusedlm {

// ---- nf4 ----
inline void check_nf4_blocks(const Nf4Args& a, int64_t n) {
  require(a.blocksize >= 32 && a.blocksize <= 4096 && (a.blocksize & (a.blocksize - 1)) == 0,
          "blocksize must be a power of two in [32, 4096], got " + std::to_string(a.blocksize));
  check_contiguous(a.data, "data", {DType::U8}, {-1});
  require(a.data.numel() == (n + 1) / 2, "data must hold " + std::to_string((n + 1) / 2) + " bytes");
  check_contiguous(a.absmax, "absmax", {DType::F32}, {(n + a.blocksize - 1) / a.blocksize});
}

// w -> data, absmax
inline void check_nf4_quantize(const Nf4Args& a) {
  check_contiguous(a.w, "w", kFloatTypes, {-1});
  check_nf4_blocks(a, a.w.numel());
  check_contiguous(a.midpoints, "midpoints", {DType::F32}, {15});
}

// data, absmax -> out
inline void check_nf4_dequantize(const Nf4Args& a) {
  check_contiguous(a.out, "out", kFloatTypes, {-1});
  check_nf4_blocks(a, a.out.numel());
  check_contiguous(a.code, "code", {DType::F32}, {16});
}

// The tiles of the weight [N, K] (common/args.h: Nf4Args), as repack writes and gemv reads them.
inline void check_nf4_tiles(const Nf4Args& a, int64_t N, int64_t K) {
  require(K % a.blocksize == 0, "the tiles need K % blocksize == 0, got K=" + std::to_string(K));
  check_contiguous(a.tiles, "tiles", {DType::U8},
                   {(N + kNf4TileRows - 1) / kNf4TileRows, K / a.blocksize, nf4_tile_block_bytes(a.blocksize)});
}

// data, absmax -> tiles, for the weight [N, K] with K = tiles.size(1) * blocksize
inline void check_nf4_repack(const Nf4Args& a) {
  require(static_cast<bool>(a.tiles) && a.tiles.ndim == 3, "tiles must be a 3-D view");
  const int64_t K = a.tiles.size(1) * a.blocksize;
  require(K > 0 && a.data.numel() * 2 % K == 0, "data must hold whole rows of K=" + std::to_string(K) + " elements");
  const int64_t N = a.data.numel() * 2 / K;
  check_nf4_blocks(a, N * K);
  check_nf4_tiles(a, N, K);
}

// out = x @ W^T + bias for the NF4 weight W [N, K] (data, absmax, or the tiles)
inline void check_nf4_gemv(const Nf4Args& a) {
  check_view(a.x, "x", kFloatTypes, {-1, -1});
  const int64_t M = a.x.size(0), K = a.x.size(1);
  require(a.x.stride(1) == 1 || K == 1, "x must have unit stride along K");
  require(K % 32 == 0, "K must be a multiple of 32, got " + std::to_string(K));
  check_contiguous(a.out, "out", {a.x.dtype}, {M, -1});
  const int64_t N = a.out.size(1);
  if (a.tiles) {
    require(a.blocksize >= 32 && a.blocksize <= 4096 && (a.blocksize & (a.blocksize - 1)) == 0,
            "blocksize must be a power of two in [32, 4096], got " + std::to_string(a.blocksize));
    check_nf4_tiles(a, N, K);
  } else {
    check_nf4_blocks(a, N * K);
  }
  check_contiguous(a.code, "code", {DType::F32}, {16});
  if (a.bias) check_contiguous(a.bias, "bias", {DType::F32}, {N});
}

// ---- dense decode GEMV ----
inline void check_dense_gemv(const GemvArgs& a) {
  check_view(a.x, "x", {DType::F32, DType::BF16}, {-1, -1});
  const int64_t M = a.x.size(0), K = a.x.size(1);
  require(M >= 1 && M <= kGemvMaxRows, "x must have 1 to " + std::to_string(kGemvMaxRows) + " rows, got " + std::to_string(M));
  require(K >= 1 && a.x.stride(1) == 1, "x must have K >= 1 and unit stride along K");
  check_view(a.w, "w", {a.x.dtype}, {-1, K});
  const int64_t N = a.w.size(0);
  require(N >= 1 && a.w.stride(1) == 1 && a.w.stride(0) >= K, "w must be [N, K] rows with unit stride along K, N >= 1");
  check_contiguous(a.out, "out", {a.x.dtype}, {M, N});
  if (a.bias) check_contiguous(a.bias, "bias", {DType::F32}, {N});
}

// ---- attention ----
inline void check_attention(const AttentionArgs& a, bool backward) {
  check_view(a.q, "q", {DType::F32, DType::BF16}, {-1, -1, -1, -1});
  const int64_t B = a.q.size(0), Hq = a.q.size(1), Nq = a.q.size(2), D = a.q.size(3);
  check_view(a.k, "k", {a.q.dtype}, {B, -1, -1, D});
  const int64_t Hkv = a.k.size(1), Nk = a.k.size(2);
  check_view(a.v, "v", {a.q.dtype}, {B, Hkv, Nk, D});
  require(Hkv > 0 && Hq % Hkv == 0, "the query heads must be a multiple of the key/value heads");
  require(a.q.stride(3) == 1 && a.k.stride(3) == 1 && a.v.stride(3) == 1, "q, k and v need unit stride along D");
  require(a.mask_mode >= 0 && a.mask_mode <= 2, "mask_mode must be 0, 1 or 2");
  if (a.mask_mode == 1) check_contiguous(a.prefix_len, "prefix_len", {DType::I64}, {B});
  if (a.key_padding_mask) check_contiguous(a.key_padding_mask, "key_padding_mask", {DType::U8}, {B, Nk});
  if (a.bias) check_view(a.bias, "bias", {DType::F32}, {B, Hq, Nq, Nk});
  require(a.dropout_p >= 0.0 && a.dropout_p < 1.0, "dropout_p must be in [0, 1)");
  check_contiguous(a.lse, "lse", {DType::F32}, {B, Hq, Nq});
  check_contiguous(a.out, "out", {a.q.dtype}, {B, Hq, Nq, D});
  if (!backward) return;
  check_contiguous(a.grad_out, "grad_out", {a.q.dtype}, {B, Hq, Nq, D});
  check_contiguous(a.dq, "dq", {DType::F32}, {-1, B, Hq, Nq, (D + 15) / 16 * 16});
  check_contiguous(a.dk, "dk", {DType::F32}, {B, Hkv, Nk, D});
  check_contiguous(a.dv, "dv", {DType::F32}, {B, Hkv, Nk, D});
  if (a.dbias) check_contiguous(a.dbias, "dbias", {DType::F32}, {B, Hq, Nq, Nk});
}

// ---- lora ----
inline void check_lora(const LoraArgs& a) {
  check_view(a.x, "x", kFloatTypes, {-1, -1});
  const int64_t M = a.x.size(0), K = a.x.size(1);
  require(a.x.stride(1) == 1 || K == 1, "x must have unit stride along K");
  check_contiguous(a.lora_a, "lora_a", {DType::F32}, {-1, -1, K});
  const int64_t n_adapters = a.lora_a.size(0), r = a.lora_a.size(1);
  check_contiguous(a.out, "out", kFloatTypes, {M, -1});
  const int64_t N = a.out.size(1);
  check_contiguous(a.lora_bt, "lora_bt", {DType::F32}, {n_adapters, r, N});
  check_contiguous(a.segments, "segments", {DType::I64}, {n_adapters + 2});
  if (a.rows) check_contiguous(a.rows, "rows", {DType::I64}, {M});
  check_contiguous(a.scales, "scales", {DType::F32}, {n_adapters});
  if (a.bias) check_contiguous(a.bias, "bias", {DType::F32}, {N});
  check_contiguous(a.h, "h", {DType::F32}, {M, r});
  if (a.init) check_contiguous(a.init, "init", {a.out.dtype}, {M, N});
  const int64_t* segments = a.segments.ptr<const int64_t>();
  require(segments[0] == 0 && segments[n_adapters + 1] == M, "segments must run from 0 to M");
  for (int64_t s = 0; s <= n_adapters; ++s) require(segments[s] <= segments[s + 1], "segments must not decrease");
  if (a.rows)
    for (int64_t i = 0; i < M; ++i) require(a.rows.ptr<const int64_t>()[i] >= 0 && a.rows.ptr<const int64_t>()[i] < M, "rows must lie in [0, M)");
}

// out (+)= a Wᵀ + a2 w2ᵀ or a W + a2 w2 for the base weight W [n, k] (dense w, or NF4 data + absmax)
inline void check_lora_gemm(const LoraGemmArgs& a) {
  require(a.n > 0 && a.k > 0, "W must be [n >= 1, k >= 1], got [" + std::to_string(a.n) + ", " + std::to_string(a.k) + "]");
  if (a.w) {
    check_view(a.w, "w", {DType::F32, DType::BF16}, {a.n, a.k});
    require(a.w.stride(1) == 1 || a.k == 1, "w must have unit stride along k");
  } else {
    require(a.k % 32 == 0, "an NF4 W needs k % 32 == 0, got k = " + std::to_string(a.k));
    require(a.blocksize >= 32 && a.blocksize <= 4096 && (a.blocksize & (a.blocksize - 1)) == 0,
            "blocksize must be a power of two in [32, 4096], got " + std::to_string(a.blocksize));
    check_contiguous(a.data, "data", {DType::U8}, {-1});
    require(a.data.numel() == a.n * a.k / 2, "data must hold n k / 2 bytes");
    check_contiguous(a.absmax, "absmax", {DType::F32}, {(a.n * a.k + a.blocksize - 1) / a.blocksize});
    check_contiguous(a.code, "code", {DType::F32}, {16});
  }
  require(a.transposed == 0 || a.transposed == 1, "transposed must be 0 or 1");
  const int64_t R = a.transposed ? a.n : a.k, C = a.transposed ? a.k : a.n;
  check_view(a.a, "a", {DType::F32, DType::BF16}, {-1, R});
  const int64_t M = a.a.size(0);
  require(a.a.stride(1) == 1 || R == 1, "a must have unit stride along its columns");
  require(a.a.dtype != DType::BF16 || R % 2 == 0, "bf16 a needs an even reduction length");
  if (a.a2) {
    check_view(a.a2, "a2", {a.a.dtype}, {M, -1});
    const int64_t r = a.a2.size(1);
    require(a.a2.stride(1) == 1 || r == 1, "a2 must have unit stride along its columns");
    require(a.a2.dtype != DType::BF16 || r % 2 == 0, "bf16 a2 needs an even rank");
    if (a.transposed) check_view(a.w2, "w2", {DType::F32, DType::BF16}, {r, C});
    else check_view(a.w2, "w2", {DType::F32, DType::BF16}, {C, r});
    require(a.w2.stride(1) == 1 || a.w2.size(1) == 1, "w2 must have unit stride along its rows");
  }
  check_view(a.out, "out", {DType::F32, DType::BF16}, {M, C});
  require(a.out.stride(1) == 1 || C == 1, "out must have unit stride along its columns");
}

// ---- linear_cross_entropy ----
inline void check_linear_cross_entropy(const LinearCrossEntropyArgs& a) {
  check_view(a.logits, "logits", kFloatTypes, {-1, -1});
  const int64_t C = a.logits.size(0), V = a.logits.size(1);
  require(a.logits.stride(1) == 1 || V == 1, "logits must have unit stride along the vocabulary");
  require(V > 0 && V < (int64_t{1} << 31), "the vocabulary must have 1 to 2^31 - 1 entries");
  check_contiguous(a.targets, "targets", {DType::I64}, {C});
  if (a.scales) check_contiguous(a.scales, "scales", {DType::F32}, {C});
  check_contiguous(a.loss, "loss", {DType::F32}, {C});
  check_contiguous(a.lse, "lse", {DType::F32}, {C});
  check_contiguous(a.argmax, "argmax", {DType::I64}, {C});
  const int64_t* targets = a.targets.ptr<const int64_t>();
  for (int64_t c = 0; c < C; ++c)
    require(targets[c] == a.ignore_index || (targets[c] >= 0 && targets[c] < V),
            "targets must lie in [0, V) or equal ignore_index, got " + std::to_string(targets[c]));
}

// ---- sampling ----
inline void check_sampling(const SamplingArgs& a) {
  check_view(a.logits, "logits", kFloatTypes, {-1, -1});
  const int64_t B = a.logits.size(0), V = a.logits.size(1);
  require(a.logits.stride(1) == 1 || V == 1, "logits must have unit stride along the vocabulary");
  require(V < (int64_t{1} << 31), "the vocabulary must have fewer than 2^31 entries");
  check_contiguous(a.temperature, "temperature", {DType::F32}, {B});
  check_contiguous(a.top_k, "top_k", {DType::I64}, {B});
  check_contiguous(a.top_p, "top_p", {DType::F64}, {B});
  check_contiguous(a.status, "status", {DType::I32}, {B});
  if (a.tokens) check_contiguous(a.tokens, "tokens", {DType::I64}, {B});
  if (a.filtered) check_contiguous(a.filtered, "filtered", {DType::F32}, {B, V});
}

}  // namespace fusedlm
