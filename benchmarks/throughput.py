"""One-step sampling latency / throughput and an iCT training step: eager, torch.compile and cmfast side by side.

    python benchmarks/throughput.py            # GPU: ddpmpp-cifar10, ddpmpp-64, adm-imagenet64; batch 1..1024
    python benchmarks/throughput.py --quick    # GPU, ~3 min on an H100: cifar net, batch 1 and 256, iCT step at 256
    python benchmarks/throughput.py --cpu      # CPU (auto without CUDA): tiny / fmnist-small, batch 1 and 8

Every row: median ms, images/s, speedup over eager bf16 (CPU: eager fp32) and over the best torch.compile, and
the roofline floor (counted FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth; both ceilings
measured in this run). Prints a table and writes JSON to benchmarks/results/<device>-<date>.json (or --out).
All modes run in one process on one device; compilation and graph capture happen before the timed region.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import cmfast  # noqa: E402
from cmfast import ops, precond  # noqa: E402
from cmfast.ema import ema_update_  # noqa: E402
from cmfast.objectives import ict_loss  # noqa: E402
from cmfast.training.cuda_graph import grad_norm  # noqa: E402

SIGMA = 80.0                       # one-step sampling from sigma_max (CM Alg. 1 with one level)
COMPILE_COST_S = 60.0              # a compile row is skipped when less than this is left of the time budget
ROW_COST_S = 20.0                  # any other row is skipped when less than this is left before --deadline-s
TRAIN_BUDGET_MS = 1500             # the timer's budget of a training-step row, at least (5 repetitions of ~300 ms)
# --quick on a GPU also times the reference runs' step (fmnist-small, batch 256), eager rows only: a small net whose
# step is host-bound. The H200 of session 4 ran it at 126 ms in an iCT run, against 77 ms in session 1.
HOST_BOUND = ("fmnist-small", 256, ["eager-bf16", "cmfast", "cmfast-auto", "cmfast-graph"])


def _model(preset: str, device: torch.device) -> cmfast.ConsistencyModel:
    torch.manual_seed(0)
    return cmfast.ConsistencyModel(cmfast.UNet.from_preset(preset)).to(device).eval()


def one_step_fn(model, B: int, device, dtype=None, channels_last=False):
    """The strongest plain sampler: z ~ N(0, I), F = backbone(80 z, 80), clamp(c_skip x + c_out F)."""
    shape = (B, model.net.in_channels, model.net.img_resolution, model.net.img_resolution)
    s = torch.full((B,), SIGMA, device=device)

    def fn():
        x = SIGMA * torch.randn(shape, device=device)
        x_in = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            F = model.backbone(x_in, s)
            return ops.skip_output_infer(x, F, s, model.sigma_data, model.sigma_min)
    return fn


def with_backend(backend: str, fn):
    def run():
        with ops.use_backend(backend):
            return fn()
    return run


def _step_parts(model, B: int, device, channels_last: bool):
    """What both training-step rows hold: a batch x, the trained parameters, fused Adam (on CUDA), the evaluated net
    and its EMA copy."""
    res, C = model.net.img_resolution, model.net.in_channels
    x = torch.rand(B, C, res, res, device=device) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    net = getattr(model.net, "_orig_mod", model.net)             # the EMA copies the module, not its compiled form
    return x, params, opt, net, copy.deepcopy(net).requires_grad_(False)


def ict_step_fn(model, B: int, device, dtype=None, channels_last=False):
    """One iCT training step as cmfast-train runs it: loss (two forwards, pseudo-Huber), backward, the gradient norm
    (training.cuda_graph.grad_norm), the step's one host sync (loss and norm), Adam, the evaluation EMA update."""
    x, params, opt, net, ema = _step_parts(model, B, device, channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None), \
                precond.skip_value_checks():    # as cmfast-train's step: no mid-step host sync
            loss = ict_loss(model, x, num_scales=80).mean()
        loss.backward()
        gnorm = grad_norm(params)
        torch.stack([loss.detach().float(), gnorm.float()]).tolist()
        opt.step()
        ema_update_(ema, net, 0.9999)
    return step


