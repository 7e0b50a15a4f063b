// NF4 kernels, written once over common/vec.h and compiled once per ISA level by nf4.cpp (through
// common/for_each_isa.h, hence no include guard). Layout and rounding: reference/nf4.py.
//
// A chunk is W packed bytes = 2W elements: byte j holds element 2j (high nibble) and 2j + 1 (low
// nibble). Blocksizes are powers of two >= 32 >= 2W, so a chunk that starts at a multiple of 2W
// lies in one block and shares one scale: the block's code table times its absmax (Lut16), looked
// up with the high nibbles (even elements) and the low nibbles (odd elements) of W bytes at once.

constexpr int64_t kChunk = 2 * W;

// Splits [0, n_items) into tasks of at least `grain` items for parallel_for.
struct Tasks {
  int64_t per_task, count;
  Tasks(int64_t n_items, int64_t grain)
      : per_task(std::max<int64_t>(grain, 1)), count((n_items + per_task - 1) / per_task) {}
  int64_t begin(int64_t task) const { return task * per_task; }
  int64_t end(int64_t task, int64_t n_items) const { return std::min(n_items, (task + 1) * per_task); }
};

// ---- quantise -----------------------------------------------------------------------------

// Block [begin, begin + len) of w (len <= blocksize; shorter only for the last block): writes its
// ceil(len / 2) bytes and returns its absmax entry. Full blocks multiply by the reciprocal of the
// absmax, the short last block divides by it (bitsandbytes' way); a zero last block stores the
// clamped absmax, a zero full block 0. Lanes past len read as 0, so an odd count pads with the
// code of 0.0, as the reference does.
template <DType D>
float quantize_block(const void* w, int64_t begin, int64_t len, bool full, const float* midpoints, uint8_t* data) {
  Vec amax_v = Vec::zero();
  for_chunks(len, [&](int64_t i, auto c) { amax_v = max(amax_v, abs(load_as<D>(w, begin + i, c))); });
  const float amax = amax_v.reduce_max();
  const float safe = std::max(amax, 1e-38f);
  const Vec inverse(1.0f / safe), divisor(safe), one(1.0f), minus_one(-1.0f);
  Vec mid[15];
  for (int j = 0; j < 15; ++j) mid[j] = Vec(midpoints[j]);
  for_chunks(len, [&](int64_t i, auto c) {
    const Vec raw = load_as<D>(w, begin + i, c);
    const Vec v = min(one, max(minus_one, full ? raw * inverse : raw / divisor));
    IVec index(0);  // the number of midpoints strictly below v (torch.bucketize's choice)
    for (int j = 0; j < 15; ++j) index = select(mid[j] < v, index + IVec(1), index);
    int32_t lane[W];
    index.store(lane);
    uint8_t* out = data + (begin + i) / 2;
    for (int j = 0; j < (c.n + 1) / 2; ++j) out[j] = static_cast<uint8_t>((lane[2 * j] << 4) | lane[2 * j + 1]);
  });
  return full ? amax : safe;
}

template <DType D>
void quantize(const Nf4Args& a) {
  const int64_t n = a.w.numel(), blocksize = a.blocksize, n_blocks = (n + blocksize - 1) / blocksize;
  const Tasks tasks(n_blocks, 8192 / blocksize);
  parallel_for(tasks.count, a.num_threads, [&](int64_t task) {
    for (int64_t block = tasks.begin(task); block < tasks.end(task, n_blocks); ++block) {
      const int64_t begin = block * blocksize, len = std::min(blocksize, n - begin);
      a.absmax.ptr<float>()[block] = quantize_block<D>(a.w.data, begin, len, len == blocksize,
                                                       a.midpoints.ptr<const float>(), a.data.ptr<uint8_t>());
    }
  });
}

void quantize(const Nf4Args& a) {
  switch (a.w.dtype) {
    case DType::BF16: return quantize<DType::BF16>(a);
    case DType::F16: return quantize<DType::F16>(a);
    default: return quantize<DType::F32>(a);
  }
}

// ---- dequantise ---------------------------------------------------------------------------

