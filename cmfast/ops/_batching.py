"""vmap rules for the kernel backends' autograd.Functions (torch.func; PyTorch notes "Extending torch.func with
autograd.Function").

The fused ops work per sample along dim 0 (GroupNorm, skip output, residual join, attention, the per-sample losses),
so a vmapped dimension folds into that batch: a vmap over V calls of an op on N samples is one call on V * N, and
the outputs unfold to (V, N, ...). Parameters shared by all samples (GroupNorm's weight and bias, the residual bias)
pass through unchanged; where a call vmaps a parameter itself, each vmapped slice is a different op, so the rule
loops over the vmapped dimension instead (one kernel call per slice: correct, V launches; a parameter vmapped per
call is rare, per-sample gradients vmap the data and keep the parameters shared). Outputs that sum over the batch
(the CUDA GroupNorm backward's weight and bias gradients) cannot be folded either and loop too.

A kernel's backward must be vmappable as well: under vmap(grad(f)) (per-sample gradients) and jacrev the backward
runs on batched tensors, which a kernel cannot read. `kernel_call` wraps a backward kernel as a forward-only
autograd.Function with a fold rule; the backward staticmethods use it only under a transform (plain calls launch
the kernel directly, no Function in between). Plain calls of the ops also take an old-style twin of each Function
(`eager_twin`), which keeps their host time.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..precond import under_torch_func

# Kinds of an argument: 's' a per-sample tensor (dim 0 is the op's batch), 'p' a tensor shared by the batch
# (a parameter), '-' anything else (numbers, strings, dtypes, plans).


def fold(t, d, V: int):
    """t with its vmapped dimension d (None: not vmapped, broadcast to V copies) merged into dim 0: (V * N, ...),
    contiguous: the kernels read their side inputs (statistics, log-sum-exps, per-sample factors) as dense arrays,
    and a merged view can keep a broadcast's zero stride (N = 1)."""
    if t is None:
        return None
    t = t.movedim(d, 0) if d is not None else t.expand(V, *t.shape)
    return t.reshape(V * t.shape[1], *t.shape[2:]).contiguous()


def unfold(out, V: int):
    """The outputs of a folded call back to (V, N, ...) with out_dims 0 (None and non-tensors: out_dim None)."""
    if isinstance(out, tuple):
        pairs = [unfold(o, V) for o in out]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if isinstance(out, torch.Tensor):
        return out.unflatten(0, (V, -1)), 0
    return out, None


def loop(apply: Callable, V: int, in_dims, args):
    """One call per vmapped slice, outputs stacked along dim 0 (non-tensor outputs: the first slice's)."""
    outs = [apply(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims))) for i in range(V)]
    first = outs[0]
    if not isinstance(first, tuple):
        return (torch.stack(outs), 0) if isinstance(first, torch.Tensor) else (first, None)
    out, dims = [], []
    for j, o in enumerate(first):
        if isinstance(o, torch.Tensor):
            out.append(torch.stack([r[j] for r in outs]))
            dims.append(0)
        else:
            out.append(o)
            dims.append(None)
    return tuple(out), tuple(dims)


def rule(apply: Callable, kinds: str, info, in_dims, args, must_loop: bool = False, regroup: Callable | None = None):
    """A per-sample op's vmap rule: fold the vmapped dimension into the batch, or loop where a parameter ('p') is
    vmapped or `must_loop`. in_dims: an int or None per tensor argument (a structure of Nones for the others).
    regroup(outputs, V, folded args): a folded call's outputs laid out as V calls' would be, where an output is not
    simply sample after sample."""
    V = info.batch_size
    if must_loop or any(isinstance(d, int) and k == "p" for k, d in zip(kinds, in_dims)):
        return loop(apply, V, in_dims, args)
    folded = [fold(a, d, V) if k == "s" else a for a, k, d in zip(args, kinds, in_dims)]
    out = apply(*folded)
    return unfold(out if regroup is None else regroup(out, V, folded), V)


def kernel_call(fn: Callable, kinds: str, loops: Callable | None = None) -> type:
    """fn (a backward kernel launch, per-sample along dim 0 of the 's' arguments) as a forward-only
    autograd.Function with a fold rule; loops(args) -> True where it must loop instead (outputs summed over the
    batch). No double backward: the kernels' backward passes are first order (as the Functions were)."""

    def forward(*args):
        return fn(*args)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{fn.__name__}: the kernel backends' backward passes are first order (no double "
                           f"backward); use backend 'torch' for higher derivatives")

    def vmap(info, in_dims, *args):
        return rule(Cls.apply, kinds, info, in_dims, args, loops is not None and loops(args))

    Cls = type(f"KernelCall_{fn.__name__}", (torch.autograd.Function,),
               {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                "backward": staticmethod(backward), "vmap": staticmethod(vmap)})
    return Cls


def eager_twin(cls: type) -> type:
    """Class decorator: cls (torch.func style: forward without ctx, setup_context, backward, vmap) gets `cls.eager`, an
    old-style Function made of the same staticmethods (forward(ctx, ...) runs forward, then setup_context), and
    `apply(cls, ...)` picks it outside a transform. PyTorch's apply of a Function with setup_context binds the call's
    arguments to forward's signature (inspect.signature, on every call): on CPU that tripled the host time of a
    no-grad GroupNorm call (19 -> 57 us, benchmarks/wrapper_overhead.py's shapes, the kernels no-ops). The plain path
    keeps the old style's cost; both run the same code. Where forward returns a tuple (the op's output first, then
    what setup_context saves), the twin returns the op's output alone, as the old Functions did: the rest is saved,
    not made outputs (the backward takes their gradients as *_, absent here)."""

    def forward(ctx, *args):
        out = cls.forward(*args)
        cls.setup_context(ctx, args, out)
        return out[0] if isinstance(out, tuple) else out

    cls.eager = type(f"{cls.__name__}Eager", (torch.autograd.Function,),
                     {"forward": staticmethod(forward), "backward": staticmethod(cls.backward)})
    return cls


def apply(cls: type, *args):
    """The op's output (the first of cls's outputs): cls.apply(*args) under a torch.func transform (its rules), else
    its eager twin's (see eager_twin)."""
    if under_torch_func():
        out = cls.apply(*args)
        return out[0] if isinstance(out, tuple) else out
    return cls.eager.apply(*args)


def transformed(saved: torch.Tensor | None = None) -> bool:
    """Whether a backward calls its kernels through a kernel_call Function: a torch.func transform is active, or
    `saved` (one of its saved tensors) is a grad transform's wrapper still. torch.func.vjp's pullback runs after its
    transform has exited, with the saved tensors' wrappers dead: Function.apply unwraps those (as torch's own ops
    do), a kernel launch cannot read them."""
    return under_torch_func() or (
        saved is not None and torch._C._functorch.is_gradtrackingtensor(saved))
