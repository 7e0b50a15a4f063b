// The NF4 tile kernels (the tiles: common/args.h, Nf4Args) of the NF4 matmul (nf4_kernels.h), in
// their own header so that another kernel file can run them on its own tiles. Like
// nf4_kernels.h, this file is included once per ISA namespace (common/for_each_isa.h), hence no
// include guard; everything here is a template, a constant or inline, so copies in several
// translation units are one definition.

// ---- GEMV / GEMM on the tiles ------------------------------------------------------------
// NT adjacent tiles (16 NT rows of W) against MT rows of x at a time. Per block of a row the
// products of the code values and x are summed in float32 (in registers), then scaled by the
// rows' absmax (one vector per 16 rows) into the totals (in a small buffer). Each row of W is one
// lane: no horizontal sums.
//   float32 (any ISA): x in float32; the nibbles of one position j give 16 rows of element
//     k0 + kNf4NibbleK[j] through the code table (exact float32 values), times x broadcast.
//   bf16 (kNativeBf16): x rounded to bf16; each 16-bit half of a word gives the bf16 pair
//     (k0 + 2i, k0 + 2i + 1) of its row through the code table rounded to bf16, and dot2
//     (vdpbf16ps) multiplies it by the pair of x: half the instructions per weight.
// Each decoded vector serves MT rows of x and each broadcast of x NT vectors, so for many rows
// (prefill) the decoding is a small part and the kernel runs at the FMA / dot2 rate (a GEMM).
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead of the tile group being read to prefetch
constexpr int kTileVecs = static_cast<int>(kNf4TileRows) / W;  // vectors per 16 rows
// The register block: up to kMostRows rows of x by kMostTiles tiles (bf16: each broadcast of x
// then feeds two dot2); partial sums per accumulator so that at least four independent chains
// hide the FMA / dot2 latency.
constexpr int kMostRows = kRegisters >= 32 ? 6 : 4;
constexpr int kMostTiles = kRegisters >= 32 ? 2 : 1;
template <int Accumulators>
constexpr int kParts = Accumulators >= 4 ? 1 : 4 / Accumulators;

using Sums = float (*)[kNf4TileRows * kMostTiles];  // sums[m][16 nt + r]: x row m . row r of tile nt

// sums[m][16 nt + r] += tile nt, row r . x row m (x rows K apart), for MT rows and NT tiles.
template <int MT, int NT>
void tiles_f32(const float* x, int64_t K, const uint8_t* tile, int64_t tile_bytes, int64_t blocksize, const Lut16& code,
               Sums sums) {
  constexpr int V = NT * kTileVecs, P = kParts<MT * V>;  // vectors of W per element, partial sums
  const int64_t record = nf4_tile_block_bytes(blocksize);
  for (int64_t k0 = 0; k0 < K; k0 += blocksize, tile += record) {
    Vec part[MT][V][P];
    for (auto& row : part)
      for (auto& vec : row)
        for (Vec& v : vec) v = Vec::zero();
    for (int64_t g = 0; g < blocksize / 8; ++g) {
      IVec words[V];
      for (int nt = 0; nt < NT; ++nt) {
        prefetch_stream(tile + nt * tile_bytes + 64 * g + kPrefetchBytes);
        for (int h = 0; h < kTileVecs; ++h) words[nt * kTileVecs + h] = IVec::load(tile + nt * tile_bytes + 64 * g + 4 * W * h);
      }
      const float* xg = x + k0 + 8 * g;
      unroll<8>([&](auto j_constant) {
        constexpr int j = decltype(j_constant)::value;
        Vec w[V];
        for (int v = 0; v < V; ++v) w[v] = code.lookup_nibble<j>(words[v]);
        for (int m = 0; m < MT; ++m) {
          const Vec xj(xg[m * K + kNf4NibbleK[j]]);
          for (int v = 0; v < V; ++v) part[m][v][j % P] = fma(w[v], xj, part[m][v][j % P]);
        }
      });
    }
    const float* scale = reinterpret_cast<const float*>(tile + 8 * blocksize);
    for (int v = 0; v < V; ++v) {
      const Vec s = Vec::load(scale + (v / kTileVecs) * (tile_bytes / 4) + W * (v % kTileVecs));
      for (int m = 0; m < MT; ++m) {
        Vec block = part[m][v][0];
        for (int p = 1; p < P; ++p) block = block + part[m][v][p];
        fma(block, s, Vec::load(sums[m] + W * v)).store(sums[m] + W * v);
      }
    }
  }
}

// As tiles_f32 with bf16 x (rows K apart) and bf16 dot products; only where kNativeBf16 (W = 16).
template <int MT, int NT>
void tiles_bf16(const uint16_t* x, int64_t K, const uint8_t* tile, int64_t tile_bytes, int64_t blocksize,
                const BLut16& code, Sums sums) {
  static_assert(MT > 0 && kTileVecs == 1, "the bf16 tile kernel runs on 16 lanes");
  constexpr int P = kParts<MT * NT>;
  const int64_t record = nf4_tile_block_bytes(blocksize);
  for (int64_t k0 = 0; k0 < K; k0 += blocksize, tile += record) {
    Vec part[MT][NT][P];
    for (auto& row : part)
      for (auto& vec : row)
        for (Vec& v : vec) v = Vec::zero();
    for (int64_t g = 0; g < blocksize / 8; ++g) {
      BVec words[NT];
      for (int nt = 0; nt < NT; ++nt) {
        prefetch_stream(tile + nt * tile_bytes + 64 * g + kPrefetchBytes);
        words[nt] = BVec::load(tile + nt * tile_bytes + 64 * g);
      }
      const uint16_t* xg = x + k0 + 8 * g;
      unroll<4>([&](auto i_constant) {  // elements (2i, 2i + 1) of the group
        constexpr int i = decltype(i_constant)::value;
        BVec w[NT];
        for (int nt = 0; nt < NT; ++nt) w[nt] = code.lookup(shr<4 * i>(words[nt]));
        for (int m = 0; m < MT; ++m) {
          const BVec xi = BVec::broadcast_pair(xg + m * K + 2 * i);
          for (int nt = 0; nt < NT; ++nt) part[m][nt][i % P] = dot2(part[m][nt][i % P], w[nt], xi);
        }
      });
    }
    const float* scale = reinterpret_cast<const float*>(tile + 8 * blocksize);
    for (int nt = 0; nt < NT; ++nt) {
      const Vec s = Vec::load(scale + nt * (tile_bytes / 4));
      for (int m = 0; m < MT; ++m) {
        Vec block = part[m][nt][0];
        for (int p = 1; p < P; ++p) block = block + part[m][nt][p];
        fma(block, s, Vec::load(sums[m] + W * nt)).store(sums[m] + W * nt);
      }
    }
  }
}

// fn(std::integral_constant<int, n>) for the runtime n in [1, Most].
template <int Most, class Fn>
inline void with_constant(int64_t n, Fn&& fn) {
  unroll<Most>([&](auto c) {
    if (n == decltype(c)::value + 1) fn(std::integral_constant<int, decltype(c)::value + 1>{});
  });
}

