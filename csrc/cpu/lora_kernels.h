// The adapter part of the LoRA linear layer, written once over common/vec.h (lora.cpp includes
// this file once per ISA level through common/for_each_isa.h, hence no include guard).
//
//   shrink: h[m, :] = x[m, :] A_a^T                 rows of one adapter, [K] -> [r], float32
//   expand: out[m, n] = init[m, n] + bias[n] + s_a * h[m, :] . Bt_a[:, n]
//
// Both are register tiles: the shrink keeps kShrinkRows rows x kShrinkRanks ranks of partial dot
// products (each x chunk and A chunk loaded once per several FMAs, lanes summed at the end); the
// expand keeps kExpandRows rows x kExpandVecs vectors of out in registers over the rank loop
// (per rank: kExpandVecs loads of Bt and kExpandRows broadcasts of s h feed their product of FMAs).

constexpr int64_t kShrinkRows = 4;
constexpr int64_t kShrinkRanks = kRegisters >= 32 ? 4 : 2;  // AVX2: 4 x 2 accumulators + 4 x chunks fit 16 registers
constexpr int64_t kExpandRows = 4;
constexpr int kExpandVecs = kRegisters >= 32 ? 4 : 3;  // AVX2: 12 accumulators + 3 Bt vectors + 1 broadcast

inline int64_t row_at(const LoraArgs& p, int64_t i) { return p.rows ? p.rows.ptr<const int64_t>()[i] : i; }

// Rows [begin, end) of the row order, all of one adapter (a: its A, [r, K]).
template <DType D>
void shrink(const LoraArgs& p, const float* a, int64_t begin, int64_t end) {
  const int64_t K = p.x.size(1), r = p.lora_a.size(1), stride = p.x.stride(0);
  float* h = p.h.ptr<float>();
  for (int64_t i0 = begin; i0 < end; i0 += kShrinkRows) {
    const int64_t rows = std::min(kShrinkRows, end - i0);
    int64_t m[kShrinkRows];  // past the last row: the last row again, its results dropped
    for (int64_t t = 0; t < kShrinkRows; ++t) m[t] = row_at(p, i0 + std::min(t, rows - 1));
    for (int64_t j0 = 0; j0 < r; j0 += kShrinkRanks) {
      const int64_t ranks = std::min(kShrinkRanks, r - j0);
      Vec acc[kShrinkRows][kShrinkRanks];
      for (auto& row : acc)
        for (Vec& v : row) v = Vec::zero();
      for_chunks(K, [&](int64_t k, auto c) {
        Vec xv[kShrinkRows];
        for (int64_t t = 0; t < kShrinkRows; ++t) xv[t] = load_as<D>(p.x.data, m[t] * stride + k, c);
        for (int64_t j = 0; j < kShrinkRanks; ++j) {
          const Vec av = load(a + std::min(j0 + j, r - 1) * K + k, c);
          for (int64_t t = 0; t < kShrinkRows; ++t) acc[t][j] = fma(xv[t], av, acc[t][j]);
        }
      });
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t j = 0; j < ranks; ++j) h[m[t] * r + j0 + j] = acc[t][j].reduce_add();
    }
  }
}

// Rows [begin, end) of one adapter (bt: its Bt, [r, N]; null for the rows without an adapter),
// columns [n0, n1): out = init + bias + scale * h Bt.
template <DType D>
void expand(const LoraArgs& p, const float* bt, float scale, int64_t begin, int64_t end, int64_t n0, int64_t n1) {
  const int64_t N = p.out.size(1), r = p.lora_a.size(1);
  const float* h = p.h.ptr<const float>();
  const float* bias = p.bias.ptr<const float>();
  constexpr int64_t R = kExpandRows, C = kExpandVecs;
  float hs[R * 64];  // scale * h of the tile's rows (r <= 64 per chunk of ranks)
  for (int64_t i0 = begin; i0 < end; i0 += R) {
    const int64_t rows = std::min(R, end - i0);
    int64_t m[R];
    for (int64_t t = 0; t < R; ++t) m[t] = row_at(p, i0 + std::min(t, rows - 1));
    // A tile: R rows x Vecs vectors from column n; with a Part `c` its last vector is partial.
    auto tile = [&](int64_t n, auto vecs, auto c) {
      constexpr int Vecs = decltype(vecs)::value;
      constexpr bool kPart = std::is_same_v<decltype(c), Part>;
      auto load_col = [&](const float* src, int v) { return kPart && v == Vecs - 1 ? load(src, c) : Vec::load(src); };
      Vec acc[R][Vecs];
      for (int v = 0; v < Vecs; ++v) {
        const int64_t col = n + v * W;
        const Vec b = bias ? load_col(bias + col, v) : Vec::zero();
        for (int64_t t = 0; t < R; ++t) {
          Vec init = Vec::zero();
          if (p.init)
            init = kPart && v == Vecs - 1 ? load_as<D>(p.init.data, m[t] * N + col, c) : load_as<D>(p.init.data, m[t] * N + col);
          acc[t][v] = b + init;
        }
      }
      if (bt) {
        for (int64_t j0 = 0; j0 < r; j0 += 64) {
          const int64_t ranks = std::min<int64_t>(64, r - j0);
          for (int64_t t = 0; t < R; ++t)
            for (int64_t j = 0; j < ranks; ++j) hs[t * 64 + j] = scale * h[m[t] * r + j0 + j];
          for (int64_t j = 0; j < ranks; ++j) {
            Vec bv[Vecs];
            for (int v = 0; v < Vecs; ++v) bv[v] = load_col(bt + (j0 + j) * N + n + v * W, v);
            for (int64_t t = 0; t < R; ++t) {
              const Vec hv(hs[t * 64 + j]);
              for (int v = 0; v < Vecs; ++v) acc[t][v] = fma(hv, bv[v], acc[t][v]);
            }
          }
        }
      }
      for (int64_t t = 0; t < rows; ++t)
        for (int v = 0; v < Vecs; ++v) {
          const int64_t at = m[t] * N + n + v * W;
          if (kPart && v == Vecs - 1) store_as<D>(p.out.data, at, acc[t][v], c);
          else store_as<D>(p.out.data, at, acc[t][v]);
        }
    };
    int64_t n = n0;
    for (; n + C * W <= n1; n += C * W) tile(n, std::integral_constant<int, C>{}, Full{});
    for (; n + W <= n1; n += W) tile(n, std::integral_constant<int, 1>{}, Full{});
    if (n < n1) tile(n, std::integral_constant<int, 1>{}, Part{static_cast<int>(n1 - n)});
  }
}

