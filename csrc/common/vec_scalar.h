// The scalar level of common/vec.h: 8 lanes in plain arrays, for any CPU. Every operation is a
// loop over the lanes, which the compiler may vectorise for the baseline ISA; the results are
// those of the scalar C++ expressions (fma is a * b + c, which the compiler may contract).
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_features.h"
#include "common/dtype.h"

namespace fusedlm::simd::scalar {

constexpr Isa kIsa = Isa::Scalar;
constexpr int kRegisters = 16;
constexpr bool kNativeBf16 = false;
constexpr int kLanes = 8;

struct Mask {
  static constexpr int W = kLanes;
  int32_t m[kLanes];  // 0 or -1 per lane

  static Mask first(int n) {
    Mask r;
    for (int i = 0; i < kLanes; ++i) r.m[i] = i < n ? -1 : 0;
    return r;
  }
  unsigned bits() const {
    unsigned b = 0;
    for (int i = 0; i < kLanes; ++i) b |= (m[i] ? 1u : 0u) << i;
    return b;
  }
  bool any() const { return bits() != 0; }
};

inline Mask operator&(Mask a, Mask b) {
  for (int i = 0; i < kLanes; ++i) a.m[i] &= b.m[i];
  return a;
}
inline Mask operator|(Mask a, Mask b) {
  for (int i = 0; i < kLanes; ++i) a.m[i] |= b.m[i];
  return a;
}
inline Mask operator~(Mask a) {
  for (int i = 0; i < kLanes; ++i) a.m[i] = ~a.m[i];
  return a;
}

struct Vec;

struct IVec {
  static constexpr int W = kLanes;
  int32_t v[kLanes];

  IVec() = default;
  explicit IVec(int32_t x) {
    for (int i = 0; i < kLanes; ++i) v[i] = x;
  }
  static IVec iota() {
    IVec r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = i;
    return r;
  }
  static IVec load(const void* p) {
    IVec r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static IVec load_u8(const uint8_t* p) {
    IVec r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = p[i];
    return r;
  }
  static IVec load_u16(const uint16_t* p) {
    IVec r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = p[i];
    return r;
  }
  void store(int32_t* p) const { std::memcpy(p, v, sizeof(v)); }
  void store_u16(uint16_t* p) const {
    for (int i = 0; i < kLanes; ++i) p[i] = static_cast<uint16_t>(v[i]);
  }
  inline Vec to_float() const;
};

template <class Op>
inline IVec lanes(IVec a, IVec b, Op op) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = op(a.v[i], b.v[i]);
  return a;
}
inline IVec operator+(IVec a, IVec b) { return lanes(a, b, [](int32_t x, int32_t y) { return x + y; }); }
inline IVec operator-(IVec a, IVec b) { return lanes(a, b, [](int32_t x, int32_t y) { return x - y; }); }
inline IVec operator&(IVec a, IVec b) { return lanes(a, b, [](int32_t x, int32_t y) { return x & y; }); }
inline IVec operator|(IVec a, IVec b) { return lanes(a, b, [](int32_t x, int32_t y) { return x | y; }); }
inline IVec operator^(IVec a, IVec b) { return lanes(a, b, [](int32_t x, int32_t y) { return x ^ y; }); }
inline IVec min(IVec a, IVec b) { return lanes(a, b, [](int32_t x, int32_t y) { return x < y ? x : y; }); }
inline IVec max(IVec a, IVec b) { return lanes(a, b, [](int32_t x, int32_t y) { return x > y ? x : y; }); }
inline Mask operator==(IVec a, IVec b) {
  Mask r;
  for (int i = 0; i < kLanes; ++i) r.m[i] = a.v[i] == b.v[i] ? -1 : 0;
  return r;
}
inline Mask operator>(IVec a, IVec b) {
  Mask r;
  for (int i = 0; i < kLanes; ++i) r.m[i] = a.v[i] > b.v[i] ? -1 : 0;
  return r;
}
inline IVec select(Mask m, IVec a, IVec b) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = m.m[i] ? a.v[i] : b.v[i];
  return a;
}

