"""The triton backend: one torch.autograd.Function per fused op around the kernels in kernels/ (cmfast.kernels).

Runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1 (tests only). Signatures match cmfast/ops/_torch.py;
cmfast/ops/_api.py has already checked and normalized the arguments. Kernels compute in fp32 and cast on store,
so float64 inputs are refused here rather than silently computed in fp32.
"""
from __future__ import annotations

import torch

from cmfast.kernels import attention as _attn
from cmfast.kernels import consistency_loss as _loss
from cmfast.kernels import group_norm_act as _gn
from cmfast.kernels import residual as _res
from cmfast.kernels import skip_output as _skip
from cmfast.ops import check_pre_bias_forward_only

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(op: str, *tensors) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"{op} (triton): expected float32/float16/bfloat16 tensors, got {t.dtype}")


# ---- Skip output (CM paper eq. 7) ----------------------------------------------------------------------------------
class _SkipOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, F, sigma, sigma_data, sigma_min):
        ctx.save_for_backward(sigma)
        ctx.consts = (sigma_data, sigma_min, x.dtype, F.dtype, _skip.memory_format(x))
        return _skip.skip_output_fwd(x, F, sigma, sigma_data, sigma_min)

    @staticmethod
    def backward(ctx, dy):
        (sigma,) = ctx.saved_tensors
        sigma_data, sigma_min, x_dtype, f_dtype, fmt = ctx.consts
        dx, dF = _skip.skip_output_bwd(dy, sigma, sigma_data, sigma_min, x_dtype, f_dtype, fmt)
        return dx, dF, None, None, None


def skip_output(x, F, sigma, sigma_data, sigma_min):
    _check("skip_output", x, F)
    if sigma.requires_grad and torch.is_grad_enabled():
        raise ValueError("skip_output (triton): expected sigma without requires_grad (no gradient w.r.t. sigma); "
                         "use backend 'torch' to differentiate through the scalings")
    return _SkipOutput.apply(x, F, sigma, sigma_data, sigma_min)


def skip_output_infer(x, F, sigma, sigma_data, sigma_min, uint8):
    """Sampler epilogue, no autograd: clamp to [-1, 1] and optionally the uint8 bytes, in one pass."""
    _check("skip_output_infer", x, F)
    return _skip.skip_output_fwd(x.detach(), F.detach(), sigma, sigma_data, sigma_min, clamp=True, uint8=uint8)


# ---- GroupNorm + scale/shift + SiLU ----------------------------------------------------------------------------
class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, scale, shift, act):
        y, stats, plan = _gn.group_norm_act_fwd(x, num_groups, weight, bias, eps, scale, shift, act)
        ctx.save_for_backward(x, stats, weight, bias, scale, shift)
        ctx.plan, ctx.act = plan, act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, stats, weight, bias, scale, shift = ctx.saved_tensors
        dx, A, B = _gn.group_norm_act_bwd(dy, x, stats, ctx.plan, weight, bias, scale, shift, ctx.act)
        need = ctx.needs_input_grad
        s1 = 1.0 + scale.float() if scale is not None else None
        dw = db = dscale = dshift = None
        if need[2]:
            dw = ((B * s1).sum(0) if s1 is not None else B.sum(0)).to(weight.dtype)
        if need[3]:
            db = ((A * s1).sum(0) if s1 is not None else A.sum(0)).to(bias.dtype)
        if need[5]:
            ds = B * weight.float() if weight is not None else B
            dscale = (ds + A * bias.float() if bias is not None else ds).to(scale.dtype)
        if need[6]:
            dshift = A.to(shift.dtype)
        return dx if need[0] else None, None, dw, db, None, dscale, dshift, None


def group_norm_act(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias=None):
    """pre_bias (forward only; cmfast.ops calls it so only without a gradient): GN of x + pre_bias, in the loads."""
    _check("group_norm_act", x, weight, bias, scale, shift)
    if pre_bias is not None:
        _check("group_norm_act", x, pre_bias)
        check_pre_bias_forward_only(x, weight, bias, scale, shift, pre_bias)
        return _gn.group_norm_act_fwd(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias)[0]
    return _GroupNormAct.apply(x, num_groups, weight, bias, eps, scale, shift, act)


group_norm_act.fuses_pre_bias = True


# ---- Attention --------------------------------------------------------------------------------------------------
class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _attn.attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn.attention_bwd(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def attention(q, k, v, scale):
    _check("attention", q, k, v)
    return _Attention.apply(q, k, v, scale)


# ---- Residual join ---------------------------------------------------------------------------------------------
class _Residual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip, bias, scale):
        ctx.scale, ctx.bias_dtype = scale, None if bias is None else bias.dtype
        return _res.residual_fwd(x, skip, bias, scale)

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        g = dy * ctx.scale if need[0] or need[1] else None     # d/dx = d/dskip: one tensor serves both
        db = None
        if need[2]:
            dims = [0] + list(range(2, dy.dim()))
            db = (dy.sum(dims, dtype=torch.float32) * ctx.scale).to(ctx.bias_dtype)   # no fp32 copy of dy
        return g if need[0] else None, g if need[1] else None, db, None


def residual(x, skip, bias, scale):
    _check("residual", x, skip, bias)
    return _Residual.apply(x, skip, bias, scale)


# ---- Consistency loss ------------------------------------------------------------------------------------------
class _ConsistencyLoss(torch.autograd.Function):
    """Loss and d loss / d pred in one forward pass; backward only scales the saved gradient. The target is
    stop-gradient (CM paper eq. 10: the target network's output; in CT/iCT a detached copy), so it gets none."""

    @staticmethod
    def forward(ctx, pred, target, kind, c, weight):
        loss, raw, g, coef = _loss.consistency_loss_fwd(pred, target, kind, c, weight)
        ctx.save_for_backward(g, coef, raw)
        ctx.pred_dtype = pred.dtype
        ctx.weight_dtype = weight.dtype if weight is not None else None
        return loss

    @staticmethod
    def backward(ctx, dloss):
        g, coef, raw = ctx.saved_tensors
        dpred = _loss.consistency_loss_bwd(g, coef, dloss, ctx.pred_dtype) if ctx.needs_input_grad[0] else None
        dweight = (raw * dloss.float()).to(ctx.weight_dtype) if ctx.needs_input_grad[4] else None
        return dpred, None, None, None, dweight


def consistency_loss(pred, target, kind, c, weight):
    _check("consistency_loss", pred, target, weight)
    return _ConsistencyLoss.apply(pred, target, kind, c, weight)
