// Attention kernels written once over common/vec.h (attention.cpp includes this file once per ISA
// level through common/for_each_isa.h, hence no include guard). Scores are kept in base 2: with
// a2 = scale * log2(e), exp(scale s - m) = exp2(s a2 - m2), and m2, the running max, is in base 2.
//
// Forward, one task per (batch, query head, tile of kBQ query rows):
//   for each tile of kBK keys the mask does not hide entirely:
//     S = Q K^T (+ bias), hidden entries -inf           [rows, kBK]
//     m' = max(m, rowmax(S a2));  P = exp2(S a2 - m')
//     l = l exp2(m - m') + rowsum(P);  O = O exp2(m - m') + (P * Z) V     (Z: the dropout multiplier)
//   out = O / l,  lse = (m + log2 l) ln 2    (a row that saw nothing: out 0, lse -inf)
// Backward, one task per (batch, key/value head, split of the key tiles); for each key tile and
// every query tile that sees it, with P = exp2(S a2 - lse log2(e)) recomputed from the saved lse:
//   dV^T += dO^T (P * Z),  dP = (dO V^T) * Z,  dS = P * (dP - delta), delta = rowsum(dO * O),
//   dK^T += scale Q^T dS,  dQ += scale dS K   (dQ into the split's own float32 buffer).
//
// Masks as row limits (Problem::row_limit): a key tile is skipped when the mask hides it from the
// whole query tile, is computed with no per-element work when every row sees all of it and no
// key of it is padding, and otherwise each row stops at its own limit. Inside a tile the products
// stop at the columns the tile's rows can see (the causal diagonal is not computed past it).
//
// Every product goes through one register-tiled micro-kernel, C[kMR, kNV W] (+)= A B with A
// broadcast one element (or one bf16 pair) at a time and kNV vectors of B per step: 6 x 16 floats
// on AVX2 (12 of its 16 registers accumulate: the BLIS Haswell tile), 6 x 64 on AVX-512. K, V
// (and K^T, V^T, K for the backward) are packed into tiles by each thread once per (batch,
// key/value head) it works on: O(Nk D) extra floats per thread, never Nq x Nk. float32 inputs and
// bf16 ones without native bf16 dots compute in float32 (bf16 widened when packed); with
// avx512_bf16 the forward keeps bf16 tiles, pairs interleaved for vdpbf16ps, and accumulates in
// float32; the backward always computes in float32. GQA: query head h reads key/value head
// h / (Hq / Hkv); nothing is copied.

using namespace attn;  // Problem, Dropout, Cover, row limits: attention.cpp

constexpr int64_t kBQ = 48;   // query rows per forward task: 8 register tiles of 6 rows
constexpr int64_t kBK = 128;  // keys per tile (a multiple of 4 W: the dropout words come in fours)
constexpr int kMR = 6;
constexpr int kNV = kRegisters >= 32 ? 4 : 2;

// ---- the micro-kernel -----------------------------------------------------------------------

// Operands of the products: float32, one element of K per step, or bf16 pairs, two per step
// (A row-major with pairs adjacent along K; B rows of pairs: element (k, n) at (k / 2) ldb + 2 n + k % 2).
struct F32 {
  using T = float;
  static constexpr int kStep = 1;
  static Vec broadcast(const float* a) { return Vec(*a); }
  static Vec load(const float* b) { return Vec::load(b); }
  static Vec madd(Vec acc, Vec a, Vec b) { return fma(a, b, acc); }
};
struct Bf16 {
  using T = uint16_t;
  static constexpr int kStep = 2;
  static BVec broadcast(const uint16_t* a) { return BVec::broadcast_pair(a); }
  static BVec load(const uint16_t* b) { return BVec::load(b); }
  static Vec madd(Vec acc, BVec a, BVec b) { return dot2(acc, a, b); }
};

