// Masked scaled-dot-product attention on the CPU: flash-style tiles with an online softmax,
// equal to the reference (python/fusedlm/reference/attention.py), which defines the masks and
// the edge cases.
//
// Forward, one task per (batch, query head, tile of kBQ query rows):
//   for each tile of kBK keys the mask does not hide entirely:
//     S = scale * Q K^T + bias                         [rows, kBK], masked entries -inf
//     m_new = max(m, rowmax(S));  P = exp(S - m_new)
//     l = l * exp(m - m_new) + rowsum(P);  O = O * exp(m - m_new) + P V
//   out = O / l,  lse = m + log(l)    (a row that saw nothing: out 0, lse -inf)
// Backward, one task per (batch, key/value head, split of the key tiles); for each key tile and
// every query tile that sees it, with P = exp(S - lse) recomputed from the saved lse:
//   dV += P^T dO,  dS = P * (dO V^T - delta) with delta = rowsum(dO * O),
//   dK += scale dS^T Q,  dQ += scale dS K  (dQ into the split's own float32 buffer).
//
// Masks as row limits: for query i, keys j < row_limit(i) are visible before padding (causal:
// j <= i + Nk - Nq; prefix: that or j < prefix_len[b]; bidirectional: all), and row_limit grows
// with i. So a tile is hidden when row_limit(last row) <= first key (never computed), fully shown
// when row_limit(first row) >= last key + 1 and no key of the tile is padding (computed with no
// per-element mask work), and otherwise each row simply stops at its own limit.
//
// All matrix products go through one micro-kernel, C[M, N] (+)= A[M, K] B[K, N] with row-major
// A, B, C and N a multiple of 16 (an AVX-512 register-blocked version next to the scalar loop it
// must equal): K, V, K^T and V^T are packed into tiles, by each thread once per (batch, key/value
// head) it works on, so extra memory is O(Nk * D) per thread, never Nq x Nk. Float32 inputs (and
// bf16 ones on CPUs without avx512_bf16) are widened into float32 tiles; with avx512_bf16 the
// forward keeps bf16 tiles (pairs interleaved for vdpbf16ps) and accumulates in float32; the
// backward always computes in float32. GQA: query head h reads key/value head h / (Hq / Hkv),
// nothing is copied.
//
// Decode (Nq * group <= kDecodeRows, e.g. one new token per step): a separate forward that puts
// the rows of a whole GQA group together, streams K and V without packing, and splits the keys
// across threads when the heads are too few (see "forward, few queries" below). Same outputs.
#include "cpu/ops.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "common/threading.h"

inline bool use_avx512() { return fusedlm::active_isa() >= fusedlm::Isa::Avx512; }
inline bool use_avx512_bf16() { return fusedlm::active_isa() >= fusedlm::Isa::Avx512Bf16; }
#define FUSEDLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FUSEDLM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace fusedlm::cpu {

namespace {

constexpr int64_t kBQ = 64;  // query rows per tile
constexpr int64_t kBK = 128;  // keys per tile (a multiple of 16): more keys per row amortise the
                              // per-row softmax bookkeeping, at the cost of coarser mask skipping
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum class Path { Scalar, Avx512, Avx512Bf16 };

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  DType dtype;
  int64_t B, Hq, Hkv, Nq, Nk, D;
  const int64_t* sq;  // element strides of q over [B, H, N, D]; stride along D is 1
  const int64_t* sk;
  const int64_t* sv;
  int mode;                   // 0 causal, 1 prefix, 2 bidirectional
  const int64_t* prefix_len;  // [B] (prefix mode)
  const uint8_t* pad;         // [B, Nk] bool, or null
  const float* bias;          // [B, Hq, Nq, Nk] view with strides sb, or null
  const int64_t* sb;
  float scale;

  int64_t group() const { return Hq / Hkv; }

  // Keys j < row_limit(b, i) are visible to query i, padding aside (reference: visible()).
  int64_t row_limit(int64_t b, int64_t i) const {
    const int64_t causal = std::clamp<int64_t>(i + (Nk - Nq) + 1, 0, Nk);
    if (mode == 0) return causal;
    if (mode == 1) return std::max(prefix_len[b], causal);
    return Nk;
  }

  float bias_at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return bias[b * sb[0] + h * sb[1] + i * sb[2] + j * sb[3]];
  }
};

// How the key padding mask covers keys [j0, j0 + n) of batch b.
enum class Cover { None, Partial, All };

Cover padding_cover(const Problem& p, int64_t b, int64_t j0, int64_t n) {
  if (p.pad == nullptr) return Cover::None;
  int64_t real = 0;
  for (int64_t j = 0; j < n; ++j) real += p.pad[b * p.Nk + j0 + j] != 0;
  return real == n ? Cover::None : real == 0 ? Cover::All : Cover::Partial;
}

// ---- tile loads ------------------------------------------------------------------------------

// dst[r][c] = src[r * row_stride + c] as float for r < rows, c < D; zeros up to ld_dst columns.
void load_rows_f32(const void* src, DType dtype, int64_t row_stride, int64_t rows, int64_t D, float* dst,
                   int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * ld_dst;
    if (dtype == DType::F32) {
      std::memcpy(d, static_cast<const float*>(src) + r * row_stride, D * sizeof(float));
    } else {
      for (int64_t c = 0; c < D; ++c) d[c] = load_as_float(src, dtype, r * row_stride + c);
    }
    std::fill(d + D, d + ld_dst, 0.0f);
  }
}

// dst[c][r] = src[r][c] (dst: [dp][kBK]), zero where r >= rows or c >= D.
void load_transposed_f32(const void* src, DType dtype, int64_t row_stride, int64_t rows, int64_t D, int64_t dp,
                         float* dst) {
  std::fill(dst, dst + dp * kBK, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) dst[c * kBK + r] = load_as_float(src, dtype, r * row_stride + c);
}

// bf16 rows copied as they are: dst[r][c] for c < D, zeros up to ld_dst.
void load_rows_bf16(const uint16_t* src, int64_t row_stride, int64_t rows, int64_t D, uint16_t* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld_dst, src + r * row_stride, D * sizeof(uint16_t));
    std::fill(dst + r * ld_dst + D, dst + (r + 1) * ld_dst, uint16_t{0});
  }
}

