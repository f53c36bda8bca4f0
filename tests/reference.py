"""Plain-PyTorch float64 references of every fused op, written from the formulas (not from cmfast/ops/_torch.py):
explicit mean / variance for GroupNorm, explicit softmax for attention, the CM paper's scalings spelled out.
Call them on float64 copies of the inputs; gradients come from autograd through these formulas."""
from __future__ import annotations

import torch


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def skip_output(x, F, sigma, sigma_data=0.5, sigma_min=0.002):
    """c_skip x + c_out F (CM paper Appendix C):
    c_skip = sd^2 / ((s - smin)^2 + sd^2), c_out = sd (s - smin) / sqrt(s^2 + sd^2)."""
    s = sigma.double()
    c_skip = sigma_data ** 2 / ((s - sigma_min) ** 2 + sigma_data ** 2)
    c_out = sigma_data * (s - sigma_min) / torch.sqrt(s ** 2 + sigma_data ** 2)
    return _col(c_skip, x) * x + _col(c_out, x) * F


def skip_output_infer(x, F, sigma, sigma_data=0.5, sigma_min=0.002, uint8=False):
    y = skip_output(x, F, sigma, sigma_data, sigma_min).clamp(-1, 1)
    return torch.round((y + 1) * 127.5) if uint8 else y


def group_norm_act(x, num_groups, weight=None, bias=None, eps=1e-6, scale=None, shift=None, act="silu"):
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    mean = xg.sum(-1, keepdim=True) / xg.shape[-1]
    var = ((xg - mean) ** 2).sum(-1, keepdim=True) / xg.shape[-1]
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    ch = (1, C) + (1,) * (x.dim() - 2)
    per = (N, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(ch)
    if bias is not None:
        y = y + bias.reshape(ch)
    if scale is not None:
        y = y * (1 + scale.reshape(per))
    if shift is not None:
        y = y + shift.reshape(per)
    return y / (1 + torch.exp(-y)) if act == "silu" else y


def attention(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (p / p.sum(-1, keepdim=True)) @ v


def residual(x, skip, bias=None, scale=1.0):
    y = x + skip
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * (x.dim() - 2))
    return y * scale


def consistency_loss(pred, target, kind="pseudo_huber", c=None, weight=None):
    d = (pred - target).reshape(pred.shape[0], -1)
    if kind == "pseudo_huber":
        c = 0.00054 * d.shape[1] ** 0.5 if c is None else c
        loss = torch.sqrt((d * d).sum(1) + c * c) - c
    elif kind == "l2":
        loss = (d * d).sum(1) / d.shape[1]
    else:
        loss = d.abs().sum(1) / d.shape[1]
    return loss * weight if weight is not None else loss
