"""Jacobian-vector products for continuous-time consistency training (sCM, Lu & Song 2024, Sec. 4).

sCT/sCD need dF/dt = J_F(x_t, t) . (dx_t/dt, 1), the JVP of the network along the trajectory. Two ways:

  method="fd"    central finite difference (F(p + h v) - F(p - h v)) / (2 h): both evaluations run as ONE
                 no-grad forward of twice the batch, so it costs one forward, keeps no activations, and works
                 with every forward kernel (the fused Triton attention, any cmfast.ops backend, CUDA graphs).
                 order=4: the 4-point stencil (-F(p+2hv) + 8 F(p+hv) - 8 F(p-hv) + F(p-2hv)) / (12 h), all four
                 in ONE no-grad forward of 4x the batch (truncation O(h^4) instead of O(h^2)).
  method="exact" torch.func.jvp (forward-mode AD): exact, but every op needs a forward-AD formula, so it runs
                 the torch backend of cmfast.ops and the math SDPA kernel (the fused attention kernels have no
                 JVP), and holds the tangent of every activation.

Error of the finite difference: truncation O(h^2 |F'''|) plus rounding O(u |F| / h) with u the unit roundoff of
the forward's precision, amplified by the network's conditioning. Hence fp64 (u = 1e-16) is exact for any small
h, fp32 with TF32 off (u = 6e-8) reaches ~1e-3 relative error at h ~ 1e-2 |t|; TF32 (u ~ 5e-4 inside
matmuls/convs) and bf16 (u = 4e-3) need a much larger h, and then the truncation term dominates. order=4 pays a
forward of 4B instead of 2B for truncation O(h^4 |F^(5)|) (rounding at most 1.5x the 2-point's at the same h:
coefficients 8/12 and 1/12), so a larger h, hence a cheaper precision, may reach a given error.
benchmarks/fd_jvp_accuracy.py measures this table; DEFAULT_PRECISION comes from it.

Dropout: the two halves of the doubled batch (four quarters for order=4) must see the same dropout masks,
otherwise the difference is dropout noise divided by h. `dropout_masks` (a torch function mode) intercepts
torch.nn.functional.dropout* inside the forward and applies ONE mask drawn for B samples, tiled over all blocks,
so the blocks share it by construction (mask tensors are identical, not merely equally seeded). The same mode
can record the masks of the online forward and replay them in the finite-difference forward, so F and dF/dt see
one network.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F_
from torch.overrides import TorchFunctionMode

from . import precond

PRECISIONS = ("fp64", "fp32", "tf32", "bf16", "fp16")
METHODS = ("fd", "exact")
ORDERS = (2, 4)        # points of the central difference: 2 (error O(h^2)) or 4 (O(h^4))
# PROVISIONAL, measured on CPU only (benchmarks/results/fd_jvp_accuracy-cpu.json: tiny UNet, all branches active,
# batch 4, 16x16, vs an fp64 torch.func.jvp): fp32 with TF32 off is rounding-limited below eps ~ 1e-2 (rel. error
# 5.6e-3 at 1e-3, 2.0e-3 at 3e-3) and truncation-limited above (7.5e-3 at 3e-2); its best, 1.05e-3 at eps = 1e-2,
# beats torch.func.jvp in bf16 (3.1e-2). bf16 forwards are noise at every eps (>= 0.7). The GPU run of
# benchmarks/fd_jvp_accuracy.py (DDPM++ CIFAR-10: fp32 / tf32 / fp16 / bf16) decides the default.
DEFAULT_PRECISION = "fp32"
DEFAULT_EPS = 1e-2     # step relative to |t|: h = eps * max(|t|, floor)
DEFAULT_FLOOR = 1e-3   # h never goes below eps * floor (t -> 0)
DEFAULT_ORDER = 2


# ---- Shared dropout masks ---------------------------------------------------------------------------------------
_DROPOUTS = (F_.dropout, F_.dropout1d, F_.dropout2d, F_.dropout3d, torch.dropout)
_ALPHA = (F_.alpha_dropout, F_.feature_alpha_dropout)


def _dropout_args(input, p=0.5, training=True, inplace=False, train=None):
    return input, float(p), bool(training if train is None else train), bool(inplace)


class dropout_masks(TorchFunctionMode):
    """Inside this mode every dropout call multiplies by a mask drawn for batch B = x.shape[0] // repeat and tiled
    `repeat` times along the batch, so the `repeat` blocks of the batch see identical masks. `record` (a list)
    collects the masks drawn in call order; `replay` (such a list) applies recorded masks instead of drawing.
    Alpha dropout (not a plain mask) raises. Masks are kept in fp32 and cast to the activation's dtype on use."""

    def __init__(self, repeat: int = 1, record: list | None = None, replay: list | None = None):
        super().__init__()
        self.repeat, self.record, self.replay, self.calls = int(repeat), record, replay, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            x, p, training, inplace = _dropout_args(*args, **kwargs)
            if training and p > 0:
                return self._apply(func, x, p, inplace)
        elif func in _ALPHA and _dropout_args(*args, **kwargs)[2]:
            raise NotImplementedError(f"dropout_masks: {func.__name__} is not a plain mask; it cannot be shared")
        return func(*args, **kwargs)

    def _apply(self, func, x: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
        if x.shape[0] % self.repeat:
            raise ValueError(f"dropout_masks: batch {x.shape[0]} is not a multiple of repeat={self.repeat}")
        shape = (x.shape[0] // self.repeat, *x.shape[1:])
        if self.replay is not None:
            if self.calls >= len(self.replay) or tuple(self.replay[self.calls].shape) != shape:
                got = tuple(self.replay[self.calls].shape) if self.calls < len(self.replay) else "none"
                raise ValueError(f"dropout_masks: replayed mask {self.calls} has shape {got}, the call needs {shape}")
            mask = self.replay[self.calls]
        else:
            fn = F_.dropout if func is torch.dropout else func
            mask = fn(torch.ones(shape, device=x.device, dtype=torch.float32), p, True)
            if self.record is not None:
                self.record.append(mask)
        self.calls += 1
        m = mask.to(x.dtype)
        if self.repeat > 1:
            m = m.repeat(self.repeat, *([1] * (x.dim() - 1)))
        return x.mul_(m) if inplace else x * m


# ---- Precision of the forwards ----------------------------------------------------------------------------------
@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """fp64 / fp32 (TF32 off) / tf32: autocast off, TF32 of matmul and cuDNN set; bf16 / fp16: autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device).type
    with contextlib.ExitStack() as stack:
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            # cache_enabled=False: inside a training step's autocast of another dtype (bf16 step, fp16 tangent),
            # autocast's weight cache (keyed by the weight, not the dtype) would hand back the outer dtype's copies.
            stack.enter_context(torch.autocast(dev, dtype=dtype, cache_enabled=False))
        else:
            stack.enter_context(torch.autocast(dev, enabled=False))
            stack.enter_context(_tf32(precision == "tf32"))
        yield


@contextlib.contextmanager
def _tf32(on: bool):
    # torch >= 2.9 keeps a legacy (allow_tf32) and a new (fp32_precision) TF32 state and makes CUDA matmuls raise
    # when they disagree; the legacy setters update both, so they are used unless the process already mixed them.
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        old = (mm.allow_tf32, cudnn.allow_tf32)
    except RuntimeError:
        old = None
    if old is None:
        prev = (mm.fp32_precision, cudnn.conv.fp32_precision)
        mm.fp32_precision = cudnn.conv.fp32_precision = "tf32" if on else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision, cudnn.conv.fp32_precision = prev
        return
    mm.allow_tf32 = cudnn.allow_tf32 = on
    try:
        yield
    finally:
        mm.allow_tf32, cudnn.allow_tf32 = old


def fp64_call(module: torch.nn.Module, dtype: torch.dtype = torch.float64) -> Callable:
    """A callable running `module` with `dtype` (float64) copies of its parameters and buffers
    (torch.func.functional_call): the fn for precision='fp64' without converting the module itself; with float32, the
    fp32 forwards of a module whose weights are fp16 / bf16 (a model made .half())."""
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v)
             for k, v in [*module.named_parameters(), *module.named_buffers()]}
    return lambda *args, **kw: torch.func.functional_call(module, state, args, kw)


# ---- Finite-difference JVP --------------------------------------------------------------------------------------
def _per_sample(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, *([1] * (like.dim() - 1)))


def _check(primals, tangents) -> tuple[tuple, tuple, int]:
    primals = tuple(primals) if isinstance(primals, (tuple, list)) else (primals,)
    tangents = tuple(tangents) if isinstance(tangents, (tuple, list)) else (tangents,)
    if len(primals) != len(tangents) or not primals:
        raise ValueError(f"fd_jvp: expected as many tangents as primals (>= 1), got {len(primals)} and {len(tangents)}")
    B = None
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if not isinstance(p, torch.Tensor) or not isinstance(t, torch.Tensor) or p.dim() == 0:
            raise TypeError(f"fd_jvp: primal/tangent {i}: expected batch tensors (B, ...), got "
                            f"{type(p).__name__} {getattr(p, 'shape', '')} and {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(f"fd_jvp: tangent {i}: expected the primal's shape {tuple(p.shape)}, got {tuple(t.shape)}")
        if t.device != p.device:    # failed in p + h t with torch's 'Expected all tensors to be on the same device'
            raise ValueError(f"fd_jvp: tangent {i}: expected a tensor on the primal's device {p.device}, got one on "
                             f"{t.device}")
        B = p.shape[0] if B is None else B
        if p.shape[0] != B:
            raise ValueError(f"fd_jvp: primal {i}: expected batch {B} like primal 0, got {p.shape[0]}")
    if B == 0:      # failed after the forward as 'not enough values to unpack (expected 4, got 1)'
        raise ValueError(f"fd_jvp: expected a non-empty batch, got primal 0 of shape {tuple(primals[0].shape)}")
    return primals, tangents, B


def _check_fn(fn) -> None:
    if not callable(fn):    # failed inside the forward (or torch.func.jvp) as "'str' object is not callable"
        raise TypeError(f"fd_jvp: fn: expected a callable, got {type(fn).__name__}")


def fd_step(eps, relative_to: torch.Tensor | None, B: int, device, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """Per-sample step h (B,) fp64: eps * max(|relative_to|, floor) when relative_to (e.g. the time t) is given,
    else eps itself (a number or a (B,) tensor)."""
    try:    # a string failed as "new(): invalid data type 'str'", None as "must be real number, not NoneType"
        number = isinstance(eps, (int, float)) and not isinstance(eps, bool)
        # a number eps multiplies the tensor as it is: no host-to-device copy of it (a CUDA-graph capture refuses one)
        e = float(eps) if number and relative_to is not None else torch.as_tensor(eps, dtype=torch.float64,
                                                                                   device=device)
        h = e if relative_to is None else relative_to.detach().to(torch.float64).abs().clamp_min(floor) * e
    except (TypeError, ValueError):
        raise TypeError(f"fd_jvp: eps, floor: expected numbers (or a (B,) tensor of steps), got eps={eps!r}, "
                        f"floor={floor!r}") from None
    h = h.expand(B) if h.dim() == 0 else h
    # (inf: a NaN JVP)
    if h.shape != (B,) or (not precond.value_checks_off(h) and not bool(((h > 0) & (h < math.inf)).all())):
        got = f"shape {tuple(h.shape)}" if h.shape != (B,) else f"steps {h.tolist()[:4]}"
        raise ValueError(f"fd_jvp: expected a positive step (number or ({B},)), got {got}")
    return h


def check_order(order, name: str = "order") -> int:
    """The stencil's order as an int: 2 or 4, else a one-line ValueError naming `name`."""
    if isinstance(order, bool) or order not in ORDERS:
        raise ValueError(f"{name}: expected 2 or 4 (points of the central difference), got {order!r}")
    return int(order)


def fd_points(fn: Callable, primals, tangents, h: torch.Tensor, precision: str = DEFAULT_PRECISION,
              replay: list | None = None, order: int = DEFAULT_ORDER) -> tuple[torch.Tensor, ...]:
    """The stencil's evaluations from ONE no-grad forward of batch order * B with shared dropout masks (drawn once
    for B and tiled over the `order` blocks, or the recorded `replay` masks): order 2 -> (fn(p + h v),
    fn(p - h v)); order 4 -> (fn(p + 2h v), fn(p + h v), fn(p - h v), fn(p - 2h v)). Outputs in fp32 (fp64 for
    precision='fp64'). h: per-sample (B,) steps."""
    order = check_order(order)
    primals, tangents, B = _check(primals, tangents)
    dt = torch.float64 if precision == "fp64" else torch.float32
    ins = []
    for p, v in zip(primals, tangents):
        p, v = p.detach().to(dt), v.detach().to(dt)
        step = _per_sample(h.to(device=p.device, dtype=dt), p) * v
        ins.append(torch.cat([p + step, p - step] if order == 2 else [p + 2 * step, p + step, p - step, p - 2 * step]))
    with torch.no_grad(), precision_mode(precision, primals[0].device), dropout_masks(order, replay=replay):
        out = fn(*ins)
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != order * B:
        # a tuple failed as "'tuple' object has no attribute 'to'", a reduced batch as 'not enough values to unpack'
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"fd_jvp: fn: expected one tensor with the batch of its input ({order * B}, ...): each "
                         f"sample on its own, got {got}")
    return tuple(out.to(dt).split(B))


def fd_pair(fn: Callable, primals, tangents, h: torch.Tensor, precision: str = DEFAULT_PRECISION,
            replay: list | None = None, order: int = DEFAULT_ORDER) -> tuple[torch.Tensor, torch.Tensor]:
    """(F+, F-) such that (F+ - F-) / (2 h) is the central-difference derivative, from fd_points (ONE no-grad
    forward). order 2: (fn(p + h v), fn(p - h v)). order 4: the 4-point stencil folded into a pair,
    F+- = (8 fn(p +- h v) - fn(p +- 2h v)) / 6, so a consumer of a 2-point pair (cmfast.ops.trig_tangent_loss's
    F_plus, F_minus, h) takes the O(h^4) derivative unchanged. (The folded pair's mean is 7/6 fn(p), not fn(p).)"""
    pts = fd_points(fn, primals, tangents, h, precision, replay, order)
    if len(pts) == 2:
        return pts
    f2, f1, m1, m2 = pts
    return (8 * f1 - f2) / 6, (8 * m1 - m2) / 6


def fd_estimates(points: Sequence[torch.Tensor], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(p), J v) from fd_points' evaluations and the steps h (B,). Two points: their mean (fn(p) + O(h^2)) and
    (f(h) - f(-h)) / (2 h). Four: (-f(2h) + 4 f(h) + 4 f(-h) - f(-2h)) / 6 (fn(p) + O(h^4)) and
    (-f(2h) + 8 f(h) - 8 f(-h) + f(-2h)) / (12 h)."""
    hh = _per_sample(h.to(device=points[0].device, dtype=points[0].dtype), points[0])
    if len(points) == 2:
        plus, minus = points
        return (plus + minus) * 0.5, (plus - minus) / (2 * hh)
    f2, f1, m1, m2 = points
    return (4 * (f1 + m1) - (f2 + m2)) / 6, (8 * (f1 - m1) - (f2 - m2)) / (12 * hh)


class _contiguous_group_norm(TorchFunctionMode):
    """Feeds F.group_norm a contiguous (NCHW) input: the forward-AD formula of torch <= 2.11's group_norm views a
    channels_last input and fails ("view size is not compatible ..."); 2.14 handles it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F_.group_norm and args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            args = (args[0].contiguous(),) + tuple(args[1:])
        return func(*args, **kwargs)


def exact_jvp(fn: Callable, primals, tangents, precision: str = "fp32", replay: list | None = None):
    """torch.func.jvp under the torch backend of cmfast.ops and the math SDPA kernel (the only ones with forward-AD
    formulas); dropout masks drawn like fd_jvp's (or replayed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from . import ops
    primals, tangents, _ = _check(primals, tangents)
    dt = torch.float64 if precision == "fp64" else torch.float32
    primals = tuple(p.detach().to(dt) for p in primals)
    tangents = tuple(v.detach().to(dt) for v in tangents)
    with torch.no_grad(), ops.use_backend("torch"), sdpa_kernel(SDPBackend.MATH), \
            precision_mode(precision, primals[0].device), dropout_masks(1, replay=replay), _contiguous_group_norm():
        out, jvp = torch.func.jvp(fn, primals, tangents)
    return out.to(dt), jvp.to(dt)


def fd_jvp(fn: Callable, primals: Sequence[torch.Tensor] | torch.Tensor, tangents, eps=DEFAULT_EPS, *,
           relative_to: torch.Tensor | None = None, floor: float = DEFAULT_FLOOR, method: str = "fd",
           precision: str = DEFAULT_PRECISION, replay: list | None = None,
           order: int = DEFAULT_ORDER) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(primals), J_fn(primals) . tangents). Every primal is a batch tensor (B, ...) and fn must treat the
    samples of a batch independently (no BatchNorm).

    method="fd": central difference with per-sample step h = eps * max(|relative_to|, floor) (or h = eps), all
    evaluations in one forward under no_grad, the differences taken in fp32 (fp64 for precision='fp64').
    order=2: (fn(p + h v) - fn(p - h v)) / (2 h), a forward of batch 2B; the first output is the MEAN of the two
    evaluations, fn(p) + O(h^2) (no extra forward). order=4: (-f(2h) + 8 f(h) - 8 f(-h) + f(-2h)) / (12 h) with
    f(s) = fn(p + s v), a forward of batch 4B, error O(h^4); the first output is (-f(2h) + 4 f(h) + 4 f(-h) -
    f(-2h)) / 6 = fn(p) + O(h^4). precision: 'fp64' (fn must compute in fp64, e.g. fp64_call(net)), 'fp32' (TF32
    off), 'tf32', 'bf16', 'fp16' (autocast). method="exact": torch.func.jvp (see exact_jvp); eps, order unused."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    _check_fn(fn)
    order = check_order(order)
    if method == "exact":
        return exact_jvp(fn, primals, tangents, precision, replay)
    primals, tangents, B = _check(primals, tangents)
    h = fd_step(eps, relative_to, B, primals[0].device, floor)
    return fd_estimates(fd_points(fn, primals, tangents, h, precision, replay, order), h)
