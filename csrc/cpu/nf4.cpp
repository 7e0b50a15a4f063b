// NF4 quantisation, dequantisation and the fused dequant-GEMV on the CPU, equal to the reference
// (python/fusedlm/reference/nf4.py), which documents the layout and rounding rules.
//
// The NF4 code table and its midpoints are arguments: they live in one place, the reference.
//
// Layout recap: element i of the flattened weight is nibble (i % 2 == 0 ? high : low) of byte
// i / 2 and has scale absmax[i / blocksize]. A "chunk" below is 32 consecutive elements = 16
// bytes; blocksizes are powers of two >= 32, so a chunk that starts at a multiple of 32 lies in
// one block and shares one scale.
#include "cpu/ops.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

#define FUSEDLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FUSEDLM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace fusedlm::cpu {

namespace {

constexpr int64_t kChunk = 32;  // elements decoded together (16 packed bytes)

// Index of the nearest NF4 code for a value in [-1, 1]: the number of midpoints strictly below
// it (a value exactly on a midpoint takes the lower code), as torch.bucketize computes it.
inline uint8_t nf4_index(float v, const float* midpoints) {
  int index = 0;
  for (int i = 0; i < 15; ++i) index += midpoints[i] < v;
  return static_cast<uint8_t>(index);
}

inline float clamp_unit(float v) { return std::min(1.0f, std::max(-1.0f, v)); }

// Splits [0, n_items) into tasks of at least `grain` items for parallel_for.
struct Tasks {
  int64_t per_task, count;
  Tasks(int64_t n_items, int64_t grain) : per_task(std::max<int64_t>(grain, 1)), count((n_items + per_task - 1) / per_task) {}
};

// ---- dequantise ----------------------------------------------------------------------------

void dequantize_block_scalar(const uint8_t* data, float scale, int64_t begin, int64_t end, const float* code,
                             void* out, DType dtype) {
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t byte = data[i / 2];
    const uint8_t index = (i % 2 == 0) ? (byte >> 4) : (byte & 0xF);
    store_from_float(out, dtype, i, code[index] * scale);
  }
}

// Decodes the chunk of 32 elements whose 16 bytes start at `bytes`, through `table` (the code
// table already multiplied by the block's scale): even elements (high nibbles) and odd ones.
FUSEDLM_AVX512 inline void decode_chunk(const uint8_t* bytes, __m512 table, __m512& even, __m512& odd) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  odd = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF)), table);
}

// bf16 rounding of 16 finite floats, nearest-even (the same bits as float_to_bf16).
FUSEDLM_AVX512 inline __m256i to_bf16_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

FUSEDLM_AVX512_BF16 inline __m256i to_bf16_native(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }

template <bool NativeBf16>
FUSEDLM_AVX512_BF16 void store16(void* out, DType dtype, int64_t i, __m512 v) {
  switch (dtype) {
    case DType::F32: _mm512_storeu_ps(static_cast<float*>(out) + i, v); break;
    case DType::BF16:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                          NativeBf16 ? to_bf16_native(v) : to_bf16_avx512(v));
      break;
    case DType::F16:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

template <bool NativeBf16>
FUSEDLM_AVX512_BF16 void dequantize_block_avx512(const uint8_t* data, float scale, int64_t begin, int64_t end,
                                                 const float* code, void* out, DType dtype) {
  const __m512 table = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  // interleave even/odd back into element order
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  int64_t i = begin;
  for (; i + kChunk <= end; i += kChunk) {
    __m512 even, odd;
    decode_chunk(data + i / 2, table, even, odd);
    store16<NativeBf16>(out, dtype, i, _mm512_permutex2var_ps(even, first, odd));
    store16<NativeBf16>(out, dtype, i + 16, _mm512_permutex2var_ps(even, second, odd));
  }
  dequantize_block_scalar(data, scale, i, end, code, out, dtype);
}

// ---- quantise ------------------------------------------------------------------------------

FUSEDLM_AVX512 inline __m512 load16(const void* w, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F32: return _mm512_loadu_ps(static_cast<const float*>(w) + i);
    case DType::BF16: {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case DType::F16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i)));
  }
  return _mm512_setzero_ps();
}

