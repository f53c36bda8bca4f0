"""Public functional entries of cmfast.ops: argument checks (one clear error each), then dispatch."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import precond
from ..precond import sigma_vector
from ..schedules import as_number
from . import implementation, shape_class, use_backend

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOSS_KINDS = ("pseudo_huber", "l2", "l1")
ACTS = ("silu", "none")


def _float(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating dtype (float32/float16/bfloat16/float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")


def _number(name: str, v, lo: float = -math.inf, lo_open: bool = False, what: str = "a number") -> float:
    """v as a float, finite and above lo (strictly with lo_open): one TypeError for a non-number (a string failed
    inside a comparison as "'>' not supported between instances of 'str' and 'int'", or was read by float()), one
    ValueError for a value out of range (nan and inf included)."""
    f = as_number(v)
    if f is None:
        raise TypeError(f"{name}: expected {what}, got {v!r}")
    if not (math.isfinite(f) and (f > lo if lo_open else f >= lo)):
        raise ValueError(f"{name}: expected {what}, got {v!r}")
    return f


def _same_device(ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device}, got {t.device}")


def _dispatch(op: str, ref: torch.Tensor, case: str | None, *others) -> Callable:
    """The implementation of this call: the torch composition for an empty batch (the kernels launch no empty
    grids), and under backend 'auto' for a call with any float64 tensor (the kernels compute in fp32 and refuse
    float64: auto had sent an fp32 x with an fp64 weight to the cuda backend, which raised); else the backend in
    force, by ref's device and dtype and the shape class `case`."""
    if ref.numel() == 0:
        with use_backend("torch"):
            return implementation(op, ref.device, ref.dtype, case)
    f64 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in others)
    return implementation(op, ref.device, torch.float64 if f64 else ref.dtype, case)


def _skip_args(x, F, sigma) -> torch.Tensor:
    """The checks skip_output and skip_output_infer share: x and F float tensors of one shape on one device; sigma
    as a float32 (B,) vector."""
    _float("x", x)
    _float("F", F)
    if x.dim() == 0:        # failed inside sigma_vector as 'tuple index out of range'
        raise ValueError(f"x: expected a batch (B, ...), got shape {tuple(x.shape)}")
    if F.shape != x.shape:
        raise ValueError(f"F: expected the shape of x {tuple(x.shape)}, got {tuple(F.shape)}")
    _same_device(x, F=F)
    # float64 where a test asks (DESIGN.md 2): sigma not rounded to fp32
    return sigma_vector(sigma, x, dtype=torch.float64 if torch.float64 in (x.dtype, F.dtype) else torch.float32)


def skip_output(x, F, sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """c_skip(sigma) x + c_out(sigma) F (CM paper eq. 7), math in fp32 (float64 when x or F is), result in x's dtype;
    differentiable in x and F."""
    s = _skip_args(x, F, sigma)
    sd, smin = _data_and_min(sigma_data, sigma_min)
    grad = torch.is_grad_enabled() and (x.requires_grad or F.requires_grad)
    return _dispatch("skip_output", x, shape_class(grad, batch=x.shape[0]), F)(x, F, s, sd, smin)


def _data_and_min(sigma_data, sigma_min) -> tuple[float, float]:
    """sigma_data > 0 and sigma_min >= 0, finite (0 gave c_skip = c_out = 0, NaN gave NaN images, without a word)."""
    return (_number("sigma_data", sigma_data, 0.0, True, "a positive finite number"),
            _number("sigma_min", sigma_min, 0.0, False, "a finite number >= 0"))


def skip_output_infer(x, F, sigma, sigma_data: float = 0.5, sigma_min: float = 0.002, uint8: bool = False):
    """Sampler epilogue: clamp(c_skip x + c_out F, -1, 1); with uint8=True the image bytes round((y + 1) * 127.5)."""
    s = _skip_args(x, F, sigma)
    sd, smin = _data_and_min(sigma_data, sigma_min)
    return _dispatch("skip_output_infer", x, shape_class(False, batch=x.shape[0]), F)(x, F, s, sd, smin, bool(uint8))


def group_norm_act(x, num_groups: int, weight=None, bias=None, eps: float = 1e-6, scale=None, shift=None,
                   act: str | None = "silu", pre_bias=None):
    """act(GroupNorm(x + pre_bias) * (1 + scale) + shift): fp32 statistics; scale/shift are (N, C); act 'silu' or
    None. pre_bias, (N, C) or (1, C), is a per-channel add before the norm (a DDPM++ block's embedding): the Triton
    and CUDA kernels add it as they load x (the sum in fp32) when no gradient is needed; otherwise, and in the torch
    backend, it is an add in x's dtype first."""
    _float("x", x)
    if x.dim() < 3:
        raise ValueError(f"x: expected (N, C, ...) with at least one spatial dimension, got shape {tuple(x.shape)}")
    N, C = x.shape[:2]
    if C == 0 or any(n == 0 for n in x.shape[2:]):
        raise ValueError(f"x: expected channels and spatial dimensions of at least 1, got shape {tuple(x.shape)}")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups: expected a positive divisor of the {C} channels, got {num_groups!r}")
    # also nan and inf; 1 / sqrt(var + eps) needs a positive eps for constant groups
    eps = _number("eps", eps, 0.0, True, "a positive number")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _float(name, t)
            if t.shape != (C,):
                raise ValueError(f"{name}: expected shape ({C},), got {tuple(t.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            _float(name, t)
            if t.shape != (N, C):
                raise ValueError(f"{name}: expected shape ({N}, {C}), got {tuple(t.shape)}")
    if pre_bias is not None:
        _float("pre_bias", pre_bias)
        if pre_bias.shape not in ((N, C), (1, C)):
            raise ValueError(f"pre_bias: expected shape ({N}, {C}) or (1, {C}), got {tuple(pre_bias.shape)}")
    _same_device(x, weight=weight, bias=bias, scale=scale, shift=shift, pre_bias=pre_bias)
    act = "none" if act is None else act
    if act not in ACTS:
        raise ValueError(f"act: expected 'silu' or None, got {act!r}")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, scale, shift, pre_bias))
    fn = _dispatch("group_norm_act", x, shape_class(grad, x), weight, bias, scale, shift, pre_bias)
    if pre_bias is not None:
        if not grad and getattr(fn, "fuses_pre_bias", False):
            return fn(x, num_groups, weight, bias, eps, scale, shift, act, pre_bias=pre_bias)
        x = x + pre_bias.to(x.dtype).reshape(pre_bias.shape + (1,) * (x.dim() - 2))
    return fn(x, num_groups, weight, bias, eps, scale, shift, act)