// K^T packed for vdpbf16ps: dst[c / 2][r][c % 2] = K[r][c] (dst: [d2 / 2][kBK][2]), zero-padded.
void pack_kt_bf16(const uint16_t* src, int64_t row_stride, int64_t rows, int64_t D, int64_t d2, uint16_t* dst) {
  std::fill(dst, dst + d2 * kBK, uint16_t{0});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) dst[(c / 2) * 2 * kBK + 2 * r + (c % 2)] = src[r * row_stride + c];
}

// V packed for vdpbf16ps: dst[r / 2][c][r % 2] = V[r][c] (dst: [kBK / 2][dp][2]), zero-padded.
void pack_v_bf16(const uint16_t* src, int64_t row_stride, int64_t rows, int64_t D, int64_t dp, uint16_t* dst) {
  std::fill(dst, dst + kBK * dp, uint16_t{0});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) dst[(r / 2) * 2 * dp + 2 * c + (r % 2)] = src[r * row_stride + c];
}

// ---- micro-kernels: C[M, N] (+)= A[M, K] B[K, N], N % 16 == 0 ----------------------------------

void mm_scalar(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * lda + k];
      const float* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// MR rows x NV vectors of 16 columns held in registers; A broadcast one element at a time.
template <int MR, int NV>
FUSEDLM_AVX512 inline void mm_block_avx512(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                           float* C, int64_t ldc, bool accumulate) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

template <int NV>
FUSEDLM_AVX512 void mm_rows_avx512(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                   float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) mm_block_avx512<6, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: mm_block_avx512<5, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 4: mm_block_avx512<4, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 3: mm_block_avx512<3, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 2: mm_block_avx512<2, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
    case 1: mm_block_avx512<1, NV>(K, a, lda, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

FUSEDLM_AVX512 void mm_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) mm_rows_avx512<4>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
  switch ((N - j) / 16) {
    case 3: mm_rows_avx512<3>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 2: mm_rows_avx512<2>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 1: mm_rows_avx512<1>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    default: break;
  }
}

void mm(Path path, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
        float* C, int64_t ldc, bool accumulate) {
  if (path == Path::Scalar) {
    mm_scalar(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  } else {
    mm_avx512(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

// bf16 version: A[M, 2 * K2] bf16 row-major (pairs along K adjacent), B packed [K2][N][2] bf16,
// C float32: C += A B with vdpbf16ps (each lane adds the products of one pair).
template <int MR, int NV>
FUSEDLM_AVX512_BF16 inline void mm_block_bf16(int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B,
                                              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(B + k * ldb + 32 * v));
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * k, sizeof(pair));
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

template <int NV>
FUSEDLM_AVX512_BF16 void mm_rows_bf16(int64_t M, int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B,
                                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) mm_block_bf16<6, NV>(K2, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  const uint16_t* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: mm_block_bf16<5, NV>(K2, a, lda, B, ldb, c, ldc, accumulate); break;
    case 4: mm_block_bf16<4, NV>(K2, a, lda, B, ldb, c, ldc, accumulate); break;
    case 3: mm_block_bf16<3, NV>(K2, a, lda, B, ldb, c, ldc, accumulate); break;
    case 2: mm_block_bf16<2, NV>(K2, a, lda, B, ldb, c, ldc, accumulate); break;
    case 1: mm_block_bf16<1, NV>(K2, a, lda, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

// N % 16 == 0; ldb counts bf16 elements between two pair-rows of B (2 * its width).
FUSEDLM_AVX512_BF16 void mm_bf16(int64_t M, int64_t N, int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B,
                                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) mm_rows_bf16<4>(M, K2, A, lda, B + 2 * j, ldb, C + j, ldc, accumulate);
  switch ((N - j) / 16) {
    case 3: mm_rows_bf16<3>(M, K2, A, lda, B + 2 * j, ldb, C + j, ldc, accumulate); break;
    case 2: mm_rows_bf16<2>(M, K2, A, lda, B + 2 * j, ldb, C + j, ldc, accumulate); break;
    case 1: mm_rows_bf16<1>(M, K2, A, lda, B + 2 * j, ldb, C + j, ldc, accumulate); break;
    default: break;
  }
}

// ---- row operations of the softmax -----------------------------------------------------------

// exp(x) for the 16 lanes of x in `live` whose x is <= 0 (softmax arguments): 2^n * exp(r) with
// n = round(x / ln 2), |r| <= ln(2) / 2 and a Taylor polynomial of degree Degree (6: relative
// error ~2e-7, for float32 probabilities; 3: ~6e-4, for probabilities rounded to bf16 anyway,
// whose rounding step is 4e-3).
// Lanes outside `live`, and x < -87.3 (so exp(-inf) too), give exactly 0.
template <int Degree = 6>
FUSEDLM_AVX512 inline __m512 exp_avx512(__m512 x, __mmask16 live) {
  live &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln 2, ln 2 split in two parts for float32 (for bf16 one rounded constant, off by
  // 2e-9 * |n|, is plenty)
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(Degree >= 6 ? 0.693145751953125f : 0.6931471805599453f), x);
  if (Degree >= 6) r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  static constexpr float kInvFactorial[] = {1.0f, 1.0f, 1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720};
  __m512 y = _mm512_set1_ps(kInvFactorial[Degree]);
  for (int d = Degree - 1; d >= 0; --d) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kInvFactorial[d]));
  return _mm512_maskz_scalef_ps(live, y, n);
}

// bf16 rounding of 16 finite floats, nearest-even (the same bits as float_to_bf16).
FUSEDLM_AVX512 inline __m256i to_bf16_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

FUSEDLM_AVX512 float row_max_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = first_lanes(n - j);
    m = _mm512_mask_max_ps(m, live, m, _mm512_maskz_loadu_ps(live, x + j));
  }
  return _mm512_reduce_max_ps(m);
}

