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
from cmfast.ops import _batching as _b
from cmfast.ops import check_pre_bias_forward_only

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(op: str, *tensors) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"{op} (triton): expected float32/float16/bfloat16 tensors, got {t.dtype}")


# ---- Skip output (CM paper eq. 7) ----------------------------------------------------------------------------------
# The Functions take the torch.func style (forward without ctx, setup_context, vmap): see cmfast/ops/_batching.py.
_SkipBwd = _b.kernel_call(_skip.skip_output_bwd, "ss-----")


@_b.eager_twin
class _SkipOutput(torch.autograd.Function):
    @staticmethod
    def forward(x, F, sigma, sigma_data, sigma_min):
        return _skip.skip_output_fwd(x, F, sigma, sigma_data, sigma_min)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, F, sigma, sigma_data, sigma_min = inputs
        ctx.save_for_backward(sigma)
        # vmap has no channels-last query: under a transform dx and dF come NCHW-contiguous (values the same)
        fmt = torch.contiguous_format if _b.transformed() else _skip.memory_format(x)
        ctx.consts = (sigma_data, sigma_min, x.dtype, F.dtype, fmt)

    @staticmethod
    def backward(ctx, dy):
        (sigma,) = ctx.saved_tensors
        bwd = _SkipBwd.apply if _b.transformed(sigma) else _skip.skip_output_bwd
        dx, dF = bwd(dy, sigma, *ctx.consts)
        return dx, dF, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _b.rule(_SkipOutput.apply, "sss--", info, in_dims, args)


def skip_output(x, F, sigma, sigma_data, sigma_min):
    _check("skip_output", x, F)
    if sigma.requires_grad and torch.is_grad_enabled():
        raise ValueError("skip_output (triton): expected sigma without requires_grad (no gradient w.r.t. sigma); "
                         "use backend 'torch' to differentiate through the scalings")
    return _b.apply(_SkipOutput, x, F, sigma, sigma_data, sigma_min)


def _skip_infer(x, F, sigma, sigma_data, sigma_min, uint8):
    return _skip.skip_output_fwd(x, F, sigma, sigma_data, sigma_min, clamp=True, uint8=uint8)


_SkipInfer = _b.kernel_call(_skip_infer, "sss---")


def skip_output_infer(x, F, sigma, sigma_data, sigma_min, uint8):
    """Sampler epilogue, no autograd: clamp to [-1, 1] and optionally the uint8 bytes, in one pass."""
    _check("skip_output_infer", x, F)
    infer = _SkipInfer.apply if _b.transformed() else _skip_infer     # batched tensors under vmap: folded
    return infer(x.detach(), F.detach(), sigma, sigma_data, sigma_min, uint8)


