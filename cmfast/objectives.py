"""Training objectives: EDM denoising (teachers), consistency distillation (CM Alg. 2), consistency training
(CM Alg. 3) and improved consistency training (iCT). Each returns the per-sample loss (B,) in fp32.

The pair of adjacent levels (t_n < t_{n+1}) is drawn from an ascending sigma grid (cmfast.karras_sigmas); the
online model sees x_{t_{n+1}}, the target sees x_hat_{t_n} under stop-gradient with the same dropout masks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .jvp import dropout_masks
from .precond import check_images
from .schedules import karras_sigmas_on, sample_level_indices, sample_table_indices

DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")
WEIGHTINGS = ("uniform", "icm")


def _randn(x: torch.Tensor, generator=None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


# ---- Distances d(x, y) (CM paper Sec. 3; iCT Sec. 3.3) --------------------------------------------------------
class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) through the lpips package, images upsampled to 224 when smaller than 256 (CM paper
    Appendix C); 1-channel images are repeated to 3. Backbone weights come from the local torch hub cache only."""

    _FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}

    def __init__(self, net: str = "vgg", pretrained_backbone: bool = True):
        super().__init__()
        if net not in self._FILES:
            raise ValueError(f"LPIPS net: expected one of {', '.join(self._FILES)}, got {net!r}")
        if pretrained_backbone:
            hub = torch.hub.get_dir()
            path = f"{hub}/checkpoints/{self._FILES[net]}"
            import os
            if not os.path.exists(path):
                raise FileNotFoundError(f"LPIPS needs the torchvision {net} weights: put {self._FILES[net]} in "
                                        f"{hub}/checkpoints/ (no download is attempted)")
        try:
            import lpips
        except ImportError as e:
            raise ImportError("the LPIPS distance needs the lpips package: pip install lpips") from e
        self.model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False).eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        if x.shape[-1] < 256:
            x = nn.functional.interpolate(x.float(), size=224, mode="bilinear", align_corners=False)
            y = nn.functional.interpolate(y.float(), size=224, mode="bilinear", align_corners=False)
        return self.model(x.float(), y.float()).reshape(-1)


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "pseudo_huber", c: float | None = None,
             weight: torch.Tensor | None = None, lpips_model: nn.Module | None = None) -> torch.Tensor:
    """Per-sample d(pred, target) (B,): l2 / l1 / pseudo_huber through the fused op; lpips through lpips_model."""
    if kind == "lpips":
        if lpips_model is None:
            raise ValueError("distance 'lpips' needs lpips_model (cmfast.objectives.LPIPS())")
        loss = lpips_model(pred, target)
        return loss * weight if weight is not None else loss
    if kind not in DISTANCES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(DISTANCES)}")
    return ops.consistency_loss(pred, target, kind=kind, c=c, weight=weight)


# ---- EDM denoising loss (EDM eq. 8, Table 1) -------------------------------------------------------------------
def edm_loss(denoiser: nn.Module, x: torch.Tensor, generator=None, p_mean: float = -1.2, p_std: float = 1.2,
             class_labels=None) -> torch.Tensor:
    """lambda(sigma) ||D(x + sigma n, sigma) - x||^2 (mean over pixels), ln sigma ~ N(P_mean, P_std^2),
    lambda = (sigma^2 + sd^2) / (sigma sd)^2."""
    check_images(x)
    B = x.shape[0]
    sigma = (torch.randn(B, generator=generator, device=x.device) * p_std + p_mean).exp()
    sd = denoiser.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    D = denoiser(x + _bcast(sigma, x) * _randn(x, generator), sigma, class_labels)
    return ops.consistency_loss(D, x, kind="l2", weight=weight)


# ---- One ODE step of the teacher (CM Alg. 2 line 'x_hat = x + (t_n - t_{n+1}) Phi(...)'; EDM Alg. 1) ------------
@torch.no_grad()
def teacher_step(teacher: nn.Module, x: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor,
                 solver: str = "heun", class_labels=None) -> torch.Tensor:
    """From x at t_hi to t_lo (per-sample levels) along dx/dt = (x - D(x, t)) / t, Euler or Heun (2nd order)."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver: expected 'heun' or 'euler', got {solver!r}")
    hi, lo = _bcast(t_hi, x), _bcast(t_lo, x)
    d = (x - teacher(x, t_hi, class_labels)) / hi
    x_e = x + (lo - hi) * d
    if solver == "euler":
        return x_e
    d2 = (x_e - teacher(x_e, t_lo, class_labels)) / lo
    return x + (lo - hi) * (d + d2) / 2


@dataclass
class Pair:
    """Adjacent points of one trajectory: the online input (x_hi, t_hi) and the target's input (x_lo, t_lo)."""
    x_hi: torch.Tensor
    t_hi: torch.Tensor
    x_lo: torch.Tensor
    t_lo: torch.Tensor


def draw_pair(x: torch.Tensor, sigmas: torch.Tensor, generator=None, distribution: str = "uniform",
              teacher: nn.Module | None = None, solver: str = "heun", class_labels=None,
              p_mean: float = -1.1, p_std: float = 2.0) -> Pair:
    """n ~ p(n), z ~ N(0, I); x_{t_{n+1}} = x + t_{n+1} z; x_hat_{t_n} = the teacher's ODE step (CD) or
    x + t_n z (CT: the Euler step with the x estimator, CM Alg. 3)."""
    check_images(x)
    idx = sample_level_indices(sigmas, x.shape[0], distribution, generator, p_mean, p_std, device=x.device)
    return _pair_at(x, sigmas.to(device=x.device, dtype=torch.float32), idx, generator, teacher, solver,
                    class_labels)