// C[MR, NV W] (+)= A[MR, k0:k1] B[k0:k1, NV W]; lda, ldb, ldc in elements of A, B, C.
template <class Op, int MR, int NV>
void micro(int64_t k0, int64_t k1, const typename Op::T* A, int64_t lda, const typename Op::T* B, int64_t ldb,
           float* C, int64_t ldc, bool accumulate) {
  Vec c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? Vec::load(C + r * ldc + v * W) : Vec::zero();
  for (int64_t k = k0; k < k1; k += Op::kStep) {
    const typename Op::T* bk = B + (k / Op::kStep) * ldb;
    decltype(Op::load(bk)) b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Op::load(bk + v * W * Op::kStep);
    for (int r = 0; r < MR; ++r) {
      const auto a = Op::broadcast(A + r * lda + k);
      for (int v = 0; v < NV; ++v) c[r][v] = Op::madd(c[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * W);
}

template <class Op, int MR>
void micro_rows(int vectors, int64_t k0, int64_t k1, const typename Op::T* A, int64_t lda, const typename Op::T* B,
                int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  switch (vectors) {
    case 4: if constexpr (kNV >= 4) return micro<Op, MR, 4>(k0, k1, A, lda, B, ldb, C, ldc, accumulate); break;
    case 3: if constexpr (kNV >= 3) return micro<Op, MR, 3>(k0, k1, A, lda, B, ldb, C, ldc, accumulate); break;
    case 2: return micro<Op, MR, 2>(k0, k1, A, lda, B, ldb, C, ldc, accumulate);
    case 1: return micro<Op, MR, 1>(k0, k1, A, lda, B, ldb, C, ldc, accumulate);
    default: break;
  }
}

// The columns and the K range one block of rows of C needs.
struct Extent {
  int64_t cols;    // a multiple of W
  int64_t k0, k1;  // multiples of Op::kStep
};

// C[M, :] (+)= A[M, :] B: rows in blocks of kMR (the last one shorter), each block over the
// columns and K range extent(r0, rows) gives it, in tiles of kNV vectors (the last one narrower).
template <class Op, class ExtentOf>
void mm(int64_t M, const typename Op::T* A, int64_t lda, const typename Op::T* B, int64_t ldb, float* C, int64_t ldc,
        bool accumulate, ExtentOf extent) {
  for (int64_t r0 = 0; r0 < M; r0 += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, M - r0));
    const Extent e = extent(r0, rows);
    const typename Op::T* a = A + r0 * lda;
    float* c = C + r0 * ldc;
    for (int64_t c0 = 0; c0 < e.cols; c0 += kNV * W) {
      const int vectors = static_cast<int>(std::min<int64_t>(kNV, (e.cols - c0) / W));
      const typename Op::T* b = B + c0 * Op::kStep;
      switch (rows) {
        case 6: micro_rows<Op, 6>(vectors, e.k0, e.k1, a, lda, b, ldb, c + c0, ldc, accumulate); break;
        case 5: micro_rows<Op, 5>(vectors, e.k0, e.k1, a, lda, b, ldb, c + c0, ldc, accumulate); break;
        case 4: micro_rows<Op, 4>(vectors, e.k0, e.k1, a, lda, b, ldb, c + c0, ldc, accumulate); break;
        case 3: micro_rows<Op, 3>(vectors, e.k0, e.k1, a, lda, b, ldb, c + c0, ldc, accumulate); break;
        case 2: micro_rows<Op, 2>(vectors, e.k0, e.k1, a, lda, b, ldb, c + c0, ldc, accumulate); break;
        default: micro_rows<Op, 1>(vectors, e.k0, e.k1, a, lda, b, ldb, c + c0, ldc, accumulate); break;
      }
    }
  }
}

// ---- rows of the softmax --------------------------------------------------------------------

// The max of x[0, n), NaN when one of them is NaN (the vector max drops NaN operands).
float row_max(const float* x, int64_t n) {
  Vec m(kNegInf), nan = Vec::zero();
  for_chunks(n, [&](int64_t j, auto c) {
    const Vec x_j = select(live(c), load(x + j, c), Vec(kNegInf));
    m = max(m, x_j);
    nan = select(x_j != x_j, Vec(1.0f), nan);
  });
  return nan.reduce_max() > 0.0f ? std::numeric_limits<float>::quiet_NaN() : m.reduce_max();
}

// NaN semantics (ops.attention's docstring, as the reference computes them): a row with a NaN
// or +inf score (q, or the k or bias of a key it sees) gets a NaN output and lse, never zeros.
// The running max (base 2) is NaN from such a score on; exp2(m - NaN) then makes l and O NaN.
float running_max(float m, float row) {
  if (std::isnan(m) || std::isnan(row) || row == std::numeric_limits<float>::infinity())
    return std::numeric_limits<float>::quiet_NaN();
  return std::max(m, row);
}

// The log-sum-exp of a row from its max m (base 2) and sum l: -inf for a row that saw nothing, NaN for a NaN row.
float row_lse(float m, float l) {
  if (std::isnan(l)) return std::numeric_limits<float>::quiet_NaN();
  return l > 0.0f ? m * kLn2 + std::log(l) : kNegInf;
}

// x[j] = exp2(x[j] a2 - m2) for j < n, 0 for n <= j < n_total; returns the sum. Masked: x may
// hold -inf (hidden keys), which must give exactly 0; else every x is finite and a result
// below 2^-126 is as good as 0. Degree 4 (3.6e-6 relative error, like PyTorch's exp_u20) for
// float32 probabilities, 3 for those rounded to bf16.
template <bool Masked, int Degree>
float exp_row(float* x, int64_t n, int64_t n_total, float a2, float m2) {
  const Vec va(a2), vm(-m2);
  Vec sum = Vec::zero();
  for_chunks(n, [&](int64_t j, auto c) {
    const Vec arg = fma(load(x + j, c), va, vm);
    Vec e = Masked ? exp2_nonpositive<Degree>(arg) : exp2_finite<Degree>(arg);
    if constexpr (std::is_same_v<decltype(c), Part>) e = select(live(c), e, Vec::zero());
    store(e, x + j, c);
    sum = sum + e;
  });
  std::fill(x + n, x + n_total, 0.0f);
  return sum.reduce_add();
}

void scale_row(float* x, int64_t n, float a) {
  for_chunks(n, [&](int64_t j, auto c) { store(load(x + j, c) * Vec(a), x + j, c); });
}

// dst[0, n) = src[0, n) of dtype `dtype`, as float32, then zeros up to n_total.
void load_row(const void* src, DType dtype, int64_t n, int64_t n_total, float* dst) {
  widen_row(src, dtype, n, dst);
  std::fill(dst + n, dst + n_total, 0.0f);
}

// out (dtype) = x * a, n elements.
void store_row(const float* x, float a, int64_t n, void* out, DType dtype) {
  for_chunks(n, [&](int64_t j, auto c) { store_any(out, dtype, j, load(x + j, c) * Vec(a), c); });
}

// Row i of (b, h) of a score tile (keys j0 .. j0 + cols): applies bias (s = scale s + bias, in
// base 2) and hides padded keys; returns the multiplier a2 still to apply to the row.
float prepare_row(const Problem& p, float* s, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols, bool partial_padding) {
  float a2 = p.scale * kLog2e;
  if (p.bias != nullptr) {
    const float* bias = p.bias + b * p.sb[0] + h * p.sb[1] + i * p.sb[2] + j0 * p.sb[3];
    if (p.sb[3] == 1) {
      for_chunks(cols, [&](int64_t j, auto c) { store(fma(load(s + j, c), Vec(p.scale), load(bias + j, c)) * Vec(kLog2e), s + j, c); });
    } else {
      for (int64_t j = 0; j < cols; ++j) s[j] = (s[j] * p.scale + bias[j * p.sb[3]]) * kLog2e;
    }
    a2 = 1.0f;
  } else if (p.scale <= 0.0f) {  // max(s) a2 != max(s a2) there, and -inf * 0 is NaN
    scale_row(s, cols, a2);
    a2 = 1.0f;
  }
  if (partial_padding) {
    const uint8_t* pad = p.pad + b * p.Nk + j0;
    for_chunks(cols, [&](int64_t j, auto c) {
      IVec real;
      if constexpr (std::is_same_v<decltype(c), Part>) {
        uint8_t bytes[W] = {};
        std::memcpy(bytes, pad + j, c.n);
        real = IVec::load_u8(bytes);
      } else {
        real = IVec::load_u8(pad + j);
      }
      store(select(real == IVec(0), Vec(kNegInf), load(s + j, c)), s + j, c);
    });
  }
  return a2;
}

// ---- dropout: the reference's Philox-4x32-10 mask, W counters at a time ----------------------

// z[j] = keep(b, h, i, j0 + j) * dropout.scale for j < n (j0 a multiple of 4).
void dropout_row(const Dropout& d, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, float* z) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  const IVec threshold(static_cast<int32_t>(d.threshold - 1));
  for (int64_t g0 = j0 / 4; g0 * 4 < j0 + n; g0 += W) {  // W Philox calls: keys 4 g .. 4 g + 3 each
    IVec c0 = IVec::iota() + IVec(static_cast<int32_t>(g0)), c1(static_cast<int32_t>(i)), c2(static_cast<int32_t>(h)),
         c3(static_cast<int32_t>(b));
    uint32_t k0 = d.k0, k1 = d.k1;
    for (int round = 0; round < 10; ++round) {
      IVec hi0, lo0, hi1, lo1;
      mul_wide(c0, kM0, hi0, lo0);
      mul_wide(c2, kM1, hi1, lo1);
      c0 = hi1 ^ c1 ^ IVec(static_cast<int32_t>(k0));
      c2 = hi0 ^ c3 ^ IVec(static_cast<int32_t>(k1));
      c1 = lo1;
      c3 = lo0;
      k0 += kW0, k1 += kW1;
    }
    const IVec words[4] = {c0, c1, c2, c3};
    float keep[4][W];  // keep[w][g]: key 4 (g0 + g) + w
    for (int w = 0; w < 4; ++w) select(shr<8>(words[w]) > threshold, Vec(d.scale), Vec::zero()).store(keep[w]);
    for (int g = 0; g < W; ++g)
      for (int w = 0; w < 4; ++w) {
        const int64_t j = 4 * (g0 + g) + w - j0;
        if (j >= 0 && j < n) z[j] = keep[w][g];
      }
  }
}

