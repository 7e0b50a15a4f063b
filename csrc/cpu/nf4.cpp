// NF4 quantisation and dequantisation on the CPU, byte-identical to the reference
// (python/fusedlm/reference/nf4.py), which documents the layout and rounding rules.
//
// The NF4 code table and its midpoints are arguments: they live in one place, the reference.
#include "cpu/ops.h"

#include <algorithm>
#include <cmath>

#include "common/dtype.h"
#include "common/threading.h"

namespace fusedlm::cpu {

namespace {

// Index of the nearest NF4 code for a value in [-1, 1]: the number of midpoints strictly below
// it (a value exactly on a midpoint takes the lower code), as torch.bucketize computes it.
inline uint8_t nf4_index(float v, const float* midpoints) {
  int index = 0;
  for (int i = 0; i < 15; ++i) index += midpoints[i] < v;
  return static_cast<uint8_t>(index);
}

inline float clamp_unit(float v) { return std::min(1.0f, std::max(-1.0f, v)); }

}  // namespace

void nf4_quantize(const void* w, DType dtype, int64_t n, int64_t blocksize, const float* midpoints,
                  uint8_t* data, float* absmax, int num_threads) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  // Blocks are whole bytes apart because blocksize is even; a task is one block.
  parallel_for(n_blocks, num_threads, [&](int64_t block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(load_as_float(w, dtype, i)));
    const bool full = end - begin == blocksize;
    // Full blocks multiply by the reciprocal, the short tail block divides (bitsandbytes' way);
    // a zero tail block stores the clamped absmax, a zero full block stores 0.
    const float safe = std::max(amax, 1e-38f);
    const float inverse = 1.0f / safe;
    absmax[block] = full ? amax : safe;
    for (int64_t i = begin; i < end; i += 2) {
      const float a = load_as_float(w, dtype, i);
      const float b = i + 1 < end ? load_as_float(w, dtype, i + 1) : 0.0f;  // odd n: pad with 0
      const float sa = clamp_unit(full ? a * inverse : a / safe);
      const float sb = clamp_unit(full ? b * inverse : b / safe);
      data[i / 2] = static_cast<uint8_t>((nf4_index(sa, midpoints) << 4) | nf4_index(sb, midpoints));
    }
  });
}

void nf4_dequantize(const uint8_t* data, const float* absmax, int64_t n, int64_t blocksize,
                    const float* code, void* out, DType dtype, int num_threads) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  parallel_for(n_blocks, num_threads, [&](int64_t block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const float scale = absmax[block];
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t byte = data[i / 2];
      const uint8_t index = (i % 2 == 0) ? (byte >> 4) : (byte & 0xF);
      store_from_float(out, dtype, i, code[index] * scale);
    }
  });
}

}  // namespace fusedlm::cpu
