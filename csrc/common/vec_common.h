// Helpers written once over the vector types of one ISA level: vec.h includes this file inside
// each namespace fusedlm::simd::<isa> (hence no include guard), after that level's types.

constexpr int W = Vec::W;

// 2^r for r in [-1/2, 1/2]: polynomials fitted at Chebyshev nodes. Relative error in float32:
// degree 5: 2.5e-7; degree 4: 3.6e-6 (PyTorch's exp_u20 is of that order); degree 3: 1e-4 (for
// probabilities rounded to bf16, whose step is 4e-3).
template <int Degree>
inline Vec exp2_poly(Vec r) {
  static_assert(Degree >= 3 && Degree <= 5, "fitted degrees: 3, 4, 5");
  Vec y;
  if constexpr (Degree == 5) {
    y = fma(Vec(1.3390863e-3f), r, Vec(9.676032e-3f));
    y = fma(y, r, Vec(5.5503570e-2f));
    y = fma(y, r, Vec(2.4022107e-1f));
    y = fma(y, r, Vec(6.9314718e-1f));
    return fma(y, r, Vec(1.0000001f));
  } else if constexpr (Degree == 4) {
    y = fma(Vec(9.6663684e-3f), r, Vec(5.5921976e-2f));
    y = fma(y, r, Vec(2.4022350e-1f));
    y = fma(y, r, Vec(6.9312102e-1f));
    return fma(y, r, Vec(1.0f));
  } else {
    y = fma(Vec(5.5838283e-2f), r, Vec(2.4263948e-1f));
    y = fma(y, r, Vec(6.9313675e-1f));
    return fma(y, r, Vec(9.9992454e-1f));
  }
}

// 2^x for finite x <= 0: 2^n 2^r with n = round(x), r = x - n. Below -126 the result is 2^-126
// times the polynomial (under 1.2e-38, not 0): for softmax terms that are known finite.
template <int Degree = 5>
inline Vec exp2_finite(Vec x) {
  x = max(x, Vec(-126.0f));  // NaN -> -126 too (max returns its second operand)
  const Vec n = x.round();
  return exp2_poly<Degree>(x - n) * Vec::from_int(shl<23>(n.to_int() + IVec(127)));  // 2^n, n in [-126, 0]
}

// 2^x for x <= 0, exactly 0 for x < -126 (so for -inf, hidden entries) and NaN.
template <int Degree = 5>
inline Vec exp2_nonpositive(Vec x) {
  return select(x >= Vec(-126.0f), exp2_finite<Degree>(x), Vec::zero());
}

constexpr float kLog2e = 1.44269504088896341f;

// e^x for x <= 0 (as exp2_nonpositive, 0 below about -87.3).
template <int Degree = 5>
inline Vec exp_nonpositive(Vec x) {
  return exp2_nonpositive<Degree>(x * Vec(kLog2e));
}

// Asks for the cache line at p ahead of a streaming read that uses it once (prefetchnta on x86:
// it does not evict what the caches hold for longer). Never faults, whatever p is.
inline void prefetch_stream(const void* p) { __builtin_prefetch(p, 0, 0); }

