// The args struct of each op, shared by fusedlm._C (cpu/) and fusedlm._cuda (cuda/): one struct of
// views (common/view.h: a view holds a host or a device address) and scalars per op, whose fields
// Python fills by name (fusedlm/ops/_checks.py: launch) after checking every argument. Where an
// op's Python record (e.g. ops/attention.py: AttentionInputs) has a field, the struct has one of
// the same name. Each field is bound once, in common/bind.h; the entry points check the views
// against each other (common/checks.h) before a kernel reads a pointer.
#pragma once
#include <cstdint>

#include "common/view.h"

namespace fusedlm {

// How a call runs, the same for every op: the CPU kernels use num_threads, the CUDA ones the stream.
struct Launch {
  int num_threads = 1;        // cpu: the thread count torch uses (DESIGN.md rule 5)
  std::uintptr_t stream = 0;  // cuda: the cudaStream_t to launch on, as an address
};

// ---- nf4: the layout and rounding rules are python/fusedlm/reference/nf4.py's ----
// The CPU GEMV also reads the weight as tiles (nf4_repack writes them once per weight from the
// bitsandbytes bytes, an in-memory cache): the rows in tiles of kNf4TileRows; per tile and per
// block of a row (blocksize elements, K % blocksize == 0), blocksize / 8 groups of 64 bytes, then
// the tile's 16 absmax of that block (float32). Group g of block b holds elements
// k0 = b * blocksize + 8 g ... k0 + 7 of the 16 rows: 32-bit word r (little-endian) is row r, its
// nibble j (bits 4j .. 4j + 3) the code index of element k0 + kNf4NibbleK[j]. Rows past N (the
// last tile's padding) have absmax 0. One 64-byte load thus gives 16 rows x 8 elements, a lookup
// per nibble position gives 16 rows of one element (or, per 16-bit half, the bf16 pairs
// (k0 + 2i, k0 + 2i + 1)), and each thread streams one contiguous run of memory.
constexpr int64_t kNf4TileRows = 16;
constexpr int kNf4NibbleK[8] = {0, 2, 4, 6, 1, 3, 5, 7};
constexpr int64_t nf4_tile_block_bytes(int64_t blocksize) { return blocksize * kNf4TileRows / 2 + 4 * kNf4TileRows; }

struct Nf4Args : Launch {
  View w;          // quantize: the n weights (F32, BF16 or F16), contiguous, any shape
  View data;       // U8, ceil(n / 2) packed bytes (element 2j: high nibble of byte j)
  View absmax;     // F32 [ceil(n / blocksize)]
  View code;       // F32 [16]: the NF4 values (dequantize, matmul)
  View midpoints;  // F32 [15]: the decision boundaries between them (quantize)
  int64_t blocksize = 64;
  View x;          // matmul: [M, K] (F32, BF16 or F16), unit stride along K, K % 32 == 0
  View bias;       // matmul: F32 [N], or absent
  View out;        // dequantize: n elements, contiguous; matmul: [M, N] contiguous (x's dtype)
  View tiles;      // U8 [ceil(N / 16), K / blocksize, nf4_tile_block_bytes(blocksize)]: the weight as
                   // tiles (repack: written; gemv: read instead of data and absmax when present)
  bool bf16_dots = false;  // gemv, fp32 x: may be rounded to bf16 (torch's float32 matmul precision
                           // is "medium"); bf16 x always is where the CPU has bf16 dot products
};

// ---- dense decode GEMV: out = x W^T + bias for a few rows of x (python/fusedlm/ops/_gemv.py) ----
constexpr int64_t kGemvMaxRows = 4;
struct GemvArgs : Launch {
  View x;     // [M, K], M <= kGemvMaxRows, F32 or BF16, unit stride along K
  View w;     // [N, K] of x's dtype, unit stride along K (any row stride)
  View bias;  // F32 [N], or absent
  View out;   // [M, N] contiguous, x's dtype
};

// ---- attention: masks, dropout recipe and edge cases are python/fusedlm/reference/attention.py's ----
struct AttentionArgs : Launch {
  View q, k, v;           // [B, Hq, Nq, D], [B, Hkv, Nk, D], [B, Hkv, Nk, D]: F32 or BF16, unit stride along D
  int mask_mode = 0;      // reference.attention: 0 causal, 1 prefix, 2 bidirectional
  View prefix_len;        // I64 [B] (prefix mode)
  View key_padding_mask;  // U8 [B, Nk] contiguous (nonzero = real token), or absent
  View bias;              // F32 [B, Hq, Nq, Nk] view, zero strides where broadcast, or absent
  float scale = 1.0f;
  double dropout_p = 0.0;  // dropout on the probabilities, in [0, 1) (reference: dropout_keep)
  uint64_t seed = 0;       // the call's dropout seed (Philox key)
  View out;               // forward out: contiguous [B, Hq, Nq, D] of q's dtype (backward: read)
  View lse;               // forward out: contiguous F32 [B, Hq, Nq], -inf for rows that see no key
  View grad_out;          // backward: contiguous [B, Hq, Nq, D] of q's dtype
  View dq;                // backward: zeroed F32 [splits, B, Hq, Nq, round_up(D, 16)], summed by the caller
  View dk, dv;            // backward: F32 [B, Hkv, Nk, D] (written)
  View dbias;             // backward: zeroed F32 [B, Hq, Nq, Nk], or absent
};

// ---- lora: the adapter part of a LoRA linear layer, fused with the accumulation into the output ----
//   h[m] = x[m] A_a^T;  out[m] = init[m] + bias + scales[a] * h[m] Bt_a   (a = the row's adapter).
struct LoraArgs : Launch {
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
};

// ---- linear_cross_entropy: the row pass over a chunk of logits (python/fusedlm/reference/linear_cross_entropy.py) ----
//   loss[c] = logsumexp(logits[c]) - logits[c, targets[c]]; with scales, logits[c] <- scales[c] (softmax - onehot).
struct LinearCrossEntropyArgs : Launch {
  View logits;               // [C, V] (F32, BF16 or F16), unit stride along V; overwritten by the gradient with scales
  View targets;              // I64 [C], each in [0, V) or ignore_index
  int64_t ignore_index = -100;
  View scales;               // F32 [C]: the factor on each row's gradient, or absent (no gradient written)
  View loss;                 // F32 [C] out (0 on ignored rows, NaN on rows with NaN or +inf logits)
  View lse;                  // F32 [C] out: logsumexp of the row (0 on ignored rows)
  View argmax;               // I64 [C] out: the first index of the row's largest logit (-1 on ignored rows)
};

// ---- lora_gemm: a LoRA layer's products in training, base weight W [n, k] (dense or NF4) plus the adapter ----
//   transposed == 0: out[M, n] (+)= a[M, k] Wᵀ + a2[M, r] w2ᵀ (w2 [n, r]);
//   transposed == 1: out[M, k] (+)= a[M, n] W  + a2[M, r] w2  (w2 [r, k]).
struct LoraGemmArgs : Launch {
  View a;                // [M, R] F32, or BF16 where the CPU has bf16 dot products (then R even); unit stride along R
  View w;                // the dense W [n, k] (F32 or BF16, unit stride along k), or absent for an NF4 W:
  View data;             //   U8, n k / 2 packed bytes (element 2j: high nibble of byte j), k % 32 == 0
  View absmax;           //   F32 [ceil(n k / blocksize)]
  View code;             //   F32 [16]: the NF4 values
  int64_t blocksize = 64;
  int64_t n = 0, k = 0;  // W's shape
  int transposed = 0;    // 0: the forward product, 1: the input gradient's
  View a2;               // [M, r] in a's dtype (r even for BF16), or absent: the adapter's left operand
  View w2;               // F32 or BF16, unit stride along its rows: [n, r] (forward) or [r, k] (transposed)
  int accumulate = 0;    // 1: out += the products (else out = them)
  View out;              // [M, n or k] F32 or BF16, unit stride along its columns
};

// ---- sampling: semantics of python/fusedlm/reference/sampling.py ----
struct SamplingArgs : Launch {
  View logits;       // [B, V] (F32, BF16 or F16), unit stride along V
  View temperature;  // F32 [B] (0 = greedy)
  View top_k;        // I64 [B] (0 or >= V = off)
  View top_p;        // F64 [B] (1 = off)
  uint64_t seed = 0; // the call's seed (reference: row_uniforms)
  View tokens;       // I64 [B] out, or absent
  View filtered;     // F32 [B, V] contiguous out, or absent
  View status;       // I32 [B] out: 0 ok, 1 NaN, 2 +inf, 3 no finite value, 4 logits / temperature overflows
};

}  // namespace fusedlm
