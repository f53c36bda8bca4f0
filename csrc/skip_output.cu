// Skip output f = c_skip(sigma) x + c_out(sigma) F (CM paper eq. 7; scalings of Appendix C), fused with the
// sampler epilogue (clamp to [-1, 1], optional uint8 image bytes) and its backward. One read of each input, one
// write of each output; the scalings are recomputed per vector from the sample's sigma in fp32.
// Dense tensors (NCHW or channels_last) keep the batch outermost, so sample b owns [b * n, (b + 1) * n).
#include "common.cuh"

namespace cmfast {
namespace {

// c_skip = sd^2 / ((s - smin)^2 + sd^2), c_out = sd (s - smin) / sqrt(s^2 + sd^2): at s = smin exactly 1 and 0.
__device__ __forceinline__ void scalings(float s, float sd, float smin, float& c_skip, float& c_out) {
  const float sd2 = sd * sd, ds = s - smin;
  c_skip = sd2 / (ds * ds + sd2);
  c_out = sd * ds / sqrtf(s * s + sd2);
}

template <int MODE> __device__ __forceinline__ float epilogue(float y) {
  if (MODE >= 1) y = fminf(fmaxf(y, -1.f), 1.f);
  if (MODE == 2) y = rintf((y + 1.f) * 127.5f);  // round half to even, as torch.round
  return y;
}

template <typename TX, typename TF, typename TY, int MODE, int V>
__global__ void skip_output_fwd_kernel(const TX* __restrict__ x, const TF* __restrict__ F,
                                       const float* __restrict__ sigma, float sd, float smin, int64_t n,
                                       int64_t total, TY* __restrict__ y) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * V;
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    float cs, co, xv[V], fv[V], yv[V];
    scalings(sigma[i / n], sd, smin, cs, co);  // V divides n: the whole vector is one sample's
    load<TX, V>(x + i, xv);
    load<TF, V>(F + i, fv);
#pragma unroll
    for (int j = 0; j < V; ++j) yv[j] = epilogue<MODE>(cs * xv[j] + co * fv[j]);
    store<TY, V>(y + i, yv);
  }
}

template <typename TX, typename TF, int V>
__global__ void skip_output_bwd_kernel(const TX* __restrict__ g, const float* __restrict__ sigma, float sd,
                                       float smin, int64_t n, int64_t total, TX* __restrict__ dx,
                                       TF* __restrict__ dF) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * V;
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    float cs, co, gv[V], out[V];
    scalings(sigma[i / n], sd, smin, cs, co);
    load<TX, V>(g + i, gv);
    if (dx) {
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = cs * gv[j];
      store<TX, V>(dx + i, out);
    }
    if (dF) {
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = co * gv[j];
      store<TF, V>(dF + i, out);
    }
  }
}

constexpr int kThreads = 256;

// 16-byte vectors of the narrowest type when every pointer is aligned for them and n is a multiple of V.
template <typename TX, int V>
bool use_vec(int64_t n, std::initializer_list<std::pair<ptr, size_t>> ptrs) {
  if (n % V) return false;
  for (auto& p : ptrs)
    if (p.first && p.first % (p.second * V)) return false;
  return true;
}

template <typename TX, typename TF, typename TY, int MODE>
void launch_fwd(ptr x, ptr F, ptr sigma, float sd, float smin, int64_t n, int64_t total, ptr y,
                cudaStream_t st) {
  constexpr int V = 16 / (sizeof(TX) < sizeof(TF) ? sizeof(TX) : sizeof(TF));
  if (use_vec<TX, V>(n, {{x, sizeof(TX)}, {F, sizeof(TF)}, {y, sizeof(TY)}}))
    skip_output_fwd_kernel<TX, TF, TY, MODE, V><<<blocks_for(total / V, kThreads), kThreads, 0, st>>>(
        (const TX*)x, (const TF*)F, (const float*)sigma, sd, smin, n, total, (TY*)y);
  else
    skip_output_fwd_kernel<TX, TF, TY, MODE, 1><<<blocks_for(total, kThreads), kThreads, 0, st>>>(
        (const TX*)x, (const TF*)F, (const float*)sigma, sd, smin, n, total, (TY*)y);
}

}  // namespace

int skip_output_fwd(ptr x, int x_dtype, ptr F, int F_dtype, ptr sigma, float sigma_data, float sigma_min,
                    int64_t batch, int64_t per_sample, int mode, ptr y, ptr stream) {
  const int64_t total = batch * per_sample;
  if (total == 0) return 0;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  CM_DISPATCH(x_dtype, TX, CM_DISPATCH(F_dtype, TF, {
    if (mode == 0) launch_fwd<TX, TF, TX, 0>(x, F, sigma, sigma_data, sigma_min, per_sample, total, y, st);
    else if (mode == 1) launch_fwd<TX, TF, TX, 1>(x, F, sigma, sigma_data, sigma_min, per_sample, total, y, st);
    else launch_fwd<TX, TF, uint8_t, 2>(x, F, sigma, sigma_data, sigma_min, per_sample, total, y, st);
  }));
  return static_cast<int>(cudaGetLastError());
}

int skip_output_bwd(ptr g, int x_dtype, ptr sigma, float sigma_data, float sigma_min, int64_t batch,
                    int64_t per_sample, ptr dx, ptr dF, int F_dtype, ptr stream) {
  const int64_t total = batch * per_sample;
  if (total == 0 || (!dx && !dF)) return 0;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  CM_DISPATCH(x_dtype, TX, CM_DISPATCH(F_dtype, TF, {
    constexpr int V = 16 / (sizeof(TX) < sizeof(TF) ? sizeof(TX) : sizeof(TF));
    if (use_vec<TX, V>(per_sample, {{g, sizeof(TX)}, {dx, sizeof(TX)}, {dF, sizeof(TF)}}))
      skip_output_bwd_kernel<TX, TF, V><<<blocks_for(total / V, kThreads), kThreads, 0, st>>>(
          (const TX*)g, (const float*)sigma, sigma_data, sigma_min, per_sample, total, (TX*)dx, (TF*)dF);
    else
      skip_output_bwd_kernel<TX, TF, 1><<<blocks_for(total, kThreads), kThreads, 0, st>>>(
          (const TX*)g, (const float*)sigma, sigma_data, sigma_min, per_sample, total, (TX*)dx, (TF*)dF);
  }));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cmfast
