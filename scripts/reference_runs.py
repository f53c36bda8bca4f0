"""The reference runs (issue: reference runs and a shipped model): on Fashion-MNIST, train an EDM teacher, CD from
it, CT, iCT and sCT, score each with FD-FMNIST (teacher: EDM Heun, 18 steps = 35 evaluations; the consistency
models at 1 and 2 steps, 2 steps at the default levels (80, 0.821) and at the second level a search on other samples
finds) and write one results JSON that benchmarks/make_tables.py turns into the README table.

    python scripts/reference_runs.py --profile gpu   --out runs/ref          # one GPU job, at most ~7 minutes
    python scripts/reference_runs.py --profile cpu   --out runs/ref-cpu      # the tiny net on a CPU, about 1.5 hours
    python scripts/reference_runs.py --profile smoke --out /tmp/ref          # a few minutes: checks the pipeline only

Everything runs in this one process (one import of torch; the training runs through cmfast-train's own main, so
each run's exact command is recorded and can be rerun by hand). The runs pass --resume auto: rerunning the script
continues unfinished runs and rescores finished ones. Each training run is capped by --time-limit, so a
slower device ends a run early (with a checkpoint; the JSON records the steps reached) instead of overrunning; in
the gpu and smoke profiles each run plans its own length to fit inside the cap (--time-budget), so a slower device
runs fewer steps of a complete curriculum instead.
A run that fails is recorded with its error and the others go on; CD is skipped when the teacher failed.

--parallel (gpu_check.sh's reference stage) trains the teacher first, alone, then CD, CT, iCT and sCT side by side,
one process each (this script again, with --only); see PARALLEL_CAPS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import _harness as H  # noqa: E402  (the results' device naming, shared with the benchmarks)

# Per profile: the network, the batch, the steps and the time cap (minutes) of each method, the eval size, and the
# search of the 2-step level (see search_two_step). CT uses the l2 distance and CD iCT's pseudo-Huber (METHOD_ARGS; the
# paper's LPIPS needs ImageNet VGG weights, and Fashion-MNIST is 1-channel); iCT its pseudo-Huber, sCT its own loss. CT's target is the online
# network (mu0 = 0, as iCT found best): with the paper's EMA target (mu0 = 0.9) 600 CPU steps collapse to one constant
# image (FD-FMNIST 190), with mu0 = 0 they reach 10.4 (benchmarks/results/ct_target_ema-cpu.json).
#
# gpu: sized from the two GPU runs, both on an H200 with the same time caps (5.5 min of training in all):
# - benchmarks/results/reference_runs-gpu-nvidia-h200.json (GPU_MEASURED): batch 256, fixed step counts, every run
#   stopped by its cap early in its curriculum, at steps edm 1618, cd 520, ct 654, ict 703, sct 568 (59-127 ms a
#   step). FD-FMNIST 1 / 2 steps: cd 7.69 / 8.61, ct 9.63 / 19.09, ict 7.02 / 4.21, sct 12.68 / 7.23; teacher 1.20.
#   Peak memory 3.1-3.9 GiB. The shipped model (cmfast/assets/fmnist.*) is that run's iCT.
# - reference_runs-gpu-b1024-nvidia-h200.json (GPU_MEASURED_B1024): batch 1024, each run's steps planned by
#   --time-budget. The step was not host-bound at that batch, as the first run had suggested: 100-185 ms, 1.4-1.7x the
#   batch-256 step, so every run made about half the steps (edm 819, cd 303, ct 424, ict 379, sct 333). FD-FMNIST
#   1 / 2 steps: cd 10.05 / 8.86, ct 8.45 / 13.45, ict 7.92 / 10.26, sct 9.46 / 26.12; teacher 1.51. Better than the
#   first run only for CT and sCT at 1 step (sCT's warm-up now ends inside the run).
# So the profile is back at batch 256, with the steps still planned by each run (budget mode, below): the one
# combination not measured yet, batch 256's step count with curricula that complete. The stage's worst case, every
# run at its cap: 330 s of training + 28 s of start-ups and scores + ~24 s of 2-step searches (search_two_step) +
# ~7 s of interpreter and export = ~390 s of gpu_check.sh's 440 (tests/test_reference_runs.py checks it from
# GPU_MEASURED); the batch-1024 stage took 353 s. Learning rate 1e-3 (RAdam, no warm-up): batch 256 trained stably
# with it. EMA 0.999: the loop's EMA warm-up min(rate, (1 + k) / (10 + k)) stays below 0.999 until step 8990, so at
# these lengths the EMA spans about the last 1/9 of the steps.
#
# iCT's curriculum in the gpu profile spans 5.7x the run (ict_schedule_mult; cmfast-train --method-arg
# schedule_mult), so a run covers its start as the first H200 run did (703 of 4000 steps, N 11 to 21): that run's iCT
# scored 7.02 / 4.21 at 1 / 2 steps against 7.92 / 10.26 with the curriculum complete at batch 1024. On CPU (tiny net,
# 600 steps, seeds 0-2; benchmarks/results/schedule_steps-cpu.json) the short curriculum gave 1-step 12.6-13.7 and
# 2-step 11.6-12.7 at 0.821, the complete one 9.3-16.5 and 10.5-46.1: the same mean at 1 step, steadier and on
# average better at 2. CT showed no such gain on CPU (seed 0: 10.85 / 15.97 against 10.40 / 17.39), so its
# curriculum still spans the run.
#
# Budget mode (budget=True; gpu and smoke): the steps are not fixed here but planned by each run from its own speed
# (cmfast-train --time-budget, 0.95 of the cap: the plan fills 0.95 of that, about 90% of the cap), so every
# curriculum completes on a machine of any speed; the H100 of the second GPU session timed the eager batch-1
# sampler 1.6x slower than the H200 of the first (37.3 against 22.7 ms; the code changed in between too), so a step
# count sized on one would not fit the other. --time-limit stays the cap. The steps in `runs` are then None; the
# results JSON records each run's plan.
BUDGET_FILL = 0.95
PROFILES = {
    "gpu": dict(preset="fmnist-small", batch=256, precision="bf16", ema="0.999", num=10000, eval_batch=1000,
                runs={"edm": (None, 1.6), "cd": (None, 1.1), "ct": (None, 0.9), "ict": (None, 0.9),
                      "sct": (None, 1.0)},
                budget=True, log_every=25, search=dict(num=5000, iters=5, seed=1), ict_schedule_mult=5.7),
    "cpu": dict(preset="tiny", batch=32, precision="fp32", ema="0.999", num=2000, eval_batch=250,
                runs={"edm": (1000, 20.0), "cd": (500, 15.0), "ct": (600, 12.0), "ict": (600, 12.0),
                      "sct": (500, 12.0)},
                search=dict(num=1000, iters=5, seed=1)),
    "smoke": dict(preset="tiny", batch=8, precision="fp32", ema="0.9", num=200, eval_batch=100,
                  # 3 s of planned training inside a 120 s cap: a loaded machine (tests run beside other work)
                  # still ends each run on its plan (a 12 s cap, then a 36 s one, struck before the 10-step probe
                  # ended under load: start-up counts against the cap); the cap only stops a run that hangs
                  runs={m: (None, 2.0) for m in ("edm", "cd", "ct", "ict", "sct")}, budget_fill=1 / 40,
                  budget=True, log_every=5, search=dict(num=100, iters=1, seed=1)),
}
# The GPU runs (benchmarks/results) that size the gpu profile; the tests check it against them.
GPU_MEASURED = "reference_runs-gpu-nvidia-h200.json"
GPU_MEASURED_B1024 = "reference_runs-gpu-b1024-nvidia-h200.json"
GPU_MEASURED_PARALLEL = "reference_runs-gpu-s31-nvidia-h200.json"    # the first --parallel set on a GPU (session 5)
# CD's distance: pseudo-Huber with iCT's 1 / (t_{n+1} - t_n) weighting, not l2. CPU, tiny net, batch 32, 500 steps from
# one EDM teacher (1000 steps), FD-FMNIST of 2000 samples, seeds 0 / 1 (benchmarks/results/cd_loss-cpu.json):
# l2 1-step 11.56 / 13.84, 2-step 10.72 / 12.99; pseudo-Huber + 1/dt 1-step 8.06 / 8.13, 2-step 7.91 / 7.83. (With
# l2, CD lost to CT on this CPU profile and in the fifth H200 session.) CT stays on l2: in the same file, CT (600
# steps) scored 10.46 / 9.99 at 1 step with l2 and 17.56 / 18.34 with pseudo-Huber + 1/dt. Not yet run on a GPU.
METHOD_ARGS = {"edm": [], "cd": ["--loss", "pseudo_huber", "--method-arg", "weighting=icm"],
               "ct": ["--loss", "l2", "--mu0", "0"], "ict": [], "sct": []}
# sCT's tangent warm-up (r: 0 -> 1) over this fraction of the planned steps. The method's default is a fixed 10,000
# steps (the sCM paper's, for long runs), which these runs never reach: r ended at 0.057 in the H200 run (568 steps)
# and 0.05 in the CPU one. CPU, tiny net, batch 32, 500 steps, FD-FMNIST of 2000 samples (1 / 2 steps): warm-up over
# 10,000 steps 26.80 / 11.28, over 100 (0.2) 12.17 / 11.63, over 250 (0.5) 12.35 / 11.70 (sct_warmup-cpu.json).
SCT_WARMUP = 0.2
ORDER = ("edm", "cd", "ct", "ict", "sct")

# --parallel: the teacher first, alone, then cd, ct, ict and sct side by side, with these time caps (minutes). The
# fmnist-small step at batch 256 is mostly host time on an H200: 59-127 ms a step in the first run, and only 1.4-1.7x
# that at 4x the batch (the b1024 run). With step = host + GPU work, (H + 4G) / (H + G) = 1.4-1.7 puts the GPU work
# at 13-23% of a batch-256 step, so one process leaves the GPU idle most of the time.
# The first --parallel set (GPU_MEASURED_PARALLEL, H200 session 5) started edm, ct, ict and sct at once (caps 2.6,
# 5.2, 5.2, 5.2) and cd after edm (2.3): beside each other every run trained at about half its rate alone (edm 2043
# images/s against 4394), so the teacher saw half the images of the sequential run (213k against 414k) and scored FD
# 2.18 against 1.20; CD distilled from it lost to CT (18.59 against 9.69), where CD from the sequential run's teacher
# had won (7.69 against 9.63). CT, iCT and sCT gained from their longer caps (CT 9.69, iCT 7.69 / 2.94 searched, sCT
# 5.95). The stage took 347 s of its 430 s deadline.
# So the teacher now trains alone, with the sequential run's cap (1.6 minutes: 414k images, FD 1.20 there), and the
# four consistency runs then start together, CD from that teacher with about twice its images of session 5 and the
# others about 0.6x their session-5 caps (still 3-4x their sequential ones). The fit (tests/test_reference_runs.py,
# from session 5's process times): edm's process, then the slowest of the four, the rates and two exports, inside
# gpu_check.sh's stage with 30 s to spare. The four also get a quarter of the CPU cores each as their OpenMP thread
# count (child_env; session 5's children each started a thread per core). Not yet run on a GPU.
PARALLEL_CAPS = {"gpu": {"edm": 1.6, "cd": 3.2, "ct": 3.2, "ict": 3.2, "sct": 3.2},
                 "cpu": {"edm": 20.0, "cd": 30.0, "ct": 30.0, "ict": 30.0, "sct": 30.0},
                 "smoke": {m: 0.6 for m in ORDER}}
FIRST = ("edm",)                        # alone: the teacher at its full rate
THEN = ("cd", "ct", "ict", "sct")       # together, when edm's process has ended (cd only if it succeeded)
# --deadline-s: what a run started late (after the teacher) leaves after its cap ends: its own scores and 2-step
# search (~15 s beside nothing, from GPU_MEASURED; ~25 s beside the others in session 5), the sampling rates again
# (~15 s) and the export (~10 s), and some to spare.
DEADLINE_RESERVE_S = 60.0


def train_argv(method: str, prof: dict, out: str, data_dir: str | None, device: str | None, seed: int,
               cuda_graph: bool = False) -> list[str]:
    """cmfast-train's arguments for one run; cuda_graph: --cuda-graph, for the methods that have a CUDA-graph step
    (all five)."""
    steps, minutes = prof["runs"][method]
    if prof.get("budget"):   # the length planned by the run (one checkpoint and grid, at its end)
        length = ["--time-budget", f"{prof.get('budget_fill', BUDGET_FILL) * minutes:g}"]
        every = ["--ckpt-every", str(10 ** 9), "--sample-every", str(10 ** 9), "--log-every", str(prof["log_every"])]
        warmup = f"warmup_frac={SCT_WARMUP}"
    else:
        length = ["--steps", str(steps)]
        every = ["--ckpt-every", str(steps), "--sample-every", str(steps), "--log-every", str(max(1, steps // 20))]
        warmup = f"warmup_steps={max(1, round(SCT_WARMUP * steps))}"
    argv = ["--dataset", "fashion-mnist", "--method", method, "--preset", prof["preset"], "--batch-size",
            str(prof["batch"]), *length, "--time-limit", f"{minutes:g}", "--ema", prof["ema"],
            "--precision", prof["precision"], "--seed", str(seed), "--output-dir", os.path.join(out, method),
            *every, "--keep", "1", "--sample-num", "64", "--resume", "auto"] + METHOD_ARGS[method]
    if method == "cd":
        argv += ["--teacher", os.path.join(out, "edm")]
    if method == "sct":
        argv += ["--method-arg", warmup]
    if method == "ict" and prof.get("ict_schedule_mult"):
        argv += ["--method-arg", f"schedule_mult={prof['ict_schedule_mult']:g}"]
    from cmfast.training.methods import get_method
    if cuda_graph and get_method(method).graph_safe:
        argv += ["--cuda-graph"]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if device:
        argv += ["--device", device]
    return argv


def sampling_rate(model, device, batch: int, steps: int, repeats: int | None = None) -> float:
    """Images/s of `steps`-step sampling at `batch` (best of `repeats` after a warm-up; default 3 for one or two
    steps, 1 for the teacher's 35 evaluations), eager, synchronized."""
    repeats = repeats or (3 if steps <= 2 else 1)
    import torch

    from cmfast.metrics import default_sigmas
    from cmfast.precond import EDMDenoiser
    from cmfast.sampling import edm_sample, sample
    shape = (batch, model.net.in_channels, model.net.img_resolution, model.net.img_resolution)
    z = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once():
        with torch.no_grad():
            if isinstance(model, EDMDenoiser):
                edm_sample(model, z, num_steps=steps)
            else:
                sample(model, z, sigmas=default_sigmas(steps))
        sync()
    once()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return batch / best


def run_one(method: str, prof: dict, a, record: dict) -> None:
    import torch

    from cmfast.cli.train import main as train_main
    from cmfast.metrics import evaluate
    from cmfast.training.checkpoint import list_checkpoints, load_model
    argv = train_argv(method, prof, a.out, a.data_dir, a.device, a.seed, a.cuda_graph)
    record["command"] = "cmfast-train " + shlex.join(argv)
    t0 = time.time()
    rc = train_main(argv)
    record["train_wall_s"] = round(time.time() - t0, 1)
    if rc == 130:           # cmfast-train was interrupted before its loop (it says so): stop here too, not go on
        raise KeyboardInterrupt
    if rc != 0:
        raise RuntimeError(f"cmfast-train exited with {rc}")
    run_dir = os.path.join(a.out, method)
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    step = list_checkpoints(run_dir)[-1][0]
    rates = [r["img_per_s"] for r in rows[1:]] or [r["img_per_s"] for r in rows]   # the first tick holds warm-up
    # Training time from the logged rates (excludes start-up, grids and checkpoints; also right for a resumed run).
    train_s = sum((r["step"] - p) * prof["batch"] / r["img_per_s"] for p, r in zip([0] + [x["step"] for x in rows],
                                                                                   rows) if r["img_per_s"] > 0)
    with open(os.path.join(run_dir, "config.json")) as f:
        plan = json.load(f).get("planned")
    if plan:
        record["plan"] = plan
    # No plan: a fixed-steps profile, or a budget run whose --time-limit struck before its probe ended.
    record.update(steps=step, steps_planned=plan["total_steps"] if plan else prof["runs"][method][0] or step,
                  images_seen=step * prof["batch"],
                  train_s=round(train_s, 1),
                  train_img_per_s=round(sorted(rates)[len(rates) // 2], 1), loss_first=rows[0]["loss"],
                  loss_last=rows[-1]["loss"], mem_mb=rows[-1]["mem_mb"], run_dir=run_dir)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_model(run_dir, which="ema", map_location=device)
    record["evals"] = []
    for steps in ((18,) if method == "edm" else (1, 2)):
        ev = evaluate(model, "fd-fmnist", steps=steps, num=prof["num"], batch_size=prof["eval_batch"], seed=0,
                      device=device, data_dir=a.data_dir)
        nfe = 2 * steps - 1 if method == "edm" else steps
        ev["nfe"], ev["steps"] = nfe, steps
        ev["sample_img_per_s"] = round(sampling_rate(model, device, prof["eval_batch"], steps), 1)
        record["evals"].append(ev)
        print(f"reference_runs: {method} {nfe} evaluations: FD-FMNIST {ev['value']:.3f}", flush=True)
    if method != "edm":
        try:
            s = record["sigma_search"] = search_two_step(model, prof, a.data_dir, device)
            print(f"reference_runs: {method} 2 evaluations at the searched levels {s['sigmas']}: FD-FMNIST "
                  f"{s['eval']['value']:.3f} ({len(s['trials'])} trials of {s['num']} images in {s['seconds']:.1f} s)",
                  flush=True)
        except Exception as e:    # the fixed-level scores above stand; the search's failure is recorded
            record["sigma_search"] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()


def search_evals(iters: int) -> int:
    """Upper bound of the FD evaluations of one 2-step search_sigmas: the start (the default levels), two a ternary
    round, and the best of the final bracket's three points (some of them usually evaluated before)."""
    return 1 + 2 * iters + 3


def search_two_step(model, prof: dict, data_dir: str | None, device) -> dict:
    """The 2-step level as the CM paper tunes it (on the metric): cmfast.metrics.search_sigmas (greedy ternary search
    of the second level in log sigma, the default (80, 0.821) scored first) on FD-FMNIST of a smaller sample set with
    another noise seed (prof['search']), then FD-FMNIST at the level found on the same samples as the default's score
    (prof['num'] images, seed 0), so the two 2-step numbers compare like for like.

    Cost: at most search_evals(iters) evaluations of search num images at 2 steps, then one of num images.
    gpu profile (5000 images, 5 rounds: <= 14 evaluations), from the H200 run: 1-step sampling at 29,500 img/s (eval
    batch 1000) and 10k-image scores in 0.42 s (1 step) and 0.76 s (2 steps), i.e. 0.34 s of sampling per 10k images
    and network evaluation, and <= 0.08 s for the features, the Frechet distance and loading. So 5000 images at 2
    steps <= 0.34 + 0.04 = 0.38 s, x 14 = 5.3 s a search, + 0.76 s for the 10k score = ~6.1 s a model, ~24 s for the
    four consistency models (and ~0.8 s for the export's third score). cpu profile (1000 images): 2000 images at 2
    steps took 22-26 s there, so <= 14 x 13 s + 26 s = ~3.5 min a model, ~14 min in all."""
    from cmfast.metrics import default_sigmas, evaluate, search_sigmas
    sp = prof["search"]
    t0 = time.time()
    found = search_sigmas(lambda sg: evaluate(model, "fd-fmnist", sigmas=sg, num=sp["num"],
                                              batch_size=prof["eval_batch"], seed=sp["seed"], device=device,
                                              data_dir=data_dir)["value"],
                          steps=2, sigma_min=model.sigma_min, sigma_max=model.sigma_max, iters=sp["iters"],
                          start=default_sigmas(2))
    search_s = time.time() - t0
    ev = evaluate(model, "fd-fmnist", sigmas=found["sigmas"], num=prof["num"], batch_size=prof["eval_batch"],
                  seed=0, device=device, data_dir=data_dir)
    ev["nfe"] = 2
    return {"method": "greedy ternary search of the 2nd level in log sigma (cmfast.metrics.search_sigmas), the "
                      "default (80, 0.821) scored first", "num": sp["num"], "seed": sp["seed"], "iters": sp["iters"],
            "sigmas": found["sigmas"], "search_fd": found["score"], "trials": found["trials"],
            "seconds": round(search_s, 2), "eval": ev}


TRIGFLOW_METHODS = ("sct", "scd")     # TrigFlow models: not the ConsistencyModel that load_pretrained(NAME) promises


def export_best(doc: dict, a, results: str) -> None:
    """Export the consistency model (not the teacher) whose 1-step FD-FMNIST is lowest as --export NAME, among the
    skip-parameterized ones (cd, ct, ict: cmfast.load_pretrained(NAME) is a ConsistencyModel, which the CUDA-graph
    sampler takes); where a TrigFlow model (sct) scored lower still, it is exported as well, as NAME-sct. Each is
    recorded in the JSON: doc["export"], and doc["export_trigflow"] for the second."""
    scored = [(r["evals"][0]["value"], m) for m, r in doc["runs"].items()
              if m != "edm" and "error" not in r and r.get("evals")]
    skip = [s for s in scored if s[1] not in TRIGFLOW_METHODS]
    if not skip:
        doc["export"] = {"error": "no consistency model finished" if not scored else
                         "no skip-parameterized consistency model (cd, ct, ict) finished"}
    else:
        among = "" if min(skip) == min(scored) else "' consistency models (cd, ct, ict)"
        doc["export"] = _export(doc, a, *min(skip), a.export, among)
    if scored and min(scored)[1] in TRIGFLOW_METHODS and (not skip or min(scored) < min(skip)):
        fd, m = min(scored)
        doc["export_trigflow"] = _export(doc, a, fd, m, f"{a.export}-{m}")
    write(doc, results)


def _export(doc: dict, a, fd: float, m: str, name: str, among: str = "") -> dict:
    """scripts/export_pretrained.py of run `m` (1-step FD-FMNIST `fd`) as shipped model `name`; `among` narrows the
    card's note ('best 1-step FD-FMNIST of the reference runs{among} ...')."""
    import export_pretrained
    r = doc["runs"][m]
    argv = ["--checkpoint", r["run_dir"], "--name", name, "--num", str(PROFILES[a.profile]["num"]),
            "--train-command", r["command"], "--device-note",
            f"{doc['device']}, {r['train_s'] / 60:.1f} min of training, {r['images_seen']} images",
            "--note", f"best 1-step FD-FMNIST of the reference runs{among} ({a.profile} profile): {m}"]
    searched = r.get("sigma_search", {}).get("sigmas")
    if searched:   # the card also scores the 2-step levels the reference run's search found for this model
        argv += ["--searched-sigmas", ",".join(repr(float(v)) for v in searched)]
    argv += ["--out-dir", a.export_dir] if a.export_dir else []
    argv += ["--device", a.device] if a.device else []
    argv += ["--data-dir", a.data_dir] if a.data_dir else []
    rc = export_pretrained.main(argv)
    return {"name": name, "method": m, "fd_1step": fd, "rc": rc}


def parallel_cap(method: str, a, elapsed_s: float) -> float:
    """The cap (minutes) of a --parallel run started `elapsed_s` after this script: its PARALLEL_CAPS one, or less
    under --deadline-s, so that its training, then DEADLINE_RESERVE_S for its scores, the rates and the export, end
    inside the deadline. The runs after the teacher start when it ends, and a fixed cap would ignore what was left:
    the stage's limit is within ~35 s of the critical path test_reference_runs.py estimates (edm, then the slowest
    of the four), and a run cut while scoring loses the set (the README shows complete sets only) and the export.
    At least 0.1 min."""
    cap = PARALLEL_CAPS[a.profile][method]
    if getattr(a, "deadline_s", None) is None:
        return cap
    return max(0.1, min(cap, (a.deadline_s - elapsed_s - DEADLINE_RESERVE_S) / 60))


def child_argv(method: str, a, results: str, cap: float | None = None) -> list[str]:
    """This script for one method with its --parallel cap (`cap` minutes, default PARALLEL_CAPS's), writing its own
    results file."""
    cap = PARALLEL_CAPS[a.profile][method] if cap is None else cap
    argv = [sys.executable, os.path.abspath(__file__), "--profile", a.profile, "--out", a.out, "--only", method,
            "--results", results, "--seed", str(a.seed), "--cap-minutes", f"{cap:g}"]
    argv += ["--data-dir", a.data_dir] if a.data_dir else []
    argv += ["--device", a.device] if a.device else []
    argv += ["--cuda-graph"] if a.cuda_graph else []
    return argv


def child_env(beside: int) -> dict:
    """A child's environment: with `beside` runs at once, each gets its share of the CPU cores as its OpenMP /
    intra-op thread count (OMP_NUM_THREADS = cores // beside), as torchrun does for its processes: every PyTorch
    process otherwise starts a thread per core, and several of them spin-waiting on the same cores slow the host
    threads that launch the GPU work, which is what these host-bound runs wait on. A count the user set is kept;
    one run alone keeps all cores."""
    env = dict(os.environ)
    if beside > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // beside))
    return env


def run_parallel(only: list[str], prof: dict, a, doc: dict, results: str) -> None:
    """--parallel: FIRST's methods (the teacher) as processes at once, THEN's when edm's has ended (cd only if it
    succeeded; all of them at once where edm is not among the methods); each writes <out>/<method>.json and
    <out>/<method>.log, merged into `doc` as they end. A signal to this process (a time
    limit) stops the children (cmfast-train checkpoints on SIGTERM) and keeps what finished. Then the sampling rates
    again, one model at a time: measured beside other runs, they would say little."""
    import signal
    import subprocess
    doc["parallel"] = {"caps_min": {m: PARALLEL_CAPS[a.profile][m] for m in only},
                       "first": [m for m in FIRST if m in only], "then": [m for m in THEN if m in only]}
    waiting = [m for m in ORDER if m in only]
    running: dict[str, tuple] = {}
    t_all = time.time()

    def start(m, beside=1):
        res = os.path.join(a.out, f"{m}.json")
        if os.path.exists(res):
            os.remove(res)
        log = open(os.path.join(a.out, f"{m}.log"), "w")
        cap = parallel_cap(m, a, time.time() - getattr(a, "t_start", t_all))
        doc["parallel"]["caps_min"][m] = cap
        env = child_env(beside)
        doc["parallel"].setdefault("omp_threads", {})[m] = env.get("OMP_NUM_THREADS")
        running[m] = (subprocess.Popen(child_argv(m, a, res, cap), stdout=log, stderr=subprocess.STDOUT, env=env),
                      log, res, time.time())
        waiting.remove(m)
        print(f"reference_runs: started {m} (cap {cap:.3g} min)", flush=True)

    def stop_all(signum, frame):
        for sig in old:       # once: `timeout` sends its SIGINT to this process and then to the process group
            signal.signal(sig, signal.SIG_IGN)
        for proc, *_ in running.values():
            proc.terminate()                      # cmfast-train: finish the step, checkpoint, exit
        raise KeyboardInterrupt
    old = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for m in [m for m in FIRST if m in waiting]:
            start(m)
        while running or waiting:
            if "edm" not in running:      # everything still waiting (THEN): none can be left waiting forever
                group = list(waiting)
                if "cd" in group and "edm" in only and "error" in doc["runs"].get("edm", {"error": 1}):
                    group.remove("cd")
                    waiting.remove("cd")
                    doc["runs"]["cd"] = {"method": "cd", "error": "skipped: the EDM teacher run failed"}
                for m in group:
                    start(m, beside=len(group))
            for m, (proc, log, res, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[m]
                try:
                    with open(res) as f:
                        doc["runs"][m] = json.load(f)["runs"][m]
                except (OSError, ValueError, KeyError):
                    doc["runs"][m] = {"method": m}
                if proc.returncode and "error" not in doc["runs"][m]:
                    doc["runs"][m]["error"] = f"process exited with {proc.returncode} (log {log.name})"
                doc["runs"][m]["process_wall_s"] = round(time.time() - t0, 1)
                print(f"reference_runs: {m} ended ({doc['runs'][m].get('error', 'ok')}) after "
                      f"{time.time() - t0:.0f} s; last lines of {log.name}:", flush=True)
                with open(log.name) as f:
                    print("".join("    " + line for line in f.readlines()[-6:]), end="", flush=True)
                doc["wall_s"] = round(time.time() - t_all, 1)
                write(doc, results)
            time.sleep(0.5)
    except KeyboardInterrupt:
        doc["wall_s"] = round(time.time() - t_all, 1)
        write(doc, results)          # first: the time limit's SIGKILL follows its SIGINT by 10 s
        for proc, log, *_ in running.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        doc["wall_s"] = round(time.time() - t_all, 1)
        write(doc, results)
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    remeasure_rates(doc, prof, a, only)
    doc["wall_s"] = round(time.time() - t_all, 1)
    write(doc, results)


def remeasure_rates(doc: dict, prof: dict, a, only) -> None:
    """Each model this invocation trained (`only`), its sampling rate again, alone on the device (what the table
    reports). Runs kept from an earlier results file are left as they were measured (their checkpoints may be on
    another machine)."""
    import torch

    from cmfast.training.checkpoint import load_model
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for m, r in doc["runs"].items():
        if m not in only or "error" in r or not r.get("evals"):
            continue
        model, _ = load_model(r["run_dir"], which="ema", map_location=device)
        for ev in r["evals"]:
            ev["sample_img_per_s_beside_runs"] = ev.get("sample_img_per_s")
            ev["sample_img_per_s"] = round(sampling_rate(model, device, prof["eval_batch"], ev["steps"]), 1)


def device_name(device: str | None) -> tuple[str, str]:
    """(description, file-name slug) of the device the runs use; the slug as the benchmarks name it."""
    import torch
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev), H.device_slug(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{os.environ.get('OMP_NUM_THREADS', 'all')} torch threads)", H.device_slug(dev)


def write(doc: dict, path: str) -> None:
    """The results JSON, its runs in table order (ORDER), whatever order they ended in."""
    doc["runs"] = {m: doc["runs"][m] for m in ORDER if m in doc["runs"]}
    from cmfast.training.checkpoint import atomic_write
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=2).encode())    # a time limit striking mid-write keeps the old file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])   # the first paragraph, whole
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--out", required=True, help="folder for the runs (one subfolder per method)")
    ap.add_argument("--results", default=None, help="JSON path (default benchmarks/results/reference_runs-"
                                                    "<device>-<profile>.json; smoke: <out>/reference_runs.json)")
    ap.add_argument("--only", default=",".join(ORDER), help="comma list of methods (cd needs edm's run in --out)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export", metavar="NAME", default=None,
                    help="export the consistency model (cd, ct or ict) with the best 1-step FD-FMNIST as a shipped "
                         "model NAME (scripts/export_pretrained.py) into --export-dir, and the sCT model as NAME-sct "
                         "where it scored better still")
    ap.add_argument("--export-dir", default=None, help="default: the package's assets folder")
    ap.add_argument("--parallel", action="store_true",
                    help="train edm first, alone, then cd, ct, ict and sct side by side (one process each), with "
                         "the caps of PARALLEL_CAPS; sampling rates are measured after the runs, one model at a time")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="--parallel: seconds from the start within which the whole job must end (gpu_check.sh: its "
                         "step's time limit less a margin); a run started late (cd, after the teacher) gets the cap "
                         "that still leaves time for its scores, the sampling rates and the export")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="train with cmfast-train --cuda-graph (the step's forward and backward replayed as one "
                         "CUDA graph: the fmnist-small step is host-bound)")
    ap.add_argument("--cap-minutes", type=float, default=None, help=argparse.SUPPRESS)   # a --parallel child's cap
    a = ap.parse_args(argv)
    a.t_start = time.time()
    prof = PROFILES[a.profile]
    if a.cap_minutes is not None:
        prof = {**prof, "runs": {m: (steps, a.cap_minutes) for m, (steps, _) in prof["runs"].items()}}
    only = [m.strip() for m in a.only.split(",") if m.strip()]
    bad = sorted(set(only) - set(ORDER))
    if bad:
        ap.error(f"--only: unknown method(s) {', '.join(bad)}; expected some of {', '.join(ORDER)}")
    import torch
    name, slug = device_name(a.device)
    results = a.results or (os.path.join(a.out, "reference_runs.json") if a.profile == "smoke" else
                            str(ROOT / "benchmarks" / "results" / f"reference_runs-{slug}-{a.profile}.json"))
    doc = {"benchmark": "reference_runs", "profile": a.profile, "device": name, "device_slug": slug,
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "preset": prof["preset"],
           "batch_size": prof["batch"], "precision": prof["precision"], "eval_num": prof["num"],
           "metric": "FD-FMNIST (cmfast's offline metric, not comparable with FID) vs Fashion-MNIST train",
           "runs": {}}
    if set(only) != set(ORDER) and os.path.isfile(results):
        # A partial rerun (--only) updates its methods in the existing results of the same device and profile.
        with open(results) as f:
            old = json.load(f)
        if (old.get("device_slug"), old.get("profile")) == (slug, a.profile):
            doc["runs"] = {m: r for m, r in old.get("runs", {}).items() if m not in only}
    os.makedirs(a.out, exist_ok=True)
    t_all = time.time()
    if a.parallel:
        run_parallel(only, prof, a, doc, results)
    for method in ORDER if not a.parallel else ():
        if method not in only:
            continue
        record = doc["runs"][method] = {"method": method}
        if method == "cd" and "error" in doc["runs"].get("edm", {}):
            record["error"] = "skipped: the EDM teacher run failed"
            continue
        try:
            run_one(method, prof, a, record)
        except Exception as e:   # record it and go on: one broken method must not cost the other runs
            record["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        doc["wall_s"] = round(time.time() - t_all, 1)
        write(doc, results)                       # after every run: a cut-off job keeps what finished
    if a.export:
        export_best(doc, a, results)
    print(f"reference_runs: wrote {results} ({doc.get('wall_s', 0):.0f} s)")
    return 1 if any("error" in doc["runs"][m] for m in only) else 0   # this invocation's runs


if __name__ == "__main__":
    sys.exit(main())
