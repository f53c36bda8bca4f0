"""Per-op benchmarks of the Triton kernels (kernels/) against eager PyTorch and torch.compile, side by side.

    python benchmarks/bench_ops.py --out benchmarks/results/<gpu>-triton-ops.json     # GPU, a few minutes
    python benchmarks/bench_ops.py --quick --out /tmp/ops.json                       # GPU, fewer shapes
    python benchmarks/bench_ops.py --cpu-smoke --out /tmp/ops.json                   # CPU: tiny shapes, interpreter

DDPM++ CIFAR-10 shapes: group_norm_act on (B, 128 | 256, 32x32 | 16x16 | 8x8), 32 groups, weight / bias / the
noise embedding's scale and shift, SiLU; attention at 16x16 (L = 256) with head dim 256, q, k, v dense as the UNet
passes them; the residual join (channels-last, B = 1, 8, 256); skip_output, skip_output_infer and
consistency_loss on (B, 3, 32, 32); B = 1 and 256. Every case runs "triton", "torch" (eager: cmfast/ops/_torch.py,
SDPA for attention) and "torch.compile" of the same torch composition in one process on one device. Rows:
median ms (triton.testing.do_bench, L2 flushed), GB/s from the bytes a fused kernel moves (counted below, per op),
TFLOP/s for attention (fwd 4 B H L^2 D; fwd+bwd adds 10 B H L^2 D: five L x L x D matmuls), the roofline floor from
the ceilings measured in the same run (device-to-device copy, bf16 matmul), the first call's time (Triton JIT +
autotuning, or torch.compile), and the speedup over eager. Row fields match benchmarks/bench_cuda.py, so benchmarks/make_auto_table.py reads these files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402


def _elem(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def _grad(impl, inputs, dy, *args):
    """fwd+bwd through impl: autograd.grad (no .grad accumulation inside the timed region)."""
    return lambda: torch.autograd.grad(impl(*args), inputs, dy)


class Bench:
    def __init__(self, dev, dtype, backends, compile_, budget_ms, ceil, warmup=2, compile_budget=None):
        self.dev, self.dtype, self.backends, self.compile_ = dev, dtype, backends, compile_
        self.budget_ms, self.ceil, self.warmup, self.rows = budget_ms, ceil, warmup, []
        self.compile_budget = compile_budget or H.CompileBudget(None)

    def variants(self, op, make):
        """(name, fn) per backend: make(impl) with the backend's implementation called on normalized arguments."""
        from cmfast import ops
        from cmfast.ops import _torch
        out = []
        for b in self.backends:
            with ops.use_backend(b):
                out.append((b, make(ops.implementation(op, self.dev))))
        if self.compile_ and self.compile_budget.allow():
            out.append(("torch.compile", make(torch.compile(getattr(_torch, op), dynamic=False))))
        return out

    def measure(self, case: dict, op: str, make, nbytes: int, flops: int = 0):
        rows = []
        for name, fn in self.variants(op, make):
            row = dict(case, op=op, backend=name, dtype=str(self.dtype).removeprefix("torch."), bytes=nbytes)
            try:
                t0 = time.perf_counter()
                fn()                               # first call: Triton JIT + autotuning, or torch.compile
                H.sync(self.dev)
                row["first_call_s"] = time.perf_counter() - t0
                for _ in range(self.warmup):
                    fn()
                H.sync(self.dev)
                row.update(H.time_ms(fn, self.dev, budget_ms=self.budget_ms, warmup=0))
                # The GPU time alone, from a graph replay: the sampler's case (fwd), and training's (fwd+bwd), whose
                # eager time at batch 256 is mostly host launch cost that a GPU-bound step hides.
                row.update(H.graph_time(fn, self.dev, budget_ms=self.budget_ms))
                row["gb_per_s"] = nbytes / row["median_ms"] / 1e6
                row["of_copy_bw"] = row["gb_per_s"] / self.ceil["copy_gb_per_s"]
                row["floor_ms"] = H.floor_ms(flops, nbytes, self.ceil)
                if flops:
                    row["flops"] = flops
                    row["tflops"] = flops / row["median_ms"] / 1e9
                    row["of_matmul_peak"] = row["tflops"] / self.ceil["matmul_tflops"]
            except Exception as e:  # one failing variant must not lose the others' numbers
                row["error"] = H.error_line(e)
            rows.append(row)
        eager = next((r["median_ms"] for r in rows if r["backend"] == "torch" and "median_ms" in r), None)
        for r in rows:
            if eager and "median_ms" in r:
                r["speedup_vs_eager"] = eager / r["median_ms"]
        self.rows += rows


