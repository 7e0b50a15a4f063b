// The GEMMs of a LoRA layer in training, written once over common/vec.h (lora_gemm.cpp includes this
// file once per ISA level through common/for_each_isa.h, hence no include guard):
//
//   forward (transposed 0):   out[M, n] (+)= a[M, k] Wᵀ + a2[M, r] w2ᵀ      w2 = s·B [n, r]
//   gradient (transposed 1):  out[M, k] (+)= a[M, n] W  + a2[M, r] w2       w2 = A  [r, k]
//
// W [n, k] is the frozen base weight, dense (float32 or bf16) or NF4 in bitsandbytes' layout
// (reference/nf4.py); the optional second segment is the adapter, so its term lands in the same
// accumulators as the base product: no second pass over out, and an NF4 weight is decoded tile by
// tile, never as a whole.
//
// Blocking (GotoBLAS / BLIS order). R is the reduction length (k forward, n for the gradient), C the
// output columns (n forward, k for the gradient). A task owns kPanelCols output columns for every
// row of a. It walks the reduction (the base's, then the adapter's) in blocks, packs the block of
// the weight it needs into a panel (float32, or bf16 pairs where a is bf16 and the CPU has bf16
// dot products) -- decoding NF4 on the way --, and runs the register-tile microkernel over all rows
// of a against the panel, which stays in L2 (a few hundred KiB) while the rows stream past it.
//
// Panels. A panel is kPanelSlabs slabs of kTileCols output columns; a slab holds, per reduction
// step, the kTileCols weights the microkernel multiplies: float32 [steps][kTileCols], or bf16
// [pairs][kTileCols][2] where pair q holds reduction steps 2q and 2q + 1 of each column (vdpbf16ps
// multiplies such pairs by the pair (a[m, 2q], a[m, 2q + 1]) broadcast to every lane, summing in
// float32).

// Register tiles: kTileRows rows of a by kTileCols = kTileVecs vectors of output columns.
constexpr int kTileRows = kRegisters >= 32 ? 6 : 4;
constexpr int kTileVecs = kRegisters >= 32 ? 4 : 3;  // AVX2: 12 accumulators + 3 panel vectors + 1 broadcast
constexpr int64_t kTileCols = kTileVecs * W;
constexpr int64_t kPanelSlabs = kRegisters >= 32 ? 2 : 4;
constexpr int64_t kPanelCols = kPanelSlabs * kTileCols;  // 128 (AVX-512), 96 (AVX2 and scalar)
constexpr int64_t kPanelBytes = 384 << 10;               // the packed panel's size budget (L2)
constexpr int64_t kChunk = 2 * W;                        // NF4 elements decoded from W bytes at once

// A weight matrix the GEMM reads rows of: dense (float32 / bf16, `ld` elements between rows) or
// NF4 (rows of `cols` elements in blocks of `blocksize`).
struct Source {
  const void* w = nullptr;
  DType dtype = DType::F32;
  int64_t ld = 0;
  const uint8_t* data = nullptr;  // NF4 when set
  const float* absmax = nullptr;
  const float* code = nullptr;
  int64_t blocksize = 64, cols = 0;

  // Elements [j0, j0 + len) of row i as float32 into dst. NF4: j0 and len multiples of kChunk
  // (which divides the blocksize: a chunk lies in one block and shares its scale).
  void row(int64_t i, int64_t j0, int64_t len, float* dst) const {
    if (data == nullptr) {
      for_chunks(len, [&](int64_t j, auto c) { store(load_any(w, dtype, i * ld + j0 + j, c), dst + j, c); });
      return;
    }
    const int64_t flat0 = i * cols + j0;
    for (int64_t j = 0; j < len;) {
      const int64_t block = (flat0 + j) / blocksize;
      const int64_t end = std::min(len, (block + 1) * blocksize - flat0);
      const Lut16 table(code, absmax[block]);
      for (; j < end; j += kChunk) {
        const IVec bytes = IVec::load_u8(data + (flat0 + j) / 2);
        Vec first, second;  // back in element order
        zip(table.lookup(shr<4>(bytes)), table.lookup(bytes), first, second);
        first.store(dst + j);
        second.store(dst + j + W);
      }
    }
  }
};

