"""cmfast.nets.layers' initialization: EDM's weight_init('xavier_uniform') times init_weight, U(-a, a) with
a = init_weight sqrt(6 / (fan_in + fan_out)), fan = channels x kernel area (EDM training/networks.py), biases 0. The
parameter-count and EDM-equality tests load weights, so only this sees a wrong initial scale (training from scratch)."""
from __future__ import annotations

import math

import torch

from cmfast.nets.layers import Conv2d, Linear


def _check_uniform(w: torch.Tensor, bound: float):
    w = w.detach().double().flatten()
    assert w.abs().max() <= bound * (1 + 1e-6)
    assert w.abs().max() >= 0.97 * bound                 # thousands of draws reach the edge
    # U(-a, a): variance a^2 / 3 (n >= 3000 draws: the sample variance is within 5% with overwhelming probability)
    assert abs(w.var().item() / (bound ** 2 / 3) - 1) < 0.08
    assert abs(w.mean().item()) < 0.1 * bound


def test_linear_and_conv_are_edms_xavier_uniform_times_init_weight():
    torch.manual_seed(0)
    lin = Linear(96, 64, init_weight=0.5)
    _check_uniform(lin.weight, 0.5 * math.sqrt(6 / (96 + 64)))
    assert torch.equal(lin.bias, torch.zeros(64))
    conv = Conv2d(24, 40, 3)
    _check_uniform(conv.weight, math.sqrt(6 / (24 * 9 + 40 * 9)))
    assert torch.equal(conv.bias, torch.zeros(40))
    one = Conv2d(64, 32, 1, init_weight=0.2)
    _check_uniform(one.weight, 0.2 * math.sqrt(6 / (64 + 32)))
