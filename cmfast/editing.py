"""Zero-shot editing with a consistency model (CM paper Sec. 6.3, Algorithm 4), exposed as `cmfast.edit`.

Every task is one call of `edit`: an orthonormal transform A given as two functions (A, A^-1), a binary mask
`known` over A's coefficients (1 = known, i.e. 1 - Omega of the paper) and a reference image y. Each step denoises,
clamps to [-1, 1] (as the reference code does) and puts y's known coefficients back, so they come out exact.
The model is called through one callable, `model(x, sigma)`: a compiled or graphed model can be passed.
The noise comes from `generator`, or from `noise=` (one tensor shaped like the output per level), which lets a
caller make each image's noise its own, whatever batch it is edited in (cmfast-edit does).
"""
from __future__ import annotations

import math

import torch

from .precond import check_sigma
from .schedules import as_integer, as_number
from .sampling import (as_levels, check_generator, check_model, check_noise_list, check_sigmas, eval_mode,
                       model_device, model_level, sample)

LUMINANCE = (0.2989, 0.5870, 0.1140)   # Y = 0.2989 R + 0.5870 G + 0.1140 B, the weights of the CM reference code


def _identity(x):
    return x


def noise_range(model):
    """(sigma_min, sigma_max) of a model (a compiled one forwards them), else the paper's defaults."""
    return float(getattr(model, "sigma_min", 0.002)), float(getattr(model, "sigma_max", 80.0))


# ---- Algorithm 4 -------------------------------------------------------------------------------------------------
@torch.no_grad()
def edit(model, y, A, A_inv, known, sigmas, generator=None, start=None, noise=None):
    """Algorithm 4 over decreasing `sigmas`: x = start + sigmas[0] n (start defaults to A^-1[(A y) known], line 1),
    then per level s: x = A^-1[(A y) known + (A clamp(f(x, s))) (1 - known)] and, before every later level,
    x += sqrt(s^2 - sigma_min^2) n. n is drawn as torch.randn(y.shape, generator=generator, ...) on y's device, or,
    given `noise` (one tensor shaped like y per level), taken from it."""
    smin, smax = noise_range(model)
    s = check_sigmas(sigmas, smin, smax)
    if noise is not None:
        check_noise_list(noise, len(s), y.shape, "one per level")
    check_generator(generator, y.device, "the images' device")
    A, A_inv = _exact(A, y.device.type), _exact(A_inv, y.device.type)
    known = known.to(device=y.device, dtype=y.dtype)
    kept = A(y) * known
    x = A_inv(kept) if start is None else start
    with eval_mode(model):     # no dropout; a model in train mode goes back to it after
        for i, sigma in enumerate(s):
            std = sigma if i == 0 else math.sqrt(sigma ** 2 - smin ** 2)
            n = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) if noise is None else \
                noise[i].to(device=y.device, dtype=y.dtype)
            x = x + std * n
            x = A_inv(kept + A(model(x, model_level(sigma, y)).to(y.dtype).clamp(-1, 1)) * (1 - known))
    return _fit_box(x, kept, A, A_inv, known)


def _exact(fn, device_type):
    """fn with autocast off: under a caller's autocast (how the backbone runs in bf16 / fp16) the transforms' matmuls
    would run in bf16 / fp16, and the kept coefficients would come back off by ~1e-2. Only the model runs autocast."""
    def run(v):
        with torch.autocast(device_type, enabled=False):
            return fn(v)
    return run


def _fit_box(x, kept, A, A_inv, known, iters: int = 60):
    """Why: the last replacement may leave [-1, 1] (a kept luminance beside a clamped colour, a kept patch mean
    beside clamped detail); the reference code leaves that to the uint8 cast, which breaks the kept content.
    Each group that leaves the box moves to the nearest image in [-1, 1] with the same known coefficients:
    clamp(x + A^-1(lam known)), lam per known coefficient found by bisection. Sound when every known basis vector
    has positive entries and its own support (true for every task here): then coefficient j grows with lam_j only."""
    outside = x.abs() > 1
    if not bool(outside.any()):
        return x
    touched = A_inv(A(outside.to(x.dtype)) * known) != 0          # whole groups holding an out-of-range value
    v = A_inv(torch.ones_like(kept) * known)
    if not bool((v > 0).any()):
        return x.clamp(-1, 1)
    bound = (x.abs().max() + 1) / v[v > 0].min()                   # at +-bound every pixel of a group saturates
    lo, hi = torch.full_like(kept, -float(bound)), torch.full_like(kept, float(bound))
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = A(torch.clamp(x + A_inv(mid * known), -1, 1)) * known < kept
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    fitted = torch.clamp(x + A_inv((lo + hi) / 2 * known), -1, 1)
    return torch.where(touched, fitted, x.clamp(-1, 1))


