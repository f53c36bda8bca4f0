// Shared device helpers: dtype codes and dispatch, fp32 conversion, 16-byte vectors, warp/block sums.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cmfast.h"

namespace cmfast {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ uint8_t from_f<uint8_t>(float v) { return static_cast<uint8_t>(v); }

// V elements moved as one aligned access (16 bytes for V = 16 / sizeof(T)); callers check the alignment.
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

// A GPU faults on a misaligned vector access; the CPU emulation of the tests defines this to catch one there too.
#ifndef CM_ASSERT_ALIGNED
#define CM_ASSERT_ALIGNED(p, bytes)
#endif

template <typename T, int V> __device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  CM_ASSERT_ALIGNED(p, sizeof(T) * V);
  Vec<T, V> r = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_f(r.v[j]);
}

template <typename T, int V> __device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  CM_ASSERT_ALIGNED(p, sizeof(T) * V);
  Vec<T, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.v[j] = from_f<T>(in[j]);
  *reinterpret_cast<Vec<T, V>*>(p) = r;
}

// Butterfly sum: every lane ends with the same bits (a + b == b + a), so results do not depend on the lane read.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Kahan-compensated running sum: a sequential sum of many partials (thousands of HW splits, a large batch) keeps
// an error of about one ulp of the result instead of growing with the count (measured on an H200: a 1024-split
// GroupNorm dscale was 7x PyTorch's error with plain adds). No fast-math here, so nvcc keeps the compensation.
struct KahanSum {
  float sum = 0.f, comp = 0.f;
  __device__ __forceinline__ void add(float v) {
    const float y = v - comp, t = sum + y;
    comp = (t - sum) - y;
    sum = t;
  }
};

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); `smem` holds 32 floats. Fixed order.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : 0.f;
  return warp_sum(v);
}

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int blocks_for(int64_t work, int threads) {
  // Grid-stride kernels: enough blocks to fill any current GPU several times, not one per element.
  int64_t b = (work + threads - 1) / threads;
  return static_cast<int>(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

}  // namespace cmfast

// CM_DISPATCH(code, T, ...): run the statements with T bound to the element type of dtype code `code`.
#define CM_DISPATCH(code, T, ...)                      \
  switch (code) {                                      \
    case cmfast::kFloat32: { using T = float; __VA_ARGS__; } break;          \
    case cmfast::kFloat16: { using T = __half; __VA_ARGS__; } break;         \
    case cmfast::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; } break; \
    default: return static_cast<int>(cudaErrorInvalidValue);                 \
  }
