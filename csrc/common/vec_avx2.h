// The avx2 level of common/vec.h: 8 float lanes in a __m256 (AVX2 + FMA + F16C). Included by vec.h
// inside its target region; see vec.h for the interface.
#pragma once

namespace fusedlm::simd::avx2 {

constexpr Isa kIsa = Isa::Avx2;
constexpr int kRegisters = 16;
constexpr bool kNativeBf16 = false;

inline __m256i first_lanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

struct Mask {
  __m256 m;  // all bits set in the lanes that are true
  static Mask first(int n) { return {_mm256_castsi256_ps(first_lanes(n))}; }
  unsigned bits() const { return static_cast<unsigned>(_mm256_movemask_ps(m)); }
  bool any() const { return !_mm256_testz_ps(m, m); }
};

inline Mask operator&(Mask a, Mask b) { return {_mm256_and_ps(a.m, b.m)}; }
inline Mask operator|(Mask a, Mask b) { return {_mm256_or_ps(a.m, b.m)}; }
inline Mask operator~(Mask a) { return {_mm256_xor_ps(a.m, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))}; }

struct Vec;

struct IVec {
  static constexpr int W = 8;
  __m256i v;

  IVec() = default;
  IVec(__m256i x) : v(x) {}
  explicit IVec(int32_t x) : v(_mm256_set1_epi32(x)) {}
  static IVec iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static IVec load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static IVec load_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static IVec load_u16(const uint16_t* p) { return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  void store(int32_t* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  void store_u16(uint16_t* p) const {
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  inline Vec to_float() const;
};

inline IVec operator+(IVec a, IVec b) { return _mm256_add_epi32(a.v, b.v); }
inline IVec operator-(IVec a, IVec b) { return _mm256_sub_epi32(a.v, b.v); }
inline IVec operator&(IVec a, IVec b) { return _mm256_and_si256(a.v, b.v); }
inline IVec operator|(IVec a, IVec b) { return _mm256_or_si256(a.v, b.v); }
inline IVec operator^(IVec a, IVec b) { return _mm256_xor_si256(a.v, b.v); }
inline IVec min(IVec a, IVec b) { return _mm256_min_epi32(a.v, b.v); }
inline IVec max(IVec a, IVec b) { return _mm256_max_epi32(a.v, b.v); }
inline Mask operator==(IVec a, IVec b) { return {_mm256_castsi256_ps(_mm256_cmpeq_epi32(a.v, b.v))}; }
inline Mask operator>(IVec a, IVec b) { return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(a.v, b.v))}; }
inline IVec select(Mask m, IVec a, IVec b) {
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b.v), _mm256_castsi256_ps(a.v), m.m));
}

template <int N>
inline IVec shl(IVec a) {
  return _mm256_slli_epi32(a.v, N);
}
template <int N>
inline IVec shr(IVec a) {
  return _mm256_srli_epi32(a.v, N);
}

// 16-bit lanes in and out of a __m128i, for the tails of bf16 / f16 buffers.
inline __m128i load_u16_tail(const uint16_t* p, int n) {
  alignas(16) uint16_t buf[8] = {};
  std::memcpy(buf, p, n * sizeof(uint16_t));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}
inline void store_u16_tail(uint16_t* p, __m128i v, int n) {
  alignas(16) uint16_t buf[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(buf), v);
  std::memcpy(p, buf, n * sizeof(uint16_t));
}

struct Vec {
  static constexpr int W = 8;
  __m256 v;

  Vec() = default;
  Vec(__m256 x) : v(x) {}
  explicit Vec(float x) : v(_mm256_set1_ps(x)) {}
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const float* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(float* p, int n) const { _mm256_maskstore_ps(p, first_lanes(n), v); }

  static Vec from_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static Vec load_bf16(const uint16_t* p) { return from_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static Vec load_bf16(const uint16_t* p, int n) { return from_bf16(load_u16_tail(p, n)); }
  // Round to nearest even (float_to_bf16's bits, NaN included).
  __m128i to_bf16() const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    rounded = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan));
    rounded = _mm256_srli_epi32(rounded, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  }
  void store_bf16(uint16_t* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16()); }
  void store_bf16(uint16_t* p, int n) const { store_u16_tail(p, to_bf16(), n); }
  static Vec load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static Vec load_f16(const uint16_t* p, int n) { return _mm256_cvtph_ps(load_u16_tail(p, n)); }
  __m128i to_f16() const { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  void store_f16(uint16_t* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_f16()); }
  void store_f16(uint16_t* p, int n) const { store_u16_tail(p, to_f16(), n); }

  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }

  Vec round() const { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  IVec to_int() const { return _mm256_cvtps_epi32(v); }
  IVec trunc_int() const { return _mm256_cvttps_epi32(v); }
  IVec as_int() const { return _mm256_castps_si256(v); }
  static Vec from_int(IVec bits) { return _mm256_castsi256_ps(bits.v); }
};