void multiply_row(float* x, const float* z, int64_t n) {
  for_chunks(n, [&](int64_t j, auto c) { store(load(x + j, c) * load(z + j, c), x + j, c); });
}

// ---- packing ----------------------------------------------------------------------------------

// dst[c][r] = src row r, element c, as float (dst: [D][kBK]), zero where r >= rows.
void pack_transposed(const char* src, DType dtype, int64_t row_stride, int64_t rows, int64_t D, float* dst) {
  std::fill(dst, dst + D * kBK, 0.0f);
  const int64_t es = dtype == DType::F32 ? 4 : 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) dst[c * kBK + r] = load_as_float(src + r * row_stride * es, dtype, c);
}

// dst[r][c] = src row r as float for r < rows, c < D; zeros up to [kBK][ld].
void pack_rows(const char* src, DType dtype, int64_t row_stride, int64_t rows, int64_t D, int64_t ld, float* dst) {
  const int64_t es = dtype == DType::F32 ? 4 : 2;
  for (int64_t r = 0; r < rows; ++r) load_row(src + r * row_stride * es, dtype, D, ld, dst + r * ld);
  std::fill(dst + rows * ld, dst + kBK * ld, 0.0f);
}

// K^T for vdpbf16ps: dst[c / 2][r][c % 2] = K[r][c] (dst: [d2 / 2][kBK][2]), zero-padded.
void pack_kt_bf16(const uint16_t* src, int64_t row_stride, int64_t rows, int64_t D, int64_t d2, uint16_t* dst) {
  std::fill(dst, dst + d2 * kBK, uint16_t{0});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) dst[(c / 2) * 2 * kBK + 2 * r + (c % 2)] = src[r * row_stride + c];
}

// V for vdpbf16ps: dst[r / 2][c][r % 2] = V[r][c] (dst: [kBK / 2][dv][2]), zero-padded.
void pack_v_bf16(const uint16_t* src, int64_t row_stride, int64_t rows, int64_t D, int64_t dv, uint16_t* dst) {
  std::fill(dst, dst + kBK * dv, uint16_t{0});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) dst[(r / 2) * 2 * dv + 2 * c + (r % 2)] = src[r * row_stride + c];
}

// ---- forward ----------------------------------------------------------------------------------

// Per-thread scratch of the forward. K^T and V of the (batch, key/value head) a thread works on
// are packed tile by tile on first use and kept while the thread stays on that head (tasks are
// ordered head by head), so each key tile is packed about once per thread, not once per query
// tile.
struct ForwardScratch {
  uint64_t call = 0;  // the attention_forward call the packed tiles belong to
  int64_t b = -1, hk = -1;
  std::vector<uint8_t> packed;  // per key tile: packed yet?
  std::vector<float> q, kt, v, s, o, m, l, z;
  std::vector<uint16_t> qb, ktb, vb, pb;
};

