// group_norm_act: act(GroupNorm(x) * (1 + scale) + shift) and its backward (EDM/DDPM++ UNet blocks: GroupNorm,
// adaptive scale/shift from the noise embedding, SiLU). fp32 statistics; NCHW or NHWC; fp32/fp16/bf16 data.
//
// Forward, groups of at most a few thousand elements (the UNets' 32x32 and 64x64 levels; the wrapper decides, S = 0):
//           fused     one block per (n, g), one launch: the group read once into registers, the shifted sum, then
//                     M2 about the mean (both from registers), then the output; A, B per channel written for the
//                     backward where it will run
// Forward, larger groups (S >= 1 chunks per (n, c)):
//           reduce    per (n, c, chunk s), two passes over the chunk (the second from L1/L2): its mean, then
//                     M2 = sum (x - mean)^2 (no E[x^2] - E[x]^2 cancellation)
//           finalize  one warp per (n, g): merges the Cg*S partials with Chan et al.'s pairwise formula in a
//                     fixed order (deterministic, no atomics); mean, rstd; per channel A, B with act input
//                     y1 = A (x - mean) + B
//                     (not A x + B': with |mean| >> std that form cancels, this one does not)
//           apply     y = act(A (x - mean) + B), 16-byte vectors where aligned
// Backward: with dy1 = dy * act'(y1), xhat = (x - mean) rstd, per (n, c): Sdy = sum dy1, Sdyx = sum dy1 xhat
//           dshift = Sdy, dscale = w Sdyx + b Sdy, dweight = sum_n (1 + scale) Sdyx, dbias = sum_n (1 + scale) Sdy,
//           dx = rstd (ge dy1 - m1 - xhat m2), ge = w (1 + scale), m1, m2 = group means of ge dy1 and ge dy1 xhat.
// The reduction over HW is split into S chunks per (n, c) so that small batch x groups still fills the GPU; the S
// partials are added with Kahan compensation.
// pre (forward only): the norm of x + pre[n, c], DDPM++'s embedding add before norm1, without the separate add kernel
// and its full-tensor round trip. The fused path adds it as it loads (the sum in fp32); the split path shifts each
// chunk's mean by it (M2 does not change) and adds it in the output pass.
#include "common.cuh"

