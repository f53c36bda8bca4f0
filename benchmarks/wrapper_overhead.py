"""Host (Python) time per call of the cuda and triton backends' GroupNorm wrappers, kernels replaced by no-ops (CPU).

    python benchmarks/wrapper_overhead.py [--out FILE]     # -> benchmarks/results/wrapper_overhead-<cpu>.json

A small net's training step on a GPU is host time: the fmnist-small iCT step at batch 256 ran 112-146 ms against
15 ms of kernels (H200, session 5). This measures what the wrappers themselves add to it: argument checks, layout,
allocations, the autograd.Function, and the launch arguments, with every kernel launch (the pybind11 entry points,
the Triton launches) replaced by a function that returns at once, on CPU tensors. It leaves out what only a GPU
has: the driver's launch cost, CUDA allocations and stream lookups. The two backends run the same shapes, so the
difference between them is the wrappers' own.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

SHAPES = (((8, 64, 8, 8), 32, True), ((8, 64, 8, 8), 32, False), ((8, 128, 4, 4), 32, True))


class _NoOpExt:
    """cmfast._C with every entry point a no-op (and the constants the wrappers read)."""
    GN_FUSED_MAX_GROUP = 1 << 30
    GN_FUSED_MAX_CHANNELS = 1 << 30

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _NoOpKernel:
    """A Triton kernel (JIT function or autotuner) whose launch `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def no_op_kernels():
    """The cuda and triton backends on CPU tensors with their kernels as no-ops; everything restored on exit."""
    from cmfast.ops import _cuda

    def check(name, t, device=None):          # _cuda._check without its CUDA-device requirement
        if not isinstance(t, torch.Tensor) or t.dtype not in _cuda._DTYPES:
            raise TypeError(f"{name}: expected a float32 / float16 / bfloat16 tensor")
        return t
    saved = []
    try:
        for name, value in (("_check", check), ("_ext", lambda device: _NoOpExt()), ("_stream", lambda device: 0),
                            ("_sm_count", lambda index: 132), ("_on_device", contextlib.nullcontext)):
            saved.append((name, getattr(_cuda, name)))
            setattr(_cuda, name, value)
        with H.replaced_triton_kernels(lambda name: _NoOpKernel(), sms=132):
            yield
    finally:
        for name, value in reversed(saved):
            setattr(_cuda, name, value)


def _per_call_us(fn, calls: int, repeats: int) -> float:
    for _ in range(max(calls // 10, 2)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def measure(calls: int = 300, repeats: int = 7, shapes=SHAPES) -> list[dict]:
    """One row per (shape, layout, backend): median microseconds of Python per forward (no grad) and per forward +
    backward (scale, shift, weight and bias with gradients, bf16 x)."""
    from cmfast.ops import _cuda, _triton
    rows = []
    with no_op_kernels():
        for shape, groups, nhwc in shapes:
            x = torch.randn(*shape, dtype=torch.bfloat16)
            x = x.to(memory_format=torch.channels_last) if nhwc else x
            x.requires_grad_(True)
            N, C = shape[:2]
            w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
            sc = torch.zeros(N, C, dtype=torch.bfloat16, requires_grad=True)
            sh = torch.zeros(N, C, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn_like(x)
            for backend, mod in (("cuda", _cuda), ("triton", _triton)):
                def forward(mod=mod):
                    with torch.no_grad():
                        mod.group_norm_act(x, groups, w, b, 1e-6, sc, sh, "silu")

                def forward_backward(mod=mod):
                    torch.autograd.backward(mod.group_norm_act(x, groups, w, b, 1e-6, sc, sh, "silu"), dy)
                rows.append({"op": "group_norm_act", "shape": list(shape), "groups": groups,
                             "layout": "nhwc" if nhwc else "nchw", "backend": backend,
                             "forward_us": round(_per_call_us(forward, calls, repeats), 2),
                             "forward_backward_us": round(_per_call_us(forward_backward, calls // 3, repeats), 2)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wrapper_overhead.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/wrapper_overhead-<cpu>.json)")
    p.add_argument("--calls", type=int, default=300, help="calls per timing (default 300)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    rows = measure(calls=args.calls)
    print(f"{'shape':>16} {'layout':>6} {'backend':>7} {'forward us':>11} {'fwd+bwd us':>11}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>16} {r['layout']:>6} {r['backend']:>7} {r['forward_us']:>11.1f} "
              f"{r['forward_backward_us']:>11.1f}")
    env = H.environment(cpu)
    result = {"benchmark": "wrapper_overhead", **env, "threads": 1, "dtype": "bfloat16",
              "what": "host Python time per call, kernels replaced by no-ops, CPU tensors", "rows": rows}
    H.write_result(result, args.out, f"wrapper_overhead-{env['device_slug']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
