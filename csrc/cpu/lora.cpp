// The adapter part of the fused LoRA linear layer on the CPU, equal to the reference
// (python/fusedlm/reference/lora.py):
//
//   h[m, :]   = x[m, :] A_a^T                          (shrink: K -> r, float32)
//   out[m, n] = init[m, n] + bias[n] + s_a * h[m, :] . Bt_a[:, n]   (expand, fused with the accumulation)
//
// for every row m, a = the row's adapter, s_a = scaling * gate_a. Rows are grouped by adapter by the
// caller (`rows` lists them adapter by adapter, `segments` marks where each adapter's rows start),
// so each task works on rows of one adapter and reads one A_a / Bt_a. Rows of segment 0 have no
// adapter: h = 0 and out = init + bias. The base product x W^T is torch's GEMM, run before (init =
// out) or after (init = null, then an addmm with beta = 1 adds it) this kernel; see ops/lora.py.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"
#include "cpu/ops.h"

#define FUSEDLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace fusedlm::cpu {

namespace {

constexpr int64_t kShrinkRows = 4;   // rows of x per shrink step (their x chunks stay in registers)
constexpr int64_t kExpandRows = 32;  // rows per expand task
constexpr int64_t kExpandCols = 512; // columns of out per expand task (a [r, 512] slice of Bt stays in L2)

struct Args {
  const void* x; DType x_dtype; int64_t stride_xm, M, K;
  const float* a; const float* bt; int64_t n_adapters, r, N;
  const int64_t* rows; const int64_t* segments; const float* scales; const float* bias;
  float* h; const void* init; void* out; DType out_dtype;
};

inline int64_t row_at(const Args& p, int64_t i) { return p.rows ? p.rows[i] : i; }

// ---- shrink: h = x A^T for the rows [begin, end) of one adapter segment ----------------------

void shrink_scalar(const Args& p, const float* a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t m = row_at(p, i);
    for (int64_t j = 0; j < p.r; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc += load_as_float(p.x, p.x_dtype, m * p.stride_xm + k) * a[j * p.K + k];
      p.h[m * p.r + j] = acc;
    }
  }
}

// 16 elements of a buffer of dtype D as floats; lanes outside `mask` read as 0.
template <DType D>
FUSEDLM_AVX512 inline __m512 load16(const void* base, int64_t i, __mmask16 mask) {
  switch (D) {
    case DType::F32: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + i);
    case DType::BF16: {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    case DType::F16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + i));
  }
  return _mm512_setzero_ps();
}

// Four rows at a time, four ranks at a time: 16 accumulators, each x chunk and A chunk loaded once
// per 4 FMAs.
template <DType D>
FUSEDLM_AVX512 void shrink_avx512(const Args& p, const float* a, int64_t begin, int64_t end) {
  for (int64_t i0 = begin; i0 < end; i0 += kShrinkRows) {
    const int64_t nr = std::min(kShrinkRows, end - i0);
    int64_t m[kShrinkRows];
    for (int64_t t = 0; t < kShrinkRows; ++t) m[t] = row_at(p, i0 + std::min(t, nr - 1));
    for (int64_t j0 = 0; j0 < p.r; j0 += 4) {
      const int64_t nj = std::min<int64_t>(4, p.r - j0);
      __m512 acc[kShrinkRows][4];
      for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
      for (int64_t k = 0; k < p.K; k += 16) {
        const int64_t count = std::min<int64_t>(16, p.K - k);
        const __mmask16 mask = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
        __m512 xv[kShrinkRows];
        for (int64_t t = 0; t < kShrinkRows; ++t) xv[t] = load16<D>(p.x, m[t] * p.stride_xm + k, mask);
        for (int64_t j = 0; j < nj; ++j) {
          const __m512 av = _mm512_maskz_loadu_ps(mask, a + (j0 + j) * p.K + k);
          for (int64_t t = 0; t < kShrinkRows; ++t) acc[t][j] = _mm512_fmadd_ps(xv[t], av, acc[t][j]);
        }
      }
      for (int64_t t = 0; t < nr; ++t)
        for (int64_t j = 0; j < nj; ++j) p.h[m[t] * p.r + j0 + j] = _mm512_reduce_add_ps(acc[t][j]);
    }
  }
}

