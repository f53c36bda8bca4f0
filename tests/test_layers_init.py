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


def test_noise_embeddings_equal_their_formulas():
    # FourierEmbedding: EDM's random frequencies N(0, 16^2) (NCSN++ builds it with the default scale), features
    # [cos(2 pi f x), sin(2 pi f x)]; PositionalEmbedding: f_i = (1 / 10000)^(i / (half - 1)) (endpoint, DDPM++) or
    # i / half (ADM), features [cos(f x), sin(f x)]
    from cmfast.nets.layers import FourierEmbedding, PositionalEmbedding
    torch.manual_seed(3)
    four = FourierEmbedding(64)
    torch.manual_seed(3)
    freqs = torch.randn(32) * 16
    assert torch.equal(four.freqs, freqs)
    x = torch.tensor([-1.5, 0.0, 0.3, 2.0], dtype=torch.float64)
    arg = torch.outer(x, 2 * math.pi * freqs.double())
    # (2 pi f is formed from the fp32 buffer: up to ~1e-5 off the float64 product at these arguments)
    torch.testing.assert_close(four(x), torch.cat([arg.cos(), arg.sin()], 1), rtol=0, atol=1e-4)
    for endpoint, denom in ((True, 7), (False, 8)):
        f = torch.tensor([(1 / 10000) ** (i / denom) for i in range(8)], dtype=torch.float64)
        arg = torch.outer(x, f)
        torch.testing.assert_close(PositionalEmbedding(16, endpoint=endpoint)(x), torch.cat([arg.cos(), arg.sin()], 1),
                                   rtol=0, atol=1e-12)
    assert PositionalEmbedding(16).endpoint is True
