"""TrigFlow and continuous-time consistency training / distillation (sCT, sCD; Lu & Song 2024, "sCM").

TrigFlow (sCM Sec. 2.2): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2];
consistency function f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise(t)), so f(x, 0) = x.
It is the VE / EDM picture reparameterized: sigma = sd tan(t) and x_sigma = x0 + sigma n = x_t / cos(t). So
TrigFlowModel is also callable as model(x_sigma, sigma) -> f and exposes sigma_min / sigma_max: cmfast.sample
(CM Alg. 1) runs it unchanged (its output is a clean image in both pictures; nothing is rescaled).

Time input (`time_input`): "t" (default), c_noise(t) = t (sCM Sec. 4.1, "identity time transformation": the
usual 1000 t makes d/dt of the time embedding 1000x larger, destabilizing training and the finite-difference
JVP); "1000t", the older choice; "edm", c_noise = ln(sd tan t) / 4 with F = -F_edm. The last one makes an EDM
network a TrigFlow network with no change of weights: with sigma = sd tan t, EDM's c_in x_sigma = x_t / sd (the
same input), c_skip = cos^2 t, c_out = sd sin t, so the PF-ODE velocity (cos t x_t - D) / sin t = -sd F_edm.
sCD starts the student from the teacher this way (the loop copies the teacher's weights).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import ops
from .jvp import (DEFAULT_EPS, DEFAULT_FLOOR, DEFAULT_ORDER, DEFAULT_PRECISION, check_order, dropout_masks, exact_jvp,
                  fd_pair, fd_step, fp64_call)
from .nets.layers import FourierEmbedding
from .ops._api import TANGENT_NORMS
from .precond import backbone_input, check_images, check_sigma, first_float_param


TIME_INPUTS = ("t", "1000t", "edm")
PRIOR_WEIGHTINGS = ("none", "inv_sigma")   # w(t) of the sCM loss: 1, or 1 / (sd tan t) = 1 / sigma
T_MID = 1.1      # sCM paper: two-step sampling's intermediate TrigFlow time (VE level sigma_data * tan(1.1))


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


# ---- Adaptive weighting (sCM Sec. 4.2, Eq. 8: e^{-w(t)} / D ||...||^2 + w(t)) -----------------------------------
class LogVarHead(nn.Module):
    """logvar(t): a Linear on random Fourier features of t (frequencies ~ N(0, 1) cycles per unit of t, enough
    resolution over [0, pi/2]), zero-initialized (as sCM / EDM2's uncertainty head): training starts uniform."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.embed = FourierEmbedding(channels, scale=1.0)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """logvar (B,) fp32. The features go in the Linear's dtype (a model made .half() / .bfloat16() has half
        weights; fp32 features there were 'mat1 and mat2 must have the same dtype'); the loss takes logvar in fp32."""
        return self.linear(self.embed(t.float()).to(self.linear.weight.dtype)).float().reshape(-1)


# ---- The TrigFlow consistency model --------------------------------------------------------------------------
class TrigFlowModel(nn.Module):
    """f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise(t)) around a backbone F(x, c_noise, labels); also
    model(x_sigma, sigma) in the VE convention (t = atan(sigma / sd), x_t = cos(t) x_sigma) for cmfast.sample."""

    def __init__(self, net: nn.Module,
                 sigma_data: float = 0.5,     # Expected standard deviation of the data (TrigFlow's sd).
                 sigma_min: float = 0.002,    # Lowest VE noise level the sampler uses (t = atan(sigma_min / sd)).
                 sigma_max: float = 80.0,     # Highest VE noise level: t = atan(160) = pi/2 - 0.006 for sd = 0.5.
                 time_input: str = "t",       # c_noise(t): "t" (sCM), "1000t", or "edm" (an EDM network as is).
                 logvar_channels: int = 128):  # Fourier features of the adaptive weighting head.
        super().__init__()
        if not (sigma_data > 0 and 0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
            raise ValueError(f"expected sigma_data > 0 and 0 < sigma_min < sigma_max < inf, got "
                             f"sigma_data={sigma_data}, sigma_min={sigma_min}, sigma_max={sigma_max}")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input: expected one of {', '.join(TIME_INPUTS)}, got {time_input!r}")
        self.net = net
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.time_input = time_input
        self.logvar = LogVarHead(logvar_channels)

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        if self.time_input == "edm":
            return torch.log(self.sigma_data * torch.tan(t)) / 4
        return t * 1000 if self.time_input == "1000t" else t

    def backbone(self, x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        """F(x_t / sd, c_noise(t)): the raw network output (in the network's precision)."""
        F = self.net(backbone_input(self.net, x_t / self.sigma_data), self.c_noise(t), class_labels)
        return -F if self.time_input == "edm" else F

    def consistency(self, x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        """f(x_t, t) = cos(t) x_t - sin(t) sd F (sCM Eq. 6), in fp32. At t = 0, f = x_t exactly for every time input:
        the backbone sees t = atan(sigma_min / sd) there (its output is multiplied by sin 0 = 0). With t itself the
        'edm' input's c_noise = ln(sd tan 0) / 4 = -inf made F NaN (cos(-inf) in a positional embedding) and f NaN."""
        t = t.float()
        t_net = torch.where(t > 0, t, torch.full_like(t, math.atan(self.sigma_min / self.sigma_data)))
        F = self.backbone(x_t.float(), t_net, class_labels)
        with torch.autocast(x_t.device.type, enabled=False):
            return _b(torch.cos(t), x_t) * x_t.float() - _b(torch.sin(t), x_t) * self.sigma_data * F.float()

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """VE convention: f at x_sigma = x0 + sigma n, i.e. t = atan(sigma / sd), x_t = cos(t) x_sigma."""
        s = check_sigma(sigma, x, lo=0.0)
        t = sigma_to_t(s, self.sigma_data)
        return self.consistency(_b(torch.cos(t), x) * x.float(), t, class_labels)


def sigma_to_t(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    return torch.atan(sigma / sigma_data)


def sample_time(batch: int, sigma_data: float = 0.5, p_mean: float = -1.0, p_std: float = 1.4, generator=None,
                device=None) -> torch.Tensor:
    """tan(t) = exp(tau) / sd, tau ~ N(p_mean, p_std^2) (sCM Sec. 4.3: EDM's lognormal levels in TrigFlow time)."""
    tau = torch.randn(batch, generator=generator, device=device) * p_std + p_mean
    return torch.atan(tau.exp() / sigma_data)


# ---- The teacher for sCD: an EDM denoiser as a TrigFlow velocity -----------------------------------------------
@torch.no_grad()
def teacher_velocity(denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor, sigma_data: float = 0.5,
                     class_labels=None) -> torch.Tensor:
    """dx_t/dt of the PF-ODE from an EDM denoiser D(x_sigma, sigma) ~ E[x0 | x_sigma]:
    v = E[cos t z - sin t x0 | x_t] with E[z | x_t] = (x_t - cos t E[x0]) / sin t gives
    v = (cos t x_t - D(x_t / cos t, sd tan t)) / sin t  (= sd F_teacher(x_t / sd, t) in TrigFlow's notation)."""
    if abs(getattr(denoiser, "sigma_data", sigma_data) - sigma_data) > 1e-12:
        raise ValueError(f"teacher: expected sigma_data {sigma_data} like the student, got {denoiser.sigma_data}")
    dt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    t, x_t = t.to(dt), x_t.to(dt)
    cos, sin = _b(torch.cos(t), x_t), _b(torch.sin(t), x_t)
    D = denoiser(x_t / cos, sigma_data * torch.tan(t), class_labels).to(dt)
    return (cos * x_t - D) / sin


# ---- The sCM objective (sCM Alg. 1) ----------------------------------------------------------------------------
def check_prior_weighting(name: str) -> str:
    if name not in PRIOR_WEIGHTINGS:
        raise ValueError(f"prior_weighting: expected one of {', '.join(PRIOR_WEIGHTINGS)}, got {name!r}")
    return name


def check_tangent_norm(name: str) -> str:
    if name not in TANGENT_NORMS:
        raise ValueError(f"tangent_norm: expected one of {', '.join(TANGENT_NORMS)}, got {name!r}")
    return name


def prior_weight(t: torch.Tensor, sigma_data: float = 0.5, name: str = "none") -> torch.Tensor | None:
    """w(t) of the sCM loss, (B,) fp32, or None for w = 1 ('none'). 'inv_sigma': 1 / (sd tan t) = 1 / sigma, the
    prior weighting NVIDIA FastGen's sCM applies by default (weight = 1 / sigma_t, prior_weighting_enabled) and other
    sCT reimplementations compute; PAPER.md leaves w(t) open. With the adaptive weighting it is mostly absorbed: the
    optimal logvar(t) = ln(w(t) E[err | t] / D) leaves w / exp(logvar) = D / E[err | t] whatever w is, so the two differ
    mainly while logvar(t) is still being fitted (early training)."""
    if check_prior_weighting(name) == "none":
        return None
    return 1.0 / (sigma_data * torch.tan(t.detach().float()))


def tangent_warmup(step: int, warmup_steps: int = 10_000) -> float:
    """r of the tangent: 0 -> 1 linearly over warmup_steps (sCM Sec. 4.2, 'tangent warmup')."""
    return 1.0 if warmup_steps <= 0 else min(1.0, max(0.0, step / warmup_steps))


def scm_loss(model: TrigFlowModel, x0: torch.Tensor, teacher: nn.Module | None = None, step: int = 0,
             warmup_steps: int = 10_000, jvp: str = "fd", precision: str = DEFAULT_PRECISION,
             eps: float = DEFAULT_EPS, floor: float = DEFAULT_FLOOR, p_mean: float = -1.0, p_std: float = 1.4,
             c: float = 0.1, generator=None, class_labels=None, order: int = DEFAULT_ORDER,
             prior_weighting: str = "none", tangent_norm: str = "l2", r: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample sCM loss (B,): sCT without a teacher (dx_t/dt = cos t z - sin t x0 with z of std sd), sCD with
    an EDM denoiser as teacher. The online forward F (with grad, in the caller's autocast) records its dropout
    masks; dF-/dt is the JVP of the same network (same masks, theta- = stopgrad theta) along (dx_t/dt, 1):
    jvp='fd' by finite differences (one no-grad forward of 2B, step eps * max(t, floor), in `precision`; order=4:
    the 4-point stencil, one forward of 4B, folded into the pair the loss takes, see cmfast.jvp.fd_pair),
    jvp='exact' by torch.func.jvp. The fused op cmfast.ops.trig_tangent_loss forms g, normalizes and weights.
    prior_weighting: w(t) multiplying the squared error beside the adaptive weighting, 'none' (w = 1) or
    'inv_sigma' (w = 1 / (sd tan t), the VE level's inverse; see prior_weight). tangent_norm: g / (||g|| + c) ('l2',
    the paper's) or g / (RMS(g) + c) ('rms', NVIDIA FastGen's default: c then means the same at every image size).
    r: the tangent warm-up factor as a one-element tensor on x0's device, in place of tangent_warmup(step,
    warmup_steps) (cmfast-train --cuda-graph: the captured step reads it from a buffer the host updates)."""
    if jvp not in ("fd", "exact"):
        raise ValueError(f"jvp: expected 'fd' or 'exact', got {jvp!r}")
    check_prior_weighting(prior_weighting)
    check_tangent_norm(tangent_norm)
    order = check_order(order)
    check_images(x0, "x0")      # .float() below would train on uint8 pixels as if they were [-1, 1] values
    B, sd = x0.shape[0], model.sigma_data
    x0 = x0.float()
    t = sample_time(B, sd, p_mean, p_std, generator, x0.device)
    z = torch.randn(x0.shape, generator=generator, device=x0.device) * sd
    cos, sin = _b(torch.cos(t), x0), _b(torch.sin(t), x0)
    x_t = cos * x0 + sin * z
    dxdt = cos * z - sin * x0 if teacher is None else teacher_velocity(teacher, x_t, t, sd, class_labels)

    masks: list = []
    with dropout_masks(record=masks):
        F = model.backbone(x_t, t, class_labels)
    logvar = model.logvar(t)
    common = dict(logvar=logvar, weight=prior_weight(t, sd, prior_weighting),
                  r=tangent_warmup(step, warmup_steps) if r is None else r,
                  sigma_data=sd, c=c, norm=tangent_norm)
    net = model.backbone
    w = first_float_param(model.net)
    low = w is not None and w.dtype in (torch.float16, torch.bfloat16)
    if precision == "fp64" or (low and precision in ("fp32", "tf32")):
        # the backbone with fp64 copies of the weights (the model itself stays as it is); a model made .half() /
        # .bfloat16() gets fp32 copies for fp32 / tf32 forwards: in its own dtype the difference would be rounding
        # noise (a bf16 step's F+ - F- has 3 significant digits), and torch.func.jvp's tangent too
        net_c = fp64_call(model.net, torch.float64 if precision == "fp64" else torch.float32)
        sign = -1.0 if model.time_input == "edm" else 1.0
        net = lambda x, s, y: sign * net_c(x / sd, model.c_noise(s), y)  # noqa: E731
    tangents = (dxdt, torch.ones_like(t))
    if jvp == "exact":
        # torch.func.jvp cannot trace a torch.compile'd backbone (cmfast-train --compile): that one pass runs eagerly
        # (set_stance is torch >= 2.6; older torch runs it as it is)
        stance = getattr(torch.compiler, "set_stance", None)
        with stance("force_eager") if stance else contextlib.nullcontext():
            _, dFdt = exact_jvp(lambda x, s: net(x, s, class_labels), (x_t, t), tangents,
                                "fp64" if precision == "fp64" else "fp32", replay=masks)
        return ops.trig_tangent_loss(F, x_t, dxdt, t, dFdt=dFdt.float(), **common)
    labels_k = None if class_labels is None else torch.cat([class_labels] * order)
    h = stencil_inside(fd_step(eps, t, B, x0.device, floor), t, order)
    Fp, Fm = fd_pair(lambda x, s: net(x, s, labels_k), (x_t, t), tangents, h, precision, replay=masks, order=order)
    return ops.trig_tangent_loss(F, x_t, dxdt, t, F_plus=Fp.float(), F_minus=Fm.float(), h=h.float(), **common)


def stencil_inside(h: torch.Tensor, t: torch.Tensor, order: int) -> torch.Tensor:
    """The FD step h (B,) shortened where the stencil t +- h (order 4: t +- 2h) would leave (0, pi/2): it reaches
    at most half-way to either end. Outside, c_noise = ln(sd tan t) / 4 (time_input 'edm', sCD's default) is NaN: at
    the default eps = 1e-2 for t > pi/2 / 1.01 ~ 1.555, about 0.07% of the lognormal draws, which made about one
    batch of 512 in three NaN (a skipped step). Elsewhere (all but those draws) h is unchanged."""
    reach = 2.0 if order == 4 else 1.0
    td = t.detach().to(torch.float64)
    return torch.minimum(h, torch.minimum(td, math.pi / 2 - td) * (0.5 / reach))


def sct_loss(model: TrigFlowModel, x0: torch.Tensor, **kw) -> torch.Tensor:
    """Continuous-time consistency training (sCT): scm_loss without a teacher."""
    return scm_loss(model, x0, None, **kw)


def scd_loss(model: TrigFlowModel, x0: torch.Tensor, teacher: nn.Module, **kw) -> torch.Tensor:
    """Continuous-time consistency distillation (sCD) from an EDM denoiser (cmfast.EDMDenoiser, `--method edm`)."""
    return scm_loss(model, x0, teacher, **kw)
