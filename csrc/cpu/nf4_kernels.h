// NF4 kernels, written once over common/vec.h and compiled once per ISA level by nf4.cpp (through
// common/for_each_isa.h, hence no include guard). Layout and rounding: reference/nf4.py.
//
// A chunk is W packed bytes = 2W elements: byte j holds element 2j (high nibble) and 2j + 1 (low
// nibble). Blocksizes are powers of two >= 32 >= 2W, so a chunk that starts at a multiple of 2W
// lies in one block and shares one scale: the block's code table times its absmax (Lut16), looked
// up with the high nibbles (even elements) and the low nibbles (odd elements) of W bytes at once.

constexpr int64_t kChunk = 2 * W;

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

// ---- repack: the tiles the GEMV streams (common/args.h: Nf4Args) ----------------------------

// The code index of element e of the flat weight (element 2j: the high nibble of byte j).
inline int nf4_index(const uint8_t* data, int64_t e) { return e % 2 == 0 ? data[e / 2] >> 4 : data[e / 2] & 0xF; }

void repack(const Nf4Args& a) {
  const int64_t blocksize = a.blocksize, n_blocks = a.tiles.size(1), K = n_blocks * blocksize;
  const int64_t N = a.data.numel() * 2 / K, n_tiles = a.tiles.size(0), record = a.tiles.size(2);
  const uint8_t* data = a.data.ptr<const uint8_t>();
  const float* absmax = a.absmax.ptr<const float>();
  parallel_for(n_tiles, a.num_threads, [&](int64_t t) {
    uint8_t* out = a.tiles.ptr<uint8_t>() + t * n_blocks * record;
    for (int64_t b = 0; b < n_blocks; ++b, out += record) {
      for (int64_t g = 0; g < blocksize / 8; ++g) {
        const int64_t k0 = b * blocksize + 8 * g;
        for (int64_t r = 0; r < kNf4TileRows; ++r) {
          const int64_t n = t * kNf4TileRows + r;
          uint32_t word = 0;
          for (int j = 0; n < N && j < 8; ++j) word |= static_cast<uint32_t>(nf4_index(data, n * K + k0 + kNf4NibbleK[j])) << (4 * j);
          for (int byte = 0; byte < 4; ++byte) out[64 * g + 4 * r + byte] = static_cast<uint8_t>(word >> (8 * byte));
        }
      }
      float scales[kNf4TileRows];
      for (int64_t r = 0; r < kNf4TileRows; ++r) {
        const int64_t n = t * kNf4TileRows + r;
        scales[r] = n < N ? absmax[n * n_blocks + b] : 0.0f;  // padding rows: 0, whatever their nibbles
      }
      std::memcpy(out + 8 * blocksize, scales, sizeof(scales));
    }
  });
}

// ---- GEMV / GEMM on the tiles (the kernels: cpu/nf4_tiles.h) ------------------------------
#include "cpu/nf4_tiles.h"