def graphed_ict_step_fn(model, B: int, device, dtype=None, channels_last=False):
    """ict_step_fn's step as cmfast-train --cuda-graph runs it: the loss (80 levels), backward and gradient norm
    replayed as one CUDA graph (cmfast.training.cuda_graph.GraphedStep, captured at the first call, so in the
    warm-up), then the step's one host sync, Adam and the EMA update, eager as in the loop."""
    from cmfast.training.cuda_graph import GraphedStep
    from cmfast.training.methods import get_method
    method = get_method("ict")
    cfg = {"method_args": {**method.defaults, "s0": 79, "s1": 79, "schedule_steps": 1}, "total_steps": 1,
           "loss": "pseudo_huber", "sigma_min": model.sigma_min, "sigma_max": model.sigma_max, "grad_clip": 0.0}
    x, params, opt, net, ema = _step_parts(model, B, device, channels_last)
    graphed = GraphedStep(method, {"model": model}, cfg, params, dtype)

    def step():
        loss_sum, gnorm, _ = graphed(x, None, 0)
        torch.stack([loss_sum.float(), gnorm.float()]).tolist()
        opt.step()
        ema_update_(ema, net, 0.9999)
    return step


class Runner:
    def __init__(self, args, device, t_start: float | None = None):
        self.args, self.device, self.rows = args, device, []
        self.save = None                # set by main: writes the result JSON so far
        self.t0 = time.perf_counter()
        self.t_start = self.t0 if t_start is None else t_start     # --deadline-s counts from here (main's start)
        self.compile_s = 0.0            # seconds spent in compile rows so far: --budget-s is their time
        self.budget_ms = 100 if args.quick else (1000 if device.type == "cpu" else 500)

    def left_s(self) -> float:
        """What is left of --budget-s, the time for the compile rows: the seconds spent in compile rows so far are
        counted, not the rows between them (the training rows run between the sampling and training compile rows),
        nor the eager rows before them, whose first calls tune kernels on a cold machine (most of the first 126.6 s
        of the H200's session 4)."""
        left = self.deadline_left_s()
        if not self.args.budget_s:
            return left
        return min(left, self.args.budget_s - self.compile_s)

    def deadline_left_s(self) -> float:
        """What is left of --deadline-s, the whole run's wall time (inf without one). gpu_check.sh passes its step's
        time limit less a margin: rows that would run into the limit are skipped and the run ends with its JSON
        complete, where the limit's SIGINT would have cut it (complete: false, which make_tables.py does not show)."""
        deadline = getattr(self.args, "deadline_s", None)
        if deadline is None:
            return float("inf")
        return deadline - (time.perf_counter() - self.t_start)

    def row(self, task, preset, B, mode, backend, make, floor=None, compile_row=False, min_budget_ms=0,
            host=False):
        """Time one configuration; errors (OOM, a backend that cannot run) become the row's 'error'. min_budget_ms:
        the timer's budget at least this (a training step of ~300 ms needs ~1.5 s for 5 repetitions; with --quick's
        100 ms the H200's session-4 step rows were single timings). host: with --profile, also the host's profile
        (_harness.host_profile), for the training steps whose GPU waited on the host."""
        row = {"task": task, "preset": preset, "batch": B, "mode": mode, "backend": backend}
        if compile_row and self.left_s() < COMPILE_COST_S:
            row["skipped"] = f"time budget (--budget-s {self.args.budget_s}" + \
                (f", --deadline-s {self.args.deadline_s:g})" if getattr(self.args, "deadline_s", None) is not None
                 else ")")
        elif not compile_row and self.deadline_left_s() < ROW_COST_S:
            row["skipped"] = f"time limit (--deadline-s {self.args.deadline_s:g})"
        else:
            t_row = time.perf_counter()
            if compile_row:
                torch._dynamo.utils.counters.clear()
            try:
                fn = make()
                fn()                   # compile / capture / autotune here, outside the timed region
                fn()
                H.sync(self.device)
                row.update(H.time_ms(fn, self.device, max(self.budget_ms, min_budget_ms)))
                row["images_per_s"] = B / row["median_ms"] * 1e3
                if compile_row:
                    row["dynamo"] = dynamo_counts()
                if self.args.profile:
                    row["profile"] = H.kernel_profile(fn, self.device)
                    if "summed_ms_per_call" in row["profile"]:
                        row["profile"]["busy"] = row["profile"]["summed_ms_per_call"] / row["median_ms"]
                    if host:
                        row["host_profile"] = H.host_profile(fn, self.device)
            except Exception as e:  # noqa: BLE001 - a failed row is reported, the run goes on
                row["error"] = H.error_line(e)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if compile_row:
                    self.compile_s += time.perf_counter() - t_row
        if floor:
            row.update(floor)
            if "median_ms" in row:
                row["x_floor"] = row["median_ms"] / row["floor_ms"]
        self.rows.append(row)
        print(_line(row), flush=True)
        if self.save:
            self.save(complete=False)   # a run stopped at a time limit keeps every row measured so far
        return row