template <DType D>
void dequantize(const Nf4Args& a) {
  const int64_t n = a.out.numel(), blocksize = a.blocksize, n_blocks = (n + blocksize - 1) / blocksize;
  const uint8_t* data = a.data.ptr<const uint8_t>();
  const float* code = a.code.ptr<const float>();
  const Tasks tasks(n_blocks, 16384 / blocksize);
  parallel_for(tasks.count, a.num_threads, [&](int64_t task) {
    for (int64_t block = tasks.begin(task); block < tasks.end(task, n_blocks); ++block) {
      const float scale = a.absmax.ptr<const float>()[block];
      const Lut16 table(code, scale);
      const int64_t end = std::min(n, (block + 1) * blocksize);
      int64_t i = block * blocksize;
      for (; i + kChunk <= end; i += kChunk) {
        const IVec bytes = IVec::load_u8(data + i / 2);
        Vec first, second;  // back in element order
        zip(table.lookup(shr<4>(bytes)), table.lookup(bytes), first, second);
        store_as<D>(a.out.data, i, first);
        store_as<D>(a.out.data, i + W, second);
      }
      for (; i < end; ++i) {  // the short last block: the same product, one element at a time
        const uint8_t byte = data[i / 2];
        store_from_float(a.out.data, D, i, code[i % 2 == 0 ? byte >> 4 : byte & 0xF] * scale);
      }
    }
  });
}

void dequantize(const Nf4Args& a) {
  switch (a.out.dtype) {
    case DType::BF16: return dequantize<DType::BF16>(a);
    case DType::F16: return dequantize<DType::F16>(a);
    default: return dequantize<DType::F32>(a);
  }
}

// ---- GEMV ---------------------------------------------------------------------------------
// xs: x in float32, reordered per chunk as its W even elements then its W odd ones, so that a
// decoded chunk meets two contiguous loads. Row m of xs starts at m * K.

// sums[m] = weight row (flat elements [flat0, flat0 + K)) . xs row m, for MT rows of xs. The
// row is walked one block segment (one table) at a time; per step U chunks, 2U accumulators a row.
template <int MT>
void gemv_row(const float* xs, int64_t K, const uint8_t* data, const float* absmax, const float* code, int64_t flat0,
              int64_t blocksize, float* sums) {
  constexpr int U = kRegisters >= 32 ? 2 : 1;  // AVX2's 16 registers fit 4 rows x 2 accumulators
  Vec acc[MT][2 * U];
  for (auto& row : acc)
    for (Vec& v : row) v = Vec::zero();
  const uint8_t* row_data = data + flat0 / 2;
  int64_t block = flat0 / blocksize;
  for (int64_t c = 0; c < K; ++block) {
    const int64_t segment_end = std::min(K, (block + 1) * blocksize - flat0);
    const Lut16 table(code, absmax[block]);
    auto step = [&](auto chunks) {  // chunks (1 or U) chunks from c
      for (int u = 0; u < decltype(chunks)::value; ++u) {
        const IVec bytes = IVec::load_u8(row_data + (c + u * kChunk) / 2);
        const Vec even = table.lookup(shr<4>(bytes)), odd = table.lookup(bytes);
        for (int m = 0; m < MT; ++m) {
          const float* xc = xs + m * K + c + u * kChunk;
          acc[m][2 * u] = fma(even, Vec::load(xc), acc[m][2 * u]);
          acc[m][2 * u + 1] = fma(odd, Vec::load(xc + W), acc[m][2 * u + 1]);
        }
      }
      c += decltype(chunks)::value * kChunk;
    };
    while (c + U * kChunk <= segment_end) step(std::integral_constant<int, U>{});
    while (c < segment_end) step(std::integral_constant<int, 1>{});
  }
  for (int m = 0; m < MT; ++m) {
    Vec total = acc[m][0];
    for (int j = 1; j < 2 * U; ++j) total = total + acc[m][j];
    sums[m] = total.reduce_add();
  }
}

// bf16 x where the CPU has native bf16 dot products: 4W weights (2W bytes) per chunk, decoded
// straight to bf16 through the block's table rounded to bf16 (BLut16, as precise as the bf16 x it
// meets) and multiplied in pairs by dot2 with float32 accumulation: half the work per weight of
// the float32 path. xb: per chunk, the even elements then the odd ones, each as the pairs dot2
// multiplies: (x[4i], x[4i+2]) and (x[4i+1], x[4i+3]).
constexpr int64_t kChunk16 = 4 * W;

