"""Fused ops: one public function per op, one dispatch point.

Each op validates its arguments here, then runs the implementation of the active backend:
  torch  - plain PyTorch, the reference (cmfast/ops/_torch.py), any device
  triton - Triton kernels (kernels/, wrapped in cmfast/ops/_triton.py), CUDA, or CPU under TRITON_INTERPRET=1
  cuda   - CUDA C++ kernels (csrc/, wrapped in cmfast/ops/_cuda.py), CUDA tensors only
  auto   - torch on CPU; on CUDA the fastest measured backend per op (cmfast/ops/auto_table.json)
`use_backend(name)` (a context manager) or the environment variable CMFAST_BACKEND choose. A backend asked for
by name that cannot run raises one line saying why; it never falls back silently.

Under torch.compile, 'auto' is the torch composition (traced and fused, no graph break). The ops are plain functions,
not torch.library custom ops: a kernel backend named explicitly runs eagerly between two graphs (torch.compiler.disable,
a graph break; fullgraph=True refuses it). Under torch.func's vmap and grad transforms (grad, vjp, jacrev, vmap of
them: per-sample gradients) the kernels run, named or picked by 'auto': their autograd.Functions have the torch.func
style and vmap rules that fold a vmapped dimension into the op's batch (cmfast/ops/_batching.py). Forward mode (jvp,
jacfwd, hessian) has no rule in them: 'auto' is the torch composition there, and a kernel backend named explicitly
is refused in one line.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from .. import precond

BACKENDS = ("auto", "torch", "triton", "cuda")
OPS = ("skip_output", "skip_output_infer", "group_norm_act", "attention", "residual", "consistency_loss",
       "trig_tangent_loss")
_MODULES = {"torch": "cmfast.ops._torch", "triton": "cmfast.ops._triton", "cuda": "cmfast.ops._cuda"}

_state = threading.local()


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here (the message says why)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost use_backend(), else $CMFAST_BACKEND, else 'auto'."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("CMFAST_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block with backend `name` ('auto', 'torch', 'triton', 'cuda')."""
    _check_name(name)
    if not hasattr(_state, "stack"):
        _state.stack = []
    _state.stack.append(name)
    try:
        yield name
    finally:
        _state.stack.pop()


_loaded: dict[str, object] = {}


_failed: dict[str, str] = {}


def _module(backend: str):
    if backend in _failed:  # a failed import is not retried on every call
        raise BackendUnavailable(_failed[backend])
    if backend not in _loaded:
        try:
            _loaded[backend] = importlib.import_module(_MODULES[backend])
        except Exception as e:  # ImportError, missing toolchain, failed build, ...
            msg = str(e) if isinstance(e, BackendUnavailable) else \
                f"backend {backend!r} is unavailable: {type(e).__name__}: {e}"
            _failed[backend] = msg
            raise BackendUnavailable(msg) from None
    return _loaded[backend]


def _triton_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def interpreter_problem() -> str | None:
    """Why the Triton interpreter (CPU tests) cannot run here, or None: triton < 3.7's interpreter converts 1-element
    arrays with int(), which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed in #9172)."""
    try:
        import numpy as np
        import triton
    except ImportError:
        return None
    if _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter fails with numpy {np.__version__} "
                f"(triton-lang/triton#9171): install 'numpy<2.4' or triton >= 3.7 to run the kernels on CPU")
    return None


_auto_table: dict | None = None
_auto_resolved: dict[tuple, str] = {}   # (op, device, case) -> backend: resolved once, not on every op call


def _auto_choice(op: str, device: torch.device, dtype: torch.dtype | None, case: str | None = None) -> str:
    """'auto': the measured winner for this op on this device class (benchmarks/make_auto_table.py writes
    auto_table.json), per shape class `case` ('fwd' / 'fwd+bwd', with '/nchw' or '/nhwc') where the table has one;
    torch for float64, which the kernels do not take."""
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"
    key = (op, device, case)
    choice = _auto_resolved.get(key)
    if choice is None:
        choice = _auto_resolved[key] = _auto_resolve(op, device, case)
    return choice


