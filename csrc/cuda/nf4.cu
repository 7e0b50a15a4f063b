// NF4 quantisation and dequantisation on NVIDIA GPUs, byte-identical to the reference
// (python/fusedlm/reference/nf4.py). The code table and midpoints are arguments.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "common/checks.h"
#include "cuda/dtype.cuh"
#include "cuda/ops.h"

namespace fusedlm::cuda {

namespace {

__device__ inline unsigned nf4_index(float v, const float* midpoints) {
  unsigned index = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) index += midpoints[i] < v;
  return index;
}

// One block of threads per quantisation block: a max-reduction for absmax, then each thread
// packs pairs of elements into bytes.
__global__ void quantize_kernel(const void* w, DType dtype, int64_t n, int64_t blocksize,
                                const float* midpoints_global, uint8_t* data, float* absmax) {
  __shared__ float midpoints[15];
  __shared__ float warp_max[32];
  if (threadIdx.x < 15) midpoints[threadIdx.x] = midpoints_global[threadIdx.x];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * blocksize;
  const int64_t end = min(n, begin + blocksize);

  float amax = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) amax = fmaxf(amax, fabsf(load(w, dtype, i)));
  for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    amax = threadIdx.x < blockDim.x / 32 ? warp_max[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (threadIdx.x == 0) warp_max[0] = amax;
  }
  __syncthreads();
  amax = warp_max[0];

  const bool full = end - begin == blocksize;
  const float safe = fmaxf(amax, 1e-38f);
  const float inverse = __frcp_rn(safe);
  if (threadIdx.x == 0) absmax[blockIdx.x] = full ? amax : safe;
  for (int64_t i = begin + 2 * threadIdx.x; i < end; i += 2 * blockDim.x) {
    const float a = load(w, dtype, i);
    const float b = i + 1 < end ? load(w, dtype, i + 1) : 0.0f;
    const float sa = fminf(1.0f, fmaxf(-1.0f, full ? __fmul_rn(a, inverse) : __fdiv_rn(a, safe)));
    const float sb = fminf(1.0f, fmaxf(-1.0f, full ? __fmul_rn(b, inverse) : __fdiv_rn(b, safe)));
    data[i / 2] = static_cast<uint8_t>((nf4_index(sa, midpoints) << 4) | nf4_index(sb, midpoints));
  }
}

// One thread per output byte pair.
__global__ void dequantize_kernel(const uint8_t* data, const float* absmax, int64_t n, int64_t blocksize,
                                  const float* code_global, void* out, DType dtype) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code_global[threadIdx.x];
  __syncthreads();
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = 2 * pair;
  if (i >= n) return;
  const uint8_t byte = data[pair];
  store(out, dtype, i, __fmul_rn(code[byte >> 4], absmax[i / blocksize]));
  if (i + 1 < n) store(out, dtype, i + 1, __fmul_rn(code[byte & 0xF], absmax[(i + 1) / blocksize]));
}

template <typename T>
__device__ inline float to_float(T v);
template <>
__device__ inline float to_float<float>(float v) { return v; }
template <>
__device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ inline float to_float<__half>(__half v) { return __half2float(v); }

// Decode GEMV: out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for the NF4 weight W [N, K].
// One warp per (output feature n, row m of x): each lane streams 16 packed bytes (32 weights,
// one scale: K % 32 == 0 and blocksizes are multiples of 32) per step with one 16-byte load,
// decodes them through the code table in shared memory and accumulates in float32; a warp
// shuffle reduction finishes the row. K % 32 == 0 puts every 16-byte group of a row at a multiple
// of 16 bytes from `data`, so only `data` itself can be misaligned (a view with a storage offset):
// then kAligned is false and the 16 bytes are read one by one, instead of copying the weight.
template <typename T, bool kAligned>
__global__ void gemv_kernel(const T* x, int64_t K, int64_t stride_xm, const uint8_t* data, const float* absmax,
                            int64_t blocksize, int64_t N, const float* code_global, const float* bias, T* out) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code_global[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t m = blockIdx.y;
  if (n >= N) return;
  const T* xm = x + m * stride_xm;
  const int64_t row = n * K;
  float acc = 0.0f;
  for (int64_t c = 32 * lane; c < K; c += 32 * 32) {
    uint4 packed;
    if constexpr (kAligned) {
      packed = *reinterpret_cast<const uint4*>(data + (row + c) / 2);
    } else {
      uint8_t bytes[16];
#pragma unroll
      for (int b = 0; b < 16; ++b) bytes[b] = data[(row + c) / 2 + b];
      memcpy(&packed, bytes, 16);
    }
    const float scale = absmax[(row + c) / blocksize];
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
    float part = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (words[w] >> (8 * b)) & 0xFF;
        const int64_t k = c + 2 * (4 * w + b);
        part = fmaf(code[byte >> 4], to_float(xm[k]), part);
        part = fmaf(code[byte & 0xF], to_float(xm[k + 1]), part);
      }
    }
    acc = fmaf(part, scale, acc);
  }
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    if (bias) acc += bias[n];
    out[m * N + n] = T(acc);
  }
}