def dynamo_counts() -> dict:
    """What torch.compile made of a compile row (since its counters were cleared): graphs compiled, graph breaks
    and their reasons, so that a compile row no faster than eager says why."""
    c = torch._dynamo.utils.counters
    breaks = c.get("graph_break", {})
    return {"unique_graphs": c.get("stats", {}).get("unique_graphs", 0), "frames_ok": c.get("frames", {}).get("ok", 0),
            "graph_breaks": sum(breaks.values()),
            "break_reasons": [str(k)[:160] for k, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]]}


def _line(r: dict) -> str:
    what = f"{r['task']:<7} {r['preset']:<15} B={r['batch']:<5} {r['mode']:<34}"
    if "median_ms" in r:
        prof = r.get("profile", {})
        extra = f"  {prof['per_call']:6.0f} {'kernels' if 'kernel' in prof['what'] else 'ops'}, " \
                f"{prof['summed_ms_per_call']:.3f} ms summed" if "per_call" in prof else ""
        dyn = r.get("dynamo")
        extra += f"  dynamo: {dyn['unique_graphs']} graphs, {dyn['graph_breaks']} breaks" if dyn else ""
        return f"{what} {r['median_ms']:10.3f} ms {r['images_per_s']:12.1f} img/s{extra}"
    return f"{what} {r.get('error') or 'skipped: ' + r.get('skipped', '')}"


def sample_floor(model, B, ceil, count_fn) -> dict:
    """FLOPs counted at batch 1 (every op is per-sample linear) times B; bytes = weights in bf16 + noise in +
    image out (fp32), the traffic no implementation can avoid."""
    flops = count_fn() * B
    n_img = B * model.net.in_channels * model.net.img_resolution ** 2
    nbytes = sum(p.numel() for p in model.parameters()) * 2 + n_img * 8
    return {"flops": flops, "bytes": nbytes, "floor_ms": H.floor_ms(flops, nbytes, ceil)}


def train_floor(model, B, ceil, step) -> dict:
    """FLOPs of the whole step counted (two forwards, backward); bytes = the per-parameter fp32 traffic after the
    backward: the gradient norm (read g), Adam (read w, g, m, v; write w, m, v), the EMA (read w, ema; write ema)."""
    flops = H.count_flops(step, next(model.parameters()).device)
    nbytes = sum(p.numel() for p in model.parameters()) * 4 * (1 + 7 + 3)
    return {"flops": flops, "bytes": nbytes, "floor_ms": H.floor_ms(flops, nbytes, ceil)}


def plan(args, device):
    """(presets, sampling batches, sampling modes, training batches, training modes) for this run."""
    if device.type == "cpu":
        return args.presets or ["tiny", "fmnist-small"], args.batches or [1, 8], ["eager-fp32", "cmfast"], [], []
    presets = args.presets or (["ddpmpp-cifar10"] if args.quick else ["ddpmpp-cifar10", "ddpmpp-64", "adm-imagenet64"])
    if args.quick:   # the sizes of the sampler issue's goals: batch 1 and 256, the CT step at 256 (and HOST_BOUND)
        return (presets, args.batches or [1, 256],
                ["eager-fp32", "eager-bf16", "cmfast", "cmfast-auto", "compile-reduce-overhead"],
                [256], ["eager-bf16", "cmfast", "cmfast-auto", "cmfast-graph", "compile"])
    modes = ["eager-fp32", "eager-bf16", "cmfast", "cmfast-auto", "compile-max-autotune-no-cudagraphs",
             "compile-reduce-overhead"]
    return (presets, args.batches or [1, 8, 64, 256, 1024], modes, [128, 256],
            ["eager-bf16", "cmfast", "cmfast-graph", "compile"])


def cmfast_backend(mode: str) -> str:
    """'cmfast': the Triton kernels by name; 'cmfast-auto': the measured per-op choice (ops/auto_table.json)."""
    return "auto" if mode in ("cmfast-auto", "cmfast-graph") else os.environ.get("CMFAST_BENCH_BACKEND", "triton")


