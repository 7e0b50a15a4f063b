// Fused token sampling on CUDA: one block per row, no sort. The same algorithm as the Triton
// kernel (kernels/sampling.py, whose docstring has the math) and the semantics of the reference
// (python/fusedlm/reference/sampling.py):
//   1. x = logits / T, row max, checks; greedy rows take the first argmax;
//   2. top-k: bisection over the 32-bit order-preserving key for the largest K with
//      count(key >= K) >= k (the k-th largest value, ties included);
//   3. top-p: bisection for the smallest K0 with mass(key > K0) < p Z; the cut value is the
//      smallest survivor key >= K0; of its c ties (mass q each) the first
//      j = clamp(ceil((p Z - mass above) / q), 1, c) in ranking order (highest index first) are
//      kept: bisection over the index for the j-th largest tie index;
//   4. draw: u = SplitMix64 uniform of (seed, row) times the kept mass; a block-wide inclusive
//      scan in index order finds the first token whose cumulative mass exceeds it.
// Every pass re-reads the row (it stays in L2 for vocabularies of LLM size).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "cuda/dtype.cuh"
#include "cuda/ops.h"

namespace fusedlm::cuda {

namespace {

constexpr int kThreads = 1024;
constexpr unsigned kFull = 0xffffffffu;
constexpr long long kNone = 0x3fffffffffffffffLL;

// Order-preserving key in [0, 2^32) of a float (-0.0 counted as +0.0).
__device__ __forceinline__ long long key_of(float x) {
  const int bits = __float_as_int(x + 0.0f);
  return bits >= 0 ? static_cast<long long>(bits) + 2147483648LL : -1LL - static_cast<long long>(bits);
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Reduces v over the block; every thread gets the result. `scratch`: 32 elements of shared memory.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* scratch, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(kFull, v, o));
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : scratch[0];
    for (int o = 16; o > 0; o >>= 1) w = op(w, __shfl_down_sync(kFull, w, o));
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

// Inclusive prefix sum of v over the block's threads in order; `scratch`: 32 doubles.
__device__ double block_inclusive_scan(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double w = lane < warps ? scratch[lane] : 0.0;
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += n;
    }
    scratch[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += scratch[warp - 1];
  return v;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const void* logits, DType dtype, int64_t V, int64_t stride_row,
                                                          const float* temperature, const int64_t* top_k,
                                                          const double* top_p, uint64_t seed, int64_t* tokens,
                                                          float* filtered, int32_t* status) {
  __shared__ double sd[32];
  __shared__ long long sl[32];
  __shared__ float sf[32];
  const int64_t row = blockIdx.x;
  const int64_t elem = dtype == DType::F32 ? 4 : 2;
  const void* base = static_cast<const char*>(logits) + row * stride_row * elem;
  float t = temperature[row];
  const bool greedy = t == 0.0f;
  if (greedy) t = 1.0f;
  const int64_t k = top_k[row];
  const double p = top_p[row];
  auto x_at = [&](int64_t i) { return __fdiv_rn(load(base, dtype, i), t); };

  // 1. max and checks
  float mx = -INFINITY;
  long long bad_nan = 0, bad_inf = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float l = load(base, dtype, i);
    bad_nan |= l != l;
    bad_inf |= l == INFINITY;
    mx = fmaxf(mx, __fdiv_rn(l, t));
  }
  mx = block_reduce(mx, sf, Max());
  bad_nan = block_reduce(bad_nan, sl, Max());
  bad_inf = block_reduce(bad_inf, sl, Max());
  const int32_t st = bad_nan ? 1 : bad_inf ? 2 : mx == -INFINITY ? 3 : mx == INFINITY ? 4 : 0;
  if (threadIdx.x == 0) status[row] = st;
  if (st != 0) return;  // uniform over the block