template <bool kAligned>
void launch_gemv(const Nf4Args& a, dim3 grid, int threads, cudaStream_t s, int64_t K, int64_t stride_xm, int64_t N) {
  const uint8_t* data = a.data.ptr<const uint8_t>();
  const float* absmax = a.absmax.ptr<const float>();
  const float* code = a.code.ptr<const float>();
  const float* bias = a.bias.ptr<const float>();
  switch (a.x.dtype) {
    case DType::F32:
      gemv_kernel<float, kAligned><<<grid, threads, 0, s>>>(a.x.ptr<const float>(), K, stride_xm, data, absmax,
                                                             a.blocksize, N, code, bias, a.out.ptr<float>());
      break;
    case DType::BF16:
      gemv_kernel<__nv_bfloat16, kAligned><<<grid, threads, 0, s>>>(a.x.ptr<const __nv_bfloat16>(), K, stride_xm, data,
                                                                     absmax, a.blocksize, N, code, bias,
                                                                     a.out.ptr<__nv_bfloat16>());
      break;
    case DType::F16:
      gemv_kernel<__half, kAligned><<<grid, threads, 0, s>>>(a.x.ptr<const __half>(), K, stride_xm, data, absmax,
                                                              a.blocksize, N, code, bias, a.out.ptr<__half>());
      break;
    default:
      break;
  }
}

}  // namespace

int nf4_quantize(const Nf4Args& a) {
  check_nf4_quantize(a);
  const int64_t n = a.w.numel(), blocksize = a.blocksize, n_blocks = (n + blocksize - 1) / blocksize;
  if (n_blocks == 0) return 0;
  const int threads = blocksize >= 512 ? 256 : 64;  // a multiple of 32, at most 1024
  quantize_kernel<<<static_cast<unsigned>(n_blocks), threads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(
      a.w.data, a.w.dtype, n, blocksize, a.midpoints.ptr<const float>(), a.data.ptr<uint8_t>(), a.absmax.ptr<float>());
  return static_cast<int>(cudaGetLastError());
}

int nf4_dequantize(const Nf4Args& a) {
  check_nf4_dequantize(a);
  const int64_t n = a.out.numel(), pairs = (n + 1) / 2;
  if (pairs == 0) return 0;
  const int threads = 256;
  dequantize_kernel<<<static_cast<unsigned>((pairs + threads - 1) / threads), threads, 0,
                      reinterpret_cast<cudaStream_t>(a.stream)>>>(a.data.ptr<const uint8_t>(), a.absmax.ptr<const float>(),
                                                                  n, a.blocksize, a.code.ptr<const float>(), a.out.data,
                                                                  a.out.dtype);
  return static_cast<int>(cudaGetLastError());
}

int nf4_gemv(const Nf4Args& a) {
  check_nf4_gemv(a);
  const int64_t M = a.x.size(0), K = a.x.size(1), N = a.out.size(1), stride_xm = a.x.stride(0);
  if (M == 0 || N == 0) return 0;
  if (M > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);  // grid.y; callers pass M <= 16
  const int warps = 8;
  const dim3 grid(static_cast<unsigned>((N + warps - 1) / warps), static_cast<unsigned>(M));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(a.stream);
  if (reinterpret_cast<std::uintptr_t>(a.data.data) % 16 == 0) {
    launch_gemv<true>(a, grid, 32 * warps, s, K, stride_xm, N);
  } else {
    launch_gemv<false>(a, grid, 32 * warps, s, K, stride_xm, N);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fusedlm::cuda