namespace cmfast {
namespace {

struct Shape {
  int64_t N, C, HW, G, S, chunk;  // chunk: HW positions per split (a multiple of the vector width for NCHW)
  int64_t ms;                     // the row stride of scale and shift: row n at n * ms (a chunk of a wider tensor)
  bool nhwc, silu;
};

// pre[n, c] as fp32 (0 where there is none); row n at pre + n * pre_stride.
template <typename P>
__device__ __forceinline__ float pre_at(const P* pre, int64_t pre_stride, int64_t n, int64_t c) {
  return pre ? to_f(pre[n * pre_stride + c]) : 0.f;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }
__device__ __forceinline__ float act(float z, bool silu) { return silu ? z * sigmoid(z) : z; }
__device__ __forceinline__ float act_grad(float z, bool silu) {
  if (!silu) return 1.f;
  const float s = sigmoid(z);
  return s * (1.f + z * (1.f - s));
}

// Per-element terms of the reductions. Forward: pass 0 sums x - K (K = the chunk's first element: a shift that
// keeps the sum small, so the mean is as exact as fp32 allows even when |mean| >> std), pass 1 sums
// (x - chunk mean)^2. Backward (one pass): dy1 and dy1 * xhat.
template <bool BWD> struct Terms {
  float a, b, mean, rstd;
  bool silu;
  __device__ __forceinline__ void add(int pass, float xv, float dyv, float& s0, float& s1) const {
    if (!BWD) {
      const float d = xv - mean;  // pass 0: mean = K
      s0 += pass == 0 ? d : d * d;
    } else {
      const float dy1 = dyv * act_grad(a * (xv - mean) + b, silu);
      s0 += dy1;
      s1 += dy1 * (xv - mean) * rstd;
    }
  }
};

template <bool BWD>
__device__ __forceinline__ Terms<BWD> terms(const Shape& s, int64_t n, int64_t c, const float* A, const float* B,
                                            const float* stats) {
  Terms<BWD> t{};
  t.silu = s.silu;
  if (BWD) {
    const int64_t g = c / (s.C / s.G);
    t.a = A[n * s.C + c];
    t.b = B[n * s.C + c];
    t.mean = stats[(n * s.G + g) * 2];
    t.rstd = stats[(n * s.G + g) * 2 + 1];
  }
  return t;
}

// Elements in chunk `split` of HW (the last chunks may be short or empty).
__device__ __forceinline__ int64_t chunk_count(const Shape& s, int64_t split) {
  const int64_t begin = split * s.chunk;
  return begin >= s.HW ? 0 : min(s.HW, begin + s.chunk) - begin;
}

// NCHW: one warp per (n, c, s) over a contiguous run of HW; part[((n S + s) C + c) 2 + {0, 1}] holds
// (chunk mean, M2) forward, (sum dy1, sum dy1 xhat) backward.
template <typename T, bool BWD, int V>
__global__ void gn_reduce_nchw_kernel(Shape s, const T* __restrict__ x, const T* __restrict__ dy,
                                      const float* __restrict__ A, const float* __restrict__ B,
                                      const float* __restrict__ stats, const float* __restrict__ pre,
                                      int64_t pre_stride, float* __restrict__ part) {
  const int64_t unit = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (unit >= s.N * s.C * s.S) return;  // whole warps leave together
  const int64_t split = unit % s.S, nc = unit / s.S, c = nc % s.C, n = nc / s.C;
  Terms<BWD> t = terms<BWD>(s, n, c, A, B, stats);
  const int64_t begin = split * s.chunk, end = min(s.HW, begin + s.chunk), base = nc * s.HW;
  if (!BWD && begin < end) t.mean = to_f(x[base + begin]);
  float s0 = 0.f, s1 = 0.f, r0 = 0.f;
  for (int pass = 0; pass < (BWD ? 1 : 2); ++pass) {
    for (int64_t i = begin + lane * V; i < end; i += 32 * V) {
      float xv[V], dv[V];
      load<T, V>(x + base + i, xv);
      if (BWD) load<T, V>(dy + base + i, dv);
#pragma unroll
      for (int j = 0; j < V; ++j) t.add(pass, xv[j], BWD ? dv[j] : 0.f, s0, s1);
    }
    s0 = warp_sum(s0);
    if (!BWD && pass == 0) {  // the chunk's mean, the centre of pass 1
      const int64_t cnt = chunk_count(s, split);
      r0 = t.mean = cnt ? t.mean + s0 / (float)cnt : 0.f;
      s0 = 0.f;
    }
  }
  if (BWD) s1 = warp_sum(s1);
  if (lane == 0) {
    float* p = part + ((n * s.S + split) * s.C + c) * 2;
    p[0] = BWD ? s0 : r0 + pre_at(pre, pre_stride, n, c);  // the chunk's mean of x + pre
    p[1] = BWD ? s1 : s0;
  }
}

// NHWC: block (32, 8) = 32 adjacent channels x 8 rows, grid (N x C / 32, S) (the batch folded into x: gridDim.z
// would cap it at 65,535); rows of a chunk strided by 8, then the 8 row sums of each channel added in a fixed order.
template <typename T, bool BWD>
__global__ void gn_reduce_nhwc_kernel(Shape s, const T* __restrict__ x, const T* __restrict__ dy,
                                      const float* __restrict__ A, const float* __restrict__ B,
                                      const float* __restrict__ stats, const float* __restrict__ pre,
                                      int64_t pre_stride, float* __restrict__ part) {
  __shared__ float sm[2][8][33];
  const int64_t cblocks = (s.C + 31) / 32, n = blockIdx.x / cblocks;
  const int64_t c = (blockIdx.x % cblocks) * 32 + threadIdx.x, split = blockIdx.y;
  const bool live = c < s.C;
  Terms<BWD> t = terms<BWD>(s, n, live ? c : 0, A, B, stats);
  const int64_t begin = split * s.chunk, end = min(s.HW, begin + s.chunk);
  if (!BWD && live && begin < end) t.mean = to_f(x[(n * s.HW + begin) * s.C + c]);
  float tot[2] = {0.f, 0.f};
  for (int pass = 0; pass < (BWD ? 1 : 2); ++pass) {
    float s0 = 0.f, s1 = 0.f;
    if (live)
      for (int64_t r = begin + threadIdx.y; r < end; r += 8) {
        const int64_t o = (n * s.HW + r) * s.C + c;
        t.add(pass, to_f(x[o]), BWD ? to_f(dy[o]) : 0.f, s0, s1);
      }
    sm[0][threadIdx.y][threadIdx.x] = s0;
    sm[1][threadIdx.y][threadIdx.x] = s1;
    __syncthreads();
    tot[0] = tot[1] = 0.f;
#pragma unroll
    for (int r = 0; r < 8; ++r) {  // every thread adds its channel's 8 row sums, all in the same order
      tot[0] += sm[0][r][threadIdx.x];
      tot[1] += sm[1][r][threadIdx.x];
    }
    __syncthreads();  // sm is rewritten by the next pass
    if (!BWD && pass == 0) {
      const int64_t cnt = chunk_count(s, split);
      t.mean = cnt ? t.mean + tot[0] / (float)cnt : 0.f;
    }
  }
  if (threadIdx.y < 2 && live) {
    float* p = part + ((n * s.S + split) * s.C + c) * 2;
    p[threadIdx.y] = BWD ? tot[threadIdx.y] : (threadIdx.y == 0 ? t.mean + pre_at(pre, pre_stride, n, c) : tot[0]);
  }
}

// Chan, Golub & LeVeque's pairwise update of (count, mean, M2): exact in exact arithmetic, stable in fp32.
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
  const float tot = n + nb;
  if (nb == 0.f) return;
  const float delta = meanb - mean, w = nb / tot;
  mean += delta * w;
  m2 += m2b + delta * delta * n * w;
  n = tot;
}

// One warp per (n, g): group statistics from the partials, then A, B per channel of the group.
__global__ void gn_fwd_finalize_kernel(Shape s, const float* __restrict__ part,
                                       float eps, const float* __restrict__ w, const float* __restrict__ bias,
                                       const float* __restrict__ scale, const float* __restrict__ shift,
                                       float* __restrict__ stats, float* __restrict__ A, float* __restrict__ B) {
  const int64_t ng = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (ng >= s.N * s.G) return;
  const int64_t n = ng / s.G, g = ng % s.G, Cg = s.C / s.G;
  float cnt = 0.f, mean = 0.f, m2 = 0.f;
  for (int64_t i = lane; i < Cg * s.S; i += 32) {  // each lane merges its partials in order...
    const int64_t c = g * Cg + i % Cg, split = i / Cg;
    const float* p = part + ((n * s.S + split) * s.C + c) * 2;
    chan_merge(cnt, mean, m2, (float)chunk_count(s, split), p[0], p[1]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {  // ...then a fixed tree over the lanes; lane 0 holds the group
    const float nb = __shfl_down_sync(0xffffffffu, cnt, o), mb = __shfl_down_sync(0xffffffffu, mean, o);
    const float m2b = __shfl_down_sync(0xffffffffu, m2, o);
    if (lane + o < 32) chan_merge(cnt, mean, m2, nb, mb, m2b);
  }
  mean = __shfl_sync(0xffffffffu, mean, 0);
  m2 = __shfl_sync(0xffffffffu, m2, 0);
  const float rstd = 1.f / sqrtf(m2 / (float)(Cg * s.HW) + eps);
  if (lane == 0) {
    stats[ng * 2] = mean;
    stats[ng * 2 + 1] = rstd;
  }
  for (int64_t c = g * Cg + lane; c < (g + 1) * Cg; c += 32) {
    const float k = scale ? 1.f + scale[n * s.ms + c] : 1.f;
    const float a = rstd * (w ? w[c] : 1.f) * k;
    const float beta = (bias ? bias[c] : 0.f) * k + (shift ? shift[n * s.ms + c] : 0.f);
    A[n * s.C + c] = a;
    B[n * s.C + c] = beta;
  }
}

// One block per (n, g) (grid N*G), each element read from memory once: every thread keeps its vectors of the group
// in registers (at most kFusedRegs floats: IMAX vectors of V; the launcher sizes the block so that they cover the
// group), the group's per-channel coefficients in shared memory. All loads are issued before the first use, so the
// kernel waits for memory once; then two block reductions in a fixed order (the shifted sum, then M2 about the mean,
// both from registers) and the output. Element i of the group: NCHW (n, g Cg + i / HW, i % HW), a contiguous run;
// NHWC (n, i / Cg, g Cg + i % Cg), rows of Cg adjacent channels. V-element vectors: NCHW with V | HW (V elements of
// one channel), NHWC with V | Cg (V adjacent channels of one row); the caller checks the alignment. The parameters
// are read in their own types, fp32 or x's: PA for weight and bias, PM for scale, shift and pre (a bf16 sampler keeps
// the GroupNorm affine in fp32 while the embedding's scale and shift come out of bf16 layers). Converting them to
// fp32 first cost up to four launches, more than this kernel itself at batch 1 and 8 (H200 graph replay: 9.4-18.4 us
// against Triton's 2.2-11.3). stats, A, B: written where given (the backward's), null without a backward.
// (The previous version read the group three times in grid-stride loops and each element's coefficients from global
// memory after the reductions: 1.2-1.7x Triton's time on an H200 at batch 1 and 8, graph replay.)
// kFusedMaxThreads: the launch bound, which caps the scalar (V = 1) variants at 128 registers a thread (up to 152
// unbounded: a 512-thread block of them would not launch).
constexpr int kFusedRegs = 32, kFusedMaxThreads = 512;

template <typename T, typename PA, typename PM, bool NHWC, int V>
__global__ void __launch_bounds__(kFusedMaxThreads) gn_fwd_fused_kernel(Shape s, const T* __restrict__ x, float eps, const PA* __restrict__ w,
                                    const PA* __restrict__ bias, const PM* __restrict__ scale,
                                    const PM* __restrict__ shift, const PM* __restrict__ pre, int64_t pre_stride,
                                    float* __restrict__ stats, float* __restrict__ A, float* __restrict__ B,
                                    T* __restrict__ y) {
  constexpr int IMAX = kFusedRegs / V;
  __shared__ float red[32];
  // per channel c of the group: y1 = rstd ca[c] (x + cp[c] - mean) + cb[c], with ca = w (1 + scale),
  // cb = bias (1 + scale) + shift, cp = pre
  __shared__ float ca[kFusedMaxChannels], cb[kFusedMaxChannels], cp[kFusedMaxChannels];
  const int64_t ng = blockIdx.x, n = ng / s.G, g = ng % s.G;
  const int Cg = (int)(s.C / s.G), HW = (int)s.HW, M = Cg * HW, nt = (int)blockDim.x;
  const int64_t base = NHWC ? n * s.HW * s.C + g * Cg : (n * s.C + g * Cg) * s.HW;
  float xv[IMAX][V];
  int ch[IMAX];  // the channel (within the group) of the vector's first element
#pragma unroll
  for (int k = 0; k < IMAX; ++k) {
    const int i = (k * nt + (int)threadIdx.x) * V;
    ch[k] = NHWC ? i % Cg : i / HW;
    if (i < M) {
      const T* p = x + base + (NHWC ? (int64_t)(i / Cg) * s.C + ch[k] : (int64_t)i);
      if (V > 1) load<T, V>(p, xv[k]); else xv[k][0] = to_f(*p);
    }
  }
  for (int c = threadIdx.x; c < Cg; c += nt) {
    const int64_t cc = g * Cg + c, nm = n * s.ms + cc;
    const float kk = scale ? 1.f + to_f(scale[nm]) : 1.f;
    ca[c] = (w ? to_f(w[cc]) : 1.f) * kk;
    cb[c] = (bias ? to_f(bias[cc]) : 0.f) * kk + (shift ? to_f(shift[nm]) : 0.f);
    cp[c] = pre_at(pre, pre_stride, n, cc);
  }
  const float x0 = to_f(x[base]);
  __syncthreads();
  // a shift that keeps the first sum small (|mean| >> std loses nothing): the group's first element, channel g Cg
  const float K = x0 + cp[0];
  float s0 = 0.f;
#pragma unroll
  for (int k = 0; k < IMAX; ++k) {
    if ((k * nt + (int)threadIdx.x) * V < M) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (pre) xv[k][j] += cp[ch[k] + (NHWC ? j : 0)];
        s0 += xv[k][j] - K;
      }
    }
  }
  const float mean = K + block_sum(s0, red) / (float)M;
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < IMAX; ++k) {
    if ((k * nt + (int)threadIdx.x) * V < M) {
#pragma unroll
      for (int j = 0; j < V; ++j) m2 += (xv[k][j] - mean) * (xv[k][j] - mean);
    }
  }
  m2 = block_sum(m2, red);
  const float rstd = 1.f / sqrtf(m2 / (float)M + eps);
  if (stats && threadIdx.x == 0) {
    stats[ng * 2] = mean;
    stats[ng * 2 + 1] = rstd;
  }
  if (A) {
    for (int c = threadIdx.x; c < Cg; c += nt) {  // the backward's A, B
      A[n * s.C + g * Cg + c] = rstd * ca[c];
      B[n * s.C + g * Cg + c] = cb[c];
    }
  }
#pragma unroll
  for (int k = 0; k < IMAX; ++k) {
    const int i = (k * nt + (int)threadIdx.x) * V;
    if (i < M) {
      float o[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int c = ch[k] + (NHWC ? j : 0);
        o[j] = act(rstd * ca[c] * (xv[k][j] - mean) + cb[c], s.silu);
      }
      T* p = y + base + (NHWC ? (int64_t)(i / Cg) * s.C + ch[k] : (int64_t)i);
      if (V > 1) store<T, V>(p, o); else *p = from_f<T>(o[0]);
    }
  }
}

