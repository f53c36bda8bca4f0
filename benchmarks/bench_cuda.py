"""Per-op latency of the CUDA C++ kernels (csrc/) against Triton, eager PyTorch and torch.compile, side by side.

    python benchmarks/bench_cuda.py --out results/cuda-ops.json          # GPU, about 2-3 minutes
    python benchmarks/bench_cuda.py --quick --no-compile --out x.json    # a smoke run

group_norm_act at the DDPM++ CIFAR-10 shapes (C 128 / 256 at 32x32, 16x16, 8x8; 32 groups; weight, bias and the
noise embedding's scale / shift; SiLU), batch 1, 8 and 256, NCHW and channels-last, forward and forward + backward;
skip_output_infer (the sampler epilogue) and consistency_loss (forward + backward) at 3x32x32. All variants run in
one process on one device; torch.compile warms up outside the timed region. Each row gives the median, the
bytes a fused kernel must move, the roofline floor (bytes / measured copy bandwidth) and the ratio to eager.
`python benchmarks/make_auto_table.py results/*.json` turns such files into cmfast/ops/auto_table.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

from cmfast import ops  # noqa: E402

BACKENDS = ("cuda", "triton", "torch")   # "torch" = eager; "torch.compile" is added unless --no-compile


def available(backend: str, device: torch.device) -> str | None:
    """None if `backend` runs here, else why not (one line, recorded in the JSON). Builds cmfast._C if needed."""
    try:
        with ops.use_backend(backend):
            ops.implementation("group_norm_act", device)
        if backend == "cuda":
            from cmfast.ops import _cuda
            _cuda._ext(device)
    except Exception as e:  # BackendUnavailable, missing triton, build failure
        return str(e).splitlines()[0]
    return None


COMPILE_BUDGET = H.CompileBudget(None)   # main() sets it from --budget-s


def variants(op: str, make, backends, dev, compile_: bool):
    """(name, zero-argument fn): make(impl) for each backend's implementation of `op` (called directly with the
    normalized arguments, so no variant pays for the public API's checks), and for torch.compile of the torch one."""
    out = []
    for b in backends:
        with ops.use_backend(b):
            out.append((b, make(ops.implementation(op, dev))))
    if compile_ and COMPILE_BUDGET.allow():
        from cmfast.ops import _torch
        # dynamic=False as bench_ops: each case its own static graph (a second shape recompiled as a dynamic-shape
        # graph that every later case then reused)
        out.append(("torch.compile", make(torch.compile(getattr(_torch, op), dynamic=False))))
    return out


def gn_cases(quick: bool):
    # Batch 1 and 8 (the sampler's latency path) and 256 (training, and the table's 'large' class: without it auto
    # carried the batch-8 winner of forward + backward, CUDA, to batch 256, where the H200 training step measured it
    # slower than Triton in the network: GroupNorm kernels 38.5 against 30.5 ms a step).
    for B in (1, 8, 256):
        for C, R in ((128, 32), (256, 16), (256, 8)) if quick else \
                ((128, 32), (128, 16), (128, 8), (256, 32), (256, 16), (256, 8)):
            yield B, C, R


def bench_group_norm_act(dev, dtype, backends, compile_, quick, ceil):
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for B, C, R in gn_cases(quick):
        for layout in ("nchw", "nhwc"):
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            x = torch.randn(B, C, R, R, device=dev, dtype=dtype).contiguous(memory_format=fmt)
            if dev.type == "cpu" and (B, C, R) != (1, 128, 32):  # the CPU smoke run needs one case only
                continue
            w, b = torch.randn(C, device=dev, dtype=dtype), torch.randn(C, device=dev, dtype=dtype)
            sc, sh = torch.randn(B, C, device=dev, dtype=dtype), torch.randn(B, C, device=dev, dtype=dtype)
            dy = torch.randn_like(x)
            leaves = [t.detach().requires_grad_() for t in (x, w, b, sc, sh)]

            def fwd(impl):
                return lambda: impl(x, 32, w, b, 1e-6, sc, sh, "silu")

            def fwd_bwd(impl):
                def fn():
                    y = impl(leaves[0], 32, *leaves[1:3], 1e-6, *leaves[3:], "silu")
                    return torch.autograd.grad(y, leaves, dy)
                return fn

            # Minimum traffic of a fused kernel: forward reads x, writes y; backward reads x and dy, writes dx.
            for pass_, make, nbytes in (("fwd", fwd, 2 * x.numel() * elem),
                                        ("fwd+bwd", fwd_bwd, 5 * x.numel() * elem)):
                rows += measure(dict(op="group_norm_act", shape=[B, C, R, R], groups=32, layout=layout, pass_=pass_),
                                variants("group_norm_act", make, backends, dev, compile_), nbytes, dev, ceil, quick)
    return rows


