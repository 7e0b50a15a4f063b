// The avx512 levels of common/vec.h: 16 float lanes in a __m512 (AVX-512 F/BW/VL/DQ). vec.h
// includes this file twice (hence no include guard), inside each level's target region:
//   FUSEDLM_VEC512_NS avx512,     FUSEDLM_VEC512_BF16 0
//   FUSEDLM_VEC512_NS avx512bf16, FUSEDLM_VEC512_BF16 1: bf16 stores by vcvtneps2bf16 and dot2 by
//     vdpbf16ps (the avx512 level emulates dot2 in float32). vcvtneps2bf16 rounds to nearest even like float_to_bf16 but flushes
//     results below 2^-126 to zero and quiets NaN differently; the kernels never store such values.
// See vec.h for the interface.

namespace fusedlm::simd::FUSEDLM_VEC512_NS {

constexpr Isa kIsa = FUSEDLM_VEC512_BF16 ? Isa::Avx512Bf16 : Isa::Avx512;
constexpr int kRegisters = 32;
constexpr bool kNativeBf16 = FUSEDLM_VEC512_BF16;

struct Mask {
  __mmask16 m;
  static Mask first(int n) { return {static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << (n < 0 ? 0 : n)) - 1)}; }
  unsigned bits() const { return m; }
  bool any() const { return m != 0; }
};

inline Mask operator&(Mask a, Mask b) { return {static_cast<__mmask16>(a.m & b.m)}; }
inline Mask operator|(Mask a, Mask b) { return {static_cast<__mmask16>(a.m | b.m)}; }
inline Mask operator~(Mask a) { return {static_cast<__mmask16>(~a.m)}; }

struct Vec;

struct IVec {
  static constexpr int W = 16;
  __m512i v;

  IVec() = default;
  IVec(__m512i x) : v(x) {}
  explicit IVec(int32_t x) : v(_mm512_set1_epi32(x)) {}
  static IVec iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static IVec load(const void* p) { return _mm512_loadu_si512(p); }
  static IVec load_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static IVec load_u16(const uint16_t* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  void store(int32_t* p) const { _mm512_storeu_si512(p, v); }
  void store_u16(uint16_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v)); }
  inline Vec to_float() const;
};

inline IVec operator+(IVec a, IVec b) { return _mm512_add_epi32(a.v, b.v); }
inline IVec operator-(IVec a, IVec b) { return _mm512_sub_epi32(a.v, b.v); }
inline IVec operator&(IVec a, IVec b) { return _mm512_and_si512(a.v, b.v); }
inline IVec operator|(IVec a, IVec b) { return _mm512_or_si512(a.v, b.v); }
inline IVec operator^(IVec a, IVec b) { return _mm512_xor_si512(a.v, b.v); }
inline IVec min(IVec a, IVec b) { return _mm512_min_epi32(a.v, b.v); }
inline IVec max(IVec a, IVec b) { return _mm512_max_epi32(a.v, b.v); }
inline Mask operator==(IVec a, IVec b) { return {_mm512_cmpeq_epi32_mask(a.v, b.v)}; }
inline Mask operator>(IVec a, IVec b) { return {_mm512_cmpgt_epi32_mask(a.v, b.v)}; }
inline IVec select(Mask m, IVec a, IVec b) { return _mm512_mask_blend_epi32(m.m, b.v, a.v); }

template <int N>
inline IVec shl(IVec a) {
  return _mm512_slli_epi32(a.v, N);
}
template <int N>
inline IVec shr(IVec a) {
  return _mm512_srli_epi32(a.v, N);
}

struct Vec {
  static constexpr int W = 16;
  __m512 v;

  Vec() = default;
  Vec(__m512 x) : v(x) {}
  explicit Vec(float x) : v(_mm512_set1_ps(x)) {}
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const float* p, int n) { return _mm512_maskz_loadu_ps(Mask::first(n).m, p); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(float* p, int n) const { _mm512_mask_storeu_ps(p, Mask::first(n).m, v); }

  static Vec from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static Vec load_bf16(const uint16_t* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static Vec load_bf16(const uint16_t* p, int n) { return from_bf16(_mm256_maskz_loadu_epi16(Mask::first(n).m, p)); }
  __m256i to_bf16() const {
#if FUSEDLM_VEC512_BF16
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else  // round to nearest even, float_to_bf16's bits (NaN included)
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
  }
  void store_bf16(uint16_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16()); }
  void store_bf16(uint16_t* p, int n) const { _mm256_mask_storeu_epi16(p, Mask::first(n).m, to_bf16()); }
  static Vec load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static Vec load_f16(const uint16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(Mask::first(n).m, p)); }
  __m256i to_f16() const { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  void store_f16(uint16_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_f16()); }
  void store_f16(uint16_t* p, int n) const { _mm256_mask_storeu_epi16(p, Mask::first(n).m, to_f16()); }

  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }

  Vec round() const { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  IVec to_int() const { return _mm512_cvtps_epi32(v); }
  IVec trunc_int() const { return _mm512_cvttps_epi32(v); }
  IVec as_int() const { return _mm512_castps_si512(v); }
  static Vec from_int(IVec bits) { return _mm512_castsi512_ps(bits.v); }
};