// ---- expand: out = init + bias + s h Bt, for rows [begin, end) and columns [n0, n1) ------------

inline float init_value(const Args& p, int64_t m, int64_t n) {
  float v = p.bias ? p.bias[n] : 0.0f;
  if (p.init) v += load_as_float(p.init, p.out_dtype, m * p.N + n);
  return v;
}

// bt == null: rows without an adapter.
void expand_scalar(const Args& p, const float* bt, float scale, int64_t begin, int64_t end, int64_t n0, int64_t n1) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t m = row_at(p, i);
    for (int64_t n = n0; n < n1; ++n) {
      float acc = 0.0f;
      if (bt)
        for (int64_t j = 0; j < p.r; ++j) acc += p.h[m * p.r + j] * bt[j * p.N + n];
      store_from_float(p.out, p.out_dtype, m * p.N + n, init_value(p, m, n) + scale * acc);
    }
  }
}

// Round to nearest even, as float_to_bf16 (values here are finite or inf; NaN keeps a NaN bit pattern).
FUSEDLM_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

template <DType D>
FUSEDLM_AVX512 inline void store16(void* base, int64_t i, __m512 v, __mmask16 mask) {
  switch (D) {
    case DType::F32: _mm512_mask_storeu_ps(static_cast<float*>(base) + i, mask, v); break;
    case DType::BF16: _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, mask, to_bf16(v)); break;
    case DType::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, mask,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

// A tile of 4 rows x 64 columns (16 accumulators): per rank, 4 loads of Bt and 4 broadcasts of
// s * h feed 16 FMAs. The rank loop is the inner one.
template <DType D>
FUSEDLM_AVX512 void expand_avx512(const Args& p, const float* bt, float scale, int64_t begin, int64_t end, int64_t n0,
                                  int64_t n1) {
  constexpr int64_t R = 4, C = 4;  // rows, 16-column vectors per tile
  std::vector<float> hs(R * p.r);
  for (int64_t i0 = begin; i0 < end; i0 += R) {
    const int64_t nr = std::min(R, end - i0);
    int64_t m[R];
    for (int64_t t = 0; t < R; ++t) m[t] = row_at(p, i0 + std::min(t, nr - 1));
    if (bt)
      for (int64_t t = 0; t < R; ++t)
        for (int64_t j = 0; j < p.r; ++j) hs[t * p.r + j] = scale * p.h[m[t] * p.r + j];
    for (int64_t n = n0; n < n1; n += 16 * C) {
      __mmask16 mask[C];
      for (int64_t c = 0; c < C; ++c) {
        const int64_t count = std::max<int64_t>(0, std::min<int64_t>(16, n1 - n - 16 * c));
        mask[c] = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
      }
      __m512 acc[R][C];
      for (int64_t c = 0; c < C; ++c) {
        const __m512 b = p.bias ? _mm512_maskz_loadu_ps(mask[c], p.bias + n + 16 * c) : _mm512_setzero_ps();
        for (int64_t t = 0; t < R; ++t)
          acc[t][c] = p.init ? _mm512_add_ps(b, load16<D>(p.init, m[t] * p.N + n + 16 * c, mask[c])) : b;
      }
      if (bt) {
        for (int64_t j = 0; j < p.r; ++j) {
          __m512 bv[C];
          for (int64_t c = 0; c < C; ++c) bv[c] = _mm512_maskz_loadu_ps(mask[c], bt + j * p.N + n + 16 * c);
          for (int64_t t = 0; t < R; ++t) {
            const __m512 hv = _mm512_set1_ps(hs[t * p.r + j]);
            for (int64_t c = 0; c < C; ++c) acc[t][c] = _mm512_fmadd_ps(hv, bv[c], acc[t][c]);
          }
        }
      }
      for (int64_t t = 0; t < nr; ++t)
        for (int64_t c = 0; c < C; ++c) store16<D>(p.out, m[t] * p.N + n + 16 * c, acc[t][c], mask[c]);
    }
  }
}

}  // namespace