// One full block (blocksize is a multiple of 32): the same arithmetic as the scalar loop, 16
// lanes at a time. Returns the block's absmax.
FUSEDLM_AVX512 float quantize_full_block_avx512(const void* w, DType dtype, int64_t begin, int64_t blocksize,
                                                const float* midpoints, uint8_t* data) {
  __m512 amax_v = _mm512_setzero_ps();
  for (int64_t i = begin; i < begin + blocksize; i += 16) amax_v = _mm512_max_ps(amax_v, _mm512_abs_ps(load16(w, dtype, i)));
  const float amax = _mm512_reduce_max_ps(amax_v);
  const __m512 inverse = _mm512_set1_ps(1.0f / std::max(amax, 1e-38f));
  const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  __m512 mid[15];
  for (int j = 0; j < 15; ++j) mid[j] = _mm512_set1_ps(midpoints[j]);
  for (int64_t i = begin; i < begin + blocksize; i += 16) {
    const __m512 v = _mm512_min_ps(one, _mm512_max_ps(minus_one, _mm512_mul_ps(load16(w, dtype, i), inverse)));
    __m512i index = _mm512_setzero_si512();
    for (int j = 0; j < 15; ++j) {  // count of midpoints strictly below v
      const __mmask16 below = _mm512_cmp_ps_mask(mid[j], v, _CMP_LT_OQ);
      index = _mm512_mask_add_epi32(index, below, index, _mm512_set1_epi32(1));
    }
    // pairs of lanes (2j, 2j+1) -> one byte (2j high nibble): (even << 4) | odd in each 64-bit lane
    const __m512i packed = _mm512_or_si512(_mm512_slli_epi64(index, 4), _mm512_srli_epi64(index, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(data + i / 2), _mm512_cvtepi64_epi8(packed));
  }
  return amax;
}

// ---- GEMV ----------------------------------------------------------------------------------
// xs: x in float32, reordered per chunk as 16 even elements then 16 odd ones, so a decoded
// chunk meets two contiguous 16-float loads. Row m of xs starts at m * K.

template <int MT>
void gemv_row_scalar(const float* xs, int64_t K, const uint8_t* row_data, const float* absmax, int64_t flat0,
                     int64_t blocksize, const float* code, float* sums) {
  float acc[MT] = {};
  float table[16];
  int64_t table_block = -1;
  for (int64_t c = 0; c < K; c += kChunk) {
    const int64_t block = (flat0 + c) / blocksize;
    if (block != table_block) {
      for (int j = 0; j < 16; ++j) table[j] = code[j] * absmax[block];
      table_block = block;
    }
    const uint8_t* bytes = row_data + c / 2;
    for (int m = 0; m < MT; ++m) {
      const float* xc = xs + m * K + c;
      float s = 0.0f;
      for (int j = 0; j < 16; ++j) s += table[bytes[j] >> 4] * xc[j] + table[bytes[j] & 0xF] * xc[16 + j];
      acc[m] += s;
    }
  }
  for (int m = 0; m < MT; ++m) sums[m] = acc[m];
}

template <int MT>
FUSEDLM_AVX512 void gemv_row_avx512(const float* xs, int64_t K, const uint8_t* row_data, const float* absmax,
                                    int64_t flat0, int64_t blocksize, const float* code, float* sums) {
  const __m512 code_v = _mm512_loadu_ps(code);
  // Two accumulator pairs (a: even chunks, b: odd chunks of a segment) hide the FMA latency.
  __m512 a_even[MT], a_odd[MT], b_even[MT], b_odd[MT];
  for (int m = 0; m < MT; ++m) a_even[m] = a_odd[m] = b_even[m] = b_odd[m] = _mm512_setzero_ps();
  // Walk the row one block segment at a time (one scaled table each).
  int64_t block = flat0 / blocksize;
  for (int64_t c = 0; c < K; ++block) {
    const int64_t seg_end = std::min(K, (block + 1) * blocksize - flat0);
    const __m512 table = _mm512_mul_ps(code_v, _mm512_set1_ps(absmax[block]));
    for (; c + 2 * kChunk <= seg_end; c += 2 * kChunk) {
      __m512 even0, odd0, even1, odd1;
      decode_chunk(row_data + c / 2, table, even0, odd0);
      decode_chunk(row_data + c / 2 + kChunk / 2, table, even1, odd1);
      for (int m = 0; m < MT; ++m) {
        const float* xc = xs + m * K + c;
        a_even[m] = _mm512_fmadd_ps(even0, _mm512_loadu_ps(xc), a_even[m]);
        a_odd[m] = _mm512_fmadd_ps(odd0, _mm512_loadu_ps(xc + 16), a_odd[m]);
        b_even[m] = _mm512_fmadd_ps(even1, _mm512_loadu_ps(xc + 32), b_even[m]);
        b_odd[m] = _mm512_fmadd_ps(odd1, _mm512_loadu_ps(xc + 48), b_odd[m]);
      }
    }
    if (c < seg_end) {  // a segment of one chunk (blocksize 32, or a row that starts mid-block)
      __m512 even, odd;
      decode_chunk(row_data + c / 2, table, even, odd);
      for (int m = 0; m < MT; ++m) {
        a_even[m] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xs + m * K + c), a_even[m]);
        a_odd[m] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xs + m * K + c + 16), a_odd[m]);
      }
      c += kChunk;
    }
  }
  for (int m = 0; m < MT; ++m)
    sums[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a_even[m], a_odd[m]), _mm512_add_ps(b_even[m], b_odd[m])));
}