// One segment of the reduction: a [M, R] times its weight.
struct Segment {
  const void* a;
  int64_t lda, R;
  Source src;
};

// ---- packing ----------------------------------------------------------------------------------
// Reduction steps [r0, r0 + steps), output columns [c0, c0 + cols) (cols <= kPanelCols; the panel's
// columns past them are zeros). tmp: room for max(2 kPanelCols, steps) floats.

// Forward: step j, column i is W[i, j]: each column is a row of W, read along the reduction.
template <bool Bf16>
void pack_forward(const Source& src, int64_t r0, int64_t steps, int64_t c0, int64_t cols, void* panel, float* tmp) {
  const int64_t pairs = steps / 2;
  for (int64_t c = 0; c < kPanelCols; ++c) {
    const int64_t slab = c / kTileCols, at = c % kTileCols;
    if (c < cols) src.row(c0 + c, r0, steps, tmp);
    else std::fill_n(tmp, steps, 0.0f);
    if constexpr (Bf16) {
      uint32_t* dst = static_cast<uint32_t*>(panel) + slab * pairs * kTileCols + at;
      for (int64_t q = 0; q < pairs; ++q)
        dst[q * kTileCols] = uint32_t{float_to_bf16(tmp[2 * q])} | (uint32_t{float_to_bf16(tmp[2 * q + 1])} << 16);
    } else {
      float* dst = static_cast<float*>(panel) + slab * steps * kTileCols + at;
      for (int64_t j = 0; j < steps; ++j) dst[j * kTileCols] = tmp[j];
    }
  }
}

// Gradient: step i, column j is W[i, j]: rows of W, read along the output columns.
template <bool Bf16>
void pack_gradient(const Source& src, int64_t r0, int64_t steps, int64_t c0, int64_t cols, void* panel, float* tmp) {
  float* t0 = tmp;
  float* t1 = tmp + kPanelCols;
  const int64_t read = src.data ? (cols + kChunk - 1) / kChunk * kChunk : cols;  // NF4: whole chunks (k % 32 == 0)
  auto row = [&](int64_t i, float* dst) {
    src.row(i, c0, read, dst);
    std::fill(dst + cols, dst + kPanelCols, 0.0f);
  };
  if constexpr (Bf16) {
    const int64_t pairs = steps / 2;
    for (int64_t q = 0; q < pairs; ++q) {
      row(r0 + 2 * q, t0);
      row(r0 + 2 * q + 1, t1);
      for (int64_t c = 0; c < kPanelCols; c += W) {  // W columns of two rows -> W pairs, in one slab
        const int64_t slab = c / kTileCols, at = c % kTileCols;
        uint16_t* dst = static_cast<uint16_t*>(panel) + ((slab * pairs + q) * kTileCols + at) * 2;
        Vec lo, hi;
        zip(Vec::load(t0 + c), Vec::load(t1 + c), lo, hi);
        lo.store_bf16(dst);
        hi.store_bf16(dst + W);
      }
    }
  } else {
    for (int64_t i = 0; i < steps; ++i) {
      row(r0 + i, t0);
      for (int64_t slab = 0; slab < kPanelSlabs; ++slab)
        std::copy_n(t0 + slab * kTileCols, kTileCols, static_cast<float*>(panel) + (slab * steps + i) * kTileCols);
    }
  }
}

// ---- microkernels: out[rows, cols] (+)= a[rows, steps] x slab ------------------------------------
// a: the tile's first row (rows past `rows` read the last row again, their results dropped); out:
// float32, ldo apart; `add`: accumulate onto out.

