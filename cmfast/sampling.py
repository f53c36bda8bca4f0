"""Sampling: consistency models in one or more steps (CM Alg. 1) and the EDM teacher's ODE sampler (EDM Alg. 1)."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .precond import skip_value_checks
from .schedules import as_integer, karras_sigmas


def as_levels(sigmas, what: str = "sigmas") -> tuple[float, ...]:
    """Noise levels as a tuple of floats (possibly empty): a number, a 1-D sequence or a 1-D tensor of numbers."""
    if isinstance(sigmas, (int, float)):
        sigmas = (sigmas,)
    try:    # a string was read as its characters ('80' -> levels 8, 0); a 2-D tensor failed inside float()
        if isinstance(sigmas, (str, bytes)):
            raise TypeError
        return tuple(float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas))
    except (TypeError, ValueError):
        raise TypeError(f"{what}: expected a number or a 1-D sequence of numbers (noise levels), got "
                        f"{sigmas!r}") from None


def check_sigmas(sigmas, sigma_min: float, sigma_max: float) -> tuple[float, ...]:
    """Validated decreasing noise levels for Algorithm 1: non-empty, finite, strictly decreasing, in
    [sigma_min, sigma_max]."""
    s = as_levels(sigmas)
    if not s:
        raise ValueError("sigmas: expected at least one noise level, got none")
    if not all(math.isfinite(v) for v in s):
        raise ValueError(f"sigmas: expected finite noise levels, got {s}")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas: expected strictly decreasing noise levels, got {s}")
    if s[-1] < sigma_min * (1 - 1e-6) or s[0] > sigma_max * (1 + 1e-6):
        raise ValueError(f"sigmas: expected levels in [{sigma_min}, {sigma_max}], got {s}")
    return s


def model_level(sigma: float, like: torch.Tensor) -> torch.Tensor:
    """A noise level as the model call's argument: a 0-d fp32 tensor on like's device (the value a float gives). A
    torch.compile'd model specializes on a Python float, recompiling for every new level (and running eagerly after
    torch._dynamo's recompile limit, 8: a few edits, an 18-step Heun run); a tensor's value is not guarded."""
    return torch.full((), sigma, dtype=torch.float32, device=like.device)


_MODULE_SETATTR = nn.Module.__setattr__


def _modules_in_train_mode(roots) -> list[nn.Module]:
    """The modules under `roots` (each once, as Module.modules() finds them) whose .training is set. A plain walk of
    the _modules dicts: modules() builds every submodule's name on the way, 125 us for the 246 of the CIFAR-10 UNet
    on a CPU (beside a ~1 ms batch-1 GPU sample), this 47 us. Walked on every call, never cached: a submodule put back
    in train mode, or added, since the last call counts."""
    seen, found, stack = set(), [], list(roots)
    while stack:
        m = stack.pop()
        if m is None or m in seen:
            continue
        seen.add(m)
        if m.training:
            found.append(m)
        stack.extend(m._modules.values())
    return found


def _set_training(modules, mode: bool) -> None:
    """m.training = mode for each: for a plain Module with object's own assignment, which is where Module.__setattr__
    ends for a bool after ~1 us of checks for parameters, buffers and submodules (two per module per call: 570 of
    the 690 us that eval_mode cost the CIFAR-10 UNet in train mode); a class with a __setattr__ of its own (a
    ScriptModule) through it."""
    for m in modules:
        if type(m).__setattr__ is _MODULE_SETATTR:
            object.__setattr__(m, "training", mode)
        else:
            m.training = mode


@contextlib.contextmanager
def eval_mode(model):
    """`model` (an nn.Module, or a wrapper holding one as .model, such as cmfast.edit.with_class) in eval mode inside;
    each submodule that was in train mode is put back in it after. Sampling a model left in train() mode drew new
    dropout masks at every evaluation: the same seed gave other images on every call."""
    training = _modules_in_train_mode([m for m in (model, getattr(model, "model", None)) if isinstance(m, nn.Module)])
    _set_training(training, False)
    try:
        yield model
    finally:
        _set_training(training, True)


def model_device(model):
    """The device of the model's parameters, or None when it has none to show (a plain callable)."""
    params = getattr(model, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    return None if p is None else p.device


def check_generator(generator, device=None, whose: str = "z's device") -> None:
    """generator None or a torch.Generator (a seed failed as "'int' has no attribute 'device'") on device's type
    where given (torch.randn refused it from inside)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and device is not None and generator.device.type != device.type:
        raise ValueError(f"generator: expected a torch.Generator on {device.type} ({whose}), got one on "
                         f"{generator.device.type}")


def check_device(model, z, generator=None) -> None:
    """z on the device of the model's parameters and the generator there too, or one ValueError naming both: the
    network's convolution (or torch.randn) raised 'Input type (torch.FloatTensor) and weight type
    (torch.cuda.FloatTensor) should be the same' from deep inside. A model without parameters is not checked."""
    dev, tensor = model_device(model), isinstance(z, torch.Tensor)
    if dev is not None and tensor and z.device != dev:
        raise ValueError(f"z: expected a tensor on {dev} (the model's device), got one on {z.device}")
    check_generator(generator, z.device if tensor else None)


def check_noise(z, what: str = "z") -> None:
    """z must be a floating-point tensor (s[0] * z would promote an integer one: no error otherwise; a list failed as
    "can't multiply sequence by non-int of type 'float'") and, on the CPU, where the check costs no device sync,
    finite (NaN noise gave NaN images without a word)."""
    if not isinstance(z, torch.Tensor):     # ValueError, as the model's own check of x (cmfast.precond.check_sigma)
        raise ValueError(f"{what}: expected a torch.Tensor (N(0, I) noise), got {type(z).__module__}."
                         f"{type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor (N(0, I) noise), got {z.dtype}")
    if z.device.type == "cpu" and not all_finite(z):
        raise ValueError(f"{what}: expected finite noise, got NaN / inf values")


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of x is finite. A NaN or inf makes the sum NaN or inf, so a finite sum settles it in one
    reduction; isfinite(x).all() is five kernels (x == x, abs, != inf, their product, all), 10x slower on a CPU (35 us
    of a stub model's 95 us batch-1 sample, milliseconds at batch 256). Only a sum that overflowed looks again."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def _unwrapped(model):
    """The module behind torch.compile's wrapper (an OptimizedModule keeps it as _orig_mod)."""
    return getattr(model, "_orig_mod", model)


def check_model(model, what: str = "model", want: str = "a consistency model (cmfast.ConsistencyModel(net))",
                refuse: tuple = (), needs_range: bool = True) -> None:
    """One TypeError for a model of the wrong kind: not callable (a name), the bare network (a cmfast.UNet, which
    took sigma as its c_noise input without a word, or failed with "'UNet' object has no attribute 'sigma_min'"), one
    of the classes in `refuse`, or (needs_range) without the sigma_min and sigma_max that the sampler reads."""
    from .nets.unet import UNet
    inner = _unwrapped(model)
    name = type(inner).__name__
    if isinstance(inner, UNet):
        raise TypeError(f"{what}: expected {want}, got the bare network (a cmfast.UNet): wrap it first")
    if not callable(model) or (needs_range and not (hasattr(model, "sigma_min") and hasattr(model, "sigma_max"))):
        raise TypeError(f"{what}: expected {want}, got {name}")
    for cls, hint in refuse:
        if isinstance(inner, cls) or isinstance(_unwrapped(getattr(inner, "model", None)), cls):
            raise TypeError(f"{what}: expected {want}, got {cls.__name__}: {hint}")


@torch.no_grad()
def sample(model: nn.Module, z: torch.Tensor, sigmas=(80.0,), generator=None, class_labels=None,
           noise=None, clip_denoised: bool = False) -> torch.Tensor:
    """Algorithm 1: x = f(sigmas[0] z, sigmas[0]); for each later s: x = f(x + sqrt(s^2 - sigma_min^2) n, s),
    n ~ N(0, I) drawn with `generator` on z's device and dtype, or, given `noise` (one tensor shaped like z per later
    level), taken from it. Runs under torch.no_grad(): the images carry no gradient (differentiate model(x, sigma))
    and are float32 (the fp32 skip output) whatever the dtype of z or of the model. The model runs in eval mode
    (no dropout); a model in train mode is put back in it after. The levels are checked here, on the host, against the
    model's range, so the model's own per-call check (a host sync on a GPU) is left out (precond.skip_value_checks).

    clip_denoised: each f(...) clamped to [-1, 1] before it is noised again (and the output), as
    openai/consistency_models' samplers do (clip_denoised=True, their default). Algorithm 1 as the paper writes it
    does not, nor does cmfast by default: on the shipped Fashion-MNIST models it scores slightly better (FD-FMNIST
    4.26 against 4.38 at 2 steps (80, 0.821), 5,000 images, seed 0, CPU). One step: the same images, up to that final
    clamp."""
    check_model(model)
    s = check_sigmas(sigmas, model.sigma_min, model.sigma_max)
    check_noise(z)
    check_device(model, z, generator)
    if noise is not None:
        check_noise_list(noise, len(s) - 1, z.shape, "one per level after the first")
    clip = _check_flag(clip_denoised, "clip_denoised")
    with eval_mode(model), skip_value_checks():
        x = model(s[0] * z, model_level(s[0], z), class_labels)
        for k, sigma in enumerate(s[1:]):
            x = x.clamp_(-1, 1) if clip else x
            n = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype) if noise is None else \
                noise[k].to(device=z.device, dtype=z.dtype)
            x = model(x + math.sqrt(sigma ** 2 - model.sigma_min ** 2) * n, model_level(sigma, z), class_labels)
    return x.clamp_(-1, 1) if clip else x


def _check_flag(v, name: str) -> bool:
    if not isinstance(v, bool):     # a string 'False' would read as on
        raise TypeError(f"{name}: expected True or False, got {v!r}")
    return v


def check_clip_denoised(clip_denoised, edm: bool) -> bool:
    """clip_denoised of generate_batches / metrics.evaluate: a bool, and Algorithm 1's option only (an EDM teacher
    samples with its Heun solver)."""
    if _check_flag(clip_denoised, "clip_denoised") and edm:
        raise ValueError("clip_denoised: consistency sampling's option (Algorithm 1); an EDM teacher samples with "
                         "its Heun solver")
    return clip_denoised


def check_noise_list(noise, count: int, shape, per: str) -> None:
    """`noise`: `count` floating-point tensors shaped `shape` (a list, or one tensor stacked along its first dim),
    finite where they are on the CPU: a float or None in the list failed as "'float' object has no attribute
    'shape'", uint8 noise ran as its values, NaN noise gave NaN images."""
    if isinstance(noise, (str, bytes)) or not hasattr(noise, "__len__") or \
            not all(isinstance(n, torch.Tensor) for n in noise):
        got = type(noise).__name__ if not hasattr(noise, "__len__") else [type(n).__name__ for n in noise]
        raise TypeError(f"noise: expected a list of {count} tensor(s) shaped {tuple(shape)}, {per}, got {got}")
    if len(noise) != count or any(tuple(n.shape) != tuple(shape) for n in noise):
        raise ValueError(f"noise: expected {count} tensor(s) shaped {tuple(shape)}, {per}, got "
                         f"{[tuple(n.shape) for n in noise]}")
    for k, n in enumerate(noise):
        check_noise(n, f"noise[{k}]")


def image_noise(seed: int, start: int, num: int, shape, draw: int = 0) -> torch.Tensor:
    """(num, *shape) N(0, I) noise for images start .. start + num - 1 of a seeded set, each image's from a CPU
    generator of its own (seed, index, draw): an image gets the same noise whatever batch it falls in. draw 0 is z,
    draw k the noise added before the k-th later level of Algorithm 1."""
    out = torch.empty((num, *shape))
    for i in range(num):
        g = torch.Generator().manual_seed((seed * 1_000_003 + start + i) * 64 + draw)
        out[i] = torch.randn(shape, generator=g)
    return out


def check_edm_steps(num_steps, what: str = "num_steps") -> int:
    """EDM's sampler's step count as an int: an integer of any kind (numpy's too; 2.0 failed in karras_sigmas as
    its argument n), 2 or more (karras_sigmas' own error named n: cmfast-sample --steps 1 on a teacher)."""
    n = as_integer(num_steps)
    if n is None:
        raise TypeError(f"{what}: expected an integer, got {num_steps!r}")
    if n < 2:
        raise ValueError(f"steps: EDM's sampler takes 2 or more steps (sigma_max to sigma_min, then 0), got {n}")
    return n


@torch.no_grad()
def edm_sample(denoiser: nn.Module, z: torch.Tensor, num_steps: int = 18, solver: str = "heun", rho: float = 7.0,
               class_labels=None) -> torch.Tensor:
    """EDM's deterministic sampler (EDM Alg. 1, S_churn = 0) from sigma_max to 0: Heun takes 2 num_steps - 1
    network evaluations (35 for 18 steps)."""
    from .precond import ConsistencyModel
    from .trigflow import TrigFlowModel
    hint = "sample it with cmfast.sample (Algorithm 1)"
    check_model(denoiser, "denoiser", "an EDM denoiser (cmfast.EDMDenoiser(net))",
                ((ConsistencyModel, hint), (TrigFlowModel, hint)))
    check_noise(z)
    check_device(denoiser, z)
    num_steps = check_edm_steps(num_steps)
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver: expected 'heun' or 'euler', got {solver!r}")
    t = karras_sigmas(num_steps, denoiser.sigma_min, denoiser.sigma_max, rho).tolist()[::-1] + [0.0]
    x = z.double() * t[0]
    with eval_mode(denoiser), skip_value_checks():   # the levels: the denoiser's range (no per-call host sync)
        for t_cur, t_next in zip(t[:-1], t[1:]):
            d = (x - denoiser(x.float(), model_level(t_cur, x), class_labels).double()) / t_cur
            x_next = x + (t_next - t_cur) * d
            if solver == "heun" and t_next > 0:
                d2 = (x_next - denoiser(x_next.float(), model_level(t_next, x), class_labels).double()) / t_next
                x_next = x + (t_next - t_cur) * (d + d2) / 2
            x = x_next
    return x.to(z.dtype)


ENGINES = ("auto", "graphed", "eager")


def check_engine_args(engine: str, dtype: torch.dtype) -> None:
    """engine one of ENGINES and dtype one of the sampling dtypes (the checks of resolve_engine that need no model)."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")


def resolve_engine(engine: str, model: nn.Module, dtype: torch.dtype = torch.float32) -> str:
    """'graphed' (the CUDA-graph sampler, cmfast.GraphedSampler) or 'eager' (sample / edm_sample). 'auto' is graphed
    for a consistency model (a ConsistencyModel or a TrigFlow model: sCT / sCD) on a CUDA device, eager otherwise
    (CPU, and the EDM teacher's Heun sampler)."""
    from .precond import EDMDenoiser
    check_engine_args(engine, dtype)
    p = next(model.parameters(), None)
    on_cuda = p is not None and p.device.type == "cuda"
    from .graphed import is_graphable
    edm = isinstance(model, EDMDenoiser)
    graphable = is_graphable(model)
    if engine == "auto":
        engine = "graphed" if on_cuda and not edm and graphable else "eager"
    if engine == "graphed" and edm:
        raise ValueError("engine 'graphed': the EDM teacher samples with its Heun solver; use engine 'eager'")
    if engine == "graphed" and not graphable:
        raise ValueError(f"engine 'graphed': a {type(model).__name__} is not a consistency model the graphed sampler "
                         "computes (ConsistencyModel, TrigFlow); use engine 'eager'")
    if engine == "graphed" and not on_cuda:
        raise ValueError(f"engine 'graphed' needs the model on a CUDA device (CUDA graphs), got "
                         f"{p.device if p is not None else 'no parameters'}; use engine 'eager'")
    if engine == "eager" and dtype != torch.float32:
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')}: the eager engine samples in float32; reduced "
                         "precision is the graphed engine's (CUDA)")
    return engine


@torch.no_grad()
def generate_batches(model: nn.Module, num: int, *, sigmas=None, steps: int | None = None, seed: int = 0,
                     batch_size: int = 256, class_label: int | None = None, engine: str = "auto",
                     dtype: torch.dtype = torch.float32, shape: tuple | None = None, clip_denoised: bool = False):
    """Yield (start, images) for `num` images in batches: float32 (n, C, H, W) in about [-1, 1]; what cmfast-sample
    writes and cmfast-eval scores. A consistency model samples at `sigmas` (Algorithm 1), an EDMDenoiser with EDM's
    Heun solver in `steps` steps. Class labels cycle through the classes, or are all `class_label`.

    engine 'eager': image i's noise comes from CPU generators of its own (image_noise: seed, i and the draw), so
    the images do not depend on batch_size. engine 'graphed': cmfast.GraphedSampler in `dtype` (its noise drawn inside
    the graph on the GPU, seeded per batch the same way, so the images depend on batch_size; a short last batch
    runs as a full one, cut); its output is clamped to [-1, 1]. 'auto': graphed for a consistency model on CUDA.
    shape: one image's (C, H, W), by default the network's. clip_denoised: as cmfast.sample's (consistency models)."""
    from .precond import EDMDenoiser
    engine = resolve_engine(engine, model, dtype)
    edm = isinstance(model, EDMDenoiser)
    if edm and sigmas:
        raise ValueError("sigmas: an EDM teacher samples with its Heun schedule; give steps instead")
    if not edm and not sigmas:
        raise ValueError("sigmas: a consistency model needs its noise levels (e.g. (80.0,) for one step)")
    check_clip_denoised(clip_denoised, edm)
    n, b = as_integer(num), as_integer(batch_size)
    if n is None or b is None or n < 1 or b < 1:
        # a float (num=5e4) was "TypeError: 'float' object cannot be interpreted as an integer", from range()
        raise ValueError(f"num and batch_size: expected positive ints, got {num!r} and {batch_size!r}")
    num, batch_size = n, b
    net = getattr(model, "net", None)
    shape = shape or (net.in_channels, net.img_resolution, net.img_resolution)
    label_dim = int(getattr(getattr(net, "_orig_mod", net), "label_dim", 0) or 0)
    if class_label is not None and not label_dim:
        raise ValueError("class label: this model is unconditional")
    if class_label is not None and not 0 <= class_label < label_dim:
        raise ValueError(f"class label: expected 0 <= label < {label_dim}, got {class_label}")
    device = next(model.parameters()).device

    def labels(b0: int, n: int):
        if not label_dim:
            return None
        ids = torch.full((n,), class_label) if class_label is not None else torch.arange(b0, b0 + n) % label_dim
        return ids.to(device)

    if engine == "graphed":
        from .graphed import GraphedSampler
        B = min(batch_size, num)
        sampler = GraphedSampler(model, B, shape, dtype=dtype, sigmas=sigmas, seed=seed, clip_denoised=clip_denoised)
        for b0 in range(0, num, B):
            n = min(B, num - b0)
            yield b0, sampler(seed=seed * 1_000_003 + b0, class_labels=labels(b0, B))[:n]
        return
    for b0 in range(0, num, batch_size):
        n = min(batch_size, num - b0)
        z = image_noise(seed, b0, n, shape).to(device)
        if edm:
            x = edm_sample(model, z, 18 if steps is None else steps, class_labels=labels(b0, n))   # 0: an error
        else:
            later = [image_noise(seed, b0, n, shape, draw=k) for k in range(1, len(sigmas))]
            x = sample(model, z, sigmas, class_labels=labels(b0, n), noise=later, clip_denoised=clip_denoised)
        yield b0, x