// bf16 x on avx512_bf16: 64 weights (32 bytes) per step, decoded straight to bf16 through a
// bf16 table with vpermw and multiplied in pairs with vdpbf16ps (float32 accumulation), half the
// work per weight of the float32 path. The block-scaled table is rounded to bf16, which is as
// precise as the bf16 x it meets. xb: per 64-element chunk, the even elements then the odd ones,
// each as the pairs vdpbf16ps multiplies: (x[4i], x[4i+2]) and (x[4i+1], x[4i+3]).
constexpr int64_t kChunk16 = 64;

FUSEDLM_AVX512_BF16 inline void decode_chunk_bf16(const uint8_t* bytes, __m512i table, __m512i& even, __m512i& odd) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  even = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
  odd = _mm512_permutexvar_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0xF)), table);
}

template <int MT>
FUSEDLM_AVX512_BF16 void gemv_row_bf16(const uint16_t* xb, int64_t K, const uint8_t* row_data, const float* absmax,
                                       int64_t flat0, int64_t blocksize, const float* code, float* sums) {
  const __m512 code_v = _mm512_loadu_ps(code);
  __m512 a_even[MT], a_odd[MT], b_even[MT], b_odd[MT];
  for (int m = 0; m < MT; ++m) a_even[m] = a_odd[m] = b_even[m] = b_odd[m] = _mm512_setzero_ps();
  int64_t block = flat0 / blocksize;
  for (int64_t c = 0; c < K; ++block) {
    const int64_t seg_end = std::min(K, (block + 1) * blocksize - flat0);
    // 16 bf16 table entries in the low half (indices are < 16)
    const __m256i table16 = to_bf16_native(_mm512_mul_ps(code_v, _mm512_set1_ps(absmax[block])));
    const __m512i table = _mm512_castsi256_si512(table16);
    for (; c + 2 * kChunk16 <= seg_end; c += 2 * kChunk16) {
      __m512i even0, odd0, even1, odd1;
      decode_chunk_bf16(row_data + c / 2, table, even0, odd0);
      decode_chunk_bf16(row_data + c / 2 + kChunk16 / 2, table, even1, odd1);
      for (int m = 0; m < MT; ++m) {
        const uint16_t* xc = xb + m * K + c;
        a_even[m] = _mm512_dpbf16_ps(a_even[m], (__m512bh)even0, (__m512bh)_mm512_loadu_si512(xc));
        a_odd[m] = _mm512_dpbf16_ps(a_odd[m], (__m512bh)odd0, (__m512bh)_mm512_loadu_si512(xc + 32));
        b_even[m] = _mm512_dpbf16_ps(b_even[m], (__m512bh)even1, (__m512bh)_mm512_loadu_si512(xc + 64));
        b_odd[m] = _mm512_dpbf16_ps(b_odd[m], (__m512bh)odd1, (__m512bh)_mm512_loadu_si512(xc + 96));
      }
    }
    if (c < seg_end) {  // one 64-element chunk left in this segment
      __m512i even, odd;
      decode_chunk_bf16(row_data + c / 2, table, even, odd);
      for (int m = 0; m < MT; ++m) {
        const uint16_t* xc = xb + m * K + c;
        a_even[m] = _mm512_dpbf16_ps(a_even[m], (__m512bh)even, (__m512bh)_mm512_loadu_si512(xc));
        a_odd[m] = _mm512_dpbf16_ps(a_odd[m], (__m512bh)odd, (__m512bh)_mm512_loadu_si512(xc + 32));
      }
      c += kChunk16;
    }
  }
  for (int m = 0; m < MT; ++m)
    sums[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a_even[m], a_odd[m]), _mm512_add_ps(b_even[m], b_odd[m])));
}

