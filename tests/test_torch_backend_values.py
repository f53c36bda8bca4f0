"""The torch backend (cmfast/ops/_torch.py, _torch_trig_tangent_loss.py) on paths the kernel tests only compare it
against itself: every kernel test bounds the kernel's error by the torch backend's, so where the torch composition is
wrong there the kernel tests loosen instead of failing. Here each path is held to a float64 transcription of its
formula (written out below, not imported from the code)."""
from __future__ import annotations

import math

import torch

from cmfast import ops


def _scalings(s, sd=0.5, smin=0.002):
    return sd ** 2 / ((s - smin) ** 2 + sd ** 2), sd * (s - smin) / torch.sqrt(s ** 2 + sd ** 2)


def test_skip_output_infer_clamps_and_rounds_to_bytes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64) * 1.3        # many values outside [-1, 1]
    F = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.4, 3.0], dtype=torch.float64)
    cs, co = _scalings(sigma)
    y = (cs.view(-1, 1, 1, 1) * x + co.view(-1, 1, 1, 1) * F).clamp(-1, 1)
    assert (y.abs() == 1).any() and (y.abs() < 1).any()
    with ops.use_backend("torch"):
        f = ops.skip_output_infer(x.float(), F.float(), sigma.float())
        u = ops.skip_output_infer(x.float(), F.float(), sigma.float(), uint8=True)
    assert f.dtype == torch.float32 and f.abs().max() <= 1
    torch.testing.assert_close(f.double(), y, rtol=0, atol=1e-6)
    assert u.dtype == torch.uint8
    want = torch.round((y + 1) * 127.5)
    # fp32 may land on the other side of a .5 only where the float64 value is within fp32 rounding of it
    near_half = ((y + 1) * 127.5 % 1 - 0.5).abs() < 1e-4
    assert torch.equal(u.double()[~near_half], want[~near_half]) and (u.double() - want).abs().max() <= 1
    assert u.min() == 0 and u.max() == 255
    # the exact byte values of the ends and the middle (0 -> 127.5 -> 128 by round-half-to-even)
    e = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(5, 1, 1, 1)
    with ops.use_backend("torch"):
        b = ops.skip_output_infer(e, torch.zeros_like(e), torch.full((5,), 0.002), uint8=True)
    assert b.flatten().tolist() == [0, 0, 128, 255, 255]


def test_attention_uses_the_given_scale():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for scale in (0.9, None):
        s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(8) if scale is None else scale)
        p = torch.exp(s - s.amax(-1, keepdim=True))
        want = (p / p.sum(-1, keepdim=True)) @ v
        with ops.use_backend("torch"):
            got = ops.attention(q.float(), k.float(), v.float(), scale=scale)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


def _tangent_truth(F, x, v, t, dF, lv, w, r, sd, c):
    B = F.shape[0]
    Ft = F.flatten(1)
    tt = t.view(B, 1)
    g = -torch.cos(tt) ** 2 * (sd * Ft - v.flatten(1)) - r * torch.cos(tt) * torch.sin(tt) * (x.flatten(1)
                                                                                            + sd * dF.flatten(1))
    gn = g / (g.norm(dim=1, keepdim=True) + c)
    # F - F- is 0 in value: the loss is ||gn||^2 w / (e^lv D) + lv
    return gn.square().sum(1) * w / (lv.exp() * Ft.shape[1]) + lv, gn


def test_trig_tangent_loss_finite_difference_path_against_float64():
    # the central difference (F+ - F-) / (2 h): F+- = F +- h dF/dt with a curvature term that cancels exactly
    g = torch.Generator().manual_seed(2)
    B, shape = 3, (3, 2, 4, 5)
    F, x, v, dFdt, curv = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(5))
    # t and h exactly representable in fp32 (the API takes them as fp32 vectors), so float64 can be held to 1e-12
    t = torch.tensor([0.125, 0.75, 1.375], dtype=torch.float64)
    h = torch.tensor([2.0 ** -10, 2.0 ** -8, 2.0 ** -5], dtype=torch.float64)
    Fp = F + h.view(B, 1, 1, 1) * dFdt + h.view(B, 1, 1, 1) ** 2 * curv
    Fm = F - h.view(B, 1, 1, 1) * dFdt + h.view(B, 1, 1, 1) ** 2 * curv
    lv = torch.tensor([0.3, -0.2, 0.0], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    r, sd, c = 0.7, 0.5, 0.1
    want, gn = _tangent_truth(F, x, v, t, dFdt, lv, w, r, sd, c)
    Fg = F.clone().requires_grad_(True)
    with ops.use_backend("torch"):
        got = ops.trig_tangent_loss(Fg, x, v, t, F_plus=Fp, F_minus=Fm, h=h, logvar=lv, weight=w, r=r,
                                    sigma_data=sd, c=c)
    torch.testing.assert_close(got.double(), want, rtol=1e-12, atol=0)
    got.sum().backward()
    # d/dF of ||F - F- - gn||^2 q at F = F-: -2 q gn (q = w / (e^lv D))
    q = (w / (lv.exp() * gn.shape[1])).view(B, 1)
    torch.testing.assert_close(Fg.grad.flatten(1), -2 * q * gn, rtol=1e-10, atol=1e-14)


def test_group_norm_act_keeps_the_channels_last_layout():
    # a channels_last activation stays channels_last (the UNet runs NHWC end to end; a contiguous result made every
    # following convolution convert back)
    x = torch.randn(2, 8, 5, 3).to(memory_format=torch.channels_last)
    with ops.use_backend("torch"):
        y = ops.group_norm_act(x, 4, torch.ones(8), torch.zeros(8))
        z = ops.group_norm_act(x.contiguous(), 4, torch.ones(8), torch.zeros(8))
    assert y.is_contiguous(memory_format=torch.channels_last) and z.is_contiguous()
    xg = x.double().reshape(2, 4, -1)
    want = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-6)
    want = want.reshape(x.shape)
    torch.testing.assert_close(y.double(), want * torch.sigmoid(want), rtol=0, atol=1e-5)
