"""What the kernel tests (test_ops_triton.py, test_ops_cuda.py, test_csrc_emulated.py) share: the tolerance rule,
output poisoning and random inputs.

Tolerance (flash-attention's rule): a kernel's max error vs the float64 truth is at most twice PyTorch's own error
(backend 'torch', same dtype) plus a floor of one unit in the last place of the dtype at the output's scale (a single
extra rounding of a kernel that rounds in a different order). Every torch.empty / empty_like / empty_strided the
kernel's wrapper calls comes back NaN-filled, so an element or workspace entry a kernel forgets to write fails.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reference as ref
from cmfast import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
GN_GRADS = ("x", "weight", "bias", "scale", "shift")


class AtenOps(TorchDispatchMode):
    """Records the aten ops run inside it: `names` (each op's name) and `calls` ((name, args)); nothing while
    `paused` > 0 (a Triton launch under the interpreter, which copies its arguments with torch ops of its own)."""

    def __init__(self):
        super().__init__()
        self.names, self.calls, self.paused = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.names.append(func.overloadpacket.__name__)
            self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def poisoned():
    """torch.empty / empty_like / empty_strided come back filled with NaN (integers: 77)."""
    saved = torch.empty, torch.empty_like, torch.empty_strided

    def fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else 77)

    torch.empty = lambda *a, **k: fill(saved[0](*a, **k))
    torch.empty_like = lambda *a, **k: fill(saved[1](*a, **k))
    torch.empty_strided = lambda *a, **k: fill(saved[2](*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.empty_strided = saved


def run(fn, inputs: dict, grad: tuple, dy=None, poison=False, clone=False):
    """[output, gradients of the `grad` inputs] of fn(**inputs), backward with dy. Tensors are detached, not cloned
    unless asked: a clone would re-align deliberately misaligned inputs."""
    leaves = {k: ((v.detach().clone() if clone else v.detach()).requires_grad_(k in grad)
                  if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    with poisoned() if poison else contextlib.nullcontext():
        out = fn(**leaves)
        if dy is not None:
            out.backward(dy)
    return [out.detach()] + [leaves[k].grad for k in grad]


ULPS = 4


def sum_of_terms(reffn, x64: dict, grad: tuple, dy: torch.Tensor) -> dict:
    """For each gradient d{k}: the largest, over its elements j, of sum_i |dy_i| |d out_i / d k_j| (float64 Jacobian of
    the reference): the size of the terms a backward pass sums. A sum's rounding is relative to it, not to the result,
    which cancellation can leave near 0 (a 1-channel GroupNorm's dweight = sum dy * xhat with sum xhat = 0)."""
    names = list(grad)
    leaves = tuple(x64[k].detach() for k in names)

    def f(*vals):
        return reffn(**{**x64, **dict(zip(names, vals))})
    jac = torch.func.jacrev(f, argnums=tuple(range(len(names))))(*leaves)
    w = dy.double().abs()
    return {f"d{k}": (w.reshape(w.shape + (1,) * leaves[i].dim()) * j.abs()).sum(tuple(range(w.dim()))).max().item()
            for i, (k, j) in enumerate(zip(names, jac))}


def check(ours, theirs, reffn, inputs: dict, grad=(), dtype=torch.float32, backward=True, label="kernel",
          ulp_of_output=True, offset_cond=0.0, term_scale=False):
    """ours(inputs, grad, dy) (the kernel) vs the float64 truth reffn(**inputs in float64), within twice the error of
    theirs(inputs, grad, dy) (PyTorch) plus four ulps at the output's scale: of each output's own dtype, or of `dtype`
    with ulp_of_output=False. The ulps cover a reduction whose result is smaller than its terms when PyTorch's own
    rounding happens to be near exact (seen: dweight of a 1-channel GroupNorm, 1.1e-7 vs torch's 1.6e-8, with another
    thread count). offset_cond (|offset| / spread of an input far from zero, e.g. 1e4 / 3) adds that many ulps at the
    output's scale: one ulp of such an input as a normalized output sees it. There the rounding of a statistic to the
    dtype (a mean near 1e4 carries up to half an ulp of 1e4) dominates both errors, and twice PyTorch's is a coin flip
    (GroupNorm, mean 1e4, std 3, 25 seeds: the emulated CUDA kernel 2e-5 to 3.1e-4, PyTorch 7e-5 to 2.5e-4; seed 14
    failed, 3.1e-4 vs 7.9e-5). term_scale=True puts a gradient's floor at the scale of the terms it sums
(sum_of_terms) where that is larger than the result: for fuzzed shapes, where a result that cancels to near 0 comes
up by chance (test_group_norm_act_fuzz: 1 of 31 seeds, a 1-channel dweight). Returns ours' [output, gradients]."""
    x64 = {k: (v.detach().double().requires_grad_(k in grad) if isinstance(v, torch.Tensor) and v.is_floating_point()
               else v) for k, v in inputs.items()}
    out64 = reffn(**x64)
    dy = torch.randn(out64.shape, device=out64.device, dtype=dtype) if backward and grad else None
    if dy is not None:
        out64.backward(dy.double())
    truth = [out64.detach()] + [x64[k].grad for k in grad]
    terms = sum_of_terms(reffn, x64, grad, dy) if term_scale and dy is not None else {}
    a_all = theirs(inputs, grad, dy)
    b_all = ours(inputs, grad, dy)
    for name, t, a, b in zip(["out"] + [f"d{k}" for k in grad], truth, a_all, b_all):
        assert b.shape == t.shape and b.dtype == a.dtype, f"{name}: {b.shape} {b.dtype} vs {t.shape} {a.dtype}"
        assert torch.isfinite(b).all(), f"{name}: non-finite (unwritten) elements"
        err_torch = (a.double() - t).abs().max().item()
        err_ours = (b.double() - t).abs().max().item()
        ulp = ULP[b.dtype if ulp_of_output and b.is_floating_point() else dtype]
        floor = (ULPS + offset_cond) * ulp * max(t.abs().max().item(), terms.get(name, 0.0), 1e-3)
        assert err_ours <= 2 * err_torch + floor, f"{name}: {label} err {err_ours:.3g} vs torch {err_torch:.3g}"
    return b_all


def rand(*shape, dtype=torch.float32, fmt=torch.contiguous_format, misaligned=False, device="cpu"):
    t = torch.randn(*shape, device=device).to(dtype).contiguous(memory_format=fmt)
    if misaligned:  # same values one element into a fresh buffer: data_ptr is not 16-byte aligned (scalar path)
        buf = torch.empty(t.numel() + 1, device=device, dtype=dtype)
        t = buf[1:].as_strided(t.shape, t.stride()).copy_(t)
    return t


def gn_inputs(shape, dtype, fmt, affine=True, mod=True, misaligned=False, device="cpu"):
    """group_norm_act's tensors for an (N, C, ...) x: mean 1.5, std 3; weight/bias (C,); scale/shift (N, C)."""
    N, C = shape[:2]

    def r(*s, **k):
        return rand(*s, dtype=dtype, device=device, **k)
    return dict(x=3 * r(*shape, fmt=fmt, misaligned=misaligned) + 1.5,
                weight=(1 + 0.3 * r(C)) if affine else None,
                bias=0.3 * r(C) if affine else None,
                scale=0.5 * r(N, C) if mod else None,
                shift=0.5 * r(N, C) if mod else None)


def gn_pair(G, act="silu", eps=1e-6):
    """(ops.group_norm_act, reference.group_norm_act) with G groups, as functions of the tensors of gn_inputs."""
    def fn(x, weight, bias, scale, shift):
        return ops.group_norm_act(x, G, weight, bias, eps, scale, shift, act)

    def reffn(x, weight, bias, scale, shift):
        return ref.group_norm_act(x, G, weight, bias, eps, scale, shift, act)
    return fn, reffn


def half_way_inputs() -> torch.Tensor:
    """fp32 x values (1, 1, 1, n) whose (x + 1) * 127.5 is exactly k + 0.5: torch.round (half to even) decides the
    uint8 output."""
    cand = (torch.arange(0, 255, dtype=torch.float64) + 0.5) / 127.5 - 1
    cand = (cand.float()[:, None] + torch.arange(-64, 65).float() * 2.0 ** -23).flatten()
    v = (cand + 1.0) * 127.5
    x = cand[v == v.floor() + 0.5][:64]
    assert x.numel() >= 8
    return x.reshape(1, 1, 1, -1)


def check_skip_output_infer(backend: str, check, x, F, sigma) -> None:
    """ops.skip_output_infer under `backend`: the float output through `check` (the test file's, vs PyTorch); the
    uint8 bytes within 1 of the float64 truth and equal to PyTorch's for more than 99% of the pixels."""
    check(lambda **a: ops.skip_output_infer(**a), ref.skip_output_infer, dict(x=x, F=F, sigma=sigma), dtype=x.dtype,
          backward=False)
    with ops.use_backend(backend), poisoned():
        u = ops.skip_output_infer(x, F, sigma, uint8=True)
    truth = ref.skip_output_infer(x.double(), F.double(), sigma, uint8=True)
    assert u.dtype == torch.uint8 and (u.double() - truth).abs().max() <= 1
    with ops.use_backend("torch"):
        assert (u == ops.skip_output_infer(x, F, sigma, uint8=True)).float().mean() > 0.99


def check_rounds_half_to_even(backend: str, device) -> None:
    """uint8 skip_output_infer under `backend` rounds the half-way values of half_way_inputs as torch.round does."""
    x = half_way_inputs().to(device)
    with ops.use_backend(backend):
        u = ops.skip_output_infer(x, torch.zeros_like(x), 0.002, uint8=True)
    with ops.use_backend("torch"):
        assert torch.equal(u, ops.skip_output_infer(x, torch.zeros_like(x), 0.002, uint8=True))


def cuda_check_on_cpu(name, t, device=None):
    """cmfast/ops/_cuda.py's _check without its CUDA-device requirement (type and dtype checks kept): monkeypatched in
    so that CPU tensors reach the wrappers' checks (and, in test_csrc_emulated.py, the emulated kernels)."""
    from cmfast.ops import _cuda
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _cuda._DTYPES:
        raise TypeError(f"{name}: the cuda backend supports float32, float16 and bfloat16, got {t.dtype}")
    return t