// One weight row against MT rows of x, SIMD when available.
enum class GemvPath { Scalar, Avx512, Bf16 };

template <int MT>
void gemv_row(GemvPath path, const float* xs, const uint16_t* xb, int64_t K, const uint8_t* data,
              const float* absmax, int64_t n, int64_t blocksize, const float* code, float* sums) {
  const int64_t flat0 = n * K;
  switch (path) {
    case GemvPath::Bf16: gemv_row_bf16<MT>(xb, K, data + flat0 / 2, absmax, flat0, blocksize, code, sums); break;
    case GemvPath::Avx512: gemv_row_avx512<MT>(xs, K, data + flat0 / 2, absmax, flat0, blocksize, code, sums); break;
    case GemvPath::Scalar: gemv_row_scalar<MT>(xs, K, data + flat0 / 2, absmax, flat0, blocksize, code, sums); break;
  }
}

}  // namespace

void nf4_quantize(const void* w, DType dtype, int64_t n, int64_t blocksize, const float* midpoints,
                  uint8_t* data, float* absmax, int num_threads) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  const Tasks tasks(n_blocks, 8192 / blocksize);
  const bool simd = use_avx512();
  // Blocks are whole bytes apart because blocksize is even.
  parallel_for(tasks.count, num_threads, [&](int64_t task) {
    const int64_t last_block = std::min(n_blocks, (task + 1) * tasks.per_task);
    for (int64_t block = task * tasks.per_task; block < last_block; ++block) {
      const int64_t begin = block * blocksize;
      const int64_t end = std::min(n, begin + blocksize);
      const bool full = end - begin == blocksize;
      if (full && simd) {
        absmax[block] = quantize_full_block_avx512(w, dtype, begin, blocksize, midpoints, data);
        continue;
      }
      float amax = 0.0f;
      for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(load_as_float(w, dtype, i)));
      // Full blocks multiply by the reciprocal, the short tail block divides (bitsandbytes' way);
      // a zero tail block stores the clamped absmax, a zero full block stores 0.
      const float safe = std::max(amax, 1e-38f);
      const float inverse = 1.0f / safe;
      absmax[block] = full ? amax : safe;
      for (int64_t i = begin; i < end; i += 2) {
        const float a = load_as_float(w, dtype, i);
        const float b = i + 1 < end ? load_as_float(w, dtype, i + 1) : 0.0f;  // odd n: pad with 0
        const float sa = clamp_unit(full ? a * inverse : a / safe);
        const float sb = clamp_unit(full ? b * inverse : b / safe);
        data[i / 2] = static_cast<uint8_t>((nf4_index(sa, midpoints) << 4) | nf4_index(sb, midpoints));
      }
    }
  });
}