// x[j] = exp(x[j] * a - m) for j < n, x[j] = 0 for n <= j < n_total; returns the sum.
FUSEDLM_AVX512 float exp_row_avx512(float* x, int64_t n, int64_t n_total, float a, float m) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 va = _mm512_set1_ps(a), vm = _mm512_set1_ps(m);
  for (int64_t j = 0; j < n_total; j += 16) {
    const __mmask16 live = j < n ? first_lanes(n - j) : 0;
    const __m512 s = _mm512_maskz_loadu_ps(live, x + j);
    const __m512 e = exp_avx512(_mm512_fmsub_ps(s, va, vm), live);
    _mm512_storeu_ps(x + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// dst[j] = bf16(exp(x[j] * a - m)) for j < n, 0 for n <= j < n_total; returns the sum of the
// (unrounded) probabilities.
FUSEDLM_AVX512_BF16 float exp_row_bf16(const float* x, int64_t n, int64_t n_total, float a, float m, uint16_t* dst) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 va = _mm512_set1_ps(a), vm = _mm512_set1_ps(m);
  for (int64_t j = 0; j < n_total; j += 16) {
    const __mmask16 live = j < n ? first_lanes(n - j) : 0;
    const __m512 s = _mm512_maskz_loadu_ps(live, x + j);
    const __m512 e = exp_avx512<3>(_mm512_fmsub_ps(s, va, vm), live);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

FUSEDLM_AVX512 void scale_row_avx512(float* x, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), va));
}

// x[j] *= a for j < n (n % 16 == 0)
void scale_row(Path path, float* x, int64_t n, float a) {
  if (path != Path::Scalar) return scale_row_avx512(x, n, a);
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

FUSEDLM_AVX512 void store_row_avx512(const float* x, float a, int64_t n, void* out, DType dtype, int64_t offset) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = first_lanes(n - j);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, x + j), va);
    if (dtype == DType::F32) {
      _mm512_mask_storeu_ps(static_cast<float*>(out) + offset + j, live, y);
    } else {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + offset + j, live, to_bf16_avx512(y));
    }
  }
}

// out[offset + j] = x[j] * a for j < n, in out's dtype (F32 or BF16, rounded to nearest even)
void store_row(Path path, const float* x, float a, int64_t n, void* out, DType dtype, int64_t offset) {
  if (path != Path::Scalar) return store_row_avx512(x, a, n, out, dtype, offset);
  for (int64_t j = 0; j < n; ++j) store_from_float(out, dtype, offset + j, x[j] * a);
}

float row_max(Path path, const float* x, int64_t n) {
  if (path != Path::Scalar) return row_max_avx512(x, n);
  float m = kNegInf;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

float exp_row(Path path, float* x, int64_t n, int64_t n_total, float a, float m) {
  if (path != Path::Scalar) return exp_row_avx512(x, n, n_total, a, m);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] * a - m));
  std::fill(x + n, x + n_total, 0.0f);
  return sum;
}

// Row r of a score tile: applies bias (s = scale * qk + bias, leaving a multiplier of 1) and
// hides padded keys; returns the multiplier still to apply to the row (scale, or 1 when applied).
float prepare_row(const Problem& p, float* s, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols,
                  bool partial_padding) {
  float a = p.scale;
  if (p.bias != nullptr) {
    for (int64_t j = 0; j < cols; ++j) s[j] = s[j] * p.scale + p.bias_at(b, h, i, j0 + j);
    a = 1.0f;
  } else if (p.scale <= 0.0f) {  // max(s) * scale != max(s * scale), and -inf * 0 is NaN
    for (int64_t j = 0; j < cols; ++j) s[j] *= p.scale;
    a = 1.0f;
  }
  if (partial_padding) {
    for (int64_t j = 0; j < cols; ++j)
      if (!p.pad[b * p.Nk + j0 + j]) s[j] = kNegInf;
  }
  return a;
}

// ---- forward ---------------------------------------------------------------------------------

// Per-thread scratch of the forward. K^T and V of the (batch, key/value head) a thread works on
// are packed tile by tile on first use and kept while the thread stays on that head (tasks are
// ordered head by head), so each key tile is packed about once per thread, not once per query
// tile: O(Nk * D) floats per thread, never Nq x Nk.
struct ForwardScratch {
  uint64_t call = 0;  // the attention_forward call the packed tiles belong to
  int64_t b = -1, hk = -1;
  std::vector<uint8_t> packed;  // per key tile: packed yet?
  std::vector<float> q, kt, v, s, o, m, l;
  std::vector<uint16_t> qb, ktb, vb, pb;
};

std::atomic<uint64_t> forward_calls{0};