template <DType X, DType O>
void forward(const LoraArgs& p) {
  const int64_t K = p.x.size(1), n_adapters = p.lora_a.size(0), r = p.lora_a.size(1), N = p.out.size(1);
  const int64_t* segments = p.segments.ptr<const int64_t>();
  const float* lora_a = p.lora_a.ptr<const float>();
  const float* lora_bt = p.lora_bt.ptr<const float>();
  const float* scales = p.scales.ptr<const float>();
  float* h = p.h.ptr<float>();

  // Tasks: blocks of rows of one segment (0: rows without an adapter, 1 + a: adapter a).
  struct Block {
    int64_t segment, begin, end;
  };
  auto blocks_of = [&](int64_t rows_per_block) {
    std::vector<Block> blocks;
    for (int64_t s = 0; s <= n_adapters; ++s)
      for (int64_t b = segments[s]; b < segments[s + 1]; b += rows_per_block)
        blocks.push_back({s, b, std::min(segments[s + 1], b + rows_per_block)});
    return blocks;
  };

  // Shrink: blocks of 16 rows; rows without an adapter get h = 0.
  const std::vector<Block> shrink_blocks = blocks_of(16);
  parallel_for(static_cast<int64_t>(shrink_blocks.size()), p.num_threads, [&](int64_t t) {
    const Block& blk = shrink_blocks[t];
    if (blk.segment == 0) {
      for (int64_t i = blk.begin; i < blk.end; ++i) std::fill_n(h + row_at(p, i) * r, r, 0.0f);
      return;
    }
    shrink<X>(p, lora_a + (blk.segment - 1) * r * K, blk.begin, blk.end);
  });

  // Expand + accumulate: tasks over (row block, column block); a [r, 512] slice of Bt stays in L2.
  constexpr int64_t kRowsPerTask = 32, kColsPerTask = 512;
  const std::vector<Block> expand_blocks = blocks_of(kRowsPerTask);
  const int64_t col_blocks = (N + kColsPerTask - 1) / kColsPerTask;
  parallel_for(static_cast<int64_t>(expand_blocks.size()) * col_blocks, p.num_threads, [&](int64_t t) {
    const Block& blk = expand_blocks[t / col_blocks];
    const int64_t n0 = (t % col_blocks) * kColsPerTask, n1 = std::min(N, n0 + kColsPerTask);
    const bool in_place = p.init && p.init.data == p.out.data;
    if (blk.segment == 0 && in_place && !p.bias) return;  // already the base output
    const float* bt = blk.segment == 0 ? nullptr : lora_bt + (blk.segment - 1) * r * N;
    expand<O>(p, bt, blk.segment == 0 ? 0.0f : scales[blk.segment - 1], blk.begin, blk.end, n0, n1);
  });
}

template <DType X>
void forward_x(const LoraArgs& p) {
  switch (p.out.dtype) {
    case DType::BF16: return forward<X, DType::BF16>(p);
    case DType::F16: return forward<X, DType::F16>(p);
    default: return forward<X, DType::F32>(p);
  }
}

void forward(const LoraArgs& p) {
  switch (p.x.dtype) {
    case DType::BF16: return forward_x<DType::BF16>(p);
    case DType::F16: return forward_x<DType::F16>(p);
    default: return forward_x<DType::F32>(p);
  }
}

// This level's entry kernels, one row of the table in common/for_each_isa.h.
constexpr Kernels kernels{forward};