# ---- GroupNorm + scale/shift + SiLU ----------------------------------------------------------------------------
def _gn_bwd(dy, x, stats, plan, weight, bias, scale, shift, act):
    """The backward kernels; plan None (a folded or looped call under vmap, whose batch is not the forward's):
    made here for this x (stats has N * G rows)."""
    plan = plan or _gn.Plan(x, stats.shape[0] // x.shape[0])
    return _gn.group_norm_act_bwd(dy, x, stats, plan, weight, bias, scale, shift, act)


_GNBwd = _b.kernel_call(_gn_bwd, "sss-ppss-")


def _gn_param_grads_torch(A, B, weight, bias, scale, shift, need_w, need_b, need_scale, need_shift):
    """kernels.group_norm_act.group_norm_param_grads as torch ops (the path under torch.func transforms, whose
    batched A, B the kernel does not take)."""
    s1 = 1.0 + scale.float() if scale is not None else None
    dw = db = dscale = dshift = None
    if need_w:
        dw = ((B * s1).sum(0) if s1 is not None else B.sum(0)).to(weight.dtype)
    if need_b:
        db = ((A * s1).sum(0) if s1 is not None else A.sum(0)).to(bias.dtype)
    if need_scale:
        ds = B * weight.float() if weight is not None else B
        dscale = (ds + A * bias.float() if bias is not None else ds).to(scale.dtype)
    if need_shift:
        dshift = A.to(shift.dtype)
    return dw, db, dscale, dshift


@_b.eager_twin
class _GroupNormAct(torch.autograd.Function):
    """Outputs (y, stats (N * G, 3) fp32, plan): the statistics and the launch plan go to the backward through
    setup_context (the torch.func style has no ctx in the forward); group_norm_act returns y alone."""

    @staticmethod
    def forward(x, num_groups, weight, bias, eps, scale, shift, act):
        return _gn.group_norm_act_fwd(x, num_groups, weight, bias, eps, scale, shift, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, num_groups, weight, bias, eps, scale, shift, act = inputs
        y, stats, plan = output
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)        # no zeros made for the statistics' (unused) gradient
        ctx.save_for_backward(x, stats, weight, bias, scale, shift)
        ctx.plan, ctx.act = plan, act

    @staticmethod
    def backward(ctx, dy, *_):
        x, stats, weight, bias, scale, shift = ctx.saved_tensors
        need = ctx.needs_input_grad
        wants = need[2], need[3], need[5], need[6]
        if _b.transformed(x):   # batched tensors under vmap(grad) / jacrev: the plan is made for the folded call
            dx, A, B = _GNBwd.apply(dy, x, stats, None, weight, bias, scale, shift, ctx.act)
            grads = _gn_param_grads_torch(A, B, weight, bias, scale, shift, *wants)   # torch ops: batched there
        else:
            dx, A, B = _gn.group_norm_act_bwd(dy, x, stats, ctx.plan, weight, bias, scale, shift, ctx.act)
            grads = _gn.group_norm_param_grads(A, B, weight, bias, scale, shift, *wants)     # one launch
        dw, db, dscale, dshift = grads
        return dx if need[0] else None, None, dw, db, None, dscale, dshift, None

    @staticmethod
    def vmap(info, in_dims, *args):
        # weight and bias shared ('p'): folded; vmapped per call (a different affine per slice): a loop
        return _b.rule(_GroupNormAct.apply, "s-pp-ss-", info, in_dims, args)


def group_norm_act(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias=None):
    """pre_bias (forward only; cmfast.ops calls it so only without a gradient): GN of x + pre_bias, in the loads."""
    _check("group_norm_act", x, weight, bias, scale, shift)
    if pre_bias is not None:
        _check("group_norm_act", x, pre_bias)
        check_pre_bias_forward_only(x, weight, bias, scale, shift, pre_bias)
        if _b.transformed():    # batched under vmap: the add in x's dtype first, then the Function and its rule
            x = x + pre_bias.to(x.dtype).reshape(pre_bias.shape + (1,) * (x.dim() - 2))
        else:
            return _gn.group_norm_act_fwd(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias)[0]
    return _b.apply(_GroupNormAct, x, num_groups, weight, bias, eps, scale, shift, act)


group_norm_act.fuses_pre_bias = True


# ---- Attention --------------------------------------------------------------------------------------------------
_AttnBwd = _b.kernel_call(_attn.attention_bwd, "ssssss-")


@_b.eager_twin
class _Attention(torch.autograd.Function):
    """Outputs (o, lse): the log-sum-exp goes to the backward through setup_context; attention returns o."""

    @staticmethod
    def forward(q, k, v, scale):
        return _attn.attention_fwd(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, do, *_):
        q, k, v, o, lse = ctx.saved_tensors
        bwd = _AttnBwd.apply if _b.transformed(q) else _attn.attention_bwd
        dq, dk, dv = bwd(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _b.rule(_Attention.apply, "sss-", info, in_dims, args)


def attention(q, k, v, scale):
    _check("attention", q, k, v)
    return _b.apply(_Attention, q, k, v, scale)


# ---- Residual join ---------------------------------------------------------------------------------------------
_ResBwd = _b.kernel_call(_res.residual_bwd, "s--", loops=lambda a: True)     # the bias gradient sums the batch


@_b.eager_twin
class _Residual(torch.autograd.Function):
    @staticmethod
    def forward(x, skip, bias, scale):
        return _res.residual_fwd(x, skip, bias, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, skip, bias, scale = inputs
        ctx.scale, ctx.bias_dtype = scale, None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        if need[2] and 2 <= dy.dim() <= 4 and dy.numel():
            # one pass over dy for the input gradient and the bias gradient's partial sums, one to finish them;
            # under a transform through a kernel_call (vmap: one call per slice, the bias gradient sums the batch)
            bwd = _ResBwd.apply if _b.transformed(dy) else _res.residual_bwd
            g, db = bwd(dy, ctx.scale, ctx.bias_dtype)
            return g if need[0] else None, g if need[1] else None, db, None
        # no bias gradient: one multiply (batched tensors go through it as they are)
        g = dy * ctx.scale if need[0] or need[1] else None     # d/dx = d/dskip: one tensor serves both
        db = None
        if need[2]:
            dims = [0] + list(range(2, dy.dim()))
            db = (dy.sum(dims, dtype=torch.float32) * ctx.scale).to(ctx.bias_dtype)   # no fp32 copy of dy
        return g if need[0] else None, g if need[1] else None, db, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return _b.rule(_Residual.apply, "ssp-", info, in_dims, args)


def residual(x, skip, bias, scale):
    _check("residual", x, skip, bias)
    return _b.apply(_Residual, x, skip, bias, scale)


# ---- Consistency loss ------------------------------------------------------------------------------------------
_LossBwd = _b.kernel_call(_loss.consistency_loss_bwd, "sss-")


@_b.eager_twin
class _ConsistencyLoss(torch.autograd.Function):
    """Loss and d loss / d pred in one forward pass; backward only scales the saved gradient. The target is
    stop-gradient (CM paper eq. 10: the target network's output; in CT/iCT a detached copy), so it gets none.
    Outputs (loss, raw, g, coef): the unweighted loss, the gradient and its per-sample factor go to the backward
    through setup_context; consistency_loss returns the loss."""

    @staticmethod
    def forward(pred, target, kind, c, weight):
        return _loss.consistency_loss_fwd(pred, target, kind, c, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, target, kind, c, weight = inputs
        loss, raw, g, coef = output
        ctx.mark_non_differentiable(raw, g, coef)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g, coef, raw)
        ctx.pred_dtype = pred.dtype
        ctx.weight_dtype = weight.dtype if weight is not None else None

    @staticmethod
    def backward(ctx, dloss, *_):
        g, coef, raw = ctx.saved_tensors
        dpred = dweight = None
        if ctx.needs_input_grad[0]:
            bwd = _LossBwd.apply if _b.transformed(g) else _loss.consistency_loss_bwd
            dpred = bwd(g, coef, dloss, ctx.pred_dtype)
        if ctx.needs_input_grad[4]:
            dweight = (raw * dloss.float()).to(ctx.weight_dtype)
        return dpred, None, None, None, dweight

    @staticmethod
    def vmap(info, in_dims, *args):
        return _b.rule(_ConsistencyLoss.apply, "ss--s", info, in_dims, args)


def consistency_loss(pred, target, kind, c, weight):
    _check("consistency_loss", pred, target, weight)
    return _b.apply(_ConsistencyLoss, pred, target, kind, c, weight)