def _pair_at(x, s, idx, generator, teacher, solver, class_labels) -> Pair:
    """The pair at levels (s[idx], s[idx + 1]) of the device grid s, with noise z ~ N(0, I) from `generator`."""
    t_lo, t_hi = s[idx], s[idx + 1]
    z = _randn(x, generator)
    x_hi = x + _bcast(t_hi, x) * z
    if teacher is None:
        x_lo = x + _bcast(t_lo, x) * z
    else:
        x_lo = teacher_step(teacher, x_hi, t_hi, t_lo, solver, class_labels)
    return Pair(x_hi, t_hi, x_lo, t_lo)


def draw_pair_table(x: torch.Tensor, table: dict, teacher: nn.Module | None = None, solver: str = "heun",
                    class_labels=None) -> Pair:
    """draw_pair from a schedules.level_table already on x's device, with no host sync and no host-to-device copy:
    the pair of a step captured in a CUDA graph (cmfast-train --cuda-graph). Random numbers come from the default
    generator."""
    check_images(x)
    idx = sample_table_indices(table["cdf"], table["last"], x.shape[0])
    return _pair_at(x, table["sigmas"], idx, None, teacher, solver, class_labels)


@contextlib.contextmanager
def _same_rng(device: torch.device):
    """Replays the RNG state at entry for the target pass, so online and target share dropout masks."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay():
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    yield replay


def consistency_pair_loss(model: nn.Module, target_model: nn.Module, pair: Pair, loss: str = "lpips",
                          weighting: str = "uniform", c: float | None = None, lpips_model=None,
                          class_labels=None, replay: str = "rng") -> torch.Tensor:
    """lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), stopgrad f_theta-(x_hat_{t_n}, t_n)), per sample (B,).
    The target pass sees the online pass's dropout masks: replay 'rng' restores the RNG state for it; 'masks'
    records the online pass's masks and applies them (cmfast.jvp.dropout_masks), which a CUDA graph can capture
    (its RNG state is not readable while capturing)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if replay == "masks":
        masks: list = []
        with dropout_masks(record=masks):
            pred = model(pair.x_hi, pair.t_hi, class_labels)
        with torch.no_grad(), dropout_masks(replay=masks):
            target = target_model(pair.x_lo, pair.t_lo, class_labels)
    elif replay == "rng":
        with _same_rng(pair.x_hi.device) as restore:
            pred = model(pair.x_hi, pair.t_hi, class_labels)
            devices = [pair.x_hi.device] if pair.x_hi.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                restore()
                target = target_model(pair.x_lo, pair.t_lo, class_labels)
    else:
        raise ValueError(f"replay: expected 'rng' or 'masks', got {replay!r}")
    weight = 1.0 / (pair.t_hi - pair.t_lo) if weighting == "icm" else None
    return distance(pred, target.detach(), loss, c=c, weight=weight, lpips_model=lpips_model)


# ---- The three consistency objectives ------------------------------------------------------------------------
def cd_loss(model, target_model, teacher, x, num_scales: int = 18, solver: str = "heun", loss: str = "lpips",
            generator=None, lpips_model=None, class_labels=None, weighting: str = "uniform") -> torch.Tensor:
    """Consistency distillation (CM Alg. 2); CIFAR-10: N = 18, Heun, LPIPS."""
    sigmas = karras_sigmas_on(x.device, num_scales, model.sigma_min, model.sigma_max)
    pair = draw_pair(x, sigmas, generator, teacher=teacher, solver=solver, class_labels=class_labels)
    return consistency_pair_loss(model, target_model, pair, loss, weighting, lpips_model=lpips_model,
                                 class_labels=class_labels)


def ct_loss(model, target_model, x, num_scales: int, loss: str = "lpips", generator=None, lpips_model=None,
            class_labels=None, weighting: str = "uniform") -> torch.Tensor:
    """Consistency training (CM Alg. 3); num_scales = N(k) from cmfast.ct_schedule."""
    sigmas = karras_sigmas_on(x.device, num_scales, model.sigma_min, model.sigma_max)
    pair = draw_pair(x, sigmas, generator)
    return consistency_pair_loss(model, target_model, pair, loss, weighting, lpips_model=lpips_model,
                                 class_labels=class_labels)


def ict_loss(model, x, num_scales: int, loss: str = "pseudo_huber", c: float | None = None, generator=None,
             p_mean: float = -1.1, p_std: float = 2.0, lpips_model=None, class_labels=None) -> torch.Tensor:
    """Improved CT: no EMA teacher (theta- = stopgrad theta), lognormal levels, lambda = 1 / (t_{n+1} - t_n),
    pseudo-Huber with c = 0.00054 sqrt(d); num_scales = N(k) from cmfast.ict_schedule."""
    sigmas = karras_sigmas_on(x.device, num_scales, model.sigma_min, model.sigma_max)
    pair = draw_pair(x, sigmas, generator, distribution="lognormal", p_mean=p_mean, p_std=p_std)
    return consistency_pair_loss(model, model, pair, loss, "icm", c=c, lpips_model=lpips_model,
                                 class_labels=class_labels)
