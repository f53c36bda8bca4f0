"""The triton backend of cmfast.ops.trig_tangent_loss: loss and dloss/dF in one forward pass (kernels/)."""
from __future__ import annotations

import torch

from cmfast.kernels import trig_tangent_loss as _k
from cmfast.ops import _batching as _b

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_Bwd = _b.kernel_call(_k.trig_tangent_loss_bwd, "sss-")


@_b.eager_twin
class _TrigTangentLoss(torch.autograd.Function):
    """Only F and logvar get gradients: F+, F-, dF/dt, x_t and dx_t/dt are stop-gradient (sCM Alg. 1).
    torch.func style (cmfast/ops/_batching.py): outputs (loss, g, coef, dlogvar), the last three going to the backward
    through setup_context; every tensor is per sample, so vmap folds into the batch."""

    @staticmethod
    def forward(F, logvar, x_t, dxdt, t, F_plus, F_minus, h, dFdt, weight, r, sd, c, ns):
        return _k.trig_tangent_loss_fwd(F, x_t, dxdt, t, F_plus, F_minus, h, dFdt, logvar, weight, r, sd, c, ns)

    @staticmethod
    def setup_context(ctx, inputs, output):
        loss, g, coef, dlv = output
        ctx.mark_non_differentiable(g, coef, dlv)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g, coef, dlv)
        ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)

    @staticmethod
    def backward(ctx, dloss, *_):
        g, coef, dlv = ctx.saved_tensors
        dF = dlogvar = None
        if ctx.needs_input_grad[0]:     # batched under vmap(grad) / jacrev: through the folded kernel call
            dF = (_Bwd.apply if _b.transformed(g) else _k.trig_tangent_loss_bwd)(g, coef, dloss, ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dlogvar = (dlv * dloss.float()).to(ctx.dtypes[1])
        return (dF, dlogvar) + (None,) * 12

    @staticmethod
    def vmap(info, in_dims, *args):
        return _b.rule(_TrigTangentLoss.apply, "s" * 10 + "----", info, in_dims, args)


def trig_tangent_loss(F, x_t, dxdt, t, F_plus, F_minus, h, dFdt, logvar, weight, r, sigma_data, c, ns=1.0):
    for name, u in (("F", F), ("x_t", x_t), ("dxdt", dxdt), ("F_plus", F_plus), ("F_minus", F_minus),
                    ("dFdt", dFdt), ("logvar", logvar)):
        if u is not None and u.dtype not in _DTYPES:
            raise TypeError(f"trig_tangent_loss (triton): {name}: expected float32/float16/bfloat16, got {u.dtype}")
    return _b.apply(_TrigTangentLoss, F, logvar, x_t, dxdt, t, F_plus, F_minus, h, dFdt, weight, r, sigma_data, c,
                                  ns)