void forward_tile(const Problem& p, Path path, uint64_t call, int64_t b, int64_t h, int64_t i0, void* out, float* lse,
                  ForwardScratch& w) {
  const int64_t rows = std::min(kBQ, p.Nq - i0), D = p.D, dp = round_up(D, 16), d2 = round_up(D, 2);
  const int64_t hk = h / p.group(), k_tiles = (p.Nk + kBK - 1) / kBK;
  const bool bf16 = path == Path::Avx512Bf16;
  const int64_t esize = p.dtype == DType::F32 ? 4 : 2;
  const char* q = static_cast<const char*>(p.q) + (b * p.sq[0] + h * p.sq[1] + i0 * p.sq[2]) * esize;
  const char* k = static_cast<const char*>(p.k) + (b * p.sk[0] + hk * p.sk[1]) * esize;
  const char* v = static_cast<const char*>(p.v) + (b * p.sv[0] + hk * p.sv[1]) * esize;

  if (w.call != call || w.b != b || w.hk != hk) {
    w.call = call, w.b = b, w.hk = hk;
    w.packed.assign(k_tiles, 0);
    if (bf16) {
      w.ktb.resize(k_tiles * d2 * kBK);
      w.vb.resize(k_tiles * kBK * dp);
    } else {
      w.kt.resize(k_tiles * dp * kBK);
      w.v.resize(k_tiles * kBK * dp);
    }
  }
  w.s.resize(kBQ * kBK);
  w.o.assign(kBQ * dp, 0.0f);
  w.m.assign(kBQ, kNegInf);
  w.l.assign(kBQ, 0.0f);
  if (bf16) {
    w.qb.resize(kBQ * d2);
    w.pb.resize(kBQ * kBK);
    load_rows_bf16(reinterpret_cast<const uint16_t*>(q), p.sq[2], rows, D, w.qb.data(), d2);
  } else {
    w.q.resize(kBQ * dp);
    load_rows_f32(q, p.dtype, p.sq[2], rows, D, w.q.data(), dp);
  }

  const int64_t limit_first = p.row_limit(b, i0), limit_last = p.row_limit(b, i0 + rows - 1);
  for (int64_t j0 = 0; j0 < limit_last; j0 += kBK) {
    const int64_t n = std::min(kBK, p.Nk - j0), t = j0 / kBK;
    const Cover padding = padding_cover(p, b, j0, n);
    if (padding == Cover::All) continue;  // every key of the tile is padding
    const bool full = padding == Cover::None && limit_first >= j0 + n;
    const char* kj = k + j0 * p.sk[2] * esize;
    const char* vj = v + j0 * p.sv[2] * esize;
    uint16_t* ktb = w.ktb.data() + t * d2 * kBK;
    uint16_t* vb = w.vb.data() + t * kBK * dp;
    float* kt = w.kt.data() + t * dp * kBK;
    float* vt = w.v.data() + t * kBK * dp;
    if (!w.packed[t]) {
      w.packed[t] = 1;
      if (bf16) {
        pack_kt_bf16(reinterpret_cast<const uint16_t*>(kj), p.sk[2], n, D, d2, ktb);
        pack_v_bf16(reinterpret_cast<const uint16_t*>(vj), p.sv[2], n, D, dp, vb);
      } else {
        load_transposed_f32(kj, p.dtype, p.sk[2], n, D, dp, kt);
        load_rows_f32(vj, p.dtype, p.sv[2], n, D, vt, dp);
        std::fill(vt + n * dp, vt + kBK * dp, 0.0f);
      }
    }

    // S = Q K^T
    if (bf16) {
      mm_bf16(rows, kBK, d2 / 2, w.qb.data(), d2, ktb, 2 * kBK, w.s.data(), kBK, false);
    } else {
      mm(path, rows, kBK, dp, w.q.data(), dp, kt, kBK, w.s.data(), kBK, false);
    }

    // Online softmax, row by row: P overwrites S.
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s.data() + r * kBK;
      const int64_t cols = full ? n : std::clamp<int64_t>(p.row_limit(b, i0 + r) - j0, 0, n);
      float a = p.scale;
      if (!full || p.bias != nullptr || p.scale <= 0.0f) a = prepare_row(p, s, b, h, i0 + r, j0, cols, padding == Cover::Partial);
      const float m_new = std::max(w.m[r], row_max(path, s, cols) * a);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // a row that has seen nothing yet
      const float sum = bf16 ? exp_row_bf16(s, cols, kBK, a, m_use, w.pb.data() + r * kBK)
                             : exp_row(path, s, cols, kBK, a, m_use);
      const float alpha = std::exp(w.m[r] - m_use);
      w.l[r] = w.l[r] * alpha + sum;
      w.m[r] = m_new;
      if (alpha != 1.0f) scale_row(path, w.o.data() + r * dp, dp, alpha);
    }

    // O += P V
    if (bf16) {
      mm_bf16(rows, dp, kBK / 2, w.pb.data(), kBK, vb, 2 * dp, w.o.data(), dp, true);
    } else {
      mm(path, rows, dp, kBK, w.s.data(), kBK, vt, dp, w.o.data(), dp, true);
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = ((b * p.Hq + h) * p.Nq + i0 + r);
    const float l = w.l[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    store_row(path, w.o.data() + r * dp, inv, D, out, p.dtype, row * D);
    lse[row] = l > 0.0f ? w.m[r] + std::log(l) : kNegInf;
  }
}

// ---- forward, few queries (decode) -----------------------------------------------------------
//
// When Nq * group <= kDecodeRows, the rows that read one (batch, key/value head) -- the group's
// query heads times the Nq queries, row r = g * Nq + i for query head hk * group + g -- form one
// small block, and the tiles above would spend more on packing K and V than on using them. This
// path streams K and V rows straight from memory instead (D contiguous, any row stride), each key
// row read once per call: blocks of kBK keys get S = Q K^T, the same online softmax as
// forward_tile, then O += P V.
//
// Split-K (flash-decoding): when the B * Hkv heads are too few to keep the threads busy, the keys
// are cut into `chunks` ranges run as separate tasks. Range c leaves per row its running max m_c,
// its sum l_c = sum_j exp(s_j - m_c) and its unnormalised O_c = sum_j exp(s_j - m_c) v_j. Then with
// M = max_c m_c and weights w_c = exp(m_c - M) (0 for a range that saw nothing, m_c = -inf):
//   l = sum_c w_c l_c,  out = (sum_c w_c O_c) / l,  lse = M + log(l)
// which is what one pass over all the keys gives; a row no range saw (l = 0): out 0, lse -inf.

constexpr int64_t kDecodeRows = 16;  // most query rows per (batch, key/value head) on this path
constexpr int64_t kMinChunkKeys = 256;  // fewest keys worth a split-K task of their own
constexpr int64_t kDecodeWorkPerThread = int64_t{1} << 20;  // see decode_forward (measured break-even)

struct DecodeScratch {
  std::vector<float> q, s, o, m, l;
};

// s[r * kBK + j] = q_r . k_j for rows r < R (q: [R][dp], zero-padded) and keys j < n, key j at
// element j * ks of k (float32 or bf16).
void decode_scores_scalar(const float* q, int64_t R, int64_t dp, const void* k, DType dtype, int64_t ks, int64_t n,
                          int64_t D, float* s) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (int64_t c = 0; c < D; ++c) sum += q[r * dp + c] * load_as_float(k, dtype, j * ks + c);
      s[r * kBK + j] = sum;
    }
}