// One warp per (n, g): per-channel sums, the parameter gradients that need no batch sum, P = rstd ge, and the
// group means m1, m2 of dx's formula.
__global__ void gn_bwd_finalize_kernel(Shape s, const float* __restrict__ part, const float* __restrict__ w,
                                       const float* __restrict__ bias, const float* __restrict__ scale,
                                       const float* __restrict__ stats, float* __restrict__ csum,
                                       float* __restrict__ P, float* __restrict__ m12, float* __restrict__ dscale,
                                       float* __restrict__ dshift) {
  const int64_t ng = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (ng >= s.N * s.G) return;
  const int64_t n = ng / s.G, g = ng % s.G, Cg = s.C / s.G;
  const float rstd = stats[ng * 2 + 1];
  float a1 = 0.f, a2 = 0.f;
  for (int64_t c = g * Cg + lane; c < (g + 1) * Cg; c += 32) {
    KahanSum ksdy, ksdyx;
    for (int64_t split = 0; split < s.S; ++split) {
      const float* p = part + ((n * s.S + split) * s.C + c) * 2;
      ksdy.add(p[0]);
      ksdyx.add(p[1]);
    }
    const float sdy = ksdy.sum, sdyx = ksdyx.sum;
    const int64_t nc = n * s.C + c;
    const float wc = w ? w[c] : 1.f, ge = wc * (scale ? 1.f + scale[n * s.ms + c] : 1.f);
    csum[nc * 2] = sdy;
    csum[nc * 2 + 1] = sdyx;
    P[nc] = rstd * ge;
    if (dscale) dscale[nc] = wc * sdyx + (bias ? bias[c] : 0.f) * sdy;
    if (dshift) dshift[nc] = sdy;
    a1 += ge * sdy;
    a2 += ge * sdyx;
  }
  a1 = warp_sum(a1);
  a2 = warp_sum(a2);
  if (lane == 0) {
    const float M = (float)(Cg * s.HW);
    m12[ng * 2] = a1 / M;
    m12[ng * 2 + 1] = a2 / M;
  }
}