template <bool NativeBf16>
void forward_tile(const Problem& p, uint64_t call, int64_t b, int64_t h, int64_t i0, const AttentionArgs& a,
                  ForwardScratch& w) {
  const int64_t rows = std::min(kBQ, p.Nq - i0), D = p.D, dv = round_up(D, W), d2 = round_up(D, 2);
  const int64_t hk = h / p.group(), k_tiles = (p.Nk + kBK - 1) / kBK, es = p.esize();
  const char* k = static_cast<const char*>(p.k) + (b * p.sk[0] + hk * p.sk[1]) * es;
  const char* v = static_cast<const char*>(p.v) + (b * p.sv[0] + hk * p.sv[1]) * es;
  if (w.call != call || w.b != b || w.hk != hk) {
    w.call = call, w.b = b, w.hk = hk;
    w.packed.assign(k_tiles, 0);
    if (NativeBf16) {
      w.ktb.resize(k_tiles * d2 * kBK);
      w.vb.resize(k_tiles * kBK * dv);
    } else {
      w.kt.resize(k_tiles * D * kBK);
      w.v.resize(k_tiles * kBK * dv);
    }
  }
  w.s.resize(kBQ * kBK);
  w.z.resize(kBK);
  w.o.assign(kBQ * dv, 0.0f);
  w.m.assign(kBQ, kNegInf);
  w.l.assign(kBQ, 0.0f);
  const char* q = p.row(p.q, p.sq, b, h, i0);
  if (NativeBf16) {
    w.qb.assign(kBQ * d2, 0);
    w.pb.resize(kBQ * kBK);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(w.qb.data() + r * d2, q + r * p.sq[2] * es, D * sizeof(uint16_t));
  } else {
    w.q.resize(kBQ * D);
    for (int64_t r = 0; r < rows; ++r) widen_row(q + r * p.sq[2] * es, p.dtype, D, w.q.data() + r * D);
  }

  const int64_t limit_first = p.row_limit(b, i0), limit_last = p.row_limit(b, i0 + rows - 1);
  for (int64_t j0 = 0; j0 < limit_last; j0 += kBK) {
    const int64_t n = std::min(kBK, p.Nk - j0), t = j0 / kBK;
    const Cover padding = padding_cover(p, b, j0, n);
    if (padding == Cover::All) continue;  // every key of the tile is padding
    const bool full = padding == Cover::None && limit_first >= j0 + n;
    // the keys row r of the tile sees (the tile's columns past the last row's are never computed)
    auto cols_of = [&](int64_t r) { return full ? n : std::clamp<int64_t>(p.row_limit(b, i0 + r) - j0, 0, n); };
    if (!w.packed[t]) {
      w.packed[t] = 1;
      if (NativeBf16) {
        pack_kt_bf16(reinterpret_cast<const uint16_t*>(k + j0 * p.sk[2] * es), p.sk[2], n, D, d2, w.ktb.data() + t * d2 * kBK);
        pack_v_bf16(reinterpret_cast<const uint16_t*>(v + j0 * p.sv[2] * es), p.sv[2], n, D, dv, w.vb.data() + t * kBK * dv);
      } else {
        pack_transposed(k + j0 * p.sk[2] * es, p.dtype, p.sk[2], n, D, w.kt.data() + t * D * kBK);
        pack_rows(v + j0 * p.sv[2] * es, p.dtype, p.sv[2], n, D, dv, w.v.data() + t * kBK * dv);
      }
    }

    // S = Q K^T over the columns each block of rows sees
    auto score_extent = [&](int64_t r0, int rb) { return Extent{round_up(cols_of(r0 + rb - 1), W), 0, NativeBf16 ? d2 : D}; };
    if (NativeBf16) {
      mm<Bf16>(rows, w.qb.data(), d2, w.ktb.data() + t * d2 * kBK, 2 * kBK, w.s.data(), kBK, false, score_extent);
    } else {
      mm<F32>(rows, w.q.data(), D, w.kt.data() + t * D * kBK, kBK, w.s.data(), kBK, false, score_extent);
    }

    // Online softmax, row by row: P overwrites S.
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s.data() + r * kBK;
      const int64_t cols = cols_of(r), cols_block = round_up(cols_of(std::min(rows, (r / kMR + 1) * kMR) - 1), W);
      float a2 = p.scale * kLog2e;
      if (!full || p.bias != nullptr || p.scale <= 0.0f) a2 = prepare_row(p, s, b, h, i0 + r, j0, cols, padding == Cover::Partial);
      const float m_new = running_max(w.m[r], row_max(s, cols) * a2);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // a row that has seen nothing yet
      const bool masked = !full || p.bias != nullptr;
      const float sum = NativeBf16 ? (masked ? exp_row<true, 3>(s, cols, cols_block, a2, m_use) : exp_row<false, 3>(s, cols, cols_block, a2, m_use))
                                   : (masked ? exp_row<true, 4>(s, cols, cols_block, a2, m_use) : exp_row<false, 4>(s, cols, cols_block, a2, m_use));
      const float alpha = std::exp2(w.m[r] - m_use);
      w.l[r] = w.l[r] * alpha + sum;
      w.m[r] = m_new;
      if (alpha != 1.0f) scale_row(w.o.data() + r * dv, dv, alpha);
      if (p.dropout.threshold > 0) {
        dropout_row(p.dropout, b, h, i0 + r, j0, cols, w.z.data());
        multiply_row(s, w.z.data(), cols);
      }
      if (NativeBf16) {
        uint16_t* pb = w.pb.data() + r * kBK;
        for_chunks(cols_block, [&](int64_t j, auto c) { store_as<DType::BF16>(pb, j, load(s + j, c), c); });
      }
    }

    // O += (P * Z) V over the keys each block of rows sees
    auto value_extent = [&](int64_t r0, int rb) { return Extent{dv, 0, round_up(cols_of(r0 + rb - 1), 2)}; };
    if (NativeBf16) {
      mm<Bf16>(rows, w.pb.data(), kBK, w.vb.data() + t * kBK * dv, 2 * dv, w.o.data(), dv, true, value_extent);
    } else {
      mm<F32>(rows, w.s.data(), kBK, w.v.data() + t * kBK * dv, dv, w.o.data(), dv, true, value_extent);
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = (b * p.Hq + h) * p.Nq + i0 + r;
    const float l = w.l[r];
    store_row(w.o.data() + r * dv, l > 0.0f ? 1.0f / l : 0.0f, D, static_cast<char*>(a.out.data) + row * D * es, p.dtype);
    a.lse.ptr<float>()[row] = row_lse(w.m[r], l);
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
// its sum l_c = sum_j exp2(s_j - m_c) and its unnormalised O_c = sum_j exp2(s_j - m_c) v_j. Then
// with M = max_c m_c and weights w_c = exp2(m_c - M) (0 for a range that saw nothing):
//   l = sum_c w_c l_c,  out = (sum_c w_c O_c) / l,  lse = (M + log2 l) ln 2
// which is what one pass over all the keys gives; a row no range saw (l = 0): out 0, lse -inf.

constexpr int64_t kDecodeRows = 16;  // most query rows per (batch, key/value head) on this path
constexpr int64_t kMinChunkKeys = 256;  // fewest keys worth a split-K task of their own
constexpr int64_t kDecodeWorkPerThread = int64_t{1} << 20;  // see decode_forward (measured break-even)
constexpr int kDecodeVecs = kRegisters >= 32 ? 4 : 2;  // vectors of O per register tile (4 rows)

struct DecodeScratch {
  std::vector<float> q, s, o, m, l, z;
};

template <class C>
inline Vec load_key(const void* src, DType dtype, int64_t i, C c) {
  return dtype == DType::F32 ? load_as<DType::F32>(src, i, c) : load_as<DType::BF16>(src, i, c);
}

// s[r * kBK + j] = q_r . k_j for rows r < R (q: [R][D]) and keys j < n, key j at element
// j * ks of k: W keys at a time, W accumulators over D, their lanes summed together.
void decode_scores(const float* q, int64_t R, const void* k, DType dtype, int64_t ks, int64_t n, int64_t D, float* s) {
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    int64_t key[W];  // element offsets of the W keys (past n: the last key again, result dropped)
    for (int t = 0; t < W; ++t) key[t] = std::min<int64_t>(j0 + t, n - 1) * ks;
    for (int64_t r = 0; r < R; ++r) {
      Vec acc[W];
      for (Vec& x : acc) x = Vec::zero();
      for_chunks(D, [&](int64_t c0, auto c) {
        const Vec qc = load(q + r * D + c0, c);
        for (int t = 0; t < W; ++t) acc[t] = fma(qc, load_key(k, dtype, key[t] + c0, c), acc[t]);
      });
      sum_lanes(acc).store(s + r * kBK + j0, static_cast<int>(std::min<int64_t>(W, n - j0)));
    }
  }
}

// o[r][:] += sum_{j < n} p[r * kBK + j] * v_j[:] for rows r < R (o: [R][dv]): tiles of RB rows x
// kDecodeVecs vectors held in registers over all n keys.
template <int RB>
void decode_accumulate_block(const float* p, const void* v, DType dtype, int64_t vs, int64_t n, int64_t D, int64_t c0,
                             float* o, int64_t dv) {
  constexpr int NV = kDecodeVecs;
  Vec acc[RB][NV];
  for (int t = 0; t < RB; ++t)
    for (int u = 0; u < NV; ++u) acc[t][u] = c0 + u * W < dv ? Vec::load(o + t * dv + c0 + u * W) : Vec::zero();
  for (int64_t j = 0; j < n; ++j) {
    Vec vj[NV];
    for (int u = 0; u < NV; ++u) {
      const int64_t col = c0 + u * W;
      vj[u] = col + W <= D ? load_key(v, dtype, j * vs + col, Full{})
              : col < D    ? load_key(v, dtype, j * vs + col, Part{static_cast<int>(D - col)})
                           : Vec::zero();
    }
    for (int t = 0; t < RB; ++t) {
      const Vec pj(p[t * kBK + j]);
      for (int u = 0; u < NV; ++u) acc[t][u] = fma(pj, vj[u], acc[t][u]);
    }
  }
  for (int t = 0; t < RB; ++t)
    for (int u = 0; u < NV; ++u)
      if (c0 + u * W < dv) acc[t][u].store(o + t * dv + c0 + u * W);
}

void decode_accumulate(const float* p, int64_t R, const void* v, DType dtype, int64_t vs, int64_t n, int64_t D,
                       int64_t dv, float* o) {
  for (int64_t c0 = 0; c0 < dv; c0 += kDecodeVecs * W) {
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) decode_accumulate_block<4>(p + r * kBK, v, dtype, vs, n, D, c0, o + r * dv, dv);
    switch (R - r) {
      case 3: decode_accumulate_block<3>(p + r * kBK, v, dtype, vs, n, D, c0, o + r * dv, dv); break;
      case 2: decode_accumulate_block<2>(p + r * kBK, v, dtype, vs, n, D, c0, o + r * dv, dv); break;
      case 1: decode_accumulate_block<1>(p + r * kBK, v, dtype, vs, n, D, c0, o + r * dv, dv); break;
      default: break;
    }
  }
}

