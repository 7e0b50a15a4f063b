// The dense decode GEMV, written once over the vector types (cpu/dense_gemv.cpp compiles it per
// ISA level): out[m, n] = sum_k x[m, k] w[n, k] + bias[n] for a few rows of x (decode: M = 1) and a
// float32 or bf16 weight W [N, K] with unit stride along K, read once, row after row.
//
// Each task owns a contiguous run of rows of W (one stream per thread); a pass takes kRows rows of
// W against every row of x, with one vector accumulator per (row of x, row of W), and reduces them
// at the end of the row. Numerics: every product is exact in float32 (float32 x float32 by FMA;
// bf16 x bf16 by vdpbf16ps where the CPU has it, else widened to float32 and FMA) and the sums are
// float32, lane-parallel then reduced; the bias is added in float32 and the result rounded once to
// x's dtype.

constexpr int kRows = 4;  // rows of W per pass

// x (float32 rows K apart; bf16 pairs `xb` as well when `native`) against rows w .. w + RT - 1
// (ldw elements apart): sums[m][r] for the MT rows of x.
template <int MT, int RT, DType WT, bool native>
void dot_rows(const float* x, const uint16_t* xb, int64_t K, const void* w, int64_t ldw, float (&sums)[MT][kRows]) {
  using WElem = std::conditional_t<WT == DType::F32, float, uint16_t>;
  const WElem* wp = static_cast<const WElem*>(w);
  Vec acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc[m][r] = Vec::zero();
  int64_t k = 0;
  if constexpr (native) {  // bf16 x bf16: 2W elements per vdpbf16ps
    for (; k + 2 * W <= K; k += 2 * W) {
      BVec xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = BVec::load(xb + m * K + k);
      for (int r = 0; r < RT; ++r) {
        const BVec wv = BVec::load(wp + r * ldw + k);
        for (int m = 0; m < MT; ++m) acc[m][r] = dot2(acc[m][r], wv, xv[m]);
      }
    }
  }
  for_chunks(K - k, [&](int64_t i, auto c) {  // float32 FMAs (all of K, or the tail of the bf16 loop)
    Vec xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = load(x + m * K + k + i, c);
    for (int r = 0; r < RT; ++r) {
      const Vec wv = load_as<WT>(wp + r * ldw, k + i, c);
      for (int m = 0; m < MT; ++m) acc[m][r] = fma(wv, xv[m], acc[m][r]);
    }
  });
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) sums[m][r] = acc[m][r].reduce_add();
}

template <int MT, DType WT, bool native>
void gemv_rows(const GemvArgs& a, const float* xf, const uint16_t* xb, int64_t n_begin, int64_t n_end) {
  const int64_t K = a.x.size(1), N = a.out.size(1), ldw = a.w.stride(0);
  const float* bias = a.bias.ptr<const float>();
  const char* w = static_cast<const char*>(a.w.data);
  const int64_t w_row_bytes = ldw * dtype_size(WT);
  float sums[MT][kRows];
  for (int64_t n = n_begin; n < n_end; n += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, n_end - n);
    const void* wn = w + n * w_row_bytes;
    switch (rows) {
      case 4: dot_rows<MT, 4, WT, native>(xf, xb, K, wn, ldw, sums); break;
      case 3: dot_rows<MT, 3, WT, native>(xf, xb, K, wn, ldw, sums); break;
      case 2: dot_rows<MT, 2, WT, native>(xf, xb, K, wn, ldw, sums); break;
      default: dot_rows<MT, 1, WT, native>(xf, xb, K, wn, ldw, sums); break;
    }
    for (int m = 0; m < MT; ++m)
      for (int64_t r = 0; r < rows; ++r)
        store_from_float(a.out.data, a.out.dtype, m * N + n + r, sums[m][r] + (bias ? bias[n + r] : 0.0f));
  }
}

template <int MT>
void gemv_m(const GemvArgs& a, const float* xf, const uint16_t* xb, bool native, int64_t n_begin, int64_t n_end) {
  if (a.w.dtype == DType::F32) return gemv_rows<MT, DType::F32, false>(a, xf, xb, n_begin, n_end);
  if constexpr (kNativeBf16) {
    if (native) return gemv_rows<MT, DType::BF16, true>(a, xf, xb, n_begin, n_end);
  }
  gemv_rows<MT, DType::BF16, false>(a, xf, xb, n_begin, n_end);
}

void dense_gemv(const GemvArgs& a) {
  const int64_t M = a.x.size(0), K = a.x.size(1), N = a.out.size(1), stride_xm = a.x.stride(0);
  const bool native = kNativeBf16 && a.w.dtype == DType::BF16 && a.x.dtype == DType::BF16;
  // x once per call as float32 rows K apart (and as bf16 pairs for vdpbf16ps: bf16 x is exact there)
  std::vector<float> xf(static_cast<size_t>(M * K));
  std::vector<uint16_t> xb(native ? static_cast<size_t>(M * K) : 0);
  for (int64_t m = 0; m < M; ++m) {
    const char* row = static_cast<const char*>(a.x.data) + m * stride_xm * dtype_size(a.x.dtype);
    widen_row(row, a.x.dtype, K, xf.data() + m * K);
    if (native) std::memcpy(xb.data() + m * K, row, static_cast<size_t>(K) * sizeof(uint16_t));
  }
  // A few long runs of rows per thread (the stream prefetchers restart at every jump), rounded to
  // whole passes, still several per thread for balance.
  const int threads = std::max(a.num_threads, 1);
  const Tasks runs(N, std::max<int64_t>(kRows, N / (4 * threads) / kRows * kRows));
  parallel_for(runs.count, threads, [&](int64_t task) {
    const int64_t n0 = runs.begin(task), n1 = runs.end(task, N);
    switch (M) {
      case 1: return gemv_m<1>(a, xf.data(), xb.data(), native, n0, n1);
      case 2: return gemv_m<2>(a, xf.data(), xb.data(), native, n0, n1);
      case 3: return gemv_m<3>(a, xf.data(), xb.data(), native, n0, n1);
      default: return gemv_m<4>(a, xf.data(), xb.data(), native, n0, n1);
    }
  });
}

// This level's entry kernels, one row of the table in common/for_each_isa.h.
constexpr Kernels kernels{dense_gemv};