// dweight, dbias: one thread per channel, batch summed in order (compensated).
__global__ void gn_bwd_params_kernel(Shape s, const float* __restrict__ csum, const float* __restrict__ scale,
                                     float* __restrict__ dw, float* __restrict__ db) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= s.C) return;
  KahanSum sw, sb;
  for (int64_t n = 0; n < s.N; ++n) {
    const float k = scale ? 1.f + scale[n * s.ms + c] : 1.f;
    sb.add(k * csum[(n * s.C + c) * 2]);
    sw.add(k * csum[(n * s.C + c) * 2 + 1]);
  }
  if (dw) dw[c] = sw.sum;
  if (db) db[c] = sb.sum;
}

// Elementwise pass, forward (out = y) or backward (out = dx). V consecutive elements share (n, c) in NCHW (V | HW)
// and n in NHWC (V | C).
template <typename T, bool BWD, bool NHWC, int V>
__global__ void gn_apply_kernel(Shape s, const T* __restrict__ x, const T* __restrict__ dy,
                                const float* __restrict__ A, const float* __restrict__ B,
                                const float* __restrict__ stats, const float* __restrict__ P,
                                const float* __restrict__ m12, const float* __restrict__ pre, int64_t pre_stride,
                                T* __restrict__ out) {
  const int64_t total = s.N * s.C * s.HW, stride = (int64_t)gridDim.x * blockDim.x * V, Cg = s.C / s.G;
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    const int64_t n = i / (s.C * s.HW), c0 = NHWC ? i % s.C : (i / s.HW) % s.C;
    float xv[V], dv[V], o[V];
    load<T, V>(x + i, xv);
    if (BWD) load<T, V>(dy + i, dv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = c0 + (NHWC ? j : 0), nc = n * s.C + c, ng = n * s.G + c / Cg;
      const float xp = BWD ? xv[j] : xv[j] + pre_at(pre, pre_stride, n, c);  // x + pre (forward)
      const float xc = xp - stats[ng * 2], z = A[nc] * xc + B[nc];
      if (!BWD) {
        o[j] = act(z, s.silu);
      } else {
        const float rstd = stats[ng * 2 + 1], xhat = xc * rstd;
        const float dy1 = dv[j] * act_grad(z, s.silu);
        o[j] = P[nc] * dy1 - rstd * (m12[ng * 2] + xhat * m12[ng * 2 + 1]);
      }
    }
    store<T, V>(out + i, o);
  }
}