// Keys [j_begin, j_end) of (b, hk) for all its R = group * Nq rows: leaves the unnormalised
// w.o [R][dv], the running max w.m (base 2) and the sum w.l of every row.
void decode_key_range(const Problem& p, int64_t b, int64_t hk, int64_t j_begin, int64_t j_end, DecodeScratch& w) {
  const int64_t R = p.group() * p.Nq, D = p.D, dv = round_up(D, W), es = p.esize();
  const char* k = static_cast<const char*>(p.k) + (b * p.sk[0] + hk * p.sk[1]) * es;
  const char* v = static_cast<const char*>(p.v) + (b * p.sv[0] + hk * p.sv[1]) * es;
  w.q.resize(R * D);
  for (int64_t r = 0; r < R; ++r) widen_row(p.row(p.q, p.sq, b, hk * p.group() + r / p.Nq, r % p.Nq), p.dtype, D, w.q.data() + r * D);
  w.s.resize(R * kBK);
  w.z.resize(kBK);
  w.o.assign(R * dv, 0.0f);
  w.m.assign(R, kNegInf);
  w.l.assign(R, 0.0f);

  // Query 0 sees the fewest keys and query Nq - 1 the most (row_limit grows with i).
  const int64_t limit_first = p.row_limit(b, 0), limit_last = p.row_limit(b, p.Nq - 1);
  for (int64_t j0 = j_begin; j0 < std::min(j_end, limit_last); j0 += kBK) {
    const int64_t n = std::min(kBK, j_end - j0);
    const Cover padding = padding_cover(p, b, j0, n);
    if (padding == Cover::All) continue;
    const bool full = padding == Cover::None && limit_first >= j0 + n;
    decode_scores(w.q.data(), R, k + j0 * p.sk[2] * es, p.dtype, p.sk[2], n, D, w.s.data());

    // Online softmax per row, as in forward_tile: P overwrites S (zeros past each row's keys).
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * p.group() + r / p.Nq, i = r % p.Nq;
      float* s = w.s.data() + r * kBK;
      const int64_t cols = full ? n : std::clamp<int64_t>(p.row_limit(b, i) - j0, 0, n);
      float a2 = p.scale * kLog2e;
      if (!full || p.bias != nullptr || p.scale <= 0.0f) a2 = prepare_row(p, s, b, h, i, j0, cols, padding == Cover::Partial);
      const float m_new = running_max(w.m[r], row_max(s, cols) * a2);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      const float sum = exp_row<true, 4>(s, cols, kBK, a2, m_use);
      const float alpha = std::exp2(w.m[r] - m_use);
      w.l[r] = w.l[r] * alpha + sum;
      w.m[r] = m_new;
      if (alpha != 1.0f) scale_row(w.o.data() + r * dv, dv, alpha);
      if (p.dropout.threshold > 0) {
        dropout_row(p.dropout, b, h, i, j0, cols, w.z.data());
        multiply_row(s, w.z.data(), cols);
      }
    }
    decode_accumulate(w.s.data(), R, v + j0 * p.sv[2] * es, p.dtype, p.sv[2], n, D, dv, w.o.data());
  }
}