// 16 elements from src + i as float32 (lanes outside `live` 0): float32, or bf16 widened.
FUSEDLM_AVX512 inline __m512 load16_avx512(const void* src, DType dtype, int64_t i, __mmask16 live) {
  if (dtype == DType::F32) return _mm512_maskz_loadu_ps(live, static_cast<const float*>(src) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(live, static_cast<const uint16_t*>(src) + i);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Lane j of the result = sum of the 16 lanes of x[j]: three rounds of pairwise adds, each
// halving the partial sums per key, then one permutation back into key order.
FUSEDLM_AVX512 inline __m512 sum_lanes16_avx512(const __m512 x[16]) {
  __m512 b[8], c[4], d[2];
  for (int m = 0; m < 8; ++m)  // b[m]: keys 2m, 2m + 1 in 256-bit halves, 8 partials each
    b[m] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * m], x[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(x[2 * m], x[2 * m + 1], 0xEE));
  for (int m = 0; m < 4; ++m)  // c[m]: keys 4m .. 4m + 3 in 128-bit blocks, 4 partials each
    c[m] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)  // d[m], block i: keys i, 4 + i (m = 0) or 8 + i, 12 + i (m = 1), 2 partials each
    d[m] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0x88),
                         _mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0xDD));
  // e, lane 4i + t: key i + 4t
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  const __m512i key_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(key_order, e);
}

// Sixteen keys at a time for one row: 16 accumulators over D, summed across lanes together (the
// keys, a few KiB, stay in L1 while the rows take turns).
FUSEDLM_AVX512 void decode_scores_avx512(const float* q, int64_t R, int64_t dp, const void* k, DType dtype,
                                         int64_t ks, int64_t n, int64_t D, float* s) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    int64_t key[16];  // element offsets of the 16 keys (past n: the last key again, result dropped)
    for (int t = 0; t < 16; ++t) key[t] = std::min<int64_t>(j0 + t, n - 1) * ks;
    for (int64_t r = 0; r < R; ++r) {
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t c = 0; c < D; c += 16) {
        const __mmask16 live = first_lanes(D - c);
        const __m512 qc = _mm512_loadu_ps(q + r * dp + c);
        for (int t = 0; t < 16; ++t) acc[t] = _mm512_fmadd_ps(qc, load16_avx512(k, dtype, key[t] + c, live), acc[t]);
      }
      _mm512_mask_storeu_ps(s + r * kBK + j0, first_lanes(n - j0), sum_lanes16_avx512(acc));
    }
  }
}

void decode_scores(Path path, const float* q, int64_t R, int64_t dp, const void* k, DType dtype, int64_t ks,
                   int64_t n, int64_t D, float* s) {
  if (path == Path::Scalar) return decode_scores_scalar(q, R, dp, k, dtype, ks, n, D, s);
  decode_scores_avx512(q, R, dp, k, dtype, ks, n, D, s);
}

// o[r][c] += sum_{j < n} p[r * kBK + j] * v_j[c] for rows r < R (o: [R][dp]), c < D.
void decode_accumulate_scalar(const float* p, int64_t R, const void* v, DType dtype, int64_t vs, int64_t n, int64_t D,
                              int64_t dp, float* o) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < R; ++r) {
      const float pj = p[r * kBK + j];
      for (int64_t c = 0; c < D; ++c) o[r * dp + c] += pj * load_as_float(v, dtype, j * vs + c);
    }
}

// Rows r0 .. r0 + RB - 1 times 64 columns from c0 held in registers over all n keys; with one or
// two rows, even and odd keys go to separate accumulators (more independent FMA chains).
template <int RB>
FUSEDLM_AVX512 inline void decode_accumulate_block(const float* p, const void* v, DType dtype, int64_t vs, int64_t n,
                                                   const __mmask16 live[4], int64_t c0, float* o, int64_t dp) {
  constexpr int KU = RB <= 2 ? 2 : 1;  // keys per step
  __m512 acc[KU][RB][4];
  for (int t = 0; t < RB; ++t)
    for (int u = 0; u < 4; ++u) {
      acc[0][t][u] = _mm512_maskz_loadu_ps(live[u], o + t * dp + c0 + 16 * u);
      if (KU == 2) acc[KU - 1][t][u] = _mm512_setzero_ps();
    }
  int64_t j = 0;
  for (; j + KU <= n; j += KU)
    for (int e = 0; e < KU; ++e) {
      __m512 vj[4];
      for (int u = 0; u < 4; ++u) vj[u] = load16_avx512(v, dtype, (j + e) * vs + c0 + 16 * u, live[u]);
      for (int t = 0; t < RB; ++t) {
        const __m512 pj = _mm512_set1_ps(p[t * kBK + j + e]);
        for (int u = 0; u < 4; ++u) acc[e][t][u] = _mm512_fmadd_ps(pj, vj[u], acc[e][t][u]);
      }
    }
  for (; j < n; ++j) {
    __m512 vj[4];
    for (int u = 0; u < 4; ++u) vj[u] = load16_avx512(v, dtype, j * vs + c0 + 16 * u, live[u]);
    for (int t = 0; t < RB; ++t) {
      const __m512 pj = _mm512_set1_ps(p[t * kBK + j]);
      for (int u = 0; u < 4; ++u) acc[0][t][u] = _mm512_fmadd_ps(pj, vj[u], acc[0][t][u]);
    }
  }
  for (int t = 0; t < RB; ++t)
    for (int u = 0; u < 4; ++u) {
      if (KU == 2) acc[0][t][u] = _mm512_add_ps(acc[0][t][u], acc[KU - 1][t][u]);
      _mm512_mask_storeu_ps(o + t * dp + c0 + 16 * u, live[u], acc[0][t][u]);
    }
}

FUSEDLM_AVX512 void decode_accumulate_avx512(const float* p, int64_t R, const void* v, DType dtype, int64_t vs,
                                             int64_t n, int64_t D, int64_t dp, float* o) {
  for (int64_t c0 = 0; c0 < D; c0 += 64) {
    __mmask16 live[4];
    for (int u = 0; u < 4; ++u) live[u] = c0 + 16 * u < D ? first_lanes(D - c0 - 16 * u) : 0;
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) decode_accumulate_block<4>(p + r * kBK, v, dtype, vs, n, live, c0, o + r * dp, dp);
    switch (R - r) {
      case 3: decode_accumulate_block<3>(p + r * kBK, v, dtype, vs, n, live, c0, o + r * dp, dp); break;
      case 2: decode_accumulate_block<2>(p + r * kBK, v, dtype, vs, n, live, c0, o + r * dp, dp); break;
      case 1: decode_accumulate_block<1>(p + r * kBK, v, dtype, vs, n, live, c0, o + r * dp, dp); break;
      default: break;
    }
  }
}

