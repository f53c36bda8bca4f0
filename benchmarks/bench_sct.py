"""One training step of continuous-time consistency training (sCT) against the discrete one: time and peak memory.

Rows, each a full step (zero_grad, loss, backward, Adam step) of DDPM++ CIFAR-10 at batch 128 and 256, the online
forward under bf16 autocast (cmfast-train --precision bf16), side by side in one process:
  ict            discrete consistency training (iCT: online forward with grad + target forward, pseudo-Huber)
  sct-fd         sCT, dF/dt by cmfast.fd_jvp (one no-grad forward of 2B in fd_jvp's default precision), the
                 fused tangent loss; cmfast.ops backend 'auto' (the fused kernels where measured faster)
  sct-fd-triton  the same with every cmfast.ops op on the Triton backend (fused attention, GroupNorm, loss)
  sct-fd-tf32 / sct-fd-bf16   the finite difference's forwards in TF32 / bf16 (cheaper, less accurate: see
                 benchmarks/fd_jvp_accuracy.py)
  sct-fd4-tf32 / sct-fd4-fp16  the 4-point stencil (fd_jvp order=4: one no-grad forward of 4B, truncation O(h^4))
                 in TF32 / fp16 at eps --fd4-eps (default FD4_EPS). The step's time does not depend on eps (one
                 forward of 4B whatever h is): pair these times with the eps that fd_jvp_accuracy.py picks.
  sct-exact      sCT with torch.func.jvp (forward-mode AD: torch backend, math attention)
Times: median of triton.testing.do_bench (CUDA events) after warm-up; memory: torch.cuda.max_memory_allocated
over one step. Ratios are to the ict row of the same batch. JSON: benchmarks/results/bench_sct-<device>.json.

    python benchmarks/bench_sct.py                 # GPU
    python benchmarks/bench_sct.py --cpu-smoke     # CPU: tiny preset, 16x16, batch 4 (checks that it runs)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import cmfast  # noqa: E402
from cmfast import objectives, ops, precond  # noqa: E402
from cmfast.jvp import DEFAULT_EPS, DEFAULT_ORDER, DEFAULT_PRECISION  # noqa: E402
from cmfast.trigflow import TrigFlowModel, sct_loss  # noqa: E402

# eps of the sct-fd4-* rows: a guess from the H200 2-point table (tf32 rounding ~1.6e-3 / eps); the time is the same
# at any eps, so --fd4-eps only makes the rows' loss match the setting that fd_jvp_accuracy.py recommends.
FD4_EPS = 0.1

# name -> (method, backend, sct_loss keyword arguments)
ROWS = {
    "ict": ("ict", "auto", {}),
    "sct-fd": ("sct", "auto", dict(jvp="fd")),
    "sct-fd-triton": ("sct", "triton", dict(jvp="fd")),
    "sct-fd-tf32": ("sct", "auto", dict(jvp="fd", precision="tf32")),
    "sct-fd-bf16": ("sct", "auto", dict(jvp="fd", precision="bf16", eps=0.1)),
    "sct-fd4-tf32": ("sct", "auto", dict(jvp="fd", precision="tf32", order=4, eps=FD4_EPS)),
    "sct-fd4-fp16": ("sct", "auto", dict(jvp="fd", precision="fp16", order=4, eps=FD4_EPS)),
    "sct-exact": ("sct", "torch", dict(jvp="exact")),
}


def row_kwargs(name: str, fd4_eps: float = FD4_EPS) -> dict:
    """sct_loss's keyword arguments of a row, the sct-fd4-* rows at eps fd4_eps."""
    kw = dict(ROWS[name][2])
    if kw.get("order") == 4:
        kw["eps"] = fd4_eps
    return kw