constexpr int kThreads = 256;
constexpr int64_t kMaxSplits = 65535;   // the NHWC reduction's gridDim.y

template <typename T, bool BWD>
void launch_reduce(Shape s, ptr x, ptr dy, ptr A, ptr B, ptr stats, ptr pre, int64_t pre_stride, ptr part,
                   cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  if (s.nhwc) {
    dim3 grid((unsigned)((s.C + 31) / 32 * s.N), (unsigned)s.S);
    gn_reduce_nhwc_kernel<T, BWD><<<grid, dim3(32, 8), 0, st>>>(s, (const T*)x, (const T*)dy, (const float*)A,
                                                                (const float*)B, (const float*)stats,
                                                                (const float*)pre, pre_stride, (float*)part);
    return;
  }
  const unsigned blocks = (unsigned)((s.N * s.C * s.S * 32 + kThreads - 1) / kThreads);
  const bool vec = s.HW % V == 0 && s.chunk % V == 0 && x % 16 == 0 && dy % 16 == 0;
  if (vec)
    gn_reduce_nchw_kernel<T, BWD, V><<<blocks, kThreads, 0, st>>>(s, (const T*)x, (const T*)dy, (const float*)A,
                                                                  (const float*)B, (const float*)stats,
                                                                  (const float*)pre, pre_stride, (float*)part);
  else
    gn_reduce_nchw_kernel<T, BWD, 1><<<blocks, kThreads, 0, st>>>(s, (const T*)x, (const T*)dy, (const float*)A,
                                                                  (const float*)B, (const float*)stats,
                                                                  (const float*)pre, pre_stride, (float*)part);
}

