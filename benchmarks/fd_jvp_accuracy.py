"""How accurate is the finite-difference JVP, per (precision, eps, order), and what does it cost? Chooses fd_jvp's
default.

For a network F (default: DDPM++ CIFAR-10 on a GPU, the tiny preset on CPU) in the TrigFlow setting of sCT
(fn(x_t, t) = F(x_t / sd, t), tangent (dx_t/dt, 1), t drawn as in training), it tabulates the relative error
||J_fd - J|| / ||J|| of cmfast.fd_jvp against an fp64 torch.func.jvp, for each precision of the two forwards
(fp64, fp32 with TF32 off, tf32, fp16, bf16) and each relative step eps (h = eps * max(t, 1e-3)) of the 2-point
central difference (order 2, one forward of 2B), plus the 4-point stencil (order 4, one forward of 4B, truncation
O(h^4)) at the larger steps it suits (--order4-eps) in the cheap precisions (--order4-precisions), beside the error
of torch.func.jvp itself in fp32 / tf32 / bf16, with the time of each (median, CUDA events on GPU). It writes
one JSON (benchmarks/results/fd_jvp_accuracy-<device>.json; every row records its order) and names the
recommended setting: the fastest fd (precision, order) whose best eps is at most as wrong as torch.func.jvp in
bf16 (what a bf16 sCM run with a JVP kernel accepts), with 1e-3 as the bar when that is lower, and that eps.

    python benchmarks/fd_jvp_accuracy.py                     # GPU: DDPM++ CIFAR-10, batch 32
    python benchmarks/fd_jvp_accuracy.py --cpu               # CPU: tiny preset, fp64 / fp32 / bf16 (+ order 4:
                                                             #      fp32, bf16)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import cmfast  # noqa: E402
from cmfast import ops  # noqa: E402
from cmfast.jvp import exact_jvp, fd_jvp, fp64_call  # noqa: E402
from cmfast.trigflow import sample_time  # noqa: E402

EPS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# The 4-point stencil's steps: its O(h^4) truncation allows larger h, where the rounding noise of tf32 / fp16 / bf16
# (~ u |F| / h) is smaller. On the H200 2-point table (DDPM++ CIFAR-10) tf32's rounding was ~1.6e-3 / eps, the
# 2-point truncation ~7.6 eps^2; 4 precisions x 5 steps keep the script within ~100 s there (45 s before).
EPS4 = (0.03, 0.1, 0.15, 0.2, 0.3)


def activate(net: torch.nn.Module, seed: int) -> None:
    """EDM zero-initializes the last conv of every residual branch (init_weight=1e-5): the untrained net is then
    nearly linear and its JVP unrepresentatively easy. Give those convs ordinary Xavier weights instead."""
    g = torch.Generator().manual_seed(seed)
    for name, m in net.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() == 4 and float(w.detach().abs().max()) < 1e-3:
            fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
            with torch.no_grad():
                w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * math.sqrt(6 / (fan_in + fan_out)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on CPU (tiny preset, fp64/fp32/bf16 only)")
    p.add_argument("--preset", default=None, help="network preset (default ddpmpp-cifar10 on GPU, tiny on CPU)")
    p.add_argument("--weights", default=None, help="a cmfast-train run dir / checkpoint: measure a trained net")
    p.add_argument("--res", type=int, default=None, help="image size (default: the preset's; CPU: 16)")
    p.add_argument("--batch", type=int, default=None, help="batch (default 32 GPU, 4 CPU)")
    p.add_argument("--precisions", default=None, help="comma list (default fp64,fp32,tf32,fp16,bf16; CPU fp64,fp32,bf16)")
    p.add_argument("--eps", default=",".join(map(str, EPS)), help="relative steps to try (2-point)")
    p.add_argument("--order4-precisions", default=None,
                   help="precisions of the 4-point rows, comma list, '' for none "
                        "(default tf32,fp16,bf16; CPU fp32,bf16)")
    p.add_argument("--order4-eps", default=",".join(map(str, EPS4)), help="relative steps of the 4-point rows")
    p.add_argument("--budget-ms", type=float, default=300.0, help="timing budget per row")
    p.add_argument("--backend", default="auto", help="cmfast.ops backend of the fd forwards (auto/torch/triton)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fd_jvp_accuracy-<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    cpu = device.type == "cpu"
    preset = a.preset or ("tiny" if cpu else "ddpmpp-cifar10")
    B = a.batch or (4 if cpu else 32)
    precisions = (a.precisions or ("fp64,fp32,bf16" if cpu else "fp64,fp32,tf32,fp16,bf16")).split(",")
    eps_list = [float(e) for e in a.eps.split(",")]
    order4 = [q for q in (a.order4_precisions if a.order4_precisions is not None
                          else ("fp32,bf16" if cpu else "tf32,fp16,bf16")).split(",") if q]
    eps4 = [float(e) for e in a.order4_eps.split(",") if e]
    torch.manual_seed(a.seed)
    if a.weights:
        from cmfast.training import load_model
        net = load_model(a.weights, which="ema")[0].net
        res = net.img_resolution
    else:
        over = {"img_resolution": a.res or (16 if cpu else None)}
        over = {k: v for k, v in over.items() if v}
        if "img_resolution" in over and preset == "tiny":
            over["attn_resolutions"] = (over["img_resolution"] // 2,)
        net = cmfast.UNet.from_preset(preset, **over)
        activate(net, a.seed)
        res = net.img_resolution
    net = net.to(device).eval()   # eval: no dropout (the masks are shared anyway; see tests/test_fd_jvp.py)

    # TrigFlow inputs as in sCT training: x_t = cos t x0 + sin t z, tangent (cos t z - sin t x0, 1).
    g = torch.Generator(device).manual_seed(a.seed)
    sd = 0.5
    C = net.in_channels
    x0 = (torch.randn(B, C, res, res, generator=g, device=device) * 0.5).clamp(-1, 1)
    z = torch.randn(B, C, res, res, generator=g, device=device) * sd
    t = sample_time(B, sd, generator=g, device=device)
    cos, sin = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    primals, tangents = (cos * x0 + sin * z, t), (cos * z - sin * x0, torch.ones_like(t))
    fn = lambda x, s: net(x / sd, s)  # noqa: E731
    net64 = fp64_call(net)
    fn64 = lambda x, s: net64(x / sd, s)  # noqa: E731

    _, truth = exact_jvp(fn64, primals, tangents, precision="fp64")
    rows = []

    def row(kind, precision, eps, order, call):
        out = call()
        err = rel(out, truth)
        per = ((out.double() - truth.double()).flatten(1).norm(dim=1) / truth.double().flatten(1).norm(dim=1))
        timing = H.time_ms(call, device, a.budget_ms)
        r = {"method": kind, "precision": precision, "eps": eps, "order": order, "rel_error": err,
             "rel_error_median_sample": float(per.median()), "rel_error_max_sample": float(per.max()),
             "time_ms": timing["median_ms"], "timing": timing}
        rows.append(r)
        o = f"o{order}" if order else ""
        print(f"{kind:6s} {precision:5s} {o:2s} eps={eps if eps is not None else '-':<7} rel.err {err:9.2e} "
              f"(worst sample {r['rel_error_max_sample']:8.2e})  {timing['median_ms']:8.2f} ms", flush=True)

    def fd_rows(prec, order, steps):
        f = fn64 if prec == "fp64" else fn
        for eps in steps:
            row("fd", prec, eps, order, lambda f=f, eps=eps, prec=prec:
                fd_jvp(f, primals, tangents, eps, relative_to=t, precision=prec, order=order)[1])

    with ops.use_backend(a.backend):
        for prec in precisions:
            fd_rows(prec, 2, [1e-6, 1e-5, 1e-4] if prec == "fp64" else eps_list)
        for prec in order4:
            fd_rows(prec, 4, eps4)
    for prec in [q for q in ("fp32", "tf32", "bf16") if q in precisions or q == "fp32"]:
        if cpu and prec == "tf32":
            continue
        row("exact", prec, None, None, lambda prec=prec: exact_jvp(fn, primals, tangents, precision=prec)[1])

    # The cost of an fd row depends on its precision and order only (one forward of order * B; eps is a number in
    # it), so: the fastest (precision, order) whose best eps meets the bar, then that eps. The bar: torch.func.jvp's
    # own error in bf16, or 1e-3 if that is lower.
    bar = next((r["rel_error"] for r in rows if r["method"] == "exact" and r["precision"] == "bf16"), None)
    bar = max(bar or 0.0, 1e-3)
    settings = {}
    for r in rows:
        if r["method"] == "fd" and r["precision"] != "fp64":
            q = settings.setdefault((r["precision"], r["order"]), {"time_ms": r["time_ms"], "best": r})
            q["time_ms"] = min(q["time_ms"], r["time_ms"])
            q["best"] = min(q["best"], r, key=lambda u: u["rel_error"])
    ok = [q for q in settings.values() if q["best"]["rel_error"] <= bar]
    pick = min(ok, key=lambda q: q["time_ms"]) if ok else min(settings.values(), key=lambda q: q["best"]["rel_error"])
    best = dict(pick["best"], time_ms=pick["time_ms"])
    result = {"env": H.environment(device), "preset": preset, "weights": a.weights or "random (activated)",
              "batch": B, "resolution": res, "backend": a.backend, "error_bar": bar,
              "recommended": {"precision": best["precision"], "eps": best["eps"], "order": best["order"],
                              "rel_error": best["rel_error"], "time_ms": best["time_ms"], "meets_bar": bool(ok)},
              "settings": [{"precision": p_, "order": o_, "time_ms": q["time_ms"], "best_eps": q["best"]["eps"],
                            "rel_error": q["best"]["rel_error"], "meets_bar": q["best"]["rel_error"] <= bar}
                           for (p_, o_), q in sorted(settings.items(), key=lambda kv: kv[1]["time_ms"])],
              "rows": rows}
    for q in result["settings"]:
        print(f"setting {q['precision']:5s} order {q['order']}: best eps {q['best_eps']:<6} rel.err "
              f"{q['rel_error']:9.2e} {'meets' if q['meets_bar'] else 'misses'} the bar  {q['time_ms']:8.2f} ms")
    print(f"recommended: precision={best['precision']} eps={best['eps']} order={best['order']} "
          f"(rel.err {best['rel_error']:.2e}, bar {bar:.1e}{'' if ok else '; NONE meets the bar: the most accurate'})")
    H.write_result(result, a.out, f"fd_jvp_accuracy-{H.device_slug(device)}.json")
    return result


if __name__ == "__main__":
    main()