// out and lse of row r of (b, hk) from its unnormalised o, sum l and max m (base 2).
void decode_store_row(const Problem& p, const AttentionArgs& a, int64_t b, int64_t hk, int64_t r, const float* o, float l,
                      float m) {
  const int64_t h = hk * p.group() + r / p.Nq, i = r % p.Nq;
  const int64_t row = (b * p.Hq + h) * p.Nq + i;
  store_row(o, l > 0.0f ? 1.0f / l : 0.0f, p.D, static_cast<char*>(a.out.data) + row * p.D * p.esize(), p.dtype);
  a.lse.ptr<float>()[row] = row_lse(m, l);
}

void decode_forward(const Problem& p, const AttentionArgs& a) {
  const int64_t R = p.group() * p.Nq, dv = round_up(p.D, W), heads = p.B * p.Hkv;
  const int64_t k_tiles = (p.Nk + kBK - 1) / kBK;
  // Waking a pool thread costs tens of microseconds, as much as a small call's whole work: one
  // thread per kDecodeWorkPerThread multiply-adds and K/V elements (about 1 + R per K/V element).
  const int64_t work = heads * p.Nk * p.D * (R + 1);
  const int num_threads = static_cast<int>(std::clamp<int64_t>(work / kDecodeWorkPerThread, 1, std::max(a.num_threads, 1)));
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
      decode_key_range(p, b, hk, 0, p.Nk, w);
      for (int64_t r = 0; r < R; ++r) decode_store_row(p, a, b, hk, r, w.o.data() + r * dv, w.l[r], w.m[r]);
    });
    return;
  }

  // Partial results per (head, chunk): R rows of [o (dv floats), m, l].
  const int64_t stride = dv + 2;
  std::vector<float> partial(heads * chunks * R * stride);
  parallel_for(heads * chunks, num_threads, [&](int64_t task) {
    thread_local DecodeScratch w;
    const int64_t c = task % chunks, b = task / chunks / p.Hkv, hk = task / chunks % p.Hkv;
    decode_key_range(p, b, hk, chunk_begin(c), chunk_begin(c + 1), w);
    float* dst = partial.data() + task * R * stride;
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(dst + r * stride, w.o.data() + r * dv, dv * sizeof(float));
      dst[r * stride + dv] = w.m[r];
      dst[r * stride + dv + 1] = w.l[r];
    }
  });
  // Merge the chunks of each row: out = sum_c w_c O_c / l as in the split-K comment above.
  parallel_for(heads, num_threads, [&](int64_t head) {
    const int64_t b = head / p.Hkv, hk = head % p.Hkv;
    std::vector<float> o(dv);
    for (int64_t r = 0; r < R; ++r) {
      auto part = [&](int64_t c) { return partial.data() + ((head * chunks + c) * R + r) * stride; };
      float M = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) M = running_max(M, part(c)[dv]);
      std::fill(o.begin(), o.end(), 0.0f);
      float l = 0.0f;
      if (M != kNegInf) {
        for (int64_t c = 0; c < chunks; ++c) {
          const float* pc = part(c);
          const float wc = std::exp2(pc[dv] - M);  // 0 for a chunk that saw nothing (m_c = -inf)
          if (wc == 0.0f) continue;
          l += wc * pc[dv + 1];
          for (int64_t d = 0; d < dv; ++d) o[d] += wc * pc[d];
        }
      }
      decode_store_row(p, a, b, hk, r, o.data(), l, M);
    }
  });
}