def run_sampling(r: Runner, preset: str, batches, modes, ceil) -> None:
    dev = r.device
    model = _model(preset, dev)
    shape = (model.net.in_channels, model.net.img_resolution, model.net.img_resolution)
    try:
        with ops.use_backend("torch"):
            flops1 = H.count_flops(one_step_fn(model, 1, dev), dev)
    except Exception as e:  # noqa: BLE001 - the rows below then report the error themselves
        print(f"{preset}: flop count failed: {type(e).__name__}: {e}", file=sys.stderr)
        flops1 = None
    model_cl = _model(preset, dev).to(memory_format=torch.channels_last)
    bf16 = torch.bfloat16 if dev.type == "cuda" else None
    for B in batches:
        floor = sample_floor(model, B, ceil, lambda: flops1) if flops1 is not None else None
        for mode in modes:
            if mode == "eager-fp32":
                make = lambda: with_backend("torch", one_step_fn(model, B, dev))
                r.row("sample", preset, B, mode, "torch", make, floor)
            elif mode == "eager-bf16":
                make = lambda: with_backend("torch", one_step_fn(model_cl, B, dev, bf16, channels_last=True))
                r.row("sample", preset, B, mode, "torch", make, floor)
            elif mode.startswith("cmfast") and dev.type == "cpu":
                # No CUDA graph on CPU: the library path (cmfast.sample, auto backend = torch on CPU).
                make = lambda: (lambda: cmfast.sample(model, torch.randn(B, *shape)).clamp_(-1, 1))
                r.row("sample", preset, B, mode, "auto", make, floor)["note"] = \
                    "CPU: cmfast.sample, no CUDA graph; the auto backend is torch on CPU"
            elif mode.startswith("cmfast"):
                backend = cmfast_backend(mode)

                def make(backend=backend):
                    with ops.use_backend(backend):
                        sampler = cmfast.GraphedSampler(model, B, shape, torch.bfloat16)
                        sampler.capture()
                    return with_backend(backend, sampler)
                r.row("sample", preset, B, mode, backend, make, floor)
            elif mode.startswith("compile-"):
                def make(cmode=mode.removeprefix("compile-")):
                    torch._dynamo.reset()
                    fn = with_backend("torch", one_step_fn(model_cl, B, dev, bf16, channels_last=True))
                    fn()               # loads the backend module eagerly: no graph break at its import
                    return with_backend("torch", torch.compile(
                        one_step_fn(model_cl, B, dev, bf16, channels_last=True), mode=cmode, dynamic=False))
                r.row("sample", preset, B, mode, "torch", make, floor, compile_row=True)
    del model, model_cl
    torch._dynamo.reset()


def run_training(r: Runner, preset: str, batches, modes, ceil) -> None:
    dev = r.device
    for B in batches:
        floor = None
        for mode in modes:
            model = _model(preset, dev).train().to(memory_format=torch.channels_last)
            backend = "torch" if mode in ("eager-bf16", "compile") else cmfast_backend(mode)
            if mode == "compile":
                torch._dynamo.reset()
                with_backend("torch", ict_step_fn(model, 2, dev, torch.bfloat16, True))()   # eager warm-up
                model.net = torch.compile(model.net, dynamic=False)
            make = graphed_ict_step_fn if mode == "cmfast-graph" else ict_step_fn
            step = with_backend(backend, make(model, B, dev, torch.bfloat16, channels_last=True))
            if floor is None:
                try:
                    with ops.use_backend("torch"):
                        floor = train_floor(model, B, ceil, step)
                except Exception as e:  # noqa: BLE001
                    print(f"flop count failed: {type(e).__name__}: {e}", file=sys.stderr)
            r.row("ict", preset, B, mode, backend, lambda: step, floor, compile_row=mode == "compile",
                  min_budget_ms=TRAIN_BUDGET_MS, host=True)
            del model, step
            torch._dynamo.reset()


def add_ratios(rows: list[dict], reference: str) -> None:
    """speedup_vs[ref] = t(ref) / t(row) for the reference eager mode and the best torch.compile of the same
    task, preset and batch (> 1: the row is faster)."""
    for r in rows:
        if "median_ms" not in r:
            continue
        peers = [p for p in rows if "median_ms" in p and (p["task"], p["preset"], p["batch"]) ==
                 (r["task"], r["preset"], r["batch"])]
        sp = {}
        ref = [p for p in peers if p["mode"] == reference]
        if ref:
            sp[reference] = ref[0]["median_ms"] / r["median_ms"]
        comp = [p["median_ms"] for p in peers if p["mode"].startswith("compile")]
        if comp:
            sp["best-compile"] = min(comp) / r["median_ms"]
        r["speedup_vs"] = sp