  // kept set: key > cut_key, or key == cut_key and index >= cut_index (greedy: index == cut_index)
  long long cut_key = 0, cut_index = 0;
  double kept_mass = 1.0;
  if (greedy) {
    long long first = kNone;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
      if (x_at(i) == mx && i < first) first = i;
    cut_index = block_reduce(first, sl, Min());
    cut_key = key_of(mx);
  } else {
    if (k > 0 && k < V) {  // 2. top-k
      long long lo = 0, hi = 4294967296LL;
      while (hi - lo > 1) {
        const long long mid = (lo + hi) / 2;
        long long count = 0;
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) count += key_of(x_at(i)) >= mid;
        count = block_reduce(count, sl, Sum());
        (count >= k ? lo : hi) = mid;
      }
      cut_key = lo;
    }
    const long long kth_key = cut_key;
    double total = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = x_at(i);
      if (key_of(x) >= kth_key) total += expf(x - mx);
    }
    total = block_reduce(total, sd, Sum());
    kept_mass = total;
    if (p < 1.0) {  // 3. top-p
      const double target = p * total;
      long long lo = -1, hi = 4294967295LL;
      while (hi - lo > 1) {
        const long long mid = (lo + hi) / 2;
        double above = 0.0;
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
          const float x = x_at(i);
          const long long key = key_of(x);
          if (key >= kth_key && key > mid) above += expf(x - mx);
        }
        above = block_reduce(above, sd, Sum());
        (above < target ? hi : lo) = mid;
      }
      long long vkey = kNone;
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        const long long key = key_of(x_at(i));
        if (key >= kth_key && key >= hi && key < vkey) vkey = key;
      }
      cut_key = block_reduce(vkey, sl, Min());
      double above = 0.0;
      long long ties = 0;
      float q = 0.0f;
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        const float x = x_at(i);
        const long long key = key_of(x);
        if (key > cut_key) above += expf(x - mx);
        if (key == cut_key) ties += 1, q = expf(x - mx);
      }
      above = block_reduce(above, sd, Sum());
      ties = block_reduce(ties, sl, Sum());
      q = block_reduce(q, sf, Max());
      long long keep_ties = static_cast<long long>(ceil((target - above) / fmax(static_cast<double>(q), 1e-300)));
      keep_ties = keep_ties < 1 ? 1 : keep_ties > ties ? ties : keep_ties;
      kept_mass = above + static_cast<double>(keep_ties) * q;
      long long lo_i = 0, hi_i = V;
      if (keep_ties < ties) {
        while (hi_i - lo_i > 1) {
          const long long mid = (lo_i + hi_i) / 2;
          long long count = 0;
          for (int64_t i = threadIdx.x; i < V; i += blockDim.x) count += i >= mid && key_of(x_at(i)) == cut_key;
          count = block_reduce(count, sl, Sum());
          (count >= keep_ties ? lo_i : hi_i) = mid;
        }
      }
      cut_index = lo_i;
    }
  }
  auto keep = [&](int64_t i, long long key) {
    return greedy ? i == cut_index : key > cut_key || (key == cut_key && i >= cut_index);
  };

  if (filtered) {
    float* out = filtered + row * V;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = x_at(i);
      out[i] = keep(i, key_of(x)) ? x : -INFINITY;
    }
  }
  if (tokens) {  // 4. inverse CDF in index order
    if (greedy) {
      if (threadIdx.x == 0) tokens[row] = cut_index;
      return;
    }
    const uint64_t h = splitmix64(seed + static_cast<uint64_t>(row + 1) * 0x9E3779B97F4A7C15ull);
    const double goal = static_cast<double>(h >> 11) * 0x1.0p-53 * kept_mass;
    double acc = 0.0;
    long long token = kNone, last = -1;
    for (int64_t start = 0; start < V; start += blockDim.x) {
      const int64_t i = start + threadIdx.x;
      double e = 0.0;
      if (i < V) {
        const float x = x_at(i);
        if (keep(i, key_of(x))) e = expf(x - mx);
      }
      const double running = acc + block_inclusive_scan(e, sd);
      const long long hit = block_reduce((e > 0.0 && running > goal) ? static_cast<long long>(i) : kNone, sl, Min());
      last = block_reduce(e > 0.0 ? static_cast<long long>(i) : last, sl, Max());
      acc = block_reduce(running, sd, Max());
      if (hit != kNone) {
        token = hit;
        break;
      }
    }
    if (threadIdx.x == 0) tokens[row] = token != kNone ? token : last;
  }
}

}  // namespace

int sampling_run(const SamplingArgs& a) {
  check_sampling(a);
  const int64_t B = a.logits.size(0);
  if (B == 0) return 0;
  sample_kernel<<<static_cast<unsigned>(B), kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(
      a.logits.data, a.logits.dtype, a.logits.size(1), a.logits.stride(0), a.temperature.ptr<const float>(),
      a.top_k.ptr<const int64_t>(), a.top_p.ptr<const double>(), a.seed, a.tokens.ptr<int64_t>(),
      a.filtered.ptr<float>(), a.status.ptr<int32_t>());
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fusedlm::cuda