template <typename T, bool BWD, bool NHWC>
void launch_apply_layout(Shape s, ptr x, ptr dy, ptr A, ptr B, ptr stats, ptr P, ptr m12, ptr pre,
                         int64_t pre_stride, ptr out, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const int64_t total = s.N * s.C * s.HW;
  const bool vec = (NHWC ? s.C : s.HW) % V == 0 && x % 16 == 0 && dy % 16 == 0 && out % 16 == 0;
  auto args = [&](auto kernel, int v) {
    kernel<<<blocks_for(total / v, kThreads), kThreads, 0, st>>>(s, (const T*)x, (const T*)dy, (const float*)A,
                                                               (const float*)B, (const float*)stats,
                                                               (const float*)P, (const float*)m12,
                                                               (const float*)pre, pre_stride, (T*)out);
  };
  if (vec) args(gn_apply_kernel<T, BWD, NHWC, V>, V);
  else args(gn_apply_kernel<T, BWD, NHWC, 1>, 1);
}

template <typename T, bool BWD>
void launch_apply(Shape s, ptr x, ptr dy, ptr A, ptr B, ptr stats, ptr P, ptr m12, ptr pre, int64_t pre_stride,
                  ptr out, cudaStream_t st) {
  if (s.nhwc) launch_apply_layout<T, BWD, true>(s, x, dy, A, B, stats, P, m12, pre, pre_stride, out, st);
  else launch_apply_layout<T, BWD, false>(s, x, dy, A, B, stats, P, m12, pre, pre_stride, out, st);
}

