"""Per-sample consistency-model distances with the gradient computed in the forward pass (Liger-style).

l2 = mean(d^2), l1 = mean(|d|), pseudo_huber = sqrt(||d||^2 + c^2) - c (iCT, Song & Dhariwal 2023, Sec. 3.3),
d = pred - target, each times an optional per-sample weight. One read of pred and target: phase 1 splits each
sample over programs (so batch 1 still fills the GPU), each writes a partial sum and the elementwise part of
the gradient g (d for l2 / pseudo_huber, sign(d) for l1, fp32); phase 2 sums the partials in a fixed order
(deterministic) into the loss and a per-sample coefficient k with dloss/dpred = k * g:
l2: 2 w / n, l1: w / n, pseudo_huber: w / sqrt(||d||^2 + c^2). The backward pass is one scaling,
grad_pred = g * k * grad_loss. The target gets no gradient: it is stop-gradient in CD and CT (CM paper eq. 10).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import cdiv, next_power_of_2, num_sms

BLOCK = 1024
KINDS = {"l2": 0, "l1": 1, "pseudo_huber": 2}


@triton.jit
def _consistency_loss_partial_kernel(pred_ptr, target_ptr, g_ptr, part_ptr, n, chunk, S,
                                     KIND: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    base = b.to(tl.int64) * n
    start = s.to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, chunk, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(pred_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        d = p - t
        if KIND == 1:
            acc += tl.abs(d)
            g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        else:
            acc += d * d
            g = d
        tl.store(g_ptr + base + offs, g, mask=mask)
    tl.store(part_ptr + b * S + s, tl.sum(acc, axis=0))


@triton.jit
def _consistency_loss_finish_kernel(part_ptr, weight_ptr, loss_ptr, raw_ptr, coef_ptr, n, S, c,
                                    KIND: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    total = tl.sum(tl.load(part_ptr + b * S + offs, mask=offs < S, other=0.0), axis=0)
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + b).to(tl.float32)
    if KIND == 0:
        loss = total / n
        coef = 2.0 / n
    elif KIND == 1:
        loss = total / n
        coef = 1.0 / n
    else:
        r = tl.sqrt(total + c * c)
        loss = r - c
        # r = 0 only where pred == target and c * c underflows: g = 0 there, and so the gradient (not 0 * inf)
        coef = tl.where(r > 0, 1.0 / tl.where(r > 0, r, 1.0), 0.0)
    tl.store(raw_ptr + b, loss)
    tl.store(loss_ptr + b, loss * w)
    tl.store(coef_ptr + b, coef * w)


@triton.jit
def _consistency_loss_bwd_kernel(g_ptr, coef_ptr, dl_ptr, dp_ptr, n, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    k = tl.load(coef_ptr + b) * tl.load(dl_ptr + b).to(tl.float32)
    g = tl.load(g_ptr + base + offs, mask=mask)
    tl.store(dp_ptr + base + offs, (g * k).to(dp_ptr.dtype.element_ty), mask=mask)


def split(B: int, n: int, device: torch.device, block: int | None = None) -> tuple[int, int]:
    """(chunk, S): each sample's n elements in S chunks (multiples of `block`, default BLOCK) so that B * S fills
    ~4 waves of the SMs when n is large, and one chunk per sample when B already does. Shared with the fused
    sCM tangent loss (kernels/trig_tangent_loss.py)."""
    block = BLOCK if block is None else block
    want = max(1, min(cdiv(n, 4 * block), cdiv(4 * num_sms(device), B), 1024))
    chunk = cdiv(cdiv(n, want), block) * block
    return chunk, cdiv(n, chunk)


def consistency_loss_fwd(pred, target, kind, c, weight):
    """(loss, unweighted loss, g, coef): (B,) fp32 each but g, fp32 like pred; dloss_b/dpred_b = coef_b g_b."""
    from .skip_output import memory_format
    fmt = memory_format(pred)
    pred, target = pred.contiguous(memory_format=fmt), target.contiguous(memory_format=fmt)
    B, n = pred.shape[0], pred[0].numel()
    g = torch.empty_like(pred, dtype=torch.float32)
    loss = torch.empty(B, device=pred.device, dtype=torch.float32)
    raw, coef = torch.empty_like(loss), torch.empty_like(loss)
    chunk, S = split(B, n, pred.device)
    part = torch.empty(B, S, device=pred.device, dtype=torch.float32)
    _consistency_loss_partial_kernel[(B, S)](pred, target, g, part, n, chunk, S, KIND=KINDS[kind], BLOCK=BLOCK)
    w = weight.contiguous() if weight is not None else part    # (a dummy pointer when unweighted: never read)
    _consistency_loss_finish_kernel[(B,)](part, w, loss, raw, coef, n, S, c,
                                          KIND=KINDS[kind], HAS_WEIGHT=weight is not None,
                                          BLOCK_S=max(16, next_power_of_2(S)))
    return loss, raw, g, coef


def consistency_loss_bwd(g, coef, dloss, dtype):
    """dpred_b = coef_b dloss_b g_b: the saved per-sample gradient scaled (also the sCM tangent loss's backward)."""
    dp = torch.empty_like(g, dtype=dtype)
    n = g[0].numel()
    _consistency_loss_bwd_kernel[(cdiv(n, BLOCK), g.shape[0])](g, coef, dloss.contiguous(), dp, n,
                                                                       BLOCK=BLOCK)
    return dp