inline Vec operator+(Vec a, Vec b) { return _mm512_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm512_div_ps(a.v, b.v); }
inline Vec min(Vec a, Vec b) { return _mm512_min_ps(a.v, b.v); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a.v, b.v); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline Vec fnma(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a.v, b.v, c.v); }
inline Vec abs(Vec a) { return _mm512_abs_ps(a.v); }
inline Mask operator<(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask operator<=(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
inline Mask operator>(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask operator>=(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ)}; }
inline Mask operator==(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ)}; }
inline Mask operator!=(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_NEQ_UQ)}; }
inline Vec select(Mask m, Vec a, Vec b) { return _mm512_mask_blend_ps(m.m, b.v, a.v); }
inline void zip(Vec a, Vec b, Vec& lo, Vec& hi) {
  lo = _mm512_permutex2var_ps(a.v, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), b.v);
  hi = _mm512_permutex2var_ps(a.v, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), b.v);
}

inline Vec IVec::to_float() const { return _mm512_cvtepi32_ps(v); }

struct Lut16 {  // vpermps reads the low 4 bits of each index
  __m512 t;
  Lut16(const float* table, float scale) : t(_mm512_mul_ps(_mm512_loadu_ps(table), _mm512_set1_ps(scale))) {}
  Vec lookup(IVec index) const { return _mm512_permutexvar_ps(index.v, t); }
  template <int J>
  Vec lookup_nibble(IVec v) const {  // the entry of nibble J (bits 4J .. 4J + 3) of each lane
    return _mm512_permutexvar_ps(_mm512_srli_epi32(v.v, 4 * J), t);
  }
};

// Lane j = the sum of the lanes of x[j]: three rounds of pairwise adds, each halving the partial
// sums per vector, then one permutation back into order.
inline Vec sum_lanes(const Vec (&x)[16]) {
  __m512 b[8], c[4], d[2];
  for (int m = 0; m < 8; ++m)  // b[m]: x 2m, 2m + 1 in 256-bit halves, 8 partials each
    b[m] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * m].v, x[2 * m + 1].v, 0x44),
                         _mm512_shuffle_f32x4(x[2 * m].v, x[2 * m + 1].v, 0xEE));
  for (int m = 0; m < 4; ++m)  // c[m]: x 4m .. 4m + 3 in 128-bit blocks, 4 partials each
    c[m] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0x88), _mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)  // d[m], block i: x i, 4 + i (m = 0) or 8 + i, 12 + i (m = 1), 2 partials each
    d[m] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0x88), _mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0xDD));
  // e, lane 4i + t: x i + 4t
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), e);
}

// The 64-bit products a * m of unsigned 32-bit lanes, as their high and low words.
inline void mul_wide(IVec a, uint32_t m, IVec& hi, IVec& lo) {
  const __m512i vm = _mm512_set1_epi32(static_cast<int32_t>(m));
  const __m512i even = _mm512_mul_epu32(a.v, vm), odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), vm);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// 16 pairs of bf16 (32 lanes): the operands of dot2 (vdpbf16ps with avx512bf16, else float32).
struct BVec {
  __m512i v;
  static BVec load(const void* p) { return {_mm512_loadu_si512(p)}; }
  static BVec broadcast_pair(const uint16_t* p) {  // (p[0], p[1]) in every pair
    int32_t pair;
    std::memcpy(&pair, p, sizeof(pair));
    return {_mm512_set1_epi32(pair)};
  }
};
template <int N>
inline BVec shr(BVec b) {  // each 16-bit lane shifted right by N
  return {_mm512_srli_epi16(b.v, N)};
}

// A 16-entry table rounded to bf16, looked up by the low 4 bits of 16-bit lanes (the others
// ignored): vpermw reads 5 bits, so entries 16-31 repeat entries 0-15.
struct BLut16 {
  __m512i t;
  explicit BLut16(const float* table) {
    const __m256i half = Vec::load(table).to_bf16();
    t = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
  }
  BVec lookup(BVec index) const { return {_mm512_permutexvar_epi16(index.v, t)}; }
};
// acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1], products and sums in float32.
inline Vec dot2(Vec acc, BVec a, BVec b) {
#if FUSEDLM_VEC512_BF16
  return _mm512_dpbf16_ps(acc.v, reinterpret_cast<__m512bh>(a.v), reinterpret_cast<__m512bh>(b.v));
#else
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 a_even = _mm512_castsi512_ps(_mm512_slli_epi32(a.v, 16)), b_even = _mm512_castsi512_ps(_mm512_slli_epi32(b.v, 16));
  const __m512 a_odd = _mm512_castsi512_ps(_mm512_and_si512(a.v, high)), b_odd = _mm512_castsi512_ps(_mm512_and_si512(b.v, high));
  return _mm512_fmadd_ps(a_odd, b_odd, _mm512_fmadd_ps(a_even, b_even, acc.v));
#endif
}

}  // namespace fusedlm::simd::FUSEDLM_VEC512_NS
