// Per-sample consistency distance d(pred, target) and its gradient in one kernel (CM paper eq. 10's d(., .);
// iCT's pseudo-Huber). One block per sample: pass 1 reduces the sample in fp32, pass 2 (when the gradient is
// wanted) writes dloss_b / dpred once, re-reading the sample from L2. The backward only scales by dL/dloss_b.
#include "common.cuh"

namespace cmfast {
namespace {

enum Kind : int { kPseudoHuber = 0, kL2 = 1, kL1 = 2 };
constexpr int kThreads = 512;

template <typename TP, typename TT, int V>
__global__ void consistency_loss_fwd_kernel(const TP* __restrict__ pred, const TT* __restrict__ target,
                                            const float* __restrict__ weight, int kind, float c, int64_t d,
                                            float* __restrict__ loss, float* __restrict__ grad) {
  __shared__ float smem[32];
  __shared__ float factor;
  const int64_t b = blockIdx.x;
  const TP* p = pred + b * d;
  const TT* t = target + b * d;
  float acc = 0.f;
  for (int64_t i = (int64_t)threadIdx.x * V; i < d; i += (int64_t)blockDim.x * V) {
    float pv[V], tv[V];
    load<TP, V>(p + i, pv);
    load<TT, V>(t + i, tv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float diff = pv[j] - tv[j];
      acc += kind == kL1 ? fabsf(diff) : diff * diff;
    }
  }
  acc = block_sum(acc, smem);
  if (threadIdx.x == 0) {
    const float w = weight ? weight[b] : 1.f;
    float l, f;  // loss and the factor of dloss/dpred (times diff, or sign(diff) for l1)
    if (kind == kPseudoHuber) {
      const float r = sqrtf(acc + c * c);
      // = r - c without the cancellation when ||diff|| << c; r = 0 only where pred == target and c * c underflows
      // (c < ~4e-23), where the gradient is 0 (not 0 * inf)
      l = r > 0.f ? acc / (r + c) : 0.f;
      f = r > 0.f ? 1.f / r : 0.f;
    } else {
      l = acc / (float)d;
      f = (kind == kL2 ? 2.f : 1.f) / (float)d;
    }
    loss[b] = w * l;
    factor = w * f;
  }
  if (!grad) return;
  __syncthreads();
  const float f = factor;
  float* gp = grad + b * d;
  for (int64_t i = (int64_t)threadIdx.x * V; i < d; i += (int64_t)blockDim.x * V) {
    float pv[V], tv[V], gv[V];
    load<TP, V>(p + i, pv);
    load<TT, V>(t + i, tv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float diff = pv[j] - tv[j];
      gv[j] = kind == kL1 ? f * (float)((diff > 0.f) - (diff < 0.f)) : f * diff;
    }
    store<float, V>(gp + i, gv);
  }
}

template <typename TP, int V>
__global__ void consistency_loss_bwd_kernel(const float* __restrict__ grad, const float* __restrict__ gout,
                                            int64_t d, int64_t total, TP* __restrict__ dpred) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * V;
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    float gv[V];
    load<float, V>(grad + i, gv);
    const float s = gout[i / d];
#pragma unroll
    for (int j = 0; j < V; ++j) gv[j] *= s;
    store<TP, V>(dpred + i, gv);
  }
}

}  // namespace

int consistency_loss_fwd(ptr pred, int pred_dtype, ptr target, int target_dtype, ptr weight, int kind, float c,
                         int64_t batch, int64_t d, ptr loss, ptr grad, ptr stream) {
  if (batch == 0) return 0;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  CM_DISPATCH(pred_dtype, TP, CM_DISPATCH(target_dtype, TT, {
    constexpr int V = 4;  // 4 elements: one 16-byte fp32 gradient store, 8- or 16-byte loads
    const bool vec = d % V == 0 && pred % (sizeof(TP) * V) == 0 && target % (sizeof(TT) * V) == 0 &&
                     grad % (sizeof(float) * V) == 0;
    if (vec)
      consistency_loss_fwd_kernel<TP, TT, V><<<(unsigned)batch, kThreads, 0, st>>>(
          (const TP*)pred, (const TT*)target, (const float*)weight, kind, c, d, (float*)loss, (float*)grad);
    else
      consistency_loss_fwd_kernel<TP, TT, 1><<<(unsigned)batch, kThreads, 0, st>>>(
          (const TP*)pred, (const TT*)target, (const float*)weight, kind, c, d, (float*)loss, (float*)grad);
  }));
  return static_cast<int>(cudaGetLastError());
}

int consistency_loss_bwd(ptr grad, ptr gout, int64_t batch, int64_t d, ptr dpred, int pred_dtype, ptr stream) {
  const int64_t total = batch * d;
  if (total == 0) return 0;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  CM_DISPATCH(pred_dtype, TP, {
    constexpr int V = 4;
    const bool vec = d % V == 0 && grad % 16 == 0 && dpred % (sizeof(TP) * V) == 0;
    if (vec)
      consistency_loss_bwd_kernel<TP, V><<<blocks_for(total / V, 256), 256, 0, st>>>(
          (const float*)grad, (const float*)gout, d, total, (TP*)dpred);
    else
      consistency_loss_bwd_kernel<TP, 1><<<blocks_for(total, 256), 256, 0, st>>>(
          (const float*)grad, (const float*)gout, d, total, (TP*)dpred);
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cmfast