# ---- Orthonormal bases (Sec. 6.3): first vector = the content that is kept --------------------------------------
def _basis_with_first(v: torch.Tensor) -> torch.Tensor:
    """Orthonormal Q (columns) with Q[:, 0] = v / |v|, by QR with the signs fixed so that R's diagonal is positive."""
    m = torch.eye(v.numel(), dtype=torch.float64)
    m[:, 0] = v.double() / v.double().norm()
    q, r = torch.linalg.qr(m)
    return (q * torch.sign(torch.diagonal(r))).float()


def luminance_basis() -> torch.Tensor:
    """(3, 3) orthonormal basis of RGB (columns); column 0 is the luminance weights normalised."""
    return _basis_with_first(torch.tensor(LUMINANCE))


def patch_basis(factor: int) -> torch.Tensor:
    """(k^2, k^2) orthonormal basis of a k x k patch (columns, row-major pixels); column 0 is constant 1/k."""
    return _basis_with_first(torch.ones(factor * factor))


class with_class:
    """A class-conditional model as the one-callable model the tasks take: model(x, sigma, label for every
    image). Its noise range, network and parameters stay visible (`noise_range`, `image_shape`)."""

    def __init__(self, model, label: int):
        label_dim = int(getattr(getattr(model, "net", None), "label_dim", 0) or 0)
        if not label_dim:
            raise ValueError("class label: this model is unconditional")
        index = as_integer(label)       # numpy's and one-element tensors too
        if index is None:               # int(1.5): class 1 without a word
            raise TypeError(f"class label: expected an integer class index, got {label!r}")
        if not 0 <= index < label_dim:
            raise ValueError(f"class label: expected 0 <= label < {label_dim}, got {label}")
        self.model, self.label = model, index
        self.sigma_min, self.sigma_max = noise_range(model)
        self.net = model.net

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x, sigma, class_labels=None):     # cmfast.sample passes class_labels=None
        return self.model(x, sigma, torch.full((x.shape[0],), self.label, device=x.device))


# ---- Input checks ------------------------------------------------------------------------------------------------
_WANT = "a consistency model (cmfast.ConsistencyModel(net), or any callable f(x, sigma))"


def _check_model(model, task: str) -> None:
    """The tasks take a consistency model or any callable f(x, sigma); refused: a name, the bare network (a UNet
    took sigma as its c_noise input: images without a word) and, except to denoise, an EDM teacher (cmfast-edit's
    own refusal: Algorithm 4 ran it as if it were a consistency model, without a word)."""
    from .precond import EDMDenoiser
    teacher = ((EDMDenoiser, "an EDM teacher is a denoiser, not a consistency model: Algorithm 4 edits with a "
                             "consistency model"),) if task != "denoise" else ()
    check_model(model, want=_WANT, refuse=teacher, needs_range=False)


def image_shape(model):
    """(C, H, W) that the model's network takes, or None when it does not say."""
    net = getattr(model, "net", model)
    c, r = getattr(net, "in_channels", None), getattr(net, "img_resolution", None)
    return (int(c), int(r), int(r)) if isinstance(c, int) and isinstance(r, int) else None