void decode_accumulate(Path path, const float* p, int64_t R, const void* v, DType dtype, int64_t vs, int64_t n,
                       int64_t D, int64_t dp, float* o) {
  if (path == Path::Scalar) return decode_accumulate_scalar(p, R, v, dtype, vs, n, D, dp, o);
  decode_accumulate_avx512(p, R, v, dtype, vs, n, D, dp, o);
}

// Keys [j_begin, j_end) of (b, hk) for all its R = group * Nq rows: leaves the unnormalised
// w.o [R][dp], the running max w.m and the sum w.l of every row.
void decode_key_range(const Problem& p, Path path, int64_t b, int64_t hk, int64_t j_begin, int64_t j_end,
                      DecodeScratch& w) {
  const int64_t R = p.group() * p.Nq, D = p.D, dp = round_up(D, 16);
  const int64_t esize = p.dtype == DType::F32 ? 4 : 2;
  const char* k = static_cast<const char*>(p.k) + (b * p.sk[0] + hk * p.sk[1]) * esize;
  const char* v = static_cast<const char*>(p.v) + (b * p.sv[0] + hk * p.sv[1]) * esize;
  w.q.resize(R * dp);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = hk * p.group() + r / p.Nq, i = r % p.Nq;
    const char* q = static_cast<const char*>(p.q) + (b * p.sq[0] + h * p.sq[1] + i * p.sq[2]) * esize;
    load_rows_f32(q, p.dtype, 0, 1, D, w.q.data() + r * dp, dp);
  }
  w.s.resize(R * kBK);
  w.o.assign(R * dp, 0.0f);
  w.m.assign(R, kNegInf);
  w.l.assign(R, 0.0f);

  // Query 0 sees the fewest keys and query Nq - 1 the most (row_limit grows with i).
  const int64_t limit_first = p.row_limit(b, 0), limit_last = p.row_limit(b, p.Nq - 1);
  for (int64_t j0 = j_begin; j0 < std::min(j_end, limit_last); j0 += kBK) {
    const int64_t n = std::min(kBK, j_end - j0);
    const Cover padding = padding_cover(p, b, j0, n);
    if (padding == Cover::All) continue;
    const bool full = padding == Cover::None && limit_first >= j0 + n;
    decode_scores(path, w.q.data(), R, dp, k + j0 * p.sk[2] * esize, p.dtype, p.sk[2], n, D, w.s.data());

    // Online softmax per row, as in forward_tile: P overwrites S (zeros past each row's keys).
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * p.group() + r / p.Nq, i = r % p.Nq;
      float* s = w.s.data() + r * kBK;
      const int64_t cols = full ? n : std::clamp<int64_t>(p.row_limit(b, i) - j0, 0, n);
      float a = p.scale;
      if (!full || p.bias != nullptr || p.scale <= 0.0f) a = prepare_row(p, s, b, h, i, j0, cols, padding == Cover::Partial);
      const float m_new = std::max(w.m[r], row_max(path, s, cols) * a);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // a row that has seen nothing yet
      const float sum = exp_row(path, s, cols, kBK, a, m_use);
      const float alpha = std::exp(w.m[r] - m_use);
      w.l[r] = w.l[r] * alpha + sum;
      w.m[r] = m_new;
      if (alpha != 1.0f) scale_row(path, w.o.data() + r * dp, dp, alpha);
    }

    decode_accumulate(path, w.s.data(), R, v + j0 * p.sv[2] * esize, p.dtype, p.sv[2], n, D, dp, w.o.data());
  }
}

// out and lse of row r of (b, hk) from its unnormalised o (dp floats), sum l and max m.
void decode_store_row(const Problem& p, Path path, int64_t b, int64_t hk, int64_t r, const float* o, float l, float m,
                      void* out, float* lse) {
  const int64_t h = hk * p.group() + r / p.Nq, i = r % p.Nq;
  const int64_t row = (b * p.Hq + h) * p.Nq + i;
  store_row(path, o, l > 0.0f ? 1.0f / l : 0.0f, p.D, out, p.dtype, row * p.D);
  lse[row] = l > 0.0f ? m + std::log(l) : kNegInf;
}

void decode_forward(const Problem& p, Path path, void* out, float* lse, int max_threads) {
  const int64_t R = p.group() * p.Nq, dp = round_up(p.D, 16), heads = p.B * p.Hkv;
  const int64_t k_tiles = (p.Nk + kBK - 1) / kBK;
  // Waking a pool thread costs tens of microseconds, as much as a small call's whole work: one
  // thread per kDecodeWorkPerThread multiply-adds and K/V elements (about 1 + R per K/V element).
  const int64_t work = heads * p.Nk * p.D * (R + 1);
  const int num_threads = static_cast<int>(std::clamp<int64_t>(work / kDecodeWorkPerThread, 1, std::max(max_threads, 1)));
  // Enough tasks for every thread (twice over, for balance), each of at least kMinChunkKeys keys.
  int64_t chunks = 1;
  if (heads < num_threads)
    chunks = std::clamp<int64_t>((2 * num_threads + heads - 1) / heads, 1, std::max<int64_t>(1, p.Nk / kMinChunkKeys));
  // Chunk c: key tiles [c * k_tiles / chunks, (c + 1) * k_tiles / chunks).
  auto chunk_begin = [&](int64_t c) { return std::min(p.Nk, c * k_tiles / chunks * kBK); };

  if (chunks == 1) {
    parallel_for(heads, num_threads, [&](int64_t task) {
      thread_local DecodeScratch w;
      const int64_t b = task / p.Hkv, hk = task % p.Hkv;
      decode_key_range(p, path, b, hk, 0, p.Nk, w);
      for (int64_t r = 0; r < R; ++r) decode_store_row(p, path, b, hk, r, w.o.data() + r * dp, w.l[r], w.m[r], out, lse);
    });
    return;
  }

  // Partial results per (head, chunk): R rows of [o (dp floats), m, l].
  const int64_t stride = dp + 2;
  std::vector<float> partial(heads * chunks * R * stride);
  parallel_for(heads * chunks, num_threads, [&](int64_t task) {
    thread_local DecodeScratch w;
    const int64_t c = task % chunks, b = task / chunks / p.Hkv, hk = task / chunks % p.Hkv;
    decode_key_range(p, path, b, hk, chunk_begin(c), chunk_begin(c + 1), w);
    float* dst = partial.data() + task * R * stride;
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(dst + r * stride, w.o.data() + r * dp, dp * sizeof(float));
      dst[r * stride + dp] = w.m[r];
      dst[r * stride + dp + 1] = w.l[r];
    }
  });
  // Merge the chunks of each row: out = sum_c w_c O_c / l as in the split-K comment above.
  parallel_for(heads, num_threads, [&](int64_t head) {
    const int64_t b = head / p.Hkv, hk = head % p.Hkv;
    std::vector<float> o(dp);
    for (int64_t r = 0; r < R; ++r) {
      auto part = [&](int64_t c) { return partial.data() + ((head * chunks + c) * R + r) * stride; };
      float M = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) M = std::max(M, part(c)[dp]);
      std::fill(o.begin(), o.end(), 0.0f);
      float l = 0.0f;
      if (M != kNegInf) {
        for (int64_t c = 0; c < chunks; ++c) {
          const float* pc = part(c);
          const float wc = std::exp(pc[dp] - M);  // 0 for a chunk that saw nothing (m_c = -inf)
          if (wc == 0.0f) continue;
          l += wc * pc[dp + 1];
          for (int64_t d = 0; d < dp; ++d) o[d] += wc * pc[d];
        }
      }
      decode_store_row(p, path, b, hk, r, o.data(), l, M, out, lse);
    }
  });
}