void forward(const Problem& p, const AttentionArgs& a) {
  if (p.Nq * p.group() <= kDecodeRows) return decode_forward(p, a);
  const bool native_bf16 = kNativeBf16 && p.dtype == DType::BF16;
  const uint64_t call = forward_calls.fetch_add(1) + 1;
  const int64_t q_tiles = (p.Nq + kBQ - 1) / kBQ;
  parallel_for(p.B * p.Hq * q_tiles, a.num_threads, [&](int64_t task) {
    thread_local ForwardScratch scratch;
    // Last query tiles first: under a causal mask they see the most keys (better balance).
    const int64_t tile = q_tiles - 1 - task % q_tiles, bh = task / q_tiles;
    if (native_bf16) forward_tile<true>(p, call, bh / p.Hq, bh % p.Hq, tile * kBQ, a, scratch);
    else forward_tile<false>(p, call, bh / p.Hq, bh % p.Hq, tile * kBQ, a, scratch);
  });
}

// ---- backward --------------------------------------------------------------------------------

constexpr int64_t kBQB = 48;  // query rows per backward step

struct BackwardScratch {
  std::vector<float> kt, vt, kr, dkt, dvt, q, qt, dout, doutt, s, dp, z;
  std::vector<Cover> padding;
};

// Keys of tiles [first, last) of (b, hk): packs them once (K^T, V^T, K), then for every query head
// of the group and every query tile, loads Q and dO (and their transposes) once and visits the
// key tiles it sees. dK^T and dV^T accumulate over the whole range (float32, O(range D)) and are
// written, transposed back, at the end.
void backward_key_range(const Problem& p, const AttentionArgs& a, int64_t b, int64_t hk, int64_t first, int64_t last,
                        const float* delta, float* dq, BackwardScratch& w) {
  const int64_t D = p.D, dv = round_up(D, W), tiles = last - first, j_begin = first * kBK, es = p.esize();
  const int64_t j_end = std::min(p.Nk, last * kBK);
  const char* k = static_cast<const char*>(p.k) + (b * p.sk[0] + hk * p.sk[1]) * es;
  const char* v = static_cast<const char*>(p.v) + (b * p.sv[0] + hk * p.sv[1]) * es;
  const float* lse = a.lse.ptr<const float>();
  float* dbias = a.dbias.ptr<float>();

  w.kt.resize(tiles * D * kBK);
  w.vt.resize(tiles * D * kBK);
  w.kr.resize(tiles * kBK * dv);
  w.dkt.assign(tiles * dv * kBK, 0.0f);
  w.dvt.assign(tiles * dv * kBK, 0.0f);
  w.padding.resize(tiles);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t j0 = (first + t) * kBK, n = std::min(kBK, p.Nk - j0);
    w.padding[t] = padding_cover(p, b, j0, n);
    pack_transposed(k + j0 * p.sk[2] * es, p.dtype, p.sk[2], n, D, w.kt.data() + t * D * kBK);
    pack_transposed(v + j0 * p.sv[2] * es, p.dtype, p.sv[2], n, D, w.vt.data() + t * D * kBK);
    pack_rows(k + j0 * p.sk[2] * es, p.dtype, p.sk[2], n, D, dv, w.kr.data() + t * kBK * dv);
  }
  w.q.resize(kBQB * dv);
  w.dout.resize(kBQB * dv);
  w.qt.resize(dv * kBQB);
  w.doutt.resize(dv * kBQB);
  w.s.resize(kBQB * kBK);
  w.dp.resize(kBQB * kBK);
  w.z.resize(kBK);
  const float a2_default = p.scale * kLog2e;

  for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
    for (int64_t i0 = 0; i0 < p.Nq; i0 += kBQB) {
      const int64_t rows = std::min(kBQB, p.Nq - i0);
      const int64_t limit_first = p.row_limit(b, i0), limit_last = p.row_limit(b, i0 + rows - 1);
      if (limit_last <= j_begin) continue;  // the mask hides this query tile from the whole range
      const int64_t row0 = (b * p.Hq + h) * p.Nq + i0;  // first row of the tile in out / lse / dq
      for (int64_t r = 0; r < rows; ++r) {
        load_row(p.row(p.q, p.sq, b, h, i0 + r), p.dtype, D, dv, w.q.data() + r * dv);
        load_row(static_cast<const char*>(a.grad_out.data) + (row0 + r) * D * es, p.dtype, D, dv, w.dout.data() + r * dv);
      }
      for (int64_t c = 0; c < dv; ++c)  // Q^T, dO^T: the A operands of dK^T, dV^T
        for (int64_t r = 0; r < kBQB; ++r) {
          w.qt[c * kBQB + r] = r < rows ? w.q[r * dv + c] : 0.0f;
          w.doutt[c * kBQB + r] = r < rows ? w.dout[r * dv + c] : 0.0f;
        }

      for (int64_t j0 = j_begin; j0 < std::min(j_end, limit_last); j0 += kBK) {
        const int64_t t = j0 / kBK - first, n = std::min(kBK, p.Nk - j0);
        if (w.padding[t] == Cover::All) continue;
        const bool full = w.padding[t] == Cover::None && limit_first >= j0 + n;
        auto cols_of = [&](int64_t r) {
          if (lse[row0 + r] == kNegInf) return int64_t{0};  // the row sees nothing: P = 0
          return full ? n : std::clamp<int64_t>(p.row_limit(b, i0 + r) - j0, 0, n);
        };
        auto extent = [&](int64_t r0, int rb) {
          int64_t cols = 0;
          for (int r = 0; r < rb; ++r) cols = std::max(cols, cols_of(r0 + r));
          return Extent{round_up(cols, W), 0, D};
        };
        const int64_t n_cols = round_up(n, W);
        // P = exp2(S a2 - lse log2 e), 0 where hidden or where the row saw nothing
        mm<F32>(rows, w.q.data(), dv, w.kt.data() + t * D * kBK, kBK, w.s.data(), kBK, false, extent);
        mm<F32>(rows, w.dout.data(), dv, w.vt.data() + t * D * kBK, kBK, w.dp.data(), kBK, false, extent);  // dP = dO V^T
        for (int64_t r = 0; r < rows; ++r) {
          float* s = w.s.data() + r * kBK;
          float* ds = w.dp.data() + r * kBK;
          const int64_t cols = cols_of(r);
          float a2 = a2_default;
          if (cols > 0 && (!full || p.bias != nullptr || p.scale <= 0.0f))
            a2 = prepare_row(p, s, b, h, i0 + r, j0, cols, w.padding[t] == Cover::Partial);
          exp_row<true, 4>(s, cols, n_cols, a2, cols > 0 ? lse[row0 + r] * kLog2e : 0.0f);
          // dS = P * (dP * Z - delta); dbias = dS; then dS *= scale (and P *= Z for dV)
          const Vec d(delta[row0 + r]), vscale(p.scale);
          if (p.dropout.threshold > 0) {
            dropout_row(p.dropout, b, h, i0 + r, j0, cols, w.z.data());
            multiply_row(ds, w.z.data(), cols);
          }
          for_chunks(n_cols, [&](int64_t j, auto c) { store(load(s + j, c) * (load(ds + j, c) - d), ds + j, c); });
          if (dbias != nullptr) std::memcpy(dbias + (row0 + r) * p.Nk + j0, ds, n * sizeof(float));
          for_chunks(n_cols, [&](int64_t j, auto c) { store(load(ds + j, c) * vscale, ds + j, c); });
          if (p.dropout.threshold > 0) multiply_row(s, w.z.data(), cols);
        }
        float* dkt = w.dkt.data() + t * dv * kBK;
        float* dvt = w.dvt.data() + t * dv * kBK;
        auto all = [&](int64_t, int) { return Extent{n_cols, 0, rows}; };
        mm<F32>(dv, w.doutt.data(), kBQB, w.s.data(), kBK, dvt, kBK, true, all);  // dV^T += dO^T (P * Z)
        mm<F32>(dv, w.qt.data(), kBQB, w.dp.data(), kBK, dkt, kBK, true, all);    // dK^T += Q^T dS
        auto keys = [&](int64_t r0, int rb) {  // dQ += dS K over the keys the rows see
          int64_t cols = 0;
          for (int r = 0; r < rb; ++r) cols = std::max(cols, cols_of(r0 + r));
          return Extent{dv, 0, cols};
        };
        mm<F32>(rows, w.dp.data(), kBK, w.kr.data() + t * kBK * dv, dv, dq + row0 * round_up(D, 16), round_up(D, 16), true, keys);
      }
    }
  }
  float* dk_out = a.dk.ptr<float>() + ((b * p.Hkv + hk) * p.Nk + j_begin) * D;
  float* dv_out = a.dv.ptr<float>() + ((b * p.Hkv + hk) * p.Nk + j_begin) * D;
  for (int64_t j = 0; j < j_end - j_begin; ++j) {
    const int64_t t = j / kBK, jj = j % kBK;
    for (int64_t c = 0; c < D; ++c) {
      dk_out[j * D + c] = w.dkt[(t * dv + c) * kBK + jj];
      dv_out[j * D + c] = w.dvt[(t * dv + c) * kBK + jj];
    }
  }
}