// The block of the one-launch forward: about two vectors per thread (all loads in flight at once, few warps to
// reduce over), a multiple of 32 threads, at most kFusedMaxThreads; IMAX = kFusedRegs / V vectors per thread then
// cover the group (M <= kFusedMaxGroup = kFusedMaxThreads kFusedRegs). 0 where they would not (the caller refuses
// the launch).
int fused_threads(int64_t M, int V) {
  static_assert(kFusedMaxGroup <= (int64_t)kFusedMaxThreads * kFusedRegs, "a largest group must fit one block");
  const int64_t vecs = (M + V - 1) / V, t = ((vecs + 1) / 2 + 31) / 32 * 32;
  const int threads = (int)(t < 32 ? 32 : t > kFusedMaxThreads ? kFusedMaxThreads : t);
  return (int64_t)threads * (kFusedRegs / V) * V >= M ? threads : 0;
}

template <typename T, typename PA, typename PM>
int launch_fused_fwd(Shape s, ptr x, float eps, ptr w, ptr b, ptr scale, ptr shift, ptr pre, int64_t pre_stride,
                     ptr stats, ptr A, ptr B, ptr y, cudaStream_t st) {
  constexpr int VMAX = 16 / sizeof(T);
  const int64_t Cg = s.C / s.G, M = Cg * s.HW;
  const unsigned blocks = (unsigned)(s.N * s.G);
  int launched = 0;
  auto go = [&](auto kernel, int v) {
    const int threads = fused_threads(M, v);
    if (!threads) return;
    kernel<<<blocks, threads, 0, st>>>(s, (const T*)x, eps, (const PA*)w, (const PA*)b, (const PM*)scale,
                                       (const PM*)shift, (const PM*)pre, pre_stride, (float*)stats, (float*)A,
                                       (float*)B, (T*)y);
    launched = 1;
  };
  // The widest vector that divides the run (NCHW: HW; NHWC: Cg, and C so every row starts aligned) and the
  // pointers' alignment allow.
  const int64_t run = s.nhwc ? Cg : s.HW;
  int v = VMAX;
  while (v > 1 && (run % v || (s.nhwc && s.C % v) || x % (v * sizeof(T)) || y % (v * sizeof(T)))) v /= 2;
  if (s.nhwc) {
    if (v >= 8) go(gn_fwd_fused_kernel<T, PA, PM, true, VMAX >= 8 ? 8 : 1>, VMAX >= 8 ? 8 : 1);
    else if (v == 4) go(gn_fwd_fused_kernel<T, PA, PM, true, 4>, 4);
    else if (v == 2) go(gn_fwd_fused_kernel<T, PA, PM, true, 2>, 2);
    else go(gn_fwd_fused_kernel<T, PA, PM, true, 1>, 1);
  } else {
    if (v == VMAX) go(gn_fwd_fused_kernel<T, PA, PM, false, VMAX>, VMAX);
    else go(gn_fwd_fused_kernel<T, PA, PM, false, 1>, 1);
  }
  return launched ? static_cast<int>(cudaGetLastError()) : static_cast<int>(cudaErrorInvalidValue);
}

template <typename U> struct Tag { using type = U; };

Shape make_shape(int64_t N, int64_t C, int64_t HW, int64_t G, int64_t S, bool nhwc, bool silu, int elem,
                 int64_t mod_stride) {
  const int64_t V = 16 / elem;
  int64_t chunk = (HW + S - 1) / S;
  if (!nhwc) chunk = (chunk + V - 1) / V * V;  // vector loads never straddle two chunks
  return Shape{N, C, HW, G, S, chunk, mod_stride, nhwc, silu};
}

int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

unsigned warps_blocks(int64_t warps) { return (unsigned)((warps * 32 + kThreads - 1) / kThreads); }

}  // namespace

