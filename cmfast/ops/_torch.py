"""The torch backend: plain-PyTorch compositions. The reference every kernel is tested against, and the CPU path."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F_

from .. import precond
from . import is_nhwc


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def skip_output(x, F, sigma, sigma_data, sigma_min):
    dt = torch.float64 if torch.float64 in (x.dtype, F.dtype) else torch.float32   # fp64 stays fp64 (references)
    c_skip, c_out, _ = precond.scalings(sigma.to(dt), sigma_data, sigma_min)
    y = _per_sample(c_skip, x) * x.to(dt) + _per_sample(c_out, x) * F.to(dt)
    return y.to(x.dtype)


def skip_output_infer(x, F, sigma, sigma_data, sigma_min, uint8):
    y = skip_output(x.float(), F, sigma, sigma_data, sigma_min).clamp(-1.0, 1.0)
    if uint8:
        return ((y + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.to(x.dtype)


def group_norm_act(x, num_groups, weight, bias, eps, scale, shift, act):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32   # fp64 stays fp64 (fp64 JVP references)
    y = F_.group_norm(x.to(dt), num_groups, None, None, eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(dt).reshape(shape)
    if bias is not None:
        y = y + bias.to(dt).reshape(shape)
    pshape = x.shape[:2] + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.to(dt).reshape(pshape))
    if shift is not None:
        y = y + shift.to(dt).reshape(pshape)
    if act == "silu":
        y = F_.silu(y)
    if not torch.compiler.is_compiling() and precond.under_torch_func():
        return y.to(x.dtype)        # vmap has no channels-last query: the values alone
    fmt = torch.channels_last if x.dim() == 4 and is_nhwc(x) else torch.contiguous_format
    return y.to(x.dtype).contiguous(memory_format=fmt)


def attention(q, k, v, scale):
    # SDPA's fused kernels (flash, memory-efficient, cuDNN) need the last dimension contiguous; otherwise it runs the
    # math kernel (two batched matmuls and a softmax in memory). The UNet's q, k, v are transposed views of the qkv
    # convolution's output (EDM's channel order) with stride(-1) = 3 L, so they are made dense here: a copy of q, k and
    # v costs far less than the math kernel (H200 profile: cmfast-auto's batch-256 sample spent 2.2 ms more in gemm
    # kernels than the Triton attention, the eager bf16 baseline as much).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return F_.scaled_dot_product_attention(q, k, v, scale=scale)


def residual(x, skip, bias, scale):
    # What the UNet did before the op existed: the bias add (in x's dtype, as autocast's convolution does), the
    # residual add, the scale.
    y = x + skip
    if bias is not None:
        y = y + bias.to(y.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
    return y * scale


def consistency_loss(pred, target, kind, c, weight):
    diff = (pred.float() - target.float()).reshape(pred.shape[0], math.prod(pred.shape[1:]))   # (B,): (B, 1)
    if kind == "pseudo_huber":
        s = diff.square().sum(1) + c * c
        # s = 0 only where pred == target and c * c underflows fp32 (c < ~4e-23): sqrt's gradient there is inf and
        # inf * 0 = nan; the sqrt is taken of 1 instead and masked, so the gradient is 0 (its true value)
        loss = torch.where(s > 0, torch.where(s > 0, s, 1.0).sqrt(), 0.0) - c
    elif kind == "l2":
        loss = diff.square().mean(1)
    else:
        loss = diff.abs().mean(1)
    if weight is not None:
        loss = loss * weight.float()
    return loss
