// Host API of the CUDA kernels: plain C++ (no CUDA or torch headers), so the pybind11 module compiles without
// either. Tensors travel as device addresses, streams as cudaStream_t values; every launcher is asynchronous on
// that stream and returns a cudaError_t code (0 = success) from the launch. A null address means "absent".
#pragma once
#include <cstdint>

namespace cmfast {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
using ptr = std::uintptr_t;

const char* error_string(int code);

// ---- skip output: y = c_skip(sigma_b) x + c_out(sigma_b) F (CM paper eq. 7, Appendix C) --------------------
// mode 0: y in x's dtype; 1: clamped to [-1, 1]; 2: clamped, then uint8 round((y + 1) * 127.5).
int skip_output_fwd(ptr x, int x_dtype, ptr F, int F_dtype, ptr sigma, float sigma_data, float sigma_min,
                    int64_t batch, int64_t per_sample, int mode, ptr y, ptr stream);
// dx = c_skip g (x's dtype, g's dtype too), dF = c_out g (F's dtype); either output may be null.
int skip_output_bwd(ptr g, int x_dtype, ptr sigma, float sigma_data, float sigma_min, int64_t batch,
                    int64_t per_sample, ptr dx, ptr dF, int F_dtype, ptr stream);

// ---- consistency loss: per-sample distance and its gradient in one kernel -----------------------------------
// kind 0 pseudo_huber, 1 l2, 2 l1. loss (B,) fp32; grad (B, d) fp32 = dloss_b / dpred (null: not computed).
int consistency_loss_fwd(ptr pred, int pred_dtype, ptr target, int target_dtype, ptr weight, int kind, float c,
                         int64_t batch, int64_t d, ptr loss, ptr grad, ptr stream);
// dpred = grad * gout[b], in pred's dtype.
int consistency_loss_bwd(ptr grad, ptr gout, int64_t batch, int64_t d, ptr dpred, int pred_dtype, ptr stream);

// ---- group_norm_act: act(GroupNorm(x) * (1 + scale) + shift) ----------------------------------------------
constexpr int64_t kFusedMaxGroup = 16384;
constexpr int64_t kFusedMaxChannels = 512;   // S = 0 also needs C/G <= this (the group's coefficients in shared memory)
// x is (N, C, HW) (nhwc = false) or (N, HW, C) (nhwc = true). weight/bias (C,) of type affine_dtype, scale/shift (N, C)
// of type mod_dtype, or null, row n at n * mod_stride (>= C: the UNet's chunks of its embedding output, read in place); each type fp32, or x's dtype where S = 0. pre (of type mod_dtype, or null): a per-channel
// add before the norm, the output is that of x + pre (DDPM++'s embedding add); row n at pre + n * pre_stride (C, or 0
// for one row shared by the batch). The stats, A and B saved are then those of x + pre: forward only.
// splits S: the reduction over HW is cut into S chunks per (n, c); part holds N*S*C*2 floats. S = 0: one block per
// (n, g) does the whole forward in one launch (groups of at most kFusedMaxGroup = C/G*HW elements and
// kFusedMaxChannels channels; part unused).
// Saved for backward: stats (N*G*2: mean, rstd), A, B (N*C each: y1 = A (x - mean) + B before the activation); with
// S = 0 they may be null (no backward: nothing saved).
int group_norm_act_fwd(ptr x, int dtype, int64_t N, int64_t C, int64_t HW, int64_t G, int64_t S, bool nhwc,
                       bool silu, float eps, ptr weight, ptr bias, ptr scale, ptr shift, int64_t mod_stride, ptr pre,
                       int64_t pre_stride, int affine_dtype, int mod_dtype, ptr y, ptr part, ptr stats, ptr A, ptr B, ptr stream);
// Workspace: part (N*S*C*2), csum (N*C*2), P (N*C), m12 (N*G*2) floats. Outputs (null = not wanted): dx in
// x's dtype and layout; dweight, dbias (C,) and dscale, dshift (N, C, dense) in fp32. scale (fp32) as in the forward.
int group_norm_act_bwd(ptr x, ptr dy, int dtype, int64_t N, int64_t C, int64_t HW, int64_t G, int64_t S,
                       bool nhwc, bool silu, ptr weight, ptr bias, ptr scale, int64_t mod_stride, ptr stats, ptr A,
                       ptr B, ptr part, ptr csum, ptr P, ptr m12, ptr dx, ptr dweight, ptr dbias, ptr dscale,
                       ptr dshift, ptr stream);

}  // namespace cmfast