def _auto_resolve(op: str, device: torch.device, case: str | None) -> str:
    global _auto_table
    if _auto_table is None:
        path = Path(__file__).with_name("auto_table.json")
        _auto_table = json.loads(path.read_text()) if path.exists() else {}
    choice = _auto_table.get(op, "torch")
    ratios = _auto_table.get("_meta", {}).get("ratios", {}).get(op, {})
    if isinstance(choice, dict):   # {"default": backend, "fwd/nhwc": backend, "fwd/nhwc/small": backend, ...}
        parts = case.split("/") if case else []
        keys = [k for k in ("/".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in choice]
        choice = choice[keys[0]] if keys else choice.get("default", "torch")
        ratios = ratios.get("classes", {}).get(keys[0], ratios) if keys else ratios
    # The winner, else the next-fastest measured backend that loads here (a machine without the CUDA toolchain has
    # no 'cuda' backend), else torch.
    ranked = sorted((b for b in ratios if b in ("triton", "cuda", "torch")), key=lambda b: ratios[b])
    for backend in dict.fromkeys([choice, *ranked, "torch"]):
        if backend == "torch":
            return "torch"
        try:
            mod = _module(backend)
            if backend == "cuda" and hasattr(mod, op):
                mod._ext(device)   # built (once) or loaded now: a failed build falls back here, not mid-model
        except BackendUnavailable as e:
            _failed.setdefault(backend, str(e))
            continue
        if hasattr(mod, op):
            return backend
    return "torch"


def is_nhwc(x: torch.Tensor) -> bool:
    """Channels-last storage (N, *spatial, C) that is not also plain NCHW-contiguous (the layout every backend
    keeps for its output, and the auto table's 'nhwc' class)."""
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def check_pre_bias_forward_only(*tensors) -> None:
    """The Triton and CUDA kernels add group_norm_act's pre_bias in their forward only (cmfast.ops.group_norm_act
    adds it first where a gradient is needed): a direct call that would need one is refused, not left without it."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError("pre_bias: the fused add is forward only; cmfast.ops.group_norm_act adds it first where a "
                         "gradient is needed")


SMALL_BATCH = 8   # the auto table's size classes: batch <= this is 'small' (the sampler's latency path), else 'large'


def shape_class(needs_grad: bool, x: torch.Tensor | None = None, batch: int | None = None) -> str | None:
    """The auto table's shape class of a call: 'fwd' or 'fwd+bwd', then '/nhwc' or '/nchw' when x (an (N, C, ...)
    tensor) is given, then '/small' or '/large' by the batch (x's, unless given). The table is looked up from the
    most specific class to the least ('fwd/nhwc/small', 'fwd/nhwc', 'fwd', then the op's default). None while
    compiling: auto is the torch composition there, and a test of the batch would be a guard (a recompilation when a
    dynamic batch crosses SMALL_BATCH)."""
    if _compiling():
        return None
    case = "fwd+bwd" if needs_grad else "fwd"
    if x is not None:
        case += "/nhwc" if is_nhwc(x) else "/nchw"
        batch = x.shape[0] if batch is None else batch
    if batch is not None:
        case += "/small" if batch <= SMALL_BATCH else "/large"
    return case


def implementation(op: str, device: torch.device, dtype: torch.dtype | None = None, case: str | None = None) -> Callable:
    """The function that runs `op` for tensors on `device` (of `dtype`) under the backend in force; `case` (see
    shape_class) refines backend 'auto'."""
    backend = get_backend()
    compiling = _compiling()
    unruled = None if compiling or not precond.under_torch_func() else unsupported_transform()
    if backend == "auto":
        # Under torch.compile, auto is the torch composition: inductor fuses it itself, while a kernel of ours would
        # be an opaque call between two graphs. Under a forward-mode transform (jvp, jacfwd) too: the kernels'
        # autograd.Functions have vmap and backward rules (vmap, grad, vjp, jacrev), no jvp rule.
        backend = "torch" if compiling or unruled else _auto_choice(op, device, dtype, case)
    if unruled and backend != "torch":
        what = "jvp transform (forward mode: jvp, jacfwd, hessian)" if unruled == "jvp" else f"{unruled} transform"
        raise BackendUnavailable(
            f"backend {backend!r} cannot run under torch.func's {what}: its kernels have rules for vmap, grad, vjp "
            f"and jacrev only; use backend 'auto' or 'torch' there")
    if backend == "triton" and not _triton_can_run(device):
        raise BackendUnavailable(
            f"backend 'triton' cannot run on {device.type}: needs a CUDA tensor (or TRITON_INTERPRET=1 for tests)")
    if backend == "triton" and device.type != "cuda":
        problem = interpreter_problem()
        if problem:
            raise BackendUnavailable(f"backend 'triton' cannot run on {device.type}: {problem}")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailable(f"backend 'cuda' cannot run on {device.type}: needs a CUDA tensor")
    mod = _module(backend)
    fn = getattr(mod, op, None)
    if fn is None:  # an op may live in its own module: cmfast.ops._<backend>_<op>
        try:
            fn = getattr(importlib.import_module(f"{_MODULES[backend]}_{op}"), op, None)
        except ModuleNotFoundError:
            fn = None
    if fn is None:
        raise BackendUnavailable(f"backend {backend!r} has no kernel for op {op!r}")
    if compiling and backend != "torch":
        # Asked for by name under torch.compile: the kernel runs eagerly between two graphs (a graph break), since
        # dynamo can trace neither the pybind11 calls nor the stream handles they take.
        fn = _eager_only(fn)
    return fn


_RULED = (torch._C._functorch.TransformType.Vmap, torch._C._functorch.TransformType.Grad)


def unsupported_transform() -> str | None:
    """The name of an active torch.func transform the kernels' autograd.Functions have no rule for ('jvp': forward
    mode, as in jvp, jacfwd and hessian; 'functionalize'), or None: no transform, or only vmap and grad levels
    (grad, vjp, jacrev, vmap of them; cmfast/ops/_batching.py)."""
    for interpreter in torch._C._functorch.get_interpreter_stack() or ():
        if interpreter.key() not in _RULED:
            return interpreter.key().name.lower()
    return None


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


_EAGER: dict[Callable, Callable] = {}


def _eager_only(fn: Callable) -> Callable:
    """fn wrapped by torch.compiler.disable, made once per fn. Only called while compiling (dynamo is loaded then;
    `import cmfast` does not load it)."""
    wrapped = _EAGER.get(fn)
    if wrapped is None:
        wrapped = _EAGER[fn] = torch.compiler.disable(fn)
    return wrapped


_module("torch")  # loaded now, so torch.compile never traces an import inside an op

from ._api import attention, consistency_loss, group_norm_act, residual, skip_output, skip_output_infer  # noqa: E402
from ._api import trig_tangent_loss  # noqa: E402

__all__ = ["BACKENDS", "BackendUnavailable", "attention", "consistency_loss", "get_backend", "group_norm_act",
           "implementation", "skip_output", "skip_output_infer", "trig_tangent_loss", "use_backend"]