def attention(q, k, v, scale: float | None = None):
    """softmax(q k^T * scale) v over (B, H, L, D) tensors; scale defaults to 1 / sqrt(D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _float(name, t, ndim=4)
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: expected q (B, H, Lq, D) and k, v (B, H, Lk, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] == 0 or (k.shape[2] == 0 and q.shape[2]):   # D = 0: a ZeroDivisionError; no key: a softmax of none
        raise ValueError(f"attention: expected D >= 1 and at least one key (Lk >= 1), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    _same_device(q, k=k, v=v)
    scale = q.shape[-1] ** -0.5 if scale is None else _number("scale", scale, what="a finite number")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _dispatch("attention", q, shape_class(grad, batch=q.shape[0]))(q, k, v, scale)


def residual(x, skip, bias=None, scale: float = 1.0):
    """A UNet block's residual join (x + skip + bias[c]) * scale, in the promoted dtype of x and skip and x's layout;
    bias (C,) is an optional per-channel add (the last convolution's, taken out of it). Differentiable in all three."""
    _float("x", x)
    _float("skip", skip)
    if x.dim() < 2 or skip.shape != x.shape:
        raise ValueError(f"skip: expected the shape of x {tuple(x.shape)} (N, C, ...), got {tuple(skip.shape)}")
    if bias is not None:
        _float("bias", bias)
        if bias.shape != (x.shape[1],):
            raise ValueError(f"bias: expected shape ({x.shape[1]},), got {tuple(bias.shape)}")
    _same_device(x, skip=skip, bias=bias)
    dt = torch.promote_types(x.dtype, skip.dtype)
    x, skip = x.to(dt), skip.to(dt)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, skip, bias))
    return _dispatch("residual", x, shape_class(grad, x), bias)(x, skip, bias, float(scale))