Path choose_path(DType dtype) {
  if (!use_avx512()) return Path::Scalar;
  if (dtype == DType::BF16 && use_avx512_bf16()) return Path::Avx512Bf16;
  return Path::Avx512;
}

// ---- backward --------------------------------------------------------------------------------

struct BackwardScratch {
  std::vector<float> kt, vt, kr, dk, dv, q, dout, s, dp, pt, dst;
  std::vector<Cover> padding;
};

// Keys of tiles [first, last) of (b, hk): packs them once (K^T, V^T, K), then for every query head
// of the group and every query tile, loads Q and dO once and visits the key tiles it sees.
// dK and dV accumulate over the whole range (float32, O(range * D)) and are written at the end.
void backward_key_range(const Problem& p, Path path, int64_t b, int64_t hk, int64_t first, int64_t last,
                        const void* grad_out, const float* lse, const float* delta, float* dq, float* dk, float* dv,
                        float* dbias, BackwardScratch& w) {
  const int64_t D = p.D, dp = round_up(D, 16), tiles = last - first, j_begin = first * kBK;
  const int64_t j_end = std::min(p.Nk, last * kBK);
  const int64_t esize = p.dtype == DType::F32 ? 4 : 2;
  const char* k = static_cast<const char*>(p.k) + (b * p.sk[0] + hk * p.sk[1]) * esize;
  const char* v = static_cast<const char*>(p.v) + (b * p.sv[0] + hk * p.sv[1]) * esize;

  w.kt.resize(tiles * dp * kBK);
  w.vt.resize(tiles * dp * kBK);
  w.kr.resize(tiles * kBK * dp);
  w.dk.assign(tiles * kBK * dp, 0.0f);
  w.dv.assign(tiles * kBK * dp, 0.0f);
  w.padding.resize(tiles);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t j0 = (first + t) * kBK, n = std::min(kBK, p.Nk - j0);
    w.padding[t] = padding_cover(p, b, j0, n);
    load_transposed_f32(k + j0 * p.sk[2] * esize, p.dtype, p.sk[2], n, D, dp, w.kt.data() + t * dp * kBK);
    load_transposed_f32(v + j0 * p.sv[2] * esize, p.dtype, p.sv[2], n, D, dp, w.vt.data() + t * dp * kBK);
    float* kr = w.kr.data() + t * kBK * dp;
    load_rows_f32(k + j0 * p.sk[2] * esize, p.dtype, p.sk[2], n, D, kr, dp);
    std::fill(kr + n * dp, kr + kBK * dp, 0.0f);
  }
  w.q.resize(kBQ * dp);
  w.dout.resize(kBQ * dp);
  w.s.resize(kBQ * kBK);
  w.dp.resize(kBQ * kBK);
  w.pt.resize(kBK * kBQ);
  w.dst.resize(kBK * kBQ);

  for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
    for (int64_t i0 = 0; i0 < p.Nq; i0 += kBQ) {
      const int64_t rows = std::min(kBQ, p.Nq - i0);
      const int64_t limit_first = p.row_limit(b, i0), limit_last = p.row_limit(b, i0 + rows - 1);
      if (limit_last <= j_begin) continue;  // the mask hides this query tile from the whole range
      const int64_t row0 = (b * p.Hq + h) * p.Nq + i0;  // first row of the tile in out / lse / dq
      const char* qi = static_cast<const char*>(p.q) + (b * p.sq[0] + h * p.sq[1] + i0 * p.sq[2]) * esize;
      load_rows_f32(qi, p.dtype, p.sq[2], rows, D, w.q.data(), dp);
      load_rows_f32(static_cast<const char*>(grad_out) + row0 * D * esize, p.dtype, D, rows, D, w.dout.data(), dp);

      for (int64_t j0 = j_begin; j0 < std::min(j_end, limit_last); j0 += kBK) {
        const int64_t t = j0 / kBK - first, n = std::min(kBK, p.Nk - j0);
        if (w.padding[t] == Cover::All) continue;
        const bool full = w.padding[t] == Cover::None && limit_first >= j0 + n;
        const float* kt = w.kt.data() + t * dp * kBK;
        const float* vt = w.vt.data() + t * dp * kBK;
        const float* kr = w.kr.data() + t * kBK * dp;

        // P = exp(scale * Q K^T + bias - lse), 0 where hidden or where the row saw nothing
        mm(path, rows, kBK, dp, w.q.data(), dp, kt, kBK, w.s.data(), kBK, false);
        for (int64_t r = 0; r < rows; ++r) {
          float* s = w.s.data() + r * kBK;
          const float row_lse = lse[row0 + r];
          int64_t cols = full ? n : std::clamp<int64_t>(p.row_limit(b, i0 + r) - j0, 0, n);
          if (row_lse == kNegInf) cols = 0;
          float a = p.scale;
          if (!full || p.bias != nullptr || p.scale <= 0.0f)
            a = prepare_row(p, s, b, h, i0 + r, j0, cols, w.padding[t] == Cover::Partial);
          exp_row(path, s, cols, kBK, a, cols > 0 ? row_lse : 0.0f);
        }
        // dS = P * (dO V^T - delta); dbias = dS; then dS *= scale
        mm(path, rows, kBK, dp, w.dout.data(), dp, vt, kBK, w.dp.data(), kBK, false);
        for (int64_t r = 0; r < rows; ++r) {
          const float* pr = w.s.data() + r * kBK;
          const float d = delta[row0 + r];
          float* ds = w.dp.data() + r * kBK;
          for (int64_t j = 0; j < kBK; ++j) ds[j] = pr[j] * (ds[j] - d);
          if (dbias != nullptr) std::memcpy(dbias + (row0 + r) * p.Nk + j0, ds, n * sizeof(float));
          for (int64_t j = 0; j < kBK; ++j) ds[j] *= p.scale;
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < n; ++j) {
            w.pt[j * kBQ + r] = w.s[r * kBK + j];
            w.dst[j * kBQ + r] = w.dp[r * kBK + j];
          }
        float* dk_t = w.dk.data() + t * kBK * dp;
        float* dv_t = w.dv.data() + t * kBK * dp;
        mm(path, n, dp, rows, w.pt.data(), kBQ, w.dout.data(), dp, dv_t, dp, true);            // dV += P^T dO
        mm(path, n, dp, rows, w.dst.data(), kBQ, w.q.data(), dp, dk_t, dp, true);             // dK += dS^T Q
        mm(path, rows, dp, kBK, w.dp.data(), kBK, kr, dp, dq + row0 * dp, dp, true);          // dQ += dS K
      }
    }
  }
  float* dk_out = dk + ((b * p.Hkv + hk) * p.Nk + j_begin) * D;
  float* dv_out = dv + ((b * p.Hkv + hk) * p.Nk + j_begin) * D;
  for (int64_t r = 0; r < j_end - j_begin; ++r) {
    std::memcpy(dk_out + r * D, w.dk.data() + r * dp, D * sizeof(float));
    std::memcpy(dv_out + r * D, w.dv.data() + r * dp, D * sizeof(float));
  }
}

}  // namespace