// One accumulator vector onto out: its first n lanes, added to what is there when `add`. The
// microkernels call it per vector with the value (passing their accumulator array by address would
// keep the array in memory through the reduction loop).
inline void store_acc(Vec r, float* out, int64_t n, bool add) {
  if (n >= W) {
    if (add) r = r + Vec::load(out);
    r.store(out);
  } else {
    if (add) r = r + Vec::load(out, static_cast<int>(n));
    r.store(out, static_cast<int>(n));
  }
}

// Not inlined into the GEMM's loops: there the register allocator spilled the 24 accumulators on
// every reduction step (2.7x slower).
template <int MR>
__attribute__((noinline)) void tile_f32(const float* a, int64_t lda, const float* slab, int64_t steps, float* out, int64_t ldo, int rows,
              int64_t cols, bool add) {
  constexpr int V = kTileVecs;
  Vec acc[MR][V];
  for (auto& r : acc)
    for (Vec& v : r) v = Vec::zero();
  const float* row[MR];
  for (int i = 0; i < MR; ++i) row[i] = a + std::min(i, rows - 1) * lda;
  for (int64_t j = 0; j < steps; ++j) {
    Vec b[V];
    for (int v = 0; v < V; ++v) b[v] = Vec::load(slab + j * kTileCols + v * W);
    for (int i = 0; i < MR; ++i) {
      const Vec x(row[i][j]);
      for (int v = 0; v < V; ++v) acc[i][v] = fma(x, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)  // compile-time indices (unrolled): the accumulators stay in registers
    for (int v = 0; v < V; ++v)
      if (i < rows && v * W < cols) store_acc(acc[i][v], out + i * ldo + v * W, cols - v * W, add);
}

template <int MR>
__attribute__((noinline)) void tile_bf16(const uint16_t* a, int64_t lda, const uint16_t* slab, int64_t pairs, float* out, int64_t ldo, int rows,
               int64_t cols, bool add) {
  constexpr int V = kTileVecs;
  Vec acc[MR][V];
  for (auto& r : acc)
    for (Vec& v : r) v = Vec::zero();
  const uint16_t* row[MR];
  for (int i = 0; i < MR; ++i) row[i] = a + std::min(i, rows - 1) * lda;
  for (int64_t q = 0; q < pairs; ++q) {
    BVec b[V];
    for (int v = 0; v < V; ++v) b[v] = BVec::load(slab + (q * kTileCols + v * W) * 2);
    for (int i = 0; i < MR; ++i) {
      const BVec x = BVec::broadcast_pair(row[i] + 2 * q);
      for (int v = 0; v < V; ++v) acc[i][v] = dot2(acc[i][v], x, b[v]);
    }
  }
  for (int i = 0; i < MR; ++i)  // compile-time indices (unrolled): the accumulators stay in registers
    for (int v = 0; v < V; ++v)
      if (i < rows && v * W < cols) store_acc(acc[i][v], out + i * ldo + v * W, cols - v * W, add);
}

// ---- the GEMM ---------------------------------------------------------------------------------

template <bool Bf16>
void gemm(const LoraGemmArgs& p) {
  const int64_t M = p.a.size(0), C = p.out.size(1);
  const bool forward = p.transposed == 0;
  const bool out_f32 = p.out.dtype == DType::F32;
  Source base;
  if (p.w) {
    base.w = p.w.data, base.dtype = p.w.dtype, base.ld = p.w.stride(0);
  } else {
    base.data = p.data.ptr<const uint8_t>(), base.absmax = p.absmax.ptr<const float>(), base.code = p.code.ptr<const float>();
    base.blocksize = p.blocksize, base.cols = p.k;
  }
  std::vector<Segment> segments{{p.a.data, p.a.stride(0), p.a.size(1), base}};
  if (p.a2) {
    Source adapter;
    adapter.w = p.w2.data, adapter.dtype = p.w2.dtype, adapter.ld = p.w2.stride(0);
    segments.push_back({p.a2.data, p.a2.stride(0), p.a2.size(1), adapter});
  }
  // Reduction blocks: the panel's budget, a multiple of kChunk (NF4 rows are decoded along it).
  const int64_t elem = Bf16 ? 2 : 4;
  const int64_t step = std::max<int64_t>(kChunk, kPanelBytes / (kPanelCols * elem) / kChunk * kChunk);
  int64_t max_steps = 0;
  for (const Segment& s : segments) max_steps = std::max(max_steps, std::min(step, s.R));
  const int64_t tasks = (C + kPanelCols - 1) / kPanelCols;
  parallel_for(tasks, p.num_threads, [&](int64_t task) {
    const int64_t c0 = task * kPanelCols, cols = std::min(kPanelCols, C - c0);
    std::vector<float> tmp(static_cast<size_t>(std::max<int64_t>(2 * kPanelCols, max_steps)));
    std::vector<float> panel_store(static_cast<size_t>((max_steps + 1) * kPanelCols * elem / 4 + 16));
    void* panel = panel_store.data();
    // the accumulators in memory: out itself (float32) or a float32 copy of this task's columns
    std::vector<float> scratch;
    float* acc = p.out.ptr<float>() + c0;
    int64_t ldc = p.out.stride(0);
    if (!out_f32) {
      scratch.assign(static_cast<size_t>(M * kPanelCols), 0.0f);
      acc = scratch.data(), ldc = kPanelCols;
      if (p.accumulate)
        for (int64_t m = 0; m < M; ++m) widen_row(static_cast<const uint16_t*>(p.out.data) + m * p.out.stride(0) + c0, p.out.dtype,
                                                  cols, acc + m * ldc);
    }
    bool add = p.accumulate != 0;
    for (const Segment& s : segments) {
      for (int64_t r0 = 0; r0 < s.R; r0 += step) {
        const int64_t steps = std::min(step, s.R - r0);
        if (forward) pack_forward<Bf16>(s.src, r0, steps, c0, cols, panel, tmp.data());
        else pack_gradient<Bf16>(s.src, r0, steps, c0, cols, panel, tmp.data());
        for (int64_t m = 0; m < M; m += kTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m));
          for (int64_t slab = 0; slab * kTileCols < cols; ++slab) {
            const int64_t n = std::min(kTileCols, cols - slab * kTileCols);
            float* out = acc + m * ldc + slab * kTileCols;
            if constexpr (Bf16) {
              const uint16_t* a = static_cast<const uint16_t*>(s.a) + m * s.lda + r0;
              const uint16_t* b = static_cast<const uint16_t*>(panel) + slab * (steps / 2) * kTileCols * 2;
              tile_bf16<kTileRows>(a, s.lda, b, steps / 2, out, ldc, rows, n, add);
            } else {
              const float* a = static_cast<const float*>(s.a) + m * s.lda + r0;
              const float* b = static_cast<const float*>(panel) + slab * steps * kTileCols;
              tile_f32<kTileRows>(a, s.lda, b, steps, out, ldc, rows, n, add);
            }
          }
        }
        add = true;
      }
    }
    if (!out_f32)
      for (int64_t m = 0; m < M; ++m)
        for_chunks(cols, [&](int64_t j, auto c) { store_any(p.out.data, p.out.dtype, m * p.out.stride(0) + c0 + j,
                                                             load(acc + m * ldc + j, c), c); });
  });
}

void gemm(const LoraGemmArgs& p) {
  if (p.a.dtype == DType::BF16) {
    if constexpr (kNativeBf16) return gemm<true>(p);
  }
  gemm<false>(p);  // float32 a (the entry point lets bf16 a through only where the dot products are native)
}

// This level's entry kernels, one row of the table in common/for_each_isa.h.
constexpr Kernels kernels{gemm};
