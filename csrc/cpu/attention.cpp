// Masked scaled-dot-product attention on the CPU, equal to the reference
// (python/fusedlm/reference/attention.py), which defines the masks, the dropout recipe and the
// edge cases. The kernels (flash-style tiles with an online softmax, a decode path for few
// queries, the backward) are in attention_kernels.h, compiled once per ISA level; this file holds
// what they share (the problem, the mask's row limits) and the entry points.
#include "cpu/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

// What the per-ISA kernels share, in a named namespace: their structs (one per level) hold these
// types, so the types cannot have internal linkage.
namespace fusedlm::cpu::attn {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLn2 = 0.693147180559945309f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Dropout on the probabilities: key the Philox generator with the seed; keep an element when the
// top 24 bits of its random word reach `threshold` (reference: dropout_keep); kept ones are
// multiplied by `scale` = 1 / (1 - p).
struct Dropout {
  int64_t threshold = 0;  // 0: no dropout
  uint32_t k0 = 0, k1 = 0;
  float scale = 1.0f;
};

// The problem as the kernels read it, from the checked AttentionArgs.
struct Problem {
  const void* q;
  const void* k;
  const void* v;
  DType dtype;
  int64_t B, Hq, Hkv, Nq, Nk, D;
  const int64_t* sq;  // element strides of q over [B, H, N, D]; stride along D is 1
  const int64_t* sk;
  const int64_t* sv;
  int mask_mode;              // 0 causal, 1 prefix, 2 bidirectional
  const int64_t* prefix_len;  // [B] (prefix mode)
  const uint8_t* pad;         // [B, Nk] bool, or null
  const float* bias;          // [B, Hq, Nq, Nk] view with strides sb, or null
  const int64_t* sb;
  float scale;
  Dropout dropout;

  int64_t group() const { return Hq / Hkv; }
  int64_t esize() const { return dtype == DType::F32 ? 4 : 2; }

  // Keys j < row_limit(b, i) are visible to query i, padding aside (reference: visible()). It
  // grows with i, so a key tile is hidden from a query tile when its first key is at or past the
  // last row's limit, and visible to every row when the first row's limit is past its last key.
  int64_t row_limit(int64_t b, int64_t i) const {
    const int64_t causal = std::clamp<int64_t>(i + (Nk - Nq) + 1, 0, Nk);
    if (mask_mode == 0) return causal;
    if (mask_mode == 1) return std::max(prefix_len[b], causal);
    return Nk;
  }

  // Start of row i of (b, h) in a tensor with element strides s (q-shaped: q, out, grad_out).
  const char* row(const void* base, const int64_t* s, int64_t b, int64_t h, int64_t i) const {
    return static_cast<const char*>(base) + (b * s[0] + h * s[1] + i * s[2]) * esize();
  }
};

Problem problem_of(const AttentionArgs& a) {
  Problem p{a.q.data, a.k.data, a.v.data, a.q.dtype, a.q.size(0), a.q.size(1), a.k.size(1), a.q.size(2), a.k.size(2),
            a.q.size(3), a.q.strides, a.k.strides, a.v.strides, a.mask_mode, a.prefix_len.ptr<const int64_t>(),
            a.key_padding_mask.ptr<const uint8_t>(), a.bias.ptr<const float>(), a.bias.strides, a.scale, {}};
  if (a.dropout_p > 0.0) {  // reference: dropout_threshold (exact: p times a power of two)
    p.dropout.threshold = static_cast<int64_t>(std::ceil(a.dropout_p * 16777216.0));
    p.dropout.k0 = static_cast<uint32_t>(a.seed);
    p.dropout.k1 = static_cast<uint32_t>(a.seed >> 32);
    p.dropout.scale = static_cast<float>(1.0 / (1.0 - a.dropout_p));
  }
  return p;
}

// How the key padding mask covers keys [j0, j0 + n) of batch b.
enum class Cover { None, Partial, All };

Cover padding_cover(const Problem& p, int64_t b, int64_t j0, int64_t n) {
  if (p.pad == nullptr) return Cover::None;
  int64_t real = 0;
  for (int64_t j = 0; j < n; ++j) real += p.pad[b * p.Nk + j0 + j] != 0;
  return real == n ? Cover::None : real == 0 ? Cover::All : Cover::Partial;
}

inline std::atomic<uint64_t> forward_calls{0};  // tells a thread's packed K / V of one call from the next's

}  // namespace fusedlm::cpu::attn

namespace fusedlm::cpu {
namespace {
struct Kernels {  // the entry kernels of one ISA level (the last line of attention_kernels.h)
  void (*forward)(const attn::Problem&, const AttentionArgs&);
  void (*backward)(const attn::Problem&, const AttentionArgs&);
};
}  // namespace
}  // namespace fusedlm::cpu

#define FUSEDLM_KERNELS "cpu/attention_kernels.h"
#include "common/for_each_isa.h"

namespace fusedlm::cpu {

void attention_forward(const AttentionArgs& a) {
  check_attention(a, false);
  active_kernels().forward(attn::problem_of(a), a);
}

void attention_backward(const AttentionArgs& a) {
  check_attention(a, true);
  active_kernels().backward(attn::problem_of(a), a);
}

}  // namespace fusedlm::cpu