void attention_forward(const AttentionArgs& a) {
  const int64_t B = a.q.size(0), Hq = a.q.size(1), Nq = a.q.size(2), D = a.q.size(3), Hkv = a.k.size(1), Nk = a.k.size(2);
  const Problem p{a.q.data, a.k.data, a.v.data, a.q.dtype, B, Hq, Hkv, Nq, Nk, D, a.q.strides, a.k.strides, a.v.strides,
                  a.mask_mode, a.prefix_len.ptr<const int64_t>(), a.key_padding_mask.ptr<const uint8_t>(),
                  a.bias.ptr<const float>(), a.bias.strides, a.scale};
  const Path path = choose_path(p.dtype);
  void* out = a.out.data;
  float* lse = a.lse.ptr<float>();
  const int num_threads = a.num_threads;
  if (Nq * p.group() <= kDecodeRows) return decode_forward(p, path, out, lse, num_threads);
  const uint64_t call = forward_calls.fetch_add(1) + 1;
  const int64_t q_tiles = (Nq + kBQ - 1) / kBQ;
  parallel_for(B * Hq * q_tiles, num_threads, [&](int64_t task) {
    thread_local ForwardScratch scratch;
    // Last query tiles first: under a causal mask they see the most keys (better balance).
    const int64_t tile = q_tiles - 1 - task % q_tiles, bh = task / q_tiles;
    forward_tile(p, path, call, bh / Hq, bh % Hq, tile * kBQ, out, lse, scratch);
  });
}

void attention_backward(const AttentionArgs& a) {
  const int64_t B = a.q.size(0), Hq = a.q.size(1), Nq = a.q.size(2), D = a.q.size(3), Hkv = a.k.size(1), Nk = a.k.size(2);
  const DType dtype = a.q.dtype;
  const Problem p{a.q.data, a.k.data, a.v.data, a.q.dtype, B, Hq, Hkv, Nq, Nk, D, a.q.strides, a.k.strides, a.v.strides,
                  a.mask_mode, a.prefix_len.ptr<const int64_t>(), a.key_padding_mask.ptr<const uint8_t>(),
                  a.bias.ptr<const float>(), a.bias.strides, a.scale};
  const void* grad_out = a.grad_out.data;
  const void* out = a.out.data;
  const float* lse = a.lse.ptr<const float>();
  float* dq = a.dq.ptr<float>();
  float* dk = a.dk.ptr<float>();
  float* dv = a.dv.ptr<float>();
  float* dbias = a.dbias.ptr<float>();
  const int64_t splits = a.dq.size(0);
  const int num_threads = a.num_threads;
  const Path path = use_avx512() ? Path::Avx512 : Path::Scalar;
  const int64_t k_tiles = (Nk + kBK - 1) / kBK, dp = round_up(D, 16), rows = B * Hq * Nq;
  // delta_i = sum_d dO[i, d] * O[i, d], once per query row
  std::vector<float> delta(rows);
  parallel_for((rows + 255) / 256, num_threads, [&](int64_t task) {
    for (int64_t i = task * 256; i < std::min(rows, (task + 1) * 256); ++i) {
      float sum = 0.0f;
      for (int64_t c = 0; c < D; ++c) sum += load_as_float(grad_out, dtype, i * D + c) * load_as_float(out, dtype, i * D + c);
      delta[i] = sum;
    }
  });
  parallel_for(B * Hkv * splits, num_threads, [&](int64_t task) {
    thread_local BackwardScratch scratch;
    const int64_t split = task % splits, bh = task / splits;
    const int64_t first = split * k_tiles / splits, last = (split + 1) * k_tiles / splits;
    if (first == last) return;
    float* dq_split = dq + split * B * Hq * Nq * dp;
    backward_key_range(p, path, bh / Hkv, bh % Hkv, first, last, grad_out, lse, delta.data(), dq_split, dk, dv,
                       dbias, scratch);
  });
}

}  // namespace fusedlm::cpu