int group_norm_act_fwd(ptr x, int dtype, int64_t N, int64_t C, int64_t HW, int64_t G, int64_t S, bool nhwc,
                       bool silu, float eps, ptr weight, ptr bias, ptr scale, ptr shift, int64_t mod_stride, ptr pre,
                       int64_t pre_stride, int affine_dtype, int mod_dtype, ptr y, ptr part, ptr stats, ptr A, ptr B, ptr stream) {
  if (N * C * HW == 0) return 0;
  if (G <= 0 || C % G || S < 0 || S > kMaxSplits ||
      (S == 0 && ((C / G) * HW > kFusedMaxGroup || C / G > kFusedMaxChannels)) ||
      (pre && pre_stride != 0 && pre_stride != C) || ((scale || shift) && N > 1 && mod_stride < C) ||
      (S != 0 && !(stats && A && B)))
    return static_cast<int>(cudaErrorInvalidValue);
  // Parameters in x's type are read as they are by the one-launch path only; the split path takes fp32.
  for (int pd : {affine_dtype, mod_dtype})
    if (pd != kFloat32 && (pd != dtype || S != 0)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const Shape s = make_shape(N, C, HW, G, S > 0 ? S : 1, nhwc, silu, dtype_size(dtype), mod_stride);
  CM_DISPATCH(dtype, T, {
    if (S == 0) {
      auto go = [&](auto pa, auto pm) {   // type tags: the parameter types
        return launch_fused_fwd<T, typename decltype(pa)::type, typename decltype(pm)::type>(
            s, x, eps, weight, bias, scale, shift, pre, pre_stride, stats, A, B, y, st);
      };
      const bool fa = affine_dtype == kFloat32, fm = mod_dtype == kFloat32;
      if (fa && fm) return go(Tag<float>{}, Tag<float>{});
      if (fa) return go(Tag<float>{}, Tag<T>{});
      if (fm) return go(Tag<T>{}, Tag<float>{});
      return go(Tag<T>{}, Tag<T>{});
    }
    launch_reduce<T, false>(s, x, 0, 0, 0, 0, pre, pre_stride, part, st);
    gn_fwd_finalize_kernel<<<warps_blocks(N * G), kThreads, 0, st>>>(
        s, (const float*)part, eps, (const float*)weight, (const float*)bias, (const float*)scale,
        (const float*)shift, (float*)stats, (float*)A, (float*)B);
    launch_apply<T, false>(s, x, 0, A, B, stats, 0, 0, pre, pre_stride, y, st);
  });
  return static_cast<int>(cudaGetLastError());
}

int group_norm_act_bwd(ptr x, ptr dy, int dtype, int64_t N, int64_t C, int64_t HW, int64_t G, int64_t S,
                       bool nhwc, bool silu, ptr weight, ptr bias, ptr scale, int64_t mod_stride, ptr stats, ptr A,
                       ptr B, ptr part, ptr csum, ptr P, ptr m12, ptr dx, ptr dweight, ptr dbias, ptr dscale,
                       ptr dshift, ptr stream) {
  if (N * C * HW == 0) return 0;
  if (G <= 0 || C % G || S <= 0 || S > kMaxSplits || (scale && N > 1 && mod_stride < C))
    return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const Shape s = make_shape(N, C, HW, G, S, nhwc, silu, dtype_size(dtype), mod_stride);
  CM_DISPATCH(dtype, T, {
    launch_reduce<T, true>(s, x, dy, A, B, stats, 0, 0, part, st);
    gn_bwd_finalize_kernel<<<warps_blocks(N * G), kThreads, 0, st>>>(
        s, (const float*)part, (const float*)weight, (const float*)bias, (const float*)scale,
        (const float*)stats, (float*)csum, (float*)P, (float*)m12, (float*)dscale, (float*)dshift);
    if (dweight || dbias)
      gn_bwd_params_kernel<<<(unsigned)((C + kThreads - 1) / kThreads), kThreads, 0, st>>>(
          s, (const float*)csum, (const float*)scale, (float*)dweight, (float*)dbias);
    if (dx) launch_apply<T, true>(s, x, dy, A, B, stats, P, m12, 0, 0, dx, st);
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cmfast