def print_table(rows: list[dict], reference: str) -> None:
    print(f"\n{'task':<7} {'preset':<15} {'B':>5} {'mode':<34} {'median ms':>10} {'img/s':>11} "
          f"{'vs ' + reference:>15} {'vs best compile':>15} {'x floor':>8}")
    for r in rows:
        head = f"{r['task']:<7} {r['preset']:<15} {r['batch']:>5} {r['mode']:<34}"
        if "median_ms" not in r:
            print(f"{head} {r.get('error') or 'skipped: ' + r.get('skipped', '')}")
            continue
        sp = r.get("speedup_vs", {})
        f = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
        print(f"{head} {r['median_ms']:10.3f} {r['images_per_s']:11.1f} {f(sp.get(reference)):>15} "
              f"{f(sp.get('best-compile')):>15} {f(r.get('x_floor')):>8}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="throughput.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about 3 minutes on an H100: fewer sizes and modes")
    p.add_argument("--cpu", action="store_true", help="run on CPU (default when no CUDA device is present)")
    p.add_argument("--presets", nargs="+", help="network presets (default: ddpmpp-cifar10 ddpmpp-64 adm-imagenet64, "
                   "the last the CM paper's ImageNet 64 network, unconditional here; --quick: ddpmpp-cifar10; "
                   "CPU: tiny fmnist-small)")
    p.add_argument("--batches", nargs="+", type=int, help="sampling batch sizes (default: 1 8 64 256 1024; --quick: "
                   "1 256; CPU: 1 8)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the compile rows (the time spent in "
                   "them): a row that would start with under 60 s left is skipped (default 240 with --quick)")
    p.add_argument("--deadline-s", type=float, default=None, help="the whole run's wall-clock seconds (from the "
                   "start of main): compile rows need 60 s of it left, other rows 20 s, or they are skipped, so the "
                   "run ends complete inside a time limit (gpu_check.sh passes its step's limit less a margin)")
    p.add_argument("--threads", type=int, default=1, help="CPU runs: torch threads (default 1: on a shared "
                   "machine more threads than free cores make every op wait on the slowest)")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/<device>-<date>.json)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip each row's kernel profile (torch.profiler over 5 calls: kernel count, time per family)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.budget_s is None and args.quick:
        args.budget_s = 240.0
    if args.batches and any(b <= 0 for b in args.batches):
        print("throughput.py: error: --batches: expected positive ints", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = H.environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']}", flush=True)
    ceil = H.ceilings(device, args.quick)
    print(f"ceilings: {ceil['matmul_tflops']:.3g} TFLOP/s {ceil['matmul_dtype']} matmul, "
          f"{ceil['copy_gb_per_s']:.0f} GB/s copy", flush=True)
    r = Runner(args, device, t_start)
    reference = "eager-bf16" if device.type == "cuda" else "eager-fp32"

    def save(complete: bool) -> dict:
        add_ratios(r.rows, reference)
        result = {"benchmark": "throughput", "schema": 1, **env, "quick": args.quick, "complete": complete,
                  "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "threads": torch.get_num_threads(),
                  "reference_mode": reference, "ceilings": ceil, "wall_s": round(time.perf_counter() - r.t0, 1),
                  "rows": r.rows}
        if complete or args.out:     # partial results only where asked (--out): the default path is the final one
            H.write_result(result, args.out, f"{env['device_slug']}-{env['date'][:10]}.json", quiet=not complete)
        return result

    r.save = save
    presets, batches, modes, tbatches, tmodes = plan(args, device)
    # The sampling rows, eager and cmfast first, then torch.compile's; then the training steps, compiled last, so a
    # time budget (--budget-s, --deadline-s) drops the costly compile rows rather than the cheap ones. The sampling
    # compile rows come before the training rows: with them after (as until the fifth H200 session) the H200's
    # sessions 4 and 5 never measured them, the training rows having used the time (the sampler goals need them).
    compiled = [m for m in modes if m.startswith("compile")]
    for preset in presets:
        run_sampling(r, preset, batches, [m for m in modes if m not in compiled], ceil)
    for preset in presets if compiled else []:
        run_sampling(r, preset, batches, compiled, ceil)
    if not args.no_train:
        for preset in presets:
            run_training(r, preset, tbatches, [m for m in tmodes if m != "compile"], ceil)
        if args.quick and device.type == "cuda" and not args.presets:
            run_training(r, HOST_BOUND[0], [HOST_BOUND[1]], HOST_BOUND[2], ceil)
    for preset in presets if "compile" in tmodes and not args.no_train else []:
        run_training(r, preset, tbatches, ["compile"], ceil)
    add_ratios(r.rows, reference)
    print_table(r.rows, reference)
    result = save(complete=True)
    print(f"({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
