"""Exponential moving averages of parameters: the CD/CT target network (rate mu(k)) and evaluation EMAs."""
from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()     # (so no detach per parameter: an op each, hundreds a step in Python)
def ema_update_(target: nn.Module, source: nn.Module, mu: float) -> None:
    """theta- <- mu theta- + (1 - mu) theta (CM paper Alg. 2/3, line 'theta- <- stopgrad(...)'); buffers copied."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu: expected a rate in [0, 1], got {mu}")
    tp, sp = list(target.parameters()), list(source.parameters())
    if len(tp) != len(sp):
        raise ValueError("EMA target and source have different parameter lists")
    if mu == 0.0:
        torch._foreach_copy_(tp, sp)
    elif mu != 1.0:
        torch._foreach_lerp_(tp, sp, 1.0 - mu)
    tb, sb = list(target.buffers()), list(source.buffers())
    if tb:      # one multi-tensor copy (a copy per buffer was a launch each: the UNet's resampling filters)
        torch._foreach_copy_(tb, sb)


class EMA(nn.Module):
    """A frozen copy of a module, updated with ema_update_ at a fixed rate or a per-step one."""

    def __init__(self, model: nn.Module, rate: float = 0.9999):
        super().__init__()
        self.rate = float(rate)
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    def update(self, model: nn.Module, rate: float | None = None) -> None:
        ema_update_(self.module, model, self.rate if rate is None else rate)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