// f(std::integral_constant<int, i>{}) for i = 0 .. N - 1, unrolled: i is a compile-time constant
// in each call (a shift count, a register index).
template <class F, int... I>
inline void unroll_sequence(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline void unroll(F&& f) {
  unroll_sequence(f, std::make_integer_sequence<int, N>{});
}

// Loops over the elements [0, len) of a row W lanes at a time: step(i, Full{}) for every whole
// step, then step(i, Part{n}) once for the last n < W elements, if any. The load / store / live
// overloads below take either, so a loop body is written once while whole steps use plain
// instructions: masked loads and stores cost far more than plain ones on AVX2 (AMD Zen microcodes
// vmaskmovps stores).
struct Full {
  static constexpr int n = W;
};
struct Part {
  int n;
};

template <class Step>
inline void for_chunks(int64_t len, Step&& step) {
  int64_t i = 0;
  for (; i + W <= len; i += W) step(i, Full{});
  if (i < len) step(i, Part{static_cast<int>(len - i)});
}

inline Mask live(Full) { return Mask::first(W); }
inline Mask live(Part c) { return Mask::first(c.n); }
inline Vec load(const float* p, Full) { return Vec::load(p); }
inline Vec load(const float* p, Part c) { return Vec::load(p, c.n); }
inline void store(Vec v, float* p, Full) { v.store(p); }
inline void store(Vec v, float* p, Part c) { v.store(p, c.n); }
inline IVec load_u16(const uint16_t* p, Full) { return IVec::load_u16(p); }
inline IVec load_u16(const uint16_t* p, Part c) {
  uint16_t buf[W] = {};
  std::memcpy(buf, p, c.n * sizeof(uint16_t));
  return IVec::load_u16(buf);
}
inline void store_u16(IVec v, uint16_t* p, Full) { v.store_u16(p); }
inline void store_u16(IVec v, uint16_t* p, Part c) {
  uint16_t buf[W];
  v.store_u16(buf);
  std::memcpy(p, buf, c.n * sizeof(uint16_t));
}

// W elements of a buffer of dtype D (F32, BF16 or F16) from element i, widened to float; a Part
// reads only its first n elements and gives 0 in the other lanes.
template <DType D>
inline Vec load_as(const void* base, int64_t i, Full) {
  if constexpr (D == DType::F32) return Vec::load(static_cast<const float*>(base) + i);
  if constexpr (D == DType::BF16) return Vec::load_bf16(static_cast<const uint16_t*>(base) + i);
  if constexpr (D == DType::F16) return Vec::load_f16(static_cast<const uint16_t*>(base) + i);
}
template <DType D>
inline Vec load_as(const void* base, int64_t i, Part c) {
  if constexpr (D == DType::F32) return Vec::load(static_cast<const float*>(base) + i, c.n);
  if constexpr (D == DType::BF16) return Vec::load_bf16(static_cast<const uint16_t*>(base) + i, c.n);
  if constexpr (D == DType::F16) return Vec::load_f16(static_cast<const uint16_t*>(base) + i, c.n);
}
template <DType D>
inline void store_as(void* base, int64_t i, Vec v, Full) {
  if constexpr (D == DType::F32) v.store(static_cast<float*>(base) + i);
  if constexpr (D == DType::BF16) v.store_bf16(static_cast<uint16_t*>(base) + i);
  if constexpr (D == DType::F16) v.store_f16(static_cast<uint16_t*>(base) + i);
}
template <DType D>
inline void store_as(void* base, int64_t i, Vec v, Part c) {
  if constexpr (D == DType::F32) v.store(static_cast<float*>(base) + i, c.n);
  if constexpr (D == DType::BF16) v.store_bf16(static_cast<uint16_t*>(base) + i, c.n);
  if constexpr (D == DType::F16) v.store_f16(static_cast<uint16_t*>(base) + i, c.n);
}
template <DType D>
inline Vec load_as(const void* base, int64_t i) {
  return load_as<D>(base, i, Full{});
}
template <DType D>
inline void store_as(void* base, int64_t i, Vec v) {
  store_as<D>(base, i, v, Full{});
}

// The dtype-generic forms, for code that is not hot enough to be a template per dtype.
template <class C>
inline Vec load_any(const void* base, DType dtype, int64_t i, C c) {
  switch (dtype) {
    case DType::BF16: return load_as<DType::BF16>(base, i, c);
    case DType::F16: return load_as<DType::F16>(base, i, c);
    default: return load_as<DType::F32>(base, i, c);
  }
}
template <class C>
inline void store_any(void* base, DType dtype, int64_t i, Vec v, C c) {
  switch (dtype) {
    case DType::BF16: return store_as<DType::BF16>(base, i, v, c);
    case DType::F16: return store_as<DType::F16>(base, i, v, c);
    default: return store_as<DType::F32>(base, i, v, c);
  }
}

// dst[0, n) = src[0, n) of dtype `dtype`, as float32.
inline void widen_row(const void* src, DType dtype, int64_t n, float* dst) {
  for_chunks(n, [&](int64_t j, auto c) { store(load_any(src, dtype, j, c), dst + j, c); });
}