void nf4_dequantize(const uint8_t* data, const float* absmax, int64_t n, int64_t blocksize,
                    const float* code, void* out, DType dtype, int num_threads) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  const Tasks tasks(n_blocks, 16384 / blocksize);
  const bool simd = use_avx512(), native_bf16 = use_avx512_bf16();
  parallel_for(tasks.count, num_threads, [&](int64_t task) {
    const int64_t last_block = std::min(n_blocks, (task + 1) * tasks.per_task);
    for (int64_t block = task * tasks.per_task; block < last_block; ++block) {
      const int64_t begin = block * blocksize;
      const int64_t end = std::min(n, begin + blocksize);
      if (native_bf16)
        dequantize_block_avx512<true>(data, absmax[block], begin, end, code, out, dtype);
      else if (simd)
        dequantize_block_avx512<false>(data, absmax[block], begin, end, code, out, dtype);
      else
        dequantize_block_scalar(data, absmax[block], begin, end, code, out, dtype);
    }
  });
}

void nf4_gemv(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t stride_xm, const uint8_t* data,
              const float* absmax, int64_t blocksize, int64_t N, const float* code, const float* bias, void* out,
              DType out_dtype, int num_threads) {
  // bf16 x takes the vdpbf16ps path when the CPU has it and every block segment of a row is a
  // whole number of 64-element chunks; otherwise x goes to float32.
  const GemvPath path = (x_dtype == DType::BF16 && use_avx512_bf16() && blocksize % kChunk16 == 0 && K % kChunk16 == 0)
                            ? GemvPath::Bf16
                            : use_avx512() ? GemvPath::Avx512 : GemvPath::Scalar;
  std::vector<float> xs;
  std::vector<uint16_t> xb;
  if (path == GemvPath::Bf16) {
    // per 64-element chunk: pairs (x[4i], x[4i+2]) for the even elements, then (x[4i+1], x[4i+3])
    xb.resize(static_cast<size_t>(M * K));
    const uint16_t* xh = static_cast<const uint16_t*>(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < K; c += kChunk16)
        for (int64_t i = 0; i < 16; ++i)
          for (int64_t j = 0; j < 2; ++j) {
            xb[m * K + c + 2 * i + j] = xh[m * stride_xm + c + 4 * i + 2 * j];
            xb[m * K + c + 32 + 2 * i + j] = xh[m * stride_xm + c + 4 * i + 2 * j + 1];
          }
  } else {
    // x -> float32, each 32-element chunk reordered as its 16 even then 16 odd elements
    xs.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < K; c += kChunk)
        for (int64_t j = 0; j < 16; ++j) {
          xs[m * K + c + j] = load_as_float(x, x_dtype, m * stride_xm + c + 2 * j);
          xs[m * K + c + 16 + j] = load_as_float(x, x_dtype, m * stride_xm + c + 2 * j + 1);
        }
  }
  constexpr int64_t kRowsPerTask = 16;
  const Tasks tasks(N, kRowsPerTask);
  parallel_for(tasks.count, num_threads, [&](int64_t task) {
    const int64_t last_row = std::min(N, (task + 1) * tasks.per_task);
    float sums[4];
    for (int64_t n = task * tasks.per_task; n < last_row; ++n) {
      // x rows in groups of 4 (each weight chunk is decoded once per group)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* xg = xs.data() + m0 * K;
        const uint16_t* xbg = xb.data() + m0 * K;
        const int64_t mt = std::min<int64_t>(4, M - m0);
        switch (mt) {
          case 4: gemv_row<4>(path, xg, xbg, K, data, absmax, n, blocksize, code, sums); break;
          case 3: gemv_row<3>(path, xg, xbg, K, data, absmax, n, blocksize, code, sums); break;
          case 2: gemv_row<2>(path, xg, xbg, K, data, absmax, n, blocksize, code, sums); break;
          default: gemv_row<1>(path, xg, xbg, K, data, absmax, n, blocksize, code, sums); break;
        }
        for (int64_t m = 0; m < mt; ++m)
          store_from_float(out, out_dtype, (m0 + m) * N + n, sums[m] + (bias ? bias[n] : 0.0f));
      }
    }
  });
}

}  // namespace fusedlm::cpu