def consistency_loss(pred, target, kind: str = "pseudo_huber", c: float | None = None, weight=None):
    """Per-sample distance (B,) in fp32: pseudo_huber sqrt(||pred - target||^2 + c^2) - c (iCT, c = 0.00054 sqrt(d)),
    l2 = mean of squares, l1 = mean of absolute values; times weight (B,) when given. Differentiable in pred."""
    _float("pred", pred)
    _float("target", target)
    if pred.shape != target.shape or pred.dim() < 1:
        raise ValueError(f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    B = pred.shape[0]
    if weight is not None:
        _float("weight", weight)
        if weight.shape != (B,):
            raise ValueError(f"weight: expected shape ({B},), got {tuple(weight.shape)}")
    _same_device(pred, target=target, weight=weight)
    d = math.prod(pred.shape[1:])
    if d == 0:
        raise ValueError(f"pred: expected at least one element per sample, got shape {tuple(pred.shape)}")
    if c is None:
        c = 0.00054 * d ** 0.5
    if kind == "pseudo_huber":      # also a string (a TypeError in the comparison) and inf (an inf / NaN loss)
        c = _number("c", c, 0.0, True, "a positive number for pseudo_huber")
    grad = torch.is_grad_enabled() and pred.requires_grad
    return _dispatch("consistency_loss", pred, shape_class(grad, batch=B), target, weight)(
        pred, target, kind, float(c), weight)


def trig_tangent_loss(F, x_t, dxdt, t, *, F_plus=None, F_minus=None, h=None, dFdt=None, logvar=None, weight=None,
                      r: float = 1.0, sigma_data: float = 0.5, c: float = 0.1, norm: str = "l2"):
    """Per-sample sCM loss (B,) fp32 (Lu & Song 2024, Alg. 1) with t the TrigFlow time (B,):
    g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt), gn = g / (||g|| + c) (norm 'l2', the paper's) or
    gn = g / (||g|| / sqrt(D) + c) (norm 'rms': the root mean square, so c means the same at every image size; NVIDIA
    FastGen's sCM default, g_norm_spatial_invariance),
    loss = ||F - F- - gn||^2 weight / (exp(logvar) D) + logvar, F- = F under stop-gradient (theta- = stopgrad theta).
    dF-/dt comes either as dFdt or as the finite-difference pair F_plus, F_minus with per-sample steps h (B,):
    (F_plus - F_minus) / (2 h). Differentiable in F and logvar (default 0, no adaptive weighting); the rest is
    stop-gradient. weight (B,) defaults to 1."""
    _float("F", F)
    if F.dim() < 2:
        raise ValueError(f"F: expected a batch (B, ...), got shape {tuple(F.shape)}")
    for name, u in (("x_t", x_t), ("dxdt", dxdt)):
        _float(name, u)
        if u.shape != F.shape:
            raise ValueError(f"{name}: expected the shape of F {tuple(F.shape)}, got {tuple(u.shape)}")
    fd = (F_plus, F_minus, h)
    if (dFdt is None and any(u is None for u in fd)) or (dFdt is not None and any(u is not None for u in fd)):
        raise ValueError("trig_tangent_loss: expected either dFdt or all of F_plus, F_minus, h")
    for name, u in (("F_plus", F_plus), ("F_minus", F_minus), ("dFdt", dFdt)):
        if u is not None:
            _float(name, u)
            if u.shape != F.shape:
                raise ValueError(f"{name}: expected the shape of F {tuple(F.shape)}, got {tuple(u.shape)}")
    B = F.shape[0]
    vd = torch.float64 if F.dtype == torch.float64 else torch.float32    # the torch reference computes in fp64 then
    t = sigma_vector(t, F, "t", vd)
    h = sigma_vector(h, F, "h", vd) if h is not None else None
    # a value check syncs and branches on data: left out where check_sigma's is (torch.compile, vmap, a capture)
    if h is not None and not precond.value_checks_off(F) and not bool((h > 0).all()):
        raise ValueError(f"h: expected positive finite-difference steps, got {h.tolist()[:4]}")
    if logvar is None:
        logvar = torch.zeros(B, device=F.device)
    else:
        _float("logvar", logvar)
        logvar = logvar.reshape(-1)
        if logvar.shape != (B,):
            raise ValueError(f"logvar: expected one value per sample ({B},), got shape {tuple(logvar.shape)}")
    weight = torch.ones(B, device=F.device, dtype=vd) if weight is None else sigma_vector(weight, F, "weight", vd)
    _same_device(F, x_t=x_t, dxdt=dxdt, F_plus=F_plus, F_minus=F_minus, dFdt=dFdt, logvar=logvar)
    try:
        ok = sigma_data > 0 and c >= 0
    except TypeError:       # a string: "'>' not supported between instances of 'str' and 'int'"
        raise TypeError(f"sigma_data, c: expected numbers, got sigma_data={sigma_data!r}, c={c!r}") from None
    if not ok:
        raise ValueError(f"expected sigma_data > 0 and c >= 0, got sigma_data={sigma_data}, c={c}")
    if isinstance(r, torch.Tensor):    # on the device: a CUDA-graph step's warm-up r (cmfast-train --cuda-graph)
        _float("r", r)
        if r.numel() != 1:
            raise ValueError(f"r: expected a number or a one-element tensor, got shape {tuple(r.shape)}")
        _same_device(F, r=r)
        r = r.reshape(())
    else:
        r = _number("r", r, 0.0, False, "a number >= 0 (the tangent warm-up factor)")
    ns = tangent_norm_scale(norm, F[0].numel())
    return _dispatch("trig_tangent_loss", F, None, x_t, dxdt, F_plus, F_minus, dFdt, logvar)(
        F, x_t, dxdt, t, F_plus, F_minus, h, dFdt, logvar, weight, r, float(sigma_data), float(c), ns)


TANGENT_NORMS = ("l2", "rms")


def tangent_norm_scale(norm: str, D: int) -> float:
    """The factor s of the tangent normalization g / (s ||g|| + c) for `norm` over D elements a sample: 'l2' 1 (sCM's
    ||g||), 'rms' 1 / sqrt(D) (the root mean square)."""
    if norm not in TANGENT_NORMS:
        raise ValueError(f"norm: expected one of {', '.join(TANGENT_NORMS)}, got {norm!r}")
    return 1.0 if norm == "l2" else 1.0 / math.sqrt(D)