def _check_images(model, x, what="images", channels=None, in_range=True, size=None):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"{what}: expected a float tensor (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                         f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    chw = image_shape(model)
    want_c = channels or (chw[0] if chw else x.shape[1],)
    want_hw = size or (chw[1:] if chw else tuple(x.shape[2:]))
    if x.shape[1] not in want_c or tuple(x.shape[2:]) != tuple(want_hw):
        raise ValueError(f"{what}: expected (B, {' or '.join(map(str, want_c))}, {want_hw[0]}, {want_hw[1]}) for "
                         f"this model, got {tuple(x.shape)}")
    dev = model_device(model)
    if dev is not None and x.device != dev:
        raise ValueError(f"{what}: expected a tensor on {dev} (the model's device), got one on {x.device}")
    if in_range and not bool(((x >= -1 - 1e-6) & (x <= 1 + 1e-6)).all()):
        raise ValueError(f"{what}: expected values in [-1, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    if not in_range and x.device.type != "meta" and not bool(torch.isfinite(x).all()):  # NaN: NaN results, no word
        raise ValueError(f"{what}: expected finite values, got NaN / inf")
    return x.float().clamp(-1, 1) if in_range else x.float()


# ---- Tasks ---------------------------------------------------------------------------------------------------------
def inpaint(model, images, mask, sigmas, generator=None, noise=None):
    """Fill the pixels where mask == 0; pixels where mask == 1 are kept exactly. A = I.
    images (B, C, H, W) in [-1, 1]; mask (B or 1, 1 or C, H, W) of 0 / 1."""
    _check_model(model, "inpaint")
    y = _check_images(model, images)
    B, C, H, W = y.shape
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[0] not in (1, B) or \
            mask.shape[1] not in (1, C) or tuple(mask.shape[2:]) != (H, W):
        raise ValueError(f"mask: expected shape ({B} or 1, 1 or {C}, {H}, {W}) with 1 = known pixel, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"mask: expected binary values (1 = known, 0 = to generate), got {mask.unique()[:4].tolist()}")
    return edit(model, y, _identity, _identity, mask.to(y.device, torch.float32), sigmas, generator, noise=noise)


def colorize(model, images, sigmas, generator=None, noise=None):
    """Colour a grayscale image, keeping its luminance 0.2989 R + 0.5870 G + 0.1140 B (0.9999 g for a 1-channel
    gray g, which is repeated to RGB). A 3-channel input keeps its luminance; its colour is discarded."""
    _check_model(model, "colorize")
    chw = image_shape(model)
    if chw is not None and chw[0] != 3:
        raise ValueError(f"colorize: expected a 3-channel (RGB) model, got a {chw[0]}-channel model")
    y = _check_images(model, images, channels=(1, 3)).expand(-1, 3, -1, -1)
    Q = luminance_basis().to(y.device)
    known = torch.tensor([1.0, 0.0, 0.0], device=y.device).reshape(1, 3, 1, 1)
    return edit(model, y, lambda x: torch.einsum("bchw,cd->bdhw", x, Q),
                lambda c: torch.einsum("bdhw,cd->bchw", c, Q), known, sigmas, generator, noise=noise)


def _to_patches(x, k):   # (B, C, H, W) -> (B, C, H/k, W/k, k*k), row-major within a patch
    B, C, H, W = x.shape
    return x.reshape(B, C, H // k, k, W // k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H // k, W // k, k * k)


def _from_patches(p, k):
    B, C, h, w, _ = p.shape
    return p.reshape(B, C, h, w, k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, h * k, w * k)


def super_resolve(model, images, factor, sigmas, generator=None, noise=None):
    """Upsample by an integer `factor`, keeping every factor x factor patch mean. `images` is either the low-res
    image (H / factor: each pixel is one patch mean) or a full-size image whose patch means are used (as in the
    reference code); the model's resolution tells which (without one, full-size is assumed)."""
    _check_model(model, "super_resolve")
    k = as_integer(factor)      # numpy's too: np.int64(2) was refused as 'expected an integer >= 1, got 2'
    if k is None or k < 1:
        raise ValueError(f"factor: expected an integer >= 1, got {factor!r}")
    factor = k
    chw = image_shape(model)
    low_hw = None if chw is None or factor == 1 or chw[1] % factor or chw[2] % factor else \
        (chw[1] // factor, chw[2] // factor)
    if low_hw and isinstance(images, torch.Tensor) and images.dim() == 4 and tuple(images.shape[2:]) == low_hw:
        y = _check_images(model, images, size=low_hw).repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    else:
        y = _check_images(model, images)
    if y.shape[2] % factor or y.shape[3] % factor:
        raise ValueError(f"factor: expected a divisor of the image size {tuple(y.shape[2:])}, got {factor}")
    Q = patch_basis(factor).to(y.device)
    known = torch.zeros(factor * factor, device=y.device)
    known[0] = 1
    return edit(model, y, lambda x: _to_patches(x, factor) @ Q, lambda c: _from_patches(c @ Q.T, factor),
                known, sigmas, generator, noise=noise)


def stroke_guided(model, strokes, sigma_start, sigmas=(), generator=None, noise=None):
    """SDEdit-style generation from a stroke painting: x = f(strokes + sigma_start n, sigma_start), then multistep
    sampling (Algorithm 1, clamped) over `sigmas`, which must all lie below sigma_start."""
    _check_model(model, "stroke_guided")
    smin, smax = noise_range(model)
    start = as_number(sigma_start)      # '20' was read as 20.0; None failed inside float()
    if start is None:
        raise TypeError(f"sigma_start: expected a number (a noise level), got {sigma_start!r}")
    if not smin < start <= smax * (1 + 1e-6):
        raise ValueError(f"sigma_start: expected a level in ({smin}, {smax}], got {sigma_start}")
    rest = as_levels(sigmas)      # a string was read as its characters: '51' -> levels 5, 1
    if rest and max(rest) >= start:
        raise ValueError(f"sigmas: expected levels below sigma_start = {sigma_start}, got {rest}")
    y = _check_images(model, strokes, what="strokes")
    return edit(model, y, _identity, _identity, torch.zeros(()), (start, *rest), generator, start=y,
                noise=noise)


def slerp(z0, z1, alphas):
    """Spherical interpolation per sample: (len(alphas), *z0.shape); alpha 0 gives z0 and 1 gives z1 exactly."""
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1, 1)
    u, v = z0.double().flatten(1), z1.double().flatten(1)
    cos = ((u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))).clamp(-1, 1)
    theta = torch.acos(cos)                                         # (B,)
    s = torch.sin(theta)
    lerp = s < 1e-6                                                 # (anti)parallel noises: fall back to lerp
    w0 = torch.where(lerp, 1 - a, torch.sin((1 - a) * theta) / torch.where(lerp, 1, s))
    w1 = torch.where(lerp, a, torch.sin(a * theta) / torch.where(lerp, 1, s))
    shape = (a.shape[0], z0.shape[0]) + (1,) * (z0.dim() - 1)
    return (w0.reshape(shape) * z0.double() + w1.reshape(shape) * z1.double()).to(z0.dtype)


@torch.no_grad()
def interpolate(model, z0, z1, alphas, sigma=80.0, sigmas=None, generator=None):
    """Sample from the slerp of two standard-normal noises z0, z1 (B, C, H, W): one step at `sigma`, or
    Algorithm 1 over `sigmas` when given, its later noise drawn once per pair and shared by every alpha (so the
    images move smoothly with alpha). Returns (len(alphas), B, C, H, W); alpha 0 is sample(model, z0, ...) with that
    noise."""
    _check_model(model, "interpolate")
    _check_images(model, z0, what="z0", in_range=False)
    if not isinstance(z1, torch.Tensor) or z1.shape != z0.shape:
        raise ValueError(f"z1: expected the shape of z0 {tuple(z0.shape)}, got "
                         f"{tuple(z1.shape) if isinstance(z1, torch.Tensor) else type(z1).__name__}")
    if z1.device != z0.device:
        raise ValueError(f"z1: expected a tensor on z0's device {z0.device}, got one on {z1.device}")
    check_generator(generator, z0.device, "the images' device")
    try:
        a = torch.as_tensor(alphas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):        # a string: "new(): invalid data type 'str'"
        raise TypeError(f"alphas: expected a number or a sequence of interpolation weights, got "
                        f"{alphas!r}") from None
    a = a.reshape(-1)
    if not len(a) or not bool(torch.isfinite(a).all()):     # none failed in the model as an empty batch 'x'
        raise ValueError(f"alphas: expected one or more finite interpolation weights, got {a.tolist()}")
    _check_images(model, z1, what="z1", in_range=False)
    levels = check_sigmas((sigma,) if sigmas is None else sigmas, model.sigma_min, model.sigma_max)
    z = slerp(z0, z1, alphas)
    # Algorithm 1's later noise: one draw per pair and level, the same for every alpha (a draw per alpha made the
    # multistep path jump between neighbouring alphas instead of moving smoothly from z0's sample to z1's)
    later = [torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype) for _ in levels[1:]]
    noise = [n.expand(len(a), *n.shape).reshape(-1, *n.shape[1:]) for n in later]
    x = sample(model, z.reshape(-1, *z0.shape[1:]), levels, noise=noise or None)
    return x.reshape(z.shape)


@torch.no_grad()
def denoise(model, noisy, sigma):
    """One evaluation f(noisy, sigma): the consistency model's estimate of the clean image. sigma: a number or one
    per image, in [sigma_min, sigma_max] (the range the other tasks' levels must lie in)."""
    _check_model(model, "denoise")
    x = _check_images(model, noisy, what="noisy", in_range=False)
    check_sigma(sigma, x, *noise_range(model))
    with eval_mode(model):
        return model(x, sigma)
