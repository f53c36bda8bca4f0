// CPU emulation of the CUDA execution model, just enough for csrc/ kernels: every thread of a block is a
// std::thread, blocks run one after another (so `static` stands in for __shared__), __syncthreads is a block
// barrier, __shfl_xor_sync a warp barrier around a shared buffer. Threads that return drop out of both barriers,
// as exited CUDA threads do. Slow and for tests only (tests/test_csrc_emulated.py): it checks indexing,
// reductions and the host launch logic without a GPU, not timing or memory-model subtleties.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // host-side types: dim3, uint3, cudaStream_t, cudaError_t

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  float vals[32];
};
struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  explicit Block(int n) : bar(n) {
    for (int w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(new Warp);
  }
};
inline thread_local uint3 tIdx, bIdx;
inline thread_local Block* blk;
inline dim3 gDim, bDim;

inline unsigned linear() { return tIdx.x + bDim.x * (tIdx.y + bDim.y * tIdx.z); }

inline void syncthreads() { blk->bar.arrive_and_wait(); }

// Lane `lane` gets the value of lane src(lane) (its own when src is out of range, as CUDA does).
template <typename Src> inline float exchange(float v, Src src) {
  Warp& w = *blk->warps[linear() / 32];
  const unsigned lane = linear() % 32, from = src(lane);
  w.vals[lane] = v;
  w.bar.arrive_and_wait();
  const float r = from < 32 ? w.vals[from] : v;
  w.bar.arrive_and_wait();
  return r;
}
inline float shfl_xor(float v, int o) { return exchange(v, [o](unsigned l) { return l ^ o; }); }
inline float shfl_down(float v, int o) { return exchange(v, [o](unsigned l) { return l + o; }); }
inline float shfl(float v, int src) { return exchange(v, [src](unsigned) { return (unsigned)src; }); }

struct Launch {
  dim3 grid, block;
  template <typename K, typename... Args> void operator()(K kernel, Args... args) const {
    gDim = grid;
    bDim = block;
    const int n = block.x * block.y * block.z;
    if (n % 32) throw std::runtime_error("emu: block size must be a multiple of 32");
    // CUDA's launch limits (a GPU refuses the launch: "invalid configuration argument")
    if (n > 1024 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u || !grid.x || !grid.y || !grid.z)
      throw std::runtime_error("emu: grid or block outside CUDA's launch limits");
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Block b(n);
          std::vector<std::thread> threads;
          threads.reserve(n);
          for (int t = 0; t < n; ++t)
            threads.emplace_back([&, t] {
              blk = &b;
              bIdx = uint3{bx, by, bz};
              tIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
              kernel(args...);
              b.warps[t / 32]->bar.arrive_and_drop();
              b.bar.arrive_and_drop();
            });
          for (auto& th : threads) th.join();
        }
  }
};
inline Launch launch(dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) { return Launch{grid, block}; }
}  // namespace emu

template <typename T> inline T min(T a, T b) { return std::min(a, b); }
// What a GPU would fault on ("misaligned address"): a vector access off its alignment.
#define CM_ASSERT_ALIGNED(p, bytes)                                                                  \
  if (reinterpret_cast<std::uintptr_t>(p) % (bytes)) {                                               \
    std::fprintf(stderr, "emu: misaligned %zu-byte access at %p\n", (size_t)(bytes), (const void*)(p)); \
    std::abort();                                                                                    \
  }
#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define blockDim emu::bDim
#define gridDim emu::gDim
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor(v, o)
#define __shfl_down_sync(mask, v, o) emu::shfl_down(v, o)
#define __shfl_sync(mask, v, src) emu::shfl(v, src)
#define cudaGetLastError() cudaSuccess
#define cudaGetErrorString(e) "emulated"