template <int MT>
void gemv_row_bf16(const uint16_t* xb, int64_t K, const uint8_t* data, const float* absmax, const float* code,
                   int64_t flat0, int64_t blocksize, float* sums) {
  constexpr int U = 2;
  Vec acc[MT][2 * U];
  for (auto& row : acc)
    for (Vec& v : row) v = Vec::zero();
  const uint8_t* row_data = data + flat0 / 2;
  int64_t block = flat0 / blocksize;
  for (int64_t c = 0; c < K; ++block) {
    const int64_t segment_end = std::min(K, (block + 1) * blocksize - flat0);
    const BLut16 table(code, absmax[block]);
    auto step = [&](auto chunks) {
      for (int u = 0; u < decltype(chunks)::value; ++u) {
        const BVec bytes = BVec::load_u8(row_data + (c + u * kChunk16) / 2);
        const BVec even = table.lookup(high_nibbles(bytes)), odd = table.lookup(low_nibbles(bytes));
        for (int m = 0; m < MT; ++m) {
          const uint16_t* xc = xb + m * K + c + u * kChunk16;
          acc[m][2 * u] = dot2(acc[m][2 * u], even, BVec::load(xc));
          acc[m][2 * u + 1] = dot2(acc[m][2 * u + 1], odd, BVec::load(xc + 2 * W));
        }
      }
      c += decltype(chunks)::value * kChunk16;
    };
    while (c + U * kChunk16 <= segment_end) step(std::integral_constant<int, U>{});
    while (c < segment_end) step(std::integral_constant<int, 1>{});
  }
  for (int m = 0; m < MT; ++m) {
    Vec total = acc[m][0];
    for (int j = 1; j < 2 * U; ++j) total = total + acc[m][j];
    sums[m] = total.reduce_add();
  }
}

void gemv(const Nf4Args& a) {
  const int64_t M = a.x.size(0), K = a.x.size(1), N = a.out.size(1), stride_xm = a.x.stride(0);
  const bool bf16_dots = kNativeBf16 && a.x.dtype == DType::BF16 && a.blocksize % kChunk16 == 0 && K % kChunk16 == 0;
  std::vector<float> xs;
  std::vector<uint16_t> xb;
  if (bf16_dots) {  // the pairs gemv_row_bf16 multiplies
    const uint16_t* x = a.x.ptr<const uint16_t>();
    xb.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < K; c += kChunk16)
        for (int64_t i = 0; i < W; ++i)
          for (int64_t t = 0; t < 2; ++t) {
            xb[m * K + c + 2 * i + t] = x[m * stride_xm + c + 4 * i + 2 * t];
            xb[m * K + c + 2 * W + 2 * i + t] = x[m * stride_xm + c + 4 * i + 2 * t + 1];
          }
  } else {  // float32, each chunk as its W even then its W odd elements
    xs.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < K; c += kChunk)
        for (int64_t j = 0; j < W; ++j) {
          xs[m * K + c + j] = load_as_float(a.x.data, a.x.dtype, m * stride_xm + c + 2 * j);
          xs[m * K + c + W + j] = load_as_float(a.x.data, a.x.dtype, m * stride_xm + c + 2 * j + 1);
        }
  }
  const uint8_t* data = a.data.ptr<const uint8_t>();
  const float* absmax = a.absmax.ptr<const float>();
  const float* code = a.code.ptr<const float>();
  const float* bias = a.bias.ptr<const float>();
  // Rows of x in groups of 4: each chunk of W is decoded once per group.
  auto row_group = [&](int64_t n, int64_t m0, int rows, float* sums) {
    const int64_t flat0 = n * K;
    if (bf16_dots) {
      const uint16_t* x = xb.data() + m0 * K;
      switch (rows) {
        case 4: return gemv_row_bf16<4>(x, K, data, absmax, code, flat0, a.blocksize, sums);
        case 3: return gemv_row_bf16<3>(x, K, data, absmax, code, flat0, a.blocksize, sums);
        case 2: return gemv_row_bf16<2>(x, K, data, absmax, code, flat0, a.blocksize, sums);
        default: return gemv_row_bf16<1>(x, K, data, absmax, code, flat0, a.blocksize, sums);
      }
    }
    const float* x = xs.data() + m0 * K;
    switch (rows) {
      case 4: return gemv_row<4>(x, K, data, absmax, code, flat0, a.blocksize, sums);
      case 3: return gemv_row<3>(x, K, data, absmax, code, flat0, a.blocksize, sums);
      case 2: return gemv_row<2>(x, K, data, absmax, code, flat0, a.blocksize, sums);
      default: return gemv_row<1>(x, K, data, absmax, code, flat0, a.blocksize, sums);
    }
  };
  const Tasks tasks(N, 16);
  parallel_for(tasks.count, a.num_threads, [&](int64_t task) {
    float sums[4];
    for (int64_t n = tasks.begin(task); n < tasks.end(task, N); ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int rows = static_cast<int>(std::min<int64_t>(4, M - m0));
        row_group(n, m0, rows, sums);
        for (int64_t m = 0; m < rows; ++m)
          store_from_float(a.out.data, a.out.dtype, (m0 + m) * N + n, sums[m] + (bias ? bias[n] : 0.0f));
      }
    }
  });
}

// This level's entry kernels, one row of the table in common/for_each_isa.h.
constexpr Kernels kernels{quantize, dequantize, gemv};
