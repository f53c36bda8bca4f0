"""Boundary-condition preconditioning (CM paper Sec. 3 and Appendix C; EDM Table 1).

The backbone F runs in whatever precision the caller chose (autocast, or the dtype of a model converted with
.half() / .bfloat16()); the scalings and the skip connection run in fp32 (the output is fp32), so
f(x, sigma_min) == x to the last bit.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import nn


def _as_tensor(sigma, what: str = "sigma", **kw) -> torch.Tensor:
    if isinstance(sigma, torch.Tensor) and not kw:
        return sigma if sigma.dtype in (torch.float32, torch.float64) else sigma.float()
    try:    # a string failed as "new(): invalid data type 'str'", None as "must be real number, not NoneType"
        return torch.as_tensor(sigma, **({"dtype": torch.float32} | kw))
    except (TypeError, ValueError):
        raise TypeError(f"{what}: expected a number or a tensor of noise levels, got {sigma!r}") from None


# ---- Scalings (CM paper Appendix C, eq. for c_skip, c_out; EDM Table 1 for c_in) -------------------------------
def scalings(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """(c_skip, c_out, c_in) shaped like sigma, float32 (float64 if sigma is):
    c_skip = sd^2 / ((s - smin)^2 + sd^2), c_out = sd (s - smin) / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2).
    With sigma_min = 0 these are EDM's denoiser scalings."""
    s = _as_tensor(sigma)
    try:    # 0 or less gave c_skip = c_out = 0 (or NaN) without a word; a string failed inside the formula
        ok = sigma_data > 0 and sigma_data < math.inf
    except TypeError:
        raise TypeError(f"sigma_data: expected a number, got {sigma_data!r}") from None
    if not ok:
        raise ValueError(f"sigma_data: expected a positive finite number, got {sigma_data}")
    sd2 = sigma_data * sigma_data
    rs = torch.rsqrt(s * s + sd2)
    c_skip = sd2 / ((s - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (s - sigma_min) * rs
    return c_skip, c_out, rs


def noise_conditioning(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise = ln(sigma) / 4 (EDM Table 1), the backbone's time input."""
    return torch.log(sigma) / 4


def sigma_vector(sigma, x: torch.Tensor, what: str = "sigma", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sigma as a (B,) vector of dtype (float32 unless asked) on x's device: a number, a 0-d, (B,) or (B, 1, ..., 1)
    tensor."""
    B = x.shape[0]
    s = _as_tensor(sigma, what, dtype=dtype, device=x.device)
    if s.dim() > 1 and all(d == 1 for d in s.shape[1:]):
        s = s.reshape(s.shape[0])
    if s.dim() == 0:
        s = s.expand(B)
    if s.shape != (B,):
        raise ValueError(f"{what}: expected a number or one value per sample ({B},), got shape {tuple(s.shape)}")
    return s


def under_torch_func() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp) is running this call: vmap refuses value-dependent branches,
    .tolist() and channels-last queries, so the value checks (like under torch.compile) and layouts are left out."""
    return torch._C._functorch.maybe_current_level() is not None


def capturing(t: torch.Tensor) -> bool:
    """Whether t's device stream is being captured into a CUDA graph (cmfast.GraphedSampler, cmfast-train
    --cuda-graph): a value check's host sync is illegal there, so the checks are left out as under torch.compile."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


_LOCAL = threading.local()    # .skip: value checks left out on this thread (skip_value_checks)


@contextlib.contextmanager
def skip_value_checks():
    """Inside, the models' and ops' value checks (noise levels, finite-difference steps) are left out, as under
    torch.compile or a CUDA-graph capture; their shape, dtype and device checks stay. Each value check reads the values
    on the host: on a GPU a host sync, which drains the device's queue in the middle of the work. cmfast-train's eager
    step runs its loss inside, so the step's one sync is the loop's own: its levels come from the resolved config's
    grids and time distributions, which were checked once, and a non-finite loss is still caught there."""
    prev = getattr(_LOCAL, "skip", False)
    _LOCAL.skip = True
    try:
        yield
    finally:
        _LOCAL.skip = prev


def value_checks_off(t: torch.Tensor) -> bool:
    """Whether a value check (a host read of t's values) is left out: while compiling, under a torch.func transform,
    while capturing t's stream in a CUDA graph, or inside skip_value_checks()."""
    # (is_compiling first: under torch.compile the rest is not traced)
    return (torch.compiler.is_compiling() or getattr(_LOCAL, "skip", False) or under_torch_func()
            or capturing(t))


def check_images(x: torch.Tensor, what: str = "x") -> None:
    """A non-empty floating-point batch (B, C, ...): the models' input, and the losses' data before they draw noise
    like it."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor (B, C, ...), got {type(x).__module__}.{type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{what}: expected a non-empty batch tensor (B, C, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():   # uint8 pixels (0..255) would run as if they were [-1, 1] values
        raise TypeError(f"{what}: expected a floating-point tensor (images in [-1, 1]), got {x.dtype}")


def check_sigma(sigma, x: torch.Tensor, lo: float, hi: float | None = None, what: str = "sigma") -> torch.Tensor:
    """sigma as an fp32 (B,) vector on x's device; a clear error when it is non-finite or outside [lo, hi].
    One host sync for the check (none while compiling or capturing a CUDA graph, or inside skip_value_checks(); not
    checked under a torch.func transform, whose vmap refuses a value-dependent branch)."""
    check_images(x)
    s = sigma_vector(sigma, x, what)
    if value_checks_off(s):
        return s
    bad = ~torch.isfinite(s) | (s < lo * (1 - 1e-6))
    if hi is not None:
        bad |= s > hi * (1 + 1e-6)
    if bool(bad.any()):  # the only sync on the good path; the messages below run only on bad input
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{what}: expected finite noise levels, got {s.tolist()[:4]}")
        if float(s.min()) < lo * (1 - 1e-6):
            raise ValueError(f"{what}: expected noise levels >= sigma_min = {lo}, got {float(s.min())}")
        raise ValueError(f"{what}: expected noise levels <= sigma_max = {hi}, got {float(s.max())}")
    return s


def autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (cuda / cpu; never on 'meta'): layers then let it cast their weights,
    and outside it the weights follow x's dtype (a net converted with .half() / .bfloat16() / .double())."""
    return x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)


def first_float_param(net: nn.Module) -> torch.Tensor | None:
    """The module's first floating-point parameter (its weights' dtype and device), or None."""
    return next((p for p in net.parameters() if p.is_floating_point()), None)


def backbone_input(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (the fp32 scaled input) in the dtype of the backbone's weights, outside autocast (under it, autocast casts):
    a model converted with .half() / .bfloat16() runs its backbone in that dtype, the preconditioning stays fp32."""
    p = first_float_param(net)
    if p is not None and p.device != x.device:    # torch's device / type mismatch came from the first convolution
        raise ValueError(f"x: expected a tensor on {p.device} (the model's device), got one on {x.device}")
    if autocasting(x):
        return x
    return x if p is None else x.to(p.dtype)


class _Preconditioned(nn.Module):
    def __init__(self, net: nn.Module, sigma_data: float, sigma_min: float, sigma_max: float, boundary: float):
        super().__init__()
        if not isinstance(net, nn.Module) or isinstance(net, _Preconditioned):
            # None or a name was kept until the first call failed ("'NoneType' object is not callable"); a wrapped
            # model was preconditioned twice without a word
            got = f"a {type(net).__name__} (already preconditioned: pass its .net)" \
                if isinstance(net, _Preconditioned) else type(net).__name__
            raise TypeError(f"net: expected the backbone network F (an nn.Module, e.g. cmfast.UNet), got {got}")
        try:
            ok = sigma_data > 0 and 0 < sigma_min < sigma_max and math.isfinite(sigma_max)
        except TypeError:       # a string failed as "'>' not supported between instances of 'str' and 'int'"
            raise TypeError(f"expected numbers for sigma_data, sigma_min, sigma_max, got sigma_data={sigma_data!r}, "
                            f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}") from None
        if not ok:
            raise ValueError(f"expected 0 < sigma_min < sigma_max and sigma_data > 0, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}, sigma_data={sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)   # Expected standard deviation of the training data.
        self.sigma_min = float(sigma_min)     # Smallest noise level (the boundary of the consistency function).
        self.sigma_max = float(sigma_max)     # Largest noise level (T).
        self._boundary = float(boundary)      # sigma_min inside c_skip / c_out: sigma_min for CMs, 0 for EDM.

    def backbone(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        """F(c_in x, c_noise): the raw network output (in the network's precision)."""
        _, _, c_in = scalings(sigma, self.sigma_data, self._boundary)
        x_in = c_in.reshape(-1, *([1] * (x.dim() - 1))) * x.float()
        return self.net(backbone_input(self.net, x_in), noise_conditioning(sigma), class_labels)

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        from . import ops
        s = check_sigma(sigma, x, lo=self.sigma_min if self._boundary > 0 else 1e-12)
        F = self.backbone(x, s, class_labels)
        with torch.autocast(x.device.type, enabled=False):
            return ops.skip_output(x.float(), F.float(), s, self.sigma_data, self._boundary)


class ConsistencyModel(_Preconditioned):
    """f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, ln(sigma) / 4), f(x, sigma_min) = x exactly."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(net, sigma_data, sigma_min, sigma_max, boundary=sigma_min)


class EDMDenoiser(_Preconditioned):
    """EDM's denoiser D(x, sigma) (the diffusion teacher): the same wrapper with sigma_min = 0 in c_skip, c_out."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(net, sigma_data, sigma_min, sigma_max, boundary=0.0)