template <int N>
inline IVec shl(IVec a) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) << N);
  return a;
}
template <int N>
inline IVec shr(IVec a) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) >> N);
  return a;
}

struct Vec {
  static constexpr int W = kLanes;
  float v[kLanes];

  Vec() = default;
  explicit Vec(float x) {
    for (int i = 0; i < kLanes; ++i) v[i] = x;
  }
  static Vec zero() { return Vec(0.0f); }
  static Vec load(const float* p) {
    Vec r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static Vec load(const float* p, int n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = p[i];
    return r;
  }
  void store(float* p) const { std::memcpy(p, v, sizeof(v)); }
  void store(float* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
  static Vec load_bf16(const uint16_t* p, int n = W) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = bf16_to_float(p[i]);
    return r;
  }
  void store_bf16(uint16_t* p, int n = W) const {
    for (int i = 0; i < n; ++i) p[i] = float_to_bf16(v[i]);
  }
  static Vec load_f16(const uint16_t* p, int n = W) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = f16_to_float(p[i]);
    return r;
  }
  void store_f16(uint16_t* p, int n = W) const {
    for (int i = 0; i < n; ++i) p[i] = float_to_f16(v[i]);
  }

  // x86's order: the second operand when either is NaN
  float reduce_add() const {
    float s = 0.0f;
    for (int i = 0; i < kLanes; ++i) s += v[i];
    return s;
  }
  float reduce_max() const {
    float m = v[0];
    for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }

  Vec round() const {
    Vec r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = std::nearbyint(v[i]);
    return r;
  }
  // x86's conversions: NaN and values out of the int32 range give INT32_MIN
  static int32_t to_int32(float f) {
    return f >= -2147483648.0f && f < 2147483648.0f ? static_cast<int32_t>(f) : INT32_MIN;
  }
  IVec to_int() const {
    IVec r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = to_int32(std::nearbyint(v[i]));
    return r;
  }
  IVec trunc_int() const {
    IVec r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = to_int32(v[i]);
    return r;
  }
  IVec as_int() const {
    IVec r;
    std::memcpy(r.v, v, sizeof(v));
    return r;
  }
  static Vec from_int(IVec bits) {
    Vec r;
    std::memcpy(r.v, bits.v, sizeof(r.v));
    return r;
  }
};

template <class Op>
inline Vec lanes(Vec a, Vec b, Op op) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = op(a.v[i], b.v[i]);
  return a;
}
inline Vec operator+(Vec a, Vec b) { return lanes(a, b, [](float x, float y) { return x + y; }); }
inline Vec operator-(Vec a, Vec b) { return lanes(a, b, [](float x, float y) { return x - y; }); }
inline Vec operator*(Vec a, Vec b) { return lanes(a, b, [](float x, float y) { return x * y; }); }
inline Vec operator/(Vec a, Vec b) { return lanes(a, b, [](float x, float y) { return x / y; }); }
inline Vec min(Vec a, Vec b) { return lanes(a, b, [](float x, float y) { return x < y ? x : y; }); }
inline Vec max(Vec a, Vec b) { return lanes(a, b, [](float x, float y) { return x > y ? x : y; }); }
inline Vec fma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < kLanes; ++i) c.v[i] = a.v[i] * b.v[i] + c.v[i];
  return c;
}
inline Vec fnma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < kLanes; ++i) c.v[i] = c.v[i] - a.v[i] * b.v[i];
  return c;
}
inline Vec abs(Vec a) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = std::fabs(a.v[i]);
  return a;
}
template <class Cmp>
inline Mask compare(Vec a, Vec b, Cmp cmp) {
  Mask r;
  for (int i = 0; i < kLanes; ++i) r.m[i] = cmp(a.v[i], b.v[i]) ? -1 : 0;
  return r;
}
inline Mask operator<(Vec a, Vec b) { return compare(a, b, [](float x, float y) { return x < y; }); }
inline Mask operator<=(Vec a, Vec b) { return compare(a, b, [](float x, float y) { return x <= y; }); }
inline Mask operator>(Vec a, Vec b) { return compare(a, b, [](float x, float y) { return x > y; }); }
inline Mask operator>=(Vec a, Vec b) { return compare(a, b, [](float x, float y) { return x >= y; }); }
inline Mask operator==(Vec a, Vec b) { return compare(a, b, [](float x, float y) { return x == y; }); }
inline Mask operator!=(Vec a, Vec b) { return compare(a, b, [](float x, float y) { return x != y; }); }
inline Vec select(Mask m, Vec a, Vec b) {
  for (int i = 0; i < kLanes; ++i) a.v[i] = m.m[i] ? a.v[i] : b.v[i];
  return a;
}
inline void zip(Vec a, Vec b, Vec& lo, Vec& hi) {
  for (int i = 0; i < kLanes / 2; ++i) {
    lo.v[2 * i] = a.v[i], lo.v[2 * i + 1] = b.v[i];
    hi.v[2 * i] = a.v[kLanes / 2 + i], hi.v[2 * i + 1] = b.v[kLanes / 2 + i];
  }
}

