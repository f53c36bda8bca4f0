"""Sampling: consistency models in one or more steps (CM Alg. 1) and the EDM teacher's ODE sampler (EDM Alg. 1)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .schedules import karras_sigmas


def check_sigmas(sigmas, sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """Validated decreasing noise levels for Algorithm 1: non-empty, finite, strictly decreasing, in
    [sigma_min, sigma_max]."""
    if isinstance(sigmas, (int, float)):
        sigmas = (sigmas,)
    s = tuple(float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas))
    if not s:
        raise ValueError("sigmas: expected at least one noise level, got none")
    if not all(math.isfinite(v) for v in s):
        raise ValueError(f"sigmas: expected finite noise levels, got {s}")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas: expected strictly decreasing noise levels, got {s}")
    if s[-1] < sigma_min * (1 - 1e-6) or s[0] > sigma_max * (1 + 1e-6):
        raise ValueError(f"sigmas: expected levels in [{sigma_min}, {sigma_max}], got {s}")
    return s


@torch.no_grad()
def sample(model: nn.Module, z: torch.Tensor, sigmas=(80.0,), generator=None, class_labels=None) -> torch.Tensor:
    """Algorithm 1: x = f(sigmas[0] z, sigmas[0]); for each later s: x = f(x + sqrt(s^2 - sigma_min^2) n, s),
    n ~ N(0, I) drawn with `generator` on z's device and dtype."""
    s = check_sigmas(sigmas, model.sigma_min, model.sigma_max)
    x = model(s[0] * z, s[0], class_labels)
    for sigma in s[1:]:
        n = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        x = model(x + math.sqrt(sigma ** 2 - model.sigma_min ** 2) * n, sigma, class_labels)
    return x


@torch.no_grad()
def edm_sample(denoiser: nn.Module, z: torch.Tensor, num_steps: int = 18, solver: str = "heun", rho: float = 7.0,
               class_labels=None) -> torch.Tensor:
    """EDM's deterministic sampler (EDM Alg. 1, S_churn = 0) from sigma_max to 0: Heun takes 2 num_steps - 1
    network evaluations (35 for 18 steps)."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver: expected 'heun' or 'euler', got {solver!r}")
    t = karras_sigmas(num_steps, denoiser.sigma_min, denoiser.sigma_max, rho).flip(0).tolist() + [0.0]
    x = z.double() * t[0]
    for t_cur, t_next in zip(t[:-1], t[1:]):
        d = (x - denoiser(x.float(), t_cur, class_labels).double()) / t_cur
        x_next = x + (t_next - t_cur) * d
        if solver == "heun" and t_next > 0:
            d2 = (x_next - denoiser(x_next.float(), t_next, class_labels).double()) / t_next
            x_next = x + (t_next - t_cur) * (d + d2) / 2
        x = x_next
    return x.to(z.dtype)