def make_step(name: str, preset: str, res: int, B: int, device: torch.device, autocast, fd4_eps: float = FD4_EPS):
    method, backend, _ = ROWS[name]
    kw = row_kwargs(name, fd4_eps)
    torch.manual_seed(0)
    over = {"img_resolution": res, "attn_resolutions": (res // 2,)} if preset == "tiny" else {}
    net = cmfast.UNet.from_preset(preset, **over).to(device).train()
    model = (TrigFlowModel(net) if method == "sct" else cmfast.ConsistencyModel(net)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    x = (torch.rand(B, net.in_channels, res, res, device=device) * 2 - 1)
    gen = torch.Generator(device).manual_seed(0)
    step = {"i": 0}

    def run():
        opt.zero_grad(set_to_none=True)
        with ops.use_backend(backend), (torch.autocast(device.type, autocast) if autocast
                                        else contextlib.nullcontext()), precond.skip_value_checks():  # as cmfast-train
            if method == "sct":
                loss = sct_loss(model, x, step=step["i"], generator=gen, **kw)
            else:
                loss = objectives.ict_loss(model, x, num_scales=1281, generator=gen)
            loss.float().mean().backward()
        opt.step()
        step["i"] += 1
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU, 16x16, batch 4")
    p.add_argument("--batches", default=None, help="comma list (default 128,256; smoke 4)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--budget-ms", type=float, default=None, help="timing budget per row (default 2000; smoke 200)")
    p.add_argument("--fd4-eps", type=float, default=FD4_EPS,
                   help=f"relative step of the sct-fd4-* rows (default {FD4_EPS}; the time does not depend on it)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_sct-<device>.json)")
    a = p.parse_args(argv)

    smoke = a.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    preset, res = ("tiny", 16) if smoke else ("ddpmpp-cifar10", 32)
    batches = [int(b) for b in (a.batches or ("4" if smoke else "128,256")).split(",")]
    budget = a.budget_ms or (200.0 if smoke else 2000.0)
    autocast = None if smoke else torch.bfloat16
    rows = [r for r in a.rows.split(",") if r]
    if unknown := set(rows) - set(ROWS):
        p.error(f"unknown rows {sorted(unknown)}; expected some of {', '.join(ROWS)}")
    if smoke and "sct-fd-triton" in rows and not __import__("os").environ.get("TRITON_INTERPRET") == "1":
        rows.remove("sct-fd-triton")   # Triton on CPU only under the interpreter

    env = H.environment(device)

    def result(rows_done: list, complete: bool) -> dict:
        return {"env": env, "preset": preset, "resolution": res, "smoke": smoke, "complete": complete,
                "autocast": str(autocast).removeprefix("torch.") if autocast else "fp32", "rows": rows_done}

    results = []
    for B in batches:
        base = None
        for name in rows:
            kw, sct = row_kwargs(name, a.fd4_eps), ROWS[name][0] == "sct"
            fd = sct and kw.get("jvp") == "fd"
            row = {"row": name, "batch": B, "fd_precision": kw.get("precision", DEFAULT_PRECISION) if sct else None,
                   "fd_order": kw.get("order", DEFAULT_ORDER) if fd else None,
                   "fd_eps": kw.get("eps", DEFAULT_EPS) if fd else None, "backend": ROWS[name][1]}
            try:
                run = make_step(name, preset, res, B, device, autocast, a.fd4_eps)
                run()                                   # compile / autotune / allocate outside the timing
                H.sync(device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    run()
                    H.sync(device)
                    row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
                t = H.time_ms(run, device, budget)
                row.update(time_ms=t["median_ms"], timing=t, img_per_s=B / t["median_ms"] * 1e3)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:   # a row that cannot run here says why; the others still run
                row["error"] = H.error_line(e)
            if name == "ict" and "time_ms" in row:
                base = row
            if base and "time_ms" in row:
                row["time_vs_ict"] = row["time_ms"] / base["time_ms"]
                if "peak_mem_mb" in row:
                    row["mem_vs_ict"] = row["peak_mem_mb"] / base["peak_mem_mb"]
            results.append(row)
            msg = row.get("error") or (f"{row['time_ms']:9.2f} ms  {row['img_per_s']:8.1f} img/s  x{row.get('time_vs_ict', 1):.2f}"
                                       + (f"  {row['peak_mem_mb']:8.0f} MB" if "peak_mem_mb" in row else ""))
            print(f"B={B:<4d} {name:14s} {msg}", flush=True)
            if a.out:           # a run stopped at a time limit keeps the rows measured so far
                H.write_result(result(results, False), a.out, "", quiet=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    out = result(results, True)
    H.write_result(out, a.out, f"bench_sct-{H.device_slug(device)}.json")
    return out


if __name__ == "__main__":
    main()