inline Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_ps(a.v, b.v); }
inline Vec min(Vec a, Vec b) { return _mm256_min_ps(a.v, b.v); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a.v, b.v); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline Vec fnma(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a.v, b.v, c.v); }
inline Vec abs(Vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
inline Mask operator<(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask operator<=(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
inline Mask operator>(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask operator>=(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
inline Mask operator==(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
inline Mask operator!=(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_NEQ_UQ)}; }
inline Vec select(Mask m, Vec a, Vec b) { return _mm256_blendv_ps(b.v, a.v, m.m); }
inline void zip(Vec a, Vec b, Vec& lo, Vec& hi) {
  const __m256 l = _mm256_unpacklo_ps(a.v, b.v), h = _mm256_unpackhi_ps(a.v, b.v);  // per 128-bit half
  lo = _mm256_permute2f128_ps(l, h, 0x20);
  hi = _mm256_permute2f128_ps(l, h, 0x31);
}

inline Vec IVec::to_float() const { return _mm256_cvtepi32_ps(v); }

// Lane j = the sum of the lanes of x[j]: pairwise horizontal adds, then the two 128-bit halves.
inline Vec sum_lanes(const Vec (&x)[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(x[0].v, x[1].v), _mm256_hadd_ps(x[2].v, x[3].v));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(x[4].v, x[5].v), _mm256_hadd_ps(x[6].v, x[7].v));
  // a: low half sums of x0..x3 (their low 128 bits), high half of their high 128 bits; b likewise
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The 64-bit products a * m of unsigned 32-bit lanes, as their high and low words (vpmuludq
// multiplies the even lanes; the odd ones are shifted down first).
inline void mul_wide(IVec a, uint32_t m, IVec& hi, IVec& lo) {
  const __m256i vm = _mm256_set1_epi32(static_cast<int32_t>(m));
  const __m256i even = _mm256_mul_epu32(a.v, vm), odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), vm);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// W pairs of bf16 (16 lanes): the operands of dot2, emulated in float32 (no native bf16 dot).
struct BVec {
  __m256i v;
  static BVec load(const void* p) { return {_mm256_loadu_si256(static_cast<const __m256i*>(p))}; }
  static BVec broadcast_pair(const uint16_t* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof(pair));
    return {_mm256_set1_epi32(pair)};
  }
};
template <int N>
inline BVec shr(BVec b) {  // each 16-bit lane shifted right by N
  return {_mm256_srli_epi16(b.v, N)};
}

// A 16-entry table rounded to bf16, looked up by the low 4 bits of 16-bit lanes (through memory:
// AVX2 has no 16-bit permute; the NF4 GEMV takes this path only with avx512bf16).
struct BLut16 {
  uint16_t t[16];
  explicit BLut16(const float* table) {
    for (int i = 0; i < 16; ++i) t[i] = float_to_bf16(table[i]);
  }
  BVec lookup(BVec index) const {
    alignas(32) uint16_t lane[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane), index.v);
    for (uint16_t& x : lane) x = t[x & 15];
    return {_mm256_load_si256(reinterpret_cast<const __m256i*>(lane))};
  }
};
// acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1]: the even bf16 of each pair is its low half
inline Vec dot2(Vec acc, BVec a, BVec b) {
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m256 a_even = _mm256_castsi256_ps(_mm256_slli_epi32(a.v, 16)), b_even = _mm256_castsi256_ps(_mm256_slli_epi32(b.v, 16));
  const __m256 a_odd = _mm256_castsi256_ps(_mm256_and_si256(a.v, high)), b_odd = _mm256_castsi256_ps(_mm256_and_si256(b.v, high));
  return _mm256_fmadd_ps(a_odd, b_odd, _mm256_fmadd_ps(a_even, b_even, acc.v));
}

// Two 8-entry halves: vpermps reads the low 3 bits of an index in each, and bit 3 (moved to the
// sign bit) picks the half.
struct Lut16 {
  __m256 lo, hi;
  Lut16(const float* table, float scale)
      : lo(_mm256_mul_ps(_mm256_loadu_ps(table), _mm256_set1_ps(scale))),
        hi(_mm256_mul_ps(_mm256_loadu_ps(table + 8), _mm256_set1_ps(scale))) {}
  Vec lookup(IVec index) const { return pick(index.v, _mm256_slli_epi32(index.v, 28)); }
  template <int J>
  Vec lookup_nibble(IVec v) const {  // the entry of nibble J (bits 4J .. 4J + 3) of each lane
    return pick(_mm256_srli_epi32(v.v, 4 * J), _mm256_slli_epi32(v.v, 28 - 4 * J));
  }

 private:
  // index: the entry in the low 3 bits; half: bit 31 set for the upper half
  Vec pick(__m256i index, __m256i half) const {
    const __m256 a = _mm256_permutevar8x32_ps(lo, index), b = _mm256_permutevar8x32_ps(hi, index);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(half));
  }
};

}  // namespace fusedlm::simd::avx2