# ---- ops ----------------------------------------------------------------------------------------------------------
def bench_group_norm_act(bn: Bench, cases):
    dev, dtype, e = bn.dev, bn.dtype, _elem(bn.dtype)
    for B, C, R, layout, G in cases:
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        x = torch.randn(B, C, R, R, device=dev, dtype=dtype).contiguous(memory_format=fmt)
        w, b = torch.randn(C, device=dev, dtype=dtype), torch.randn(C, device=dev, dtype=dtype)
        sc, sh = torch.randn(B, C, device=dev, dtype=dtype), torch.randn(B, C, device=dev, dtype=dtype)
        dy = torch.randn_like(x)
        leaves = [t.detach().requires_grad_() for t in (x, w, b, sc, sh)]
        case = dict(shape=[B, C, R, R], groups=G, layout=layout)
        # Forward reads x and writes y; backward reads x and dy twice (two-phase reduction) and writes dx.
        bn.measure(dict(case, **{"pass": "fwd"}), "group_norm_act",
                   lambda impl: lambda: impl(x, G, w, b, 1e-6, sc, sh, "silu"), 2 * x.numel() * e)
        bn.measure(dict(case, **{"pass": "fwd+bwd"}), "group_norm_act",
                   lambda impl: _grad(impl, leaves, dy, leaves[0], G, *leaves[1:3], 1e-6, *leaves[3:], "silu"),
                   7 * x.numel() * e)


