"""UNet building blocks (EDM networks.py layout): EDM-initialized conv/linear, FIR resampling, noise embeddings,
GroupNorm through cmfast.ops so the fused kernels plug in without touching the nets."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..precond import autocasting


def _xavier_uniform_(t: torch.Tensor, fan_in: int, fan_out: int, gain: float) -> torch.Tensor:
    # EDM weight_init('xavier_uniform') times init_weight.
    with torch.no_grad():
        return t.uniform_(-1, 1).mul_(gain * math.sqrt(6 / (fan_in + fan_out)))


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1.0):
        super().__init__(in_features, out_features, bias=bias)
        _xavier_uniform_(self.weight, in_features, out_features, init_weight)
        if bias:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Conv2d: under autocast the layer casts itself; outside it the weights follow x's dtype, so a network
        # converted with .half() / .bfloat16() / .double() takes the fp32 noise embedding (it raised a dtype mismatch).
        if autocasting(x):
            return super().forward(x)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter (EDM Conv2d; [1,1] = box,
    [1,3,3,1] = NCSN++'s FIR). kernel=0 means resampling only."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), fused_resample: bool = False, init_weight: float = 1.0):
        super().__init__()
        assert not (up and down)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        if self.weight is not None:
            _xavier_uniform_(self.weight, in_channels * kernel * kernel, out_channels * kernel * kernel, init_weight)
        # The outer product over the squared sum, as EDM's f.ger(f) / f.sum().square() (exact for its [1, 1] and
        # [1, 3, 3, 1]), made from Python numbers: torch.outer on the meta device (checkpoint.load_model builds a
        # stored config there first) imported torch._dynamo, a second more per process.
        taps = [float(v) for v in resample_filter]
        f = torch.tensor([[[[a * b / sum(taps) ** 2 for b in taps] for a in taps]]], dtype=torch.float32)
        self.register_buffer("resample_filter", f if (up or down) else None, persistent=False)
        # The [1, 1] box filter (DDPM++) is a 2x2 mean down and a nearest-neighbour copy up: one pooling /
        # upsampling kernel instead of the filter's tile (and scale) and a depthwise convolution on every call.
        self.box = tuple(resample_filter) == (1, 1)

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        # add_bias=False: the caller adds self.bias itself, folded into a later add (UNetBlock: the embedding's
        # per-channel add, the residual join).
        # Under autocast the convolution casts weight and bias itself, and autocast caches those casts for the whole
        # region (CT / CD run the net two or three times a step); outside autocast they follow x's dtype. The bias
        # goes into the last convolution (its gradient then comes from the convolution's backward): a separate
        # cast, add and bias-gradient sum per layer were 20% of a training step's ops (fmnist-small iCT, counted).
        auto = autocasting(x)
        w = self.weight if auto or self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None or not add_bias else self.bias if auto else self.bias.to(x.dtype)
        fused_down = self.fused_resample and self.down and w is not None
        # the box filter's pooling / nearest copy needs no filter tensor (its cast was a launch per call)
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None and (fused_down or not self.box) \
            else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if fused_down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.interpolate(x, scale_factor=2, mode="nearest") if self.box else F.conv_transpose2d(
                    x, f.mul(4).tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=f_pad)
            if self.down:
                x = F.avg_pool2d(x, 2) if self.box else F.conv2d(
                    x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=f_pad)
            if w is not None:
                return F.conv2d(x, w, b, padding=w_pad)
        if b is not None:   # after the fused down-sampling filter (EDM's order)
            x = x + b.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm (+ per-sample scale/shift, + SiLU) through cmfast.ops.group_norm_act; EDM's group count."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-6):
        super().__init__()
        # EDM's count, min(32, C // 4), lowered to the nearest divisor of C where it does not divide (C = 168: 28).
        groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        while num_channels % groups:
            groups -= 1
        self.num_groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x, scale=None, shift=None, act=None, pre_bias=None):
        return ops.group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, act,
                                  pre_bias=pre_bias)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of the noise level (DDPM++)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32   # fp64 stays fp64 (JVP references)
        freqs = torch.arange(half, dtype=dt, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x.to(dt), freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise level (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        # empty + normal_ + mul_ draws what randn(n) * scale drew. On the meta device (load_model's shape check)
        # nothing is drawn: a random op or a product there runs through torch's Python references, which import
        # torch._dynamo (+1.1 s for every load of an sCT / sCD checkpoint, whose adaptive-weight head has one).
        freqs = torch.empty(num_channels // 2)
        if freqs.device.type != "meta":
            freqs.normal_().mul_(scale)
        self.register_buffer("freqs", freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = torch.outer(x.to(dt), (2 * math.pi * self.freqs).to(dt))
        return torch.cat([x.cos(), x.sin()], dim=1)