inline Vec IVec::to_float() const {
  Vec r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = static_cast<float>(v[i]);
  return r;
}

// Lane j = the sum of the lanes of x[j].
inline Vec sum_lanes(const Vec (&x)[kLanes]) {
  Vec r;
  for (int j = 0; j < kLanes; ++j) r.v[j] = x[j].reduce_add();
  return r;
}

// The 64-bit products a * m of unsigned 32-bit lanes, as their high and low words.
inline void mul_wide(IVec a, uint32_t m, IVec& hi, IVec& lo) {
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t product = static_cast<uint64_t>(static_cast<uint32_t>(a.v[i])) * m;
    hi.v[i] = static_cast<int32_t>(product >> 32);
    lo.v[i] = static_cast<int32_t>(product);
  }
}

// W pairs of bf16 (2W lanes): the operands of dot2. Native on avx512bf16 only; here in float32.
struct BVec {
  uint16_t v[2 * kLanes];
  static BVec load(const void* p) {
    BVec r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static BVec broadcast_pair(const uint16_t* p) {
    BVec r;
    for (int i = 0; i < kLanes; ++i) r.v[2 * i] = p[0], r.v[2 * i + 1] = p[1];
    return r;
  }
};
template <int N>
inline BVec shr(BVec b) {  // each 16-bit lane shifted right by N
  for (uint16_t& x : b.v) x = static_cast<uint16_t>(x >> N);
  return b;
}

// A 16-entry table rounded to bf16, looked up by the low 4 bits of 16-bit lanes (the others ignored).
struct BLut16 {
  uint16_t t[16];
  explicit BLut16(const float* table) {
    for (int i = 0; i < 16; ++i) t[i] = float_to_bf16(table[i]);
  }
  BVec lookup(BVec index) const {
    for (uint16_t& x : index.v) x = t[x & 15];
    return index;
  }
};
// acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1]
inline Vec dot2(Vec acc, const BVec& a, const BVec& b) {
  for (int i = 0; i < kLanes; ++i)
    acc.v[i] += bf16_to_float(a.v[2 * i]) * bf16_to_float(b.v[2 * i]) + bf16_to_float(a.v[2 * i + 1]) * bf16_to_float(b.v[2 * i + 1]);
  return acc;
}

struct Lut16 {
  float t[16];
  Lut16(const float* table, float scale) {
    for (int i = 0; i < 16; ++i) t[i] = table[i] * scale;
  }
  Vec lookup(IVec index) const {
    Vec r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = t[index.v[i] & 15];
    return r;
  }
  template <int J>
  Vec lookup_nibble(IVec v) const {  // the entry of nibble J (bits 4J .. 4J + 3) of each lane
    return lookup(shr<4 * J>(v));
  }
};

}  // namespace fusedlm::simd::scalar