void gemv_tiles(const Nf4Args& a) {
  const int64_t M = a.x.size(0), K = a.x.size(1), N = a.out.size(1), stride_xm = a.x.stride(0);
  const int64_t n_tiles = a.tiles.size(0), tile_bytes = a.tiles.size(1) * a.tiles.size(2);
  const bool bf16 = kNativeBf16 && (a.x.dtype == DType::BF16 || (a.x.dtype == DType::F32 && a.bf16_dots));
  // x once per call, rows K apart: as bf16 for bf16 dot products, else float32.
  std::vector<uint16_t> xb(bf16 ? static_cast<size_t>(M * K) : 0);
  std::vector<float> xf(bf16 ? 0 : static_cast<size_t>(M * K));
  parallel_for(M, a.num_threads, [&](int64_t m) {
    const void* row = static_cast<const char*>(a.x.data) + m * stride_xm * dtype_size(a.x.dtype);
    if (bf16) {
      for_chunks(K, [&](int64_t i, auto c) { store_as<DType::BF16>(xb.data() + m * K, i, load_any(row, a.x.dtype, i, c), c); });
    } else {
      widen_row(row, a.x.dtype, K, xf.data() + m * K);
    }
  });
  const float* code = a.code.ptr<const float>();
  const float* bias = a.bias.ptr<const float>();
  // Blocks of rows of x of about 1 MiB (they stay in each core's L2 while the tiles stream past);
  // per block, few long runs of tiles per thread (the stream prefetchers restart at every jump),
  // still several per thread for balance. A few rows (decode) take one tile at a time: one
  // stream; so does float32, whose FMA chains already outnumber the lookups (two tiles per pass
  // measured slower there on Zen 4).
  const int tiles_per_pass = M >= kMostRows && bf16 ? kMostTiles : 1;
  const int64_t x_block = std::max<int64_t>(kMostRows, (1 << 20) / (K * (bf16 ? 2 : 4)) / kMostRows * kMostRows);
  const Tasks row_blocks(M, x_block), runs(n_tiles, n_tiles / (8 * std::max(a.num_threads, 1)) / tiles_per_pass * tiles_per_pass);
  parallel_for(row_blocks.count * runs.count, a.num_threads, [&](int64_t task) {
    const int64_t block = task / runs.count, run = task % runs.count;
    const Lut16 table(code, 1.0f);
    const BLut16 table16(code);
    float sums[kMostRows][kNf4TileRows * kMostTiles];
    for (int64_t t = runs.begin(run); t < runs.end(run, n_tiles); t += tiles_per_pass) {
      const int64_t tiles = std::min<int64_t>(tiles_per_pass, runs.end(run, n_tiles) - t);
      const uint8_t* tile = a.tiles.ptr<const uint8_t>() + t * tile_bytes;
      const int64_t n0 = t * kNf4TileRows, live = std::min(kNf4TileRows * tiles, N - n0);
      for (int64_t m0 = row_blocks.begin(block); m0 < row_blocks.end(block, M); m0 += kMostRows) {
        const int64_t rows = std::min<int64_t>(kMostRows, row_blocks.end(block, M) - m0);
        for (int64_t m = 0; m < rows; ++m) std::fill(sums[m], sums[m] + kNf4TileRows * tiles, 0.0f);
        with_constant<kMostRows>(rows, [&](auto mt) {
          with_constant<kMostTiles>(tiles, [&](auto nt) {
            constexpr int MT = decltype(mt)::value, NT = decltype(nt)::value;
            if constexpr (kNativeBf16) {
              if (bf16) return tiles_bf16<MT, NT>(xb.data() + m0 * K, K, tile, tile_bytes, a.blocksize, table16, sums);
            }
            tiles_f32<MT, NT>(xf.data() + m0 * K, K, tile, tile_bytes, a.blocksize, table, sums);
          });
        });
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t r = 0; r < live; ++r)
            store_from_float(a.out.data, a.out.dtype, (m0 + m) * N + n0 + r, sums[m][r] + (bias ? bias[n0 + r] : 0.0f));
      }
    }
  });
}

// ---- GEMV on the flat bytes (weights without tiles: K % blocksize != 0) ----------------------
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

void gemv_flat(const Nf4Args& a) {
  const int64_t M = a.x.size(0), K = a.x.size(1), N = a.out.size(1), stride_xm = a.x.stride(0);
  std::vector<float> xs(static_cast<size_t>(M * K));  // float32, each chunk as its W even then its W odd elements
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += kChunk)
      for (int64_t j = 0; j < W; ++j) {
        xs[m * K + c + j] = load_as_float(a.x.data, a.x.dtype, m * stride_xm + c + 2 * j);
        xs[m * K + c + W + j] = load_as_float(a.x.data, a.x.dtype, m * stride_xm + c + 2 * j + 1);
      }
  const uint8_t* data = a.data.ptr<const uint8_t>();
  const float* absmax = a.absmax.ptr<const float>();
  const float* code = a.code.ptr<const float>();
  const float* bias = a.bias.ptr<const float>();
  const Tasks tasks(N, 16);
  parallel_for(tasks.count, a.num_threads, [&](int64_t task) {
    float sums[4];
    for (int64_t n = tasks.begin(task); n < tasks.end(task, N); ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // each chunk of W is decoded once per 4 rows of x
        with_constant<4>(std::min<int64_t>(4, M - m0), [&](auto rows) {
          constexpr int MT = decltype(rows)::value;
          gemv_row<MT>(xs.data() + m0 * K, K, data, absmax, code, n * K, a.blocksize, sums);
          for (int64_t m = 0; m < MT; ++m)
            store_from_float(a.out.data, a.out.dtype, (m0 + m) * N + n, sums[m] + (bias ? bias[n] : 0.0f));
        });
      }
    }
  });
}

void gemv(const Nf4Args& a) { return a.tiles ? gemv_tiles(a) : gemv_flat(a); }

// This level's entry kernels, one row of the table in common/for_each_isa.h.
constexpr Kernels kernels{quantize, dequantize, repack, gemv};
