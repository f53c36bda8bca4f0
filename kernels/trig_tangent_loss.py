"""The sCM training loss with its gradient in one pass over the inputs (Lu & Song 2024, Alg. 1, Sec. 4.2).

Per sample b, over its D elements (t the TrigFlow time, sd = sigma_data, F- = F under stop-gradient):
  dF-/dt = (F+ - F-_) / (2 h)                      (finite difference; or read dF/dt directly)
  g      = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt)
  gn     = g / (s ||g|| + c)                       (s: 1 for the paper's L2 norm, D^-1/2 for the RMS)
  loss   = ||F - F- - gn||^2 w / (exp(logvar) D) + logvar = ||gn||^2 q + logvar,  q = w / (exp(logvar) D)
  dloss/dF = -2 q gn = coef g with coef = -2 q / (s ||g|| + c);  dloss/dlogvar = 1 - ||gn||^2 q.
Phase 1 (B x S programs, S splits a sample so small batches fill the GPU) reads F, F+, F-_, x_t, dx_t/dt once,
writes g (fp32) and a partial sum of g^2; phase 2 (B programs) reduces the partials in a fixed order
(deterministic) and writes loss, coef and dloss/dlogvar. Backward: dF = g coef dloss (one scaling pass).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import next_power_of_2
from .consistency_loss import consistency_loss_bwd, split

BLOCK = 1024


@triton.jit
def _trig_tangent_partial_kernel(F_ptr, Fp_ptr, Fm_ptr, x_ptr, v_ptr, t_ptr, h_ptr, g_ptr, part_ptr, r_ptr,
                                 n, chunk, S, r, sd, FD: tl.constexpr, RT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    base = b.to(tl.int64) * n
    start = s.to(tl.int64) * chunk
    t = tl.load(t_ptr + b).to(tl.float32)
    ct = tl.cos(t)
    st = tl.sin(t)
    a = -ct * ct
    if RT:      # r read from device memory (a tensor: the warm-up of a step captured in a CUDA graph)
        r = tl.load(r_ptr).to(tl.float32)
    k = -r * ct * st
    inv2h = 0.5 / tl.load(h_ptr + b).to(tl.float32)   # unused when FD is off (h_ptr then points at t)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, chunk, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < n
        f = tl.load(F_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if FD:
            fp = tl.load(Fp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            fm = tl.load(Fm_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            dF = (fp - fm) * inv2h
        else:
            dF = tl.load(Fp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = a * (sd * f - v) + k * (x + sd * dF)
        acc += g * g
        tl.store(g_ptr + base + offs, g, mask=mask)
    tl.store(part_ptr + b * S + s, tl.sum(acc, axis=0))


@triton.jit
def _trig_tangent_finish_kernel(part_ptr, lv_ptr, w_ptr, loss_ptr, coef_ptr, dlv_ptr, n, S, c, ns,
                                BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    total = tl.sum(tl.load(part_ptr + b * S + offs, mask=offs < S, other=0.0), axis=0)
    den = tl.sqrt(total) * ns + c
    sq = total / (den * den)
    lv = tl.load(lv_ptr + b).to(tl.float32)
    q = tl.load(w_ptr + b).to(tl.float32) / (tl.exp(lv) * n)
    tl.store(loss_ptr + b, sq * q + lv)
    tl.store(coef_ptr + b, -2.0 * q / den)
    tl.store(dlv_ptr + b, 1.0 - sq * q)


def _layout(F: torch.Tensor) -> torch.memory_format:
    # The loss is a per-sample sum, so any layout works as long as every input shares F's.
    if F.dim() == 4 and F.is_contiguous(memory_format=torch.channels_last) and not F.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def trig_tangent_loss_fwd(F, x_t, dxdt, t, F_plus, F_minus, h, dFdt, logvar, weight, r, sd, c, ns=1.0):
    """(loss, g, coef, dlogvar): loss/coef/dlogvar (B,) fp32, g like F in fp32; dloss_b/dF_b = coef_b g_b. r: a
    number, or a one-element tensor on F's device (read by the kernel: no host sync, and a CUDA graph replays the
    value the tensor holds then)."""
    fmt = _layout(F)
    fd = dFdt is None
    F, x_t, dxdt = (u.contiguous(memory_format=fmt) for u in (F, x_t, dxdt))
    a, b = (F_plus.contiguous(memory_format=fmt), F_minus.contiguous(memory_format=fmt)) if fd \
        else (dFdt.contiguous(memory_format=fmt), None)
    B, n = F.shape[0], F[0].numel()
    t = t.float().contiguous()
    g = torch.empty_like(F, dtype=torch.float32)
    loss = torch.empty(B, device=F.device, dtype=torch.float32)
    coef, dlv = torch.empty_like(loss), torch.empty_like(loss)
    chunk, S = split(B, n, F.device, BLOCK)
    part = torch.empty(B, S, device=F.device, dtype=torch.float32)
    rt = isinstance(r, torch.Tensor)
    _trig_tangent_partial_kernel[(B, S)](F, a, b if fd else a, x_t, dxdt, t, h.float().contiguous() if fd else t,
                                         g, part, r.float().reshape(1) if rt else t, n, chunk, S,
                                         0.0 if rt else float(r), float(sd), FD=fd, RT=rt, BLOCK=BLOCK)
    _trig_tangent_finish_kernel[(B,)](part, logvar.float().contiguous(), weight.float().contiguous(), loss, coef,
                                      dlv, n, S, float(c), float(ns), BLOCK_S=max(16, next_power_of_2(S)))
    return loss, g, coef, dlv


def trig_tangent_loss_bwd(g, coef, dloss, dtype):
    """dF_b = coef_b dloss_b g_b: the same scaling pass as the consistency loss's backward."""
    return consistency_loss_bwd(g, coef, dloss, dtype)