def bench_attention(bn: Bench, cases):
    dev, dtype, e = bn.dev, bn.dtype, _elem(bn.dtype)
    for B, H_, L, D in cases:
        # q, k, v as the UNet passes them: the qkv convolution's NHWC output, channels (head, d, 3) as in EDM, copied
        # once into dense (3, B, H, L, D). (The strided views themselves, stride(-1) = 3, made the Triton forward 12x
        # slower on the H200: 1129 against 93 us at batch 256, graph replay.)
        side = next(d for d in range(int(L ** 0.5), 0, -1) if L % d == 0)     # an H x W with H W = L
        qkv = torch.randn(B, H_ * D * 3, side, L // side, device=dev, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        q, k, v = (t.requires_grad_(True) for t in qkv.reshape(B, H_, D, 3, L).permute(3, 0, 1, 4, 2).contiguous())
        do = torch.randn(B, H_, L, D, device=dev, dtype=dtype)
        case = dict(shape=[B, H_, L, D], qkv="unet-dense")
        n, mm = q.numel() * e, B * H_ * L * L * D
        # Forward reads q, k, v and writes o; backward reads q, k, v, o, dO and writes dq, dk, dv.
        bn.measure(dict(case, **{"pass": "fwd"}), "attention", lambda impl: lambda: impl(q, k, v, D ** -0.5),
                   4 * n, 4 * mm)
        bn.measure(dict(case, **{"pass": "fwd+bwd"}), "attention",
                   lambda impl: _grad(impl, (q, k, v), do, q, k, v, D ** -0.5), 12 * n, 14 * mm)


def bench_skip_output(bn: Bench, batches):
    dev, dtype, e = bn.dev, bn.dtype, _elem(bn.dtype)
    for B in batches:
        x, F = (torch.randn(B, 3, 32, 32, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        s = torch.rand(B, device=dev) * 80 + 0.002
        dy = torch.randn_like(x)
        case, n = dict(shape=[B, 3, 32, 32]), x.numel()
        # Forward reads x, F and writes y; backward reads dy and writes dx, dF; uint8 output writes 1 byte.
        bn.measure(dict(case, **{"pass": "fwd+bwd"}), "skip_output",
                   lambda impl: _grad(impl, (x, F), dy, x, F, s, 0.5, 0.002), 6 * n * e)
        bn.measure(dict(case, **{"pass": "fwd"}, uint8=True), "skip_output_infer",
                   lambda impl: lambda: impl(x.detach(), F.detach(), s, 0.5, 0.002, True), n * (2 * e + 1))


def bench_consistency_loss(bn: Bench, batches):
    dev, dtype, e = bn.dev, bn.dtype, _elem(bn.dtype)
    for B in batches:
        pred = torch.randn(B, 3, 32, 32, device=dev, dtype=dtype, requires_grad=True)
        target = torch.randn(B, 3, 32, 32, device=dev, dtype=dtype)
        c, n = 0.00054 * (3 * 32 * 32) ** 0.5, pred.numel()       # iCT's c for CIFAR-10
        for kind in ("pseudo_huber", "l2"):
            # Forward reads pred, target and writes the fp32 gradient part; backward reads it, writes dpred.
            bn.measure(dict(shape=[B, 3, 32, 32], kind=kind, **{"pass": "fwd+bwd"}), "consistency_loss",
                       lambda impl: lambda: torch.autograd.grad(impl(pred, target, kind, c, None).mean(), pred),
                       n * (3 * e + 8))


def bench_residual(bn: Bench, cases):
    dev, dtype, e = bn.dev, bn.dtype, _elem(bn.dtype)
    for B, C, R in cases:       # channels-last, as the sampler and the training step run the UNet
        x, skip = (torch.randn(B, C, R, R, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
                   for _ in range(2))
        bias = torch.randn(C, device=dev)                 # a parameter: fp32
        leaves = [t.detach().requires_grad_() for t in (x, skip, bias)]
        dy = torch.randn_like(x)
        case = dict(shape=[B, C, R, R], layout="nhwc")
        # Forward reads x and skip, writes y; backward reads dy, writes dx (= dskip, one tensor) and sums dbias.
        bn.measure(dict(case, **{"pass": "fwd"}), "residual",
                   lambda impl: lambda: impl(x, skip, bias, 0.5 ** 0.5), 3 * x.numel() * e)
        bn.measure(dict(case, **{"pass": "fwd+bwd"}), "residual",
                   lambda impl: _grad(impl, leaves, dy, *leaves, 0.5 ** 0.5), 6 * x.numel() * e)


def cases(mode: str):
    if mode == "smoke":
        return dict(gn=[(2, 8, 4, "nhwc", 2)], attn=[(1, 1, 17, 16)], batch=[2], res=[(2, 8, 4)])
    gn = [(B, C, R, "nchw", 32) for B in (1, 256) for C, R in ((128, 32), (256, 16), (256, 8))]
    if mode == "full":
        gn += [(B, C, R, "nhwc", 32) for B in (1, 256) for C, R in ((128, 32), (256, 16))]
        gn += [(B, C, R, "nchw", 32) for B in (1, 256) for C, R in ((256, 32), (128, 16), (128, 8))]
    attn = [(1, 1, 256, 256), (64, 1, 256, 256), (256, 1, 256, 256)]
    res = [(B, C, R) for B in (1, 8, 256) for C, R in ((128, 32), (256, 16), (256, 8))]
    return dict(gn=gn, attn=attn if mode == "full" else attn[::2], batch=[1, 256], res=res)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_ops", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default benchmarks/results/<device>-triton-ops.json)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--ops", default="group_norm_act,attention,residual,skip_output,consistency_loss")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no new torch.compile rows after this many seconds (the eager and Triton rows all run)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: tiny shapes on CPU, Triton in its interpreter, no torch.compile (checks the script)")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"      # before the kernels are first imported
        dev, mode, compile_, budget = torch.device("cpu"), "smoke", False, 5.0
    else:
        if not torch.cuda.is_available():
            print("bench_ops: error: needs a CUDA device (--cpu-smoke checks the script on CPU)", file=sys.stderr)
            return 2
        dev, mode, compile_, budget = torch.device("cuda"), "quick" if a.quick else "full", not a.no_compile, \
            50.0 if a.quick else 200.0
    dtype = getattr(torch, a.dtype)
    import torch._dynamo as dynamo
    for knob in ("recompile_limit", "cache_size_limit"):   # one compiled graph per shape: no eager fallback
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, 256)
    ceil = H.ceilings(dev, quick=a.quick or a.cpu_smoke)
    bn = Bench(dev, dtype, ("triton", "torch"), compile_, budget, ceil, warmup=0 if a.cpu_smoke else 2,
               compile_budget=H.CompileBudget(a.budget_s))
    c = cases(mode)
    run = {"group_norm_act": lambda: bench_group_norm_act(bn, c["gn"]),
           "attention": lambda: bench_attention(bn, c["attn"]),
           "residual": lambda: bench_residual(bn, c["res"]),
           "skip_output": lambda: bench_skip_output(bn, c["batch"]),
           "consistency_loss": lambda: bench_consistency_loss(bn, c["batch"])}
    print(f"ceilings: copy {ceil['copy_gb_per_s']:.0f} GB/s, {ceil['matmul_dtype']} matmul "
          f"{ceil['matmul_tflops']:.1f} TFLOP/s ({H.device_name(dev)})")
    t0 = time.perf_counter()
    for op in a.ops.split(","):
        if op not in run:
            print(f"bench_ops: error: unknown op {op!r}; expected some of {', '.join(run)}", file=sys.stderr)
            return 2
        run[op]()
    for r in bn.rows:
        t = f"{r['median_ms'] * 1e3:9.1f} us {r['gb_per_s']:7.1f} GB/s ({r['of_copy_bw']:4.0%} of copy) " \
            f"x{r.get('speedup_vs_eager', float('nan')):5.2f} vs eager" \
            + (f" {r['tflops']:6.1f} TFLOP/s ({r['of_matmul_peak']:4.0%})" if "tflops" in r else "") \
            if "median_ms" in r else r.get("error", "")
        print(f"{r['op']:18s} {str(r['shape']):20s} {r.get('layout', r.get('kind', '')):12s} {r['pass']:8s} "
              f"{r['backend']:14s} {t}")
    result = dict(H.environment(dev), benchmark="bench_ops", dtype=a.dtype, mode=mode, ceilings=ceil,
                  wall_s=time.perf_counter() - t0,
                  skipped=bn.compile_budget.note() if compile_ else {"torch.compile": "--no-compile or --cpu-smoke"},
                  rows=bn.rows)
    H.write_result(result, a.out, f"{H.device_slug(dev)}-triton-ops.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
