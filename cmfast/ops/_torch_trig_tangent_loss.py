"""Reference (torch backend) for the fused sCM tangent loss; see cmfast.ops.trig_tangent_loss for the math."""
from __future__ import annotations

import torch


def trig_tangent_loss(F, x_t, dxdt, t, F_plus, F_minus, h, dFdt, logvar, weight, r, sigma_data, c, ns=1.0):
    # sCM (Lu & Song 2024) Alg. 1: the target F- is the online output under stop-gradient (theta- = stopgrad theta),
    # so F - F- is zero in value and only carries the gradient.
    dt = torch.float64 if F.dtype == torch.float64 else torch.float32
    Fd = F.to(dt).flatten(1)
    Ft = Fd.detach()
    if dFdt is None:   # central difference of the two target evaluations, taken in fp32 / fp64
        dF = (F_plus.to(dt) - F_minus.to(dt)).flatten(1) / (2 * h.to(dt)[:, None])
    else:
        dF = dFdt.to(dt).flatten(1)
    tt = t.to(dt)[:, None]
    cos, sin = torch.cos(tt), torch.sin(tt)
    g = -cos * cos * (sigma_data * Ft - dxdt.to(dt).flatten(1)) \
        - r * cos * sin * (x_t.to(dt).flatten(1) + sigma_data * dF)
    g = g / (ns * g.norm(dim=1, keepdim=True) + c)     # tangent normalization (sCM Sec. 4.2; ns: 'l2' 1, 'rms' D^-1/2)
    lv = logvar.to(dt)
    return (Fd - Ft - g).square().sum(1) / (lv.exp() * Fd.shape[1]) * weight.to(dt) + lv
