"""The triton backend of cmfast.ops.trig_tangent_loss: loss and dloss/dF in one forward pass (kernels/)."""
from __future__ import annotations

import torch

from cmfast.kernels import trig_tangent_loss as _k

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _TrigTangentLoss(torch.autograd.Function):
    """Only F and logvar get gradients: F+, F-, dF/dt, x_t and dx_t/dt are stop-gradient (sCM Alg. 1)."""

    @staticmethod
    def forward(ctx, F, logvar, x_t, dxdt, t, F_plus, F_minus, h, dFdt, weight, r, sd, c, ns):
        loss, g, coef, dlv = _k.trig_tangent_loss_fwd(F, x_t, dxdt, t, F_plus, F_minus, h, dFdt, logvar, weight,
                                                      r, sd, c, ns)
        ctx.save_for_backward(g, coef, dlv)
        ctx.dtypes = (F.dtype, logvar.dtype)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        g, coef, dlv = ctx.saved_tensors
        dF = _k.trig_tangent_loss_bwd(g, coef, dloss, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dlogvar = (dlv * dloss.float()).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return (dF, dlogvar) + (None,) * 12


def trig_tangent_loss(F, x_t, dxdt, t, F_plus, F_minus, h, dFdt, logvar, weight, r, sigma_data, c, ns=1.0):
    for name, u in (("F", F), ("x_t", x_t), ("dxdt", dxdt), ("F_plus", F_plus), ("F_minus", F_minus),
                    ("dFdt", dFdt), ("logvar", logvar)):
        if u is not None and u.dtype not in _DTYPES:
            raise TypeError(f"trig_tangent_loss (triton): {name}: expected float32/float16/bfloat16, got {u.dtype}")
    return _TrigTangentLoss.apply(F, logvar, x_t, dxdt, t, F_plus, F_minus, h, dFdt, weight, r, sigma_data, c, ns)