void backward(const Problem& p, const AttentionArgs& a) {
  const int64_t k_tiles = (p.Nk + kBK - 1) / kBK, rows = p.B * p.Hq * p.Nq, splits = a.dq.size(0);
  const int64_t dq_stride = p.B * p.Hq * p.Nq * round_up(p.D, 16);
  // delta_i = sum_d dO[i, d] * O[i, d], once per query row
  std::vector<float> delta(rows);
  const char* grad_out = static_cast<const char*>(a.grad_out.data);
  const char* out = static_cast<const char*>(a.out.data);
  const int64_t es = p.esize(), D = p.D;
  parallel_for((rows + 255) / 256, a.num_threads, [&](int64_t task) {
    for (int64_t i = task * 256; i < std::min(rows, (task + 1) * 256); ++i) {
      Vec sum = Vec::zero();
      for_chunks(D, [&](int64_t c0, auto c) {
        sum = fma(load_any(grad_out + i * D * es, p.dtype, c0, c), load_any(out + i * D * es, p.dtype, c0, c), sum);
      });
      delta[i] = sum.reduce_add();
    }
  });
  parallel_for(p.B * p.Hkv * splits, a.num_threads, [&](int64_t task) {
    thread_local BackwardScratch scratch;
    const int64_t split = task % splits, bh = task / splits;
    const int64_t first = split * k_tiles / splits, last = (split + 1) * k_tiles / splits;
    if (first == last) return;
    backward_key_range(p, a, bh / p.Hkv, bh % p.Hkv, first, last, delta.data(), a.dq.ptr<float>() + split * dq_stride,
                       scratch);
  });
}

// This level's entry kernels, one row of the table in common/for_each_isa.h.
constexpr Kernels kernels{forward, backward};