def bench_skip_output_infer(dev, dtype, backends, compile_, quick, ceil):
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for B in (1, 8, 64):
        x, F = torch.randn(B, 3, 32, 32, device=dev, dtype=dtype), torch.randn(B, 3, 32, 32, device=dev, dtype=dtype)
        s = torch.full((B,), 80.0, device=dev)
        rows += measure(dict(op="skip_output_infer", shape=[B, 3, 32, 32], pass_="fwd", uint8=True),
                        variants("skip_output_infer", lambda impl: lambda: impl(x, F, s, 0.5, 0.002, True), backends,
                                 dev, compile_),
                        x.numel() * (2 * elem + 1), dev, ceil, quick)
    return rows


def bench_consistency_loss(dev, dtype, backends, compile_, quick, ceil):
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for B in (8, 64, 512):
        pred = torch.randn(B, 3, 32, 32, device=dev, dtype=dtype).requires_grad_()
        target = torch.randn(B, 3, 32, 32, device=dev, dtype=dtype)

        c = 0.00054 * (3 * 32 * 32) ** 0.5  # iCT's c for CIFAR-10

        def fwd_bwd(impl):
            return lambda: torch.autograd.grad(impl(pred, target, "pseudo_huber", c, None).mean(), pred)

        # A fused kernel reads pred and target and writes dpred once.
        rows += measure(dict(op="consistency_loss", shape=[B, 3, 32, 32], kind="pseudo_huber", pass_="fwd+bwd"),
                        variants("consistency_loss", fwd_bwd, backends, dev, compile_), 3 * pred.numel() * elem, dev,
                        ceil, quick)
    return rows


def measure(case: dict, fns, nbytes: int, dev, ceil: dict, quick: bool) -> list[dict]:
    rows = []
    for name, fn in fns:
        row = dict(case, backend=name, bytes=nbytes)
        row["pass"] = row.pop("pass_")
        try:
            for _ in range(3):  # warm-up outside the timed region: JIT builds, autotuning, torch.compile
                fn()
            H.sync(dev)
            row.update(H.time_ms(fn, dev, budget_ms=50 if quick else 200))
            row["gb_per_s"] = nbytes / row["median_ms"] / 1e6
            row["floor_ms"] = H.floor_ms(0, nbytes, ceil)
            # The GPU time alone, from a graph replay (forward: the sampler's case; fwd+bwd: a GPU-bound training
            # step's, whose eager time at batch 256 is mostly host launch cost)
            row.update(H.graph_time(fn, dev, budget_ms=50 if quick else 200))
        except Exception as e:  # one failing variant must not lose the others' numbers
            row["error"] = H.error_line(e)
        rows.append(row)
    eager = next((r["median_ms"] for r in rows if r["backend"] == "torch" and "median_ms" in r), None)
    for r in rows:
        if eager and "median_ms" in r:
            r["speedup_vs_eager"] = eager / r["median_ms"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_cuda", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/<device>-cuda-ops.json)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--ops", default="group_norm_act,skip_output_infer,consistency_loss")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no new torch.compile rows after this many seconds (the other rows all run)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to smoke-test this script")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: error: needs a CUDA device (--device cpu only smoke-tests the script)", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype)
    import torch._dynamo as dynamo
    for knob in ("recompile_limit", "cache_size_limit"):  # one compiled graph per shape and layout, no eager fallback
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, 256)
    global COMPILE_BUDGET
    COMPILE_BUDGET = H.CompileBudget(a.budget_s)
    skipped = {b: why for b in BACKENDS if (why := available(b, dev))}
    backends = [b for b in BACKENDS if b not in skipped]
    ceil = H.ceilings(dev, a.quick)
    rows, ops_run = [], a.ops.split(",")
    for op in ops_run:
        bench = {"group_norm_act": bench_group_norm_act, "skip_output_infer": bench_skip_output_infer,
                 "consistency_loss": bench_consistency_loss}[op]
        rows += bench(dev, dtype, backends, not a.no_compile, a.quick, ceil)
    for r in rows:
        t = f"{r['median_ms'] * 1e3:8.1f} us  x{r.get('speedup_vs_eager', float('nan')):5.2f}" if "median_ms" in r \
            else r.get("error", "")
        print(f"{r['op']:18s} {str(r['shape']):18s} {r.get('layout', ''):5s} {r['pass']:8s} {r['backend']:14s} {t}")
    from cmfast import _build
    # each op's CUDA sources as measured: make_auto_table.py lets only measurements of the current ones vote
    result = dict(H.environment(dev), benchmark="bench_cuda", dtype=a.dtype, ceilings=ceil,
                  csrc_ops={op: _build.op_digest(op) for op in ops_run},
                  skipped={**skipped, **COMPILE_BUDGET.note()}, rows=rows)
    H.write_result(result, a.out, f"{H.device_slug(dev)}-cuda-ops.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