void lora_forward(const void* x, DType x_dtype, int64_t stride_xm, int64_t M, int64_t K, const float* lora_a,
                  const float* lora_bt, int64_t n_adapters, int64_t r, int64_t N, const int64_t* rows,
                  const int64_t* segments, const float* scales, const float* bias, float* h, const void* init,
                  void* out, DType out_dtype, int num_threads) {
  const Args p{x, x_dtype, stride_xm, M, K, lora_a, lora_bt, n_adapters, r, N, rows, segments, scales, bias,
               h, init, out, out_dtype};
  const bool simd = use_avx512();

  // Tasks: (segment, first row) blocks; segment 0 = rows without an adapter, 1 + a = adapter a.
  struct Block { int64_t segment, begin, end; };
  auto blocks_of = [&](int64_t rows_per_block) {
    std::vector<Block> blocks;
    for (int64_t s = 0; s <= n_adapters; ++s)
      for (int64_t b = segments[s]; b < segments[s + 1]; b += rows_per_block)
        blocks.push_back({s, b, std::min(segments[s + 1], b + rows_per_block)});
    return blocks;
  };

  // Shrink: one task per block of 16 rows of one adapter; rows without an adapter get h = 0.
  const std::vector<Block> shrink_blocks = blocks_of(16);
  parallel_for(static_cast<int64_t>(shrink_blocks.size()), num_threads, [&](int64_t t) {
    const Block& blk = shrink_blocks[t];
    if (blk.segment == 0) {
      for (int64_t i = blk.begin; i < blk.end; ++i) std::fill_n(h + row_at(p, i) * r, r, 0.0f);
      return;
    }
    const float* a = lora_a + (blk.segment - 1) * r * K;
    if (!simd) shrink_scalar(p, a, blk.begin, blk.end);
    else if (x_dtype == DType::F32) shrink_avx512<DType::F32>(p, a, blk.begin, blk.end);
    else if (x_dtype == DType::BF16) shrink_avx512<DType::BF16>(p, a, blk.begin, blk.end);
    else shrink_avx512<DType::F16>(p, a, blk.begin, blk.end);
  });

  // Expand + accumulate: tasks over (row block, column block).
  const std::vector<Block> expand_blocks = blocks_of(kExpandRows);
  const int64_t col_blocks = (N + kExpandCols - 1) / kExpandCols;
  parallel_for(static_cast<int64_t>(expand_blocks.size()) * col_blocks, num_threads, [&](int64_t t) {
    const Block& blk = expand_blocks[t / col_blocks];
    const int64_t n0 = (t % col_blocks) * kExpandCols, n1 = std::min(N, n0 + kExpandCols);
    if (blk.segment == 0 && init == out && bias == nullptr) return;  // already the base output
    const float* bt = blk.segment == 0 ? nullptr : lora_bt + (blk.segment - 1) * r * N;
    const float scale = blk.segment == 0 ? 0.0f : scales[blk.segment - 1];
    if (!simd) expand_scalar(p, bt, scale, blk.begin, blk.end, n0, n1);
    else if (out_dtype == DType::F32) expand_avx512<DType::F32>(p, bt, scale, blk.begin, blk.end, n0, n1);
    else if (out_dtype == DType::BF16) expand_avx512<DType::BF16>(p, bt, scale, blk.begin, blk.end, n0, n1);
    else expand_avx512<DType::F16>(p, bt, scale, blk.begin, blk.end, n0, n1);
  });
}

}  // namespace fusedlm::cpu
