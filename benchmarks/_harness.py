"""Shared benchmark harness: timing (CUDA events via triton.testing.do_bench on GPU, perf_counter on CPU), the
two hardware ceilings measured in the same run, FLOP counts, and the run's environment for the result JSON."""
from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_RUNS = 10   # timed calls at the least, whatever the budget


def rep_ms(budget_ms: float, estimate_ms: float, min_runs: int = MIN_RUNS) -> float:
    """do_bench's repetition time: the budget, or enough for min_runs calls of about estimate_ms (do_bench repeats
    int(rep / its estimate) times: a 100 ms budget timed a 96 ms eager row once, its "median" one run)."""
    return max(budget_ms, 1.25 * min_runs * estimate_ms)


def time_ms(fn, device: torch.device, budget_ms: float = 500.0, warmup: int = 3) -> dict:
    """Median (and 20th / 80th percentiles) of fn's time in ms. GPU: do_bench (CUDA events, L2 flushed between
    runs, `budget_ms` of repetitions after its own warm-up, or more for MIN_RUNS calls); CPU: perf_counter around
    each call."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            fn()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            rep = rep_ms(budget_ms, a.elapsed_time(b))
            p20, med, p80 = do_bench(fn, warmup=max(25, budget_ms / 10), rep=rep, quantiles=[0.2, 0.5, 0.8])
            return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "rep_ms": round(rep, 1),
                    "timer": "triton.testing.do_bench"}
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start) * 1e3 < budget_ms and len(times) < 1000:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "n": len(times),
            "timer": "cuda events" if device.type == "cuda" else "time.perf_counter"}


def error_line(e: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message' (at most `limit` characters): how a row records what stopped it."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:limit]


def graph_time(fn, device: torch.device, budget_ms: float = 100.0) -> dict:
    """GPU time alone: fn captured in a CUDA graph and replayed (triton's do_bench_cudagraph, median), i.e. without
    the host's launch and Python cost that dominates do_bench at small sizes. This is what a kernel costs inside
    the CUDA-graph sampler. {} off CUDA; {'graph_error': why} when fn cannot be captured.
    L2 state, on purpose: the replays run back to back, so inputs that fit the L2 (50 MB on an H100) stay there, as
    inside the sampler, where an op reads what the op before it has just written (a batch-1 activation is 0.25 MB).
    Inputs larger than the L2 (batch 256's) are read from HBM either way. do_bench's rows (median_ms) flush the L2
    before each call: the cold case beside it."""
    if device.type != "cuda":
        return {}
    try:
        from triton.testing import do_bench_cudagraph
        return {"graph_median_ms": do_bench_cudagraph(fn, rep=budget_ms, return_mode="median"), "graph_l2": "warm"}
    except Exception as e:  # noqa: BLE001 - a host sync or allocation the capture refuses: the row keeps its eager time
        return {"graph_error": error_line(e)}


# Kernel families by name (first match wins): where a row's device time goes.
KERNEL_FAMILIES = (
    ("conv", re.compile(r"conv|cudnn|implicit_gemm|fprop|dgrad|wgrad|winograd", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|_attn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|matmul|nvjet|xmma", re.I)),
    ("group_norm", re.compile(r"group_?norm|\bgn_|_gn_", re.I)),
    ("inductor", re.compile(r"^triton_(poi|red|per|tem|for)_")),
    ("copy/fill", re.compile(r"memcpy|memset|copy|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|reduce_kernel", re.I)),
)


def kernel_family(name: str) -> str:
    return next((fam for fam, rx in KERNEL_FAMILIES if rx.search(name)), "other")


def kernel_profile(fn, device: torch.device, iters: int = 5, top: int = 8) -> dict:
    """Where one call of fn spends its time, from torch.profiler over `iters` calls: on CUDA the device kernels
    (count per call, summed kernel time per call, per kernel family, the `top` kernels by time); on CPU the
    top-level operators. Many short kernels whose sum is far below the call's time mean launch-bound; a few
    long ones mean compute- or bandwidth-bound. {'profile_error': why} when the profiler cannot run."""
    try:
        from torch.profiler import ProfilerActivity, profile
        cuda = device.type == "cuda"
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fn()
            sync(device)
        kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        events = [e for e in prof.events() if e.device_type == kind and (cuda or e.cpu_parent is None)]
        per_name: dict[str, list[float]] = {}
        for e in events:
            t = per_name.setdefault(e.name, [0, 0.0])
            t[0] += 1
            t[1] += e.time_range.elapsed_us()
        families: dict[str, float] = {}
        for name, (_, us) in per_name.items():
            fam = kernel_family(name) if cuda else "op"
            families[fam] = families.get(fam, 0.0) + us / iters / 1e3
        ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
        return {"what": "device kernels" if cuda else "top-level CPU operators",
                "per_call": sum(c for c, _ in per_name.values()) / iters,
                "summed_ms_per_call": sum(us for _, us in per_name.values()) / iters / 1e3,
                "families_ms": {k: round(v, 4) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
                "top": [{"name": n[:120], "per_call": c / iters, "ms_per_call": us / iters / 1e3}
                        for n, (c, us) in ranked]}
    except Exception as e:  # noqa: BLE001 - a profile is a diagnostic: the row keeps its timing without it
        return {"profile_error": error_line(e)}


def host_profile(fn, device: torch.device, iters: int = 3, top: int = 12) -> dict:
    """Where the host spends one call of fn: cProfile over `iters` calls, the `top` functions by their own time per
    call (Python and the C calls it makes: launches, allocations, dispatch). For a step whose GPU is idle part of the
    time (a kernel profile's summed kernel time well under the call's), this names what keeps it waiting. cProfile
    slows Python down, so the times rank the causes; they are not the call's time. {'host_profile_error': why} when
    it cannot run."""
    try:
        import cProfile
        import pstats
        sync(device)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(iters):
            fn()
        sync(device)
        prof.disable()
        st = pstats.Stats(prof)
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]   # (file, line, name) -> (cc, nc, tt, ct, ..)
        return {"what": "host (cProfile, inflated)", "iters": iters,
                "ms_per_call": st.total_tt / iters * 1e3,
                "top": [{"name": f"{Path(f).name}:{line}({name})"[:120], "calls_per_call": nc / iters,
                         "own_ms_per_call": tt / iters * 1e3, "cum_ms_per_call": ct / iters * 1e3}
                        for (f, line, name), (cc, nc, tt, ct, _) in rows]}
    except Exception as e:  # noqa: BLE001 - a diagnostic: the row keeps its timing without it
        return {"host_profile_error": error_line(e)}


def ceilings(device: torch.device, quick: bool) -> dict:
    """Measured peak matmul rate (bf16 on GPU, fp32 on CPU) and copy bandwidth (read + write bytes)."""
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, copy_bytes = 1024, torch.float32, 64 << 20
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = time_ms(lambda: a @ b, device, 200 if quick else 1000)["median_ms"]
    src = torch.empty(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_cp = time_ms(lambda: dst.copy_(src), device, 200 if quick else 1000)["median_ms"]
    return {"matmul_tflops": 2 * n ** 3 / t_mm / 1e9, "matmul_dtype": str(dtype).removeprefix("torch."),
            "matmul_n": n, "copy_gb_per_s": 2 * copy_bytes / t_cp / 1e6, "copy_bytes": copy_bytes}


def count_flops(fn, device: torch.device | None = None) -> int:
    """FLOPs of one call of fn, counted by torch.utils.flop_counter (matmuls, convolutions, SDPA). Off CUDA the
    counter has no formula for the CPU's fused SDPA kernel (it counted 0: the tiny net came to 0.150 GFLOP an image
    against 0.175 by forward hooks), so SDPA runs its math backend there, whose matmuls it counts."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode
    math_sdpa = contextlib.nullcontext()
    if device is None or torch.device(device).type != "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        math_sdpa = sdpa_kernel(SDPBackend.MATH)
    with math_sdpa, FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def floor_ms(flops: float, nbytes: float, ceil: dict) -> float:
    """The roofline floor: max(counted FLOPs / measured matmul rate, bytes / measured copy bandwidth)."""
    return max(flops / (ceil["matmul_tflops"] * 1e9), nbytes / (ceil["copy_gb_per_s"] * 1e6))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU: {model} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """File-name key of a device class: 'cpu', or the GPU name ('nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_slug": device_slug(device), "device_type": device.type,
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def write_result(result: dict, out, name: str, quiet: bool = False) -> Path:
    """`result` as JSON at `out`, or at benchmarks/results/<name> when out is None; prints where (unless quiet).
    Written to a temporary file and renamed, so a run killed while writing leaves the previous version whole."""
    path = Path(out or Path(__file__).resolve().parent / "results" / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")
    return path


class CompileBudget:
    """torch.compile variants are allowed until `budget_s` seconds after creation (None: always); the rest are
    counted and reported as skipped, so a time-boxed GPU check keeps its eager and kernel rows and its JSON."""

    def __init__(self, budget_s: float | None):
        self.budget_s, self.t0, self.skipped = budget_s, time.perf_counter(), 0

    def allow(self) -> bool:
        if self.budget_s is None or time.perf_counter() - self.t0 < self.budget_s:
            return True
        self.skipped += 1
        return False

    def note(self) -> dict:
        """{'torch.compile': why} when cases were skipped, else {}."""
        return {"torch.compile": f"time budget (--budget-s {self.budget_s}): {self.skipped} cases without it"} \
            if self.skipped else {}


KERNEL_MODULES = ("attention", "consistency_loss", "group_norm_act", "residual", "skip_output", "trig_tangent_loss")


@contextlib.contextmanager
def replaced_triton_kernels(make, sms: int = 132):
    """Every Triton kernel of cmfast.kernels (a JIT function, the interpreter's stand-in for one, an autotuner or one
    of kernels/_autotune's wrappers) replaced by make(name), an object whose [grid] gives the launch; GroupNorm
    plans for a GPU with `sms` multiprocessors and launches its kernels as they are. Everything restored on exit.
    The host-side benchmarks (launches.py --train, wrapper_overhead.py) run the wrappers without the kernels."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction     # a plain @triton.jit under TRITON_INTERPRET=1
    from triton.runtime.jit import JITFunction
    saved = []

    def patch(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)
    try:
        for mod_name in KERNEL_MODULES:
            mod = importlib.import_module(f"cmfast.kernels.{mod_name}")
            for name in dir(mod):
                v = getattr(mod, name)
                if isinstance(v, (JITFunction, InterpretedFunction, Autotuner)) or \
                        type(v).__name__ in ("_Fixed", "_Switch"):
                    patch(mod, name, make(name))
        gn = importlib.import_module("cmfast.kernels.group_norm_act")
        patch(gn, "_unwrapped", lambda kernel: kernel)
        patch(gn, "num_sms", lambda *args, **kwargs: sms)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
