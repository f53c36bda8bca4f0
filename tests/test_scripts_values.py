"""scripts/reference_runs.py and scripts/export_pretrained.py, their numbers and commands against values written out
here: the training commands each profile runs, the record of a run (steps, images, training time and rate from
stats.jsonl), the 2-step search's calls, the choice of the model to export and its export command, a --parallel
child's command, the sampling rate, and the export card's device note from a run folder. cmfast-train, evaluate and
the export are stand-ins that record their calls (the smoke test in test_reference_runs.py runs the real ones)."""
import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import teacher_run  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def ref():
    return _load("reference_runs")


# ---- the training commands --------------------------------------------------------------------------------------
def test_gpu_profile_commands_in_full(ref):
    """The gpu profile (gpu_check.sh's reference stage): each run plans its steps in 0.95 of its cap, one checkpoint
    and grid at its end (10^9 steps apart), a row every 25 steps, EMA 0.999 in bf16, the method's settings last."""
    tail = ["--ckpt-every", "1000000000", "--sample-every", "1000000000", "--log-every", "25", "--keep", "1",
            "--sample-num", "64", "--resume", "auto"]

    def head(method, budget, cap):
        return ["--dataset", "fashion-mnist", "--method", method, "--preset", "fmnist-small", "--batch-size", "256",
                "--time-budget", budget, "--time-limit", cap, "--ema", "0.999", "--precision", "bf16", "--seed", "3",
                "--output-dir", os.path.join("o", method)]
    prof, argv = ref.PROFILES["gpu"], lambda m: ref.train_argv(m, ref.PROFILES["gpu"], "o", "d", "cuda:1", 3)
    end = ["--data-dir", "d", "--device", "cuda:1"]
    assert argv("edm") == head("edm", "1.52", "1.6") + tail + end
    teacher = ["--teacher", os.path.join("o", "edm")]
    assert argv("cd") == head("cd", "1.045", "1.1") + tail + ["--loss", "pseudo_huber", "--method-arg",
                                                              "weighting=icm"] + teacher + end
    assert argv("ct") == head("ct", "0.855", "0.9") + tail + ["--loss", "l2", "--mu0", "0"] + end
    assert argv("ict") == head("ict", "0.855", "0.9") + tail + ["--method-arg", "schedule_mult=5.7"] + end
    assert argv("sct") == head("sct", "0.95", "1") + tail + ["--method-arg", "warmup_frac=0.2"] + end
    assert prof["runs"]["sct"] == (None, 1.0)


def test_cpu_and_smoke_profile_commands_in_full(ref):
    """The cpu profile's fixed lengths: checkpoint, grid and the last row at the run's end, 20 rows in all, sCT's
    warm-up over 0.2 of the steps; the smoke profile's 1/40 of its cap planned, EMA 0.9, in fp32."""
    cpu = ref.train_argv("sct", ref.PROFILES["cpu"], "o", None, None, 0)
    assert cpu == ["--dataset", "fashion-mnist", "--method", "sct", "--preset", "tiny", "--batch-size", "32",
                   "--steps", "500", "--time-limit", "12", "--ema", "0.999", "--precision", "fp32", "--seed", "0",
                   "--output-dir", os.path.join("o", "sct"), "--ckpt-every", "500", "--sample-every", "500",
                   "--log-every", "25", "--keep", "1", "--sample-num", "64", "--resume", "auto",
                   "--method-arg", "warmup_steps=100"]
    edm = ref.train_argv("edm", ref.PROFILES["cpu"], "o", None, None, 0)
    assert edm[edm.index("--steps"):edm.index("--time-limit") + 2] == ["--steps", "1000", "--time-limit", "20"]
    assert edm[edm.index("--ckpt-every"):edm.index("--keep")] == ["--ckpt-every", "1000", "--sample-every", "1000",
                                                                  "--log-every", "50"]
    smoke = ref.train_argv("ct", ref.PROFILES["smoke"], "o", None, None, 1)
    assert smoke[smoke.index("--batch-size"):smoke.index("--output-dir")] == [
        "--batch-size", "8", "--time-budget", "0.05", "--time-limit", "2", "--ema", "0.9", "--precision", "fp32",
        "--seed", "1"]
    assert smoke[smoke.index("--log-every") + 1] == "5"


def test_every_profile_command_is_one_cmfast_train_takes(ref):
    """Each command parses with cmfast-train's own parser, to the values the profile says."""
    from cmfast.cli.train import build_parser
    for name, prof in ref.PROFILES.items():
        for m in ref.ORDER:
            a = build_parser().parse_args(ref.train_argv(m, prof, "o", None, None, 0))
            assert (a.method, a.preset, a.batch_size, a.precision) == (m, prof["preset"], prof["batch"],
                                                                      prof["precision"]), (name, m)
            assert a.time_limit == prof["runs"][m][1] and a.output_dir == os.path.join("o", m)


def test_a_parallel_child_is_this_script_with_its_settings(ref):
    a = types.SimpleNamespace(profile="cpu", out="o", seed=4, data_dir="d", device="cuda:1", cuda_graph=False)
    assert ref.child_argv("ct", a, "r.json") == [
        sys.executable, str(ROOT / "scripts" / "reference_runs.py"), "--profile", "cpu", "--out", "o", "--only", "ct",
        "--results", "r.json", "--seed", "4", "--cap-minutes", "30", "--data-dir", "d", "--device", "cuda:1"]
    a.data_dir = a.device = None
    assert ref.child_argv("cd", a, "r.json", cap=130 / 60)[-2:] == ["--cap-minutes", "2.16667"]


# ---- the record of one run ----------------------------------------------------------------------------------------
ROWS = [(4, 16.0, 2.0), (8, 64.0, 1.5), (12, 32.0, 1.2), (16, 128.0, 1.1), (20, 256.0, 1.0)]   # step, img/s, loss


def _fake_train(run_dirs, rc=0, plan=True):
    """cmfast-train's stand-in: a run folder with a checkpoint of step 20 (tiny net, the method's), ROWS in
    stats.jsonl and (plan and --time-budget) a plan of 24 steps in config.json."""
    def train_main(argv):
        if rc:
            return rc
        out, method = argv[argv.index("--output-dir") + 1], argv[argv.index("--method") + 1]
        teacher_run(out, (1, 32, 32), method=method)
        from cmfast.training import checkpoint
        modules, meta = checkpoint.load_weights(checkpoint.resolve(out))
        checkpoint.save_checkpoint(out, 20, modules, meta["config"], {"step": 20})
        with open(os.path.join(out, "stats.jsonl"), "w") as f:
            f.write("".join(json.dumps({"step": s, "img_per_s": r, "loss": l, "mem_mb": 100.0 + s}) + "\n"
                            for s, r, l in ROWS))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"planned": {"total_steps": 24, "at_step": 20}} if plan and "--time-budget" in argv else {}, f)
        run_dirs.append(out)
        return 0
    return train_main


@pytest.mark.parametrize("method", ["edm", "ict"])
def test_run_record_from_the_run_folder(ref, tmp_path, monkeypatch, method):
    """steps and images from the checkpoint (20 steps of 8), the plan from config.json, training time from the logged
    rates (4 steps x 8 images at each row's rate: 2 + 0.5 + 1 + 0.25 + 0.125 s), the median rate without the first
    (warm-up) row (128 of 32, 64, 128, 256; with it, 64), the losses; evaluations: the teacher with 18 Heun steps
    (35 evaluations), a consistency model at 1 and 2 steps, each on prof['num'] images of seed 0, then (consistency
    models only) the 2-step search."""
    import cmfast.cli.train as train_cli
    from cmfast import metrics
    dirs, evals, searched = [], [], []
    monkeypatch.setattr(train_cli, "main", _fake_train(dirs))
    monkeypatch.setattr(metrics, "evaluate", lambda model, metric, **k: evals.append((metric, k)) or
                        {"value": 3.0 + k["steps"], "steps": k["steps"]})
    monkeypatch.setattr(ref, "sampling_rate", lambda model, device, batch, steps: 1000.0 * batch + steps)
    monkeypatch.setattr(ref, "search_two_step", lambda model, prof, data_dir, device: searched.append(data_dir) or
                        {"sigmas": [80.0, 0.5]})
    a = types.SimpleNamespace(out=str(tmp_path), data_dir="dd", device="cpu", seed=0, cuda_graph=False)
    record = {}
    ref.run_one(method, ref.PROFILES["smoke"], a, record)
    assert dirs == [str(tmp_path / method)]
    assert record["command"] == "cmfast-train " + " ".join(ref.train_argv(method, ref.PROFILES["smoke"],
                                                                          str(tmp_path), "dd", "cpu", 0))
    assert (record["steps"], record["steps_planned"], record["images_seen"]) == (20, 24, 160)
    assert record["plan"] == {"total_steps": 24, "at_step": 20}
    assert record["train_s"] == 3.9 and record["train_img_per_s"] == 128.0
    assert (record["loss_first"], record["loss_last"], record["mem_mb"]) == (2.0, 1.0, 120.0)
    assert record["run_dir"] == str(tmp_path / method) and record["train_wall_s"] >= 0
    steps = [18] if method == "edm" else [1, 2]
    assert [k["steps"] for _, k in evals] == steps and all(m == "fd-fmnist" for m, _ in evals)
    assert all((k["num"], k["batch_size"], k["seed"], k["data_dir"]) == (200, 100, 0, "dd") for _, k in evals)
    assert [(e["nfe"], e["steps"], e["value"], e["sample_img_per_s"]) for e in record["evals"]] == \
        ([(35, 18, 21.0, 100018.0)] if method == "edm" else [(1, 1, 4.0, 100001.0), (2, 2, 5.0, 100002.0)])
    assert searched == ([] if method == "edm" else ["dd"])
    assert ("sigma_search" in record) == (method != "edm")


def test_run_record_without_a_plan_and_failed_runs(ref, tmp_path, monkeypatch):
    """A fixed-length profile has no plan: steps_planned is the profile's (a budget run without one: its steps);
    cmfast-train's exit 130 (interrupted
    before its loop) stops the script, another non-zero exit is the run's error."""
    import cmfast.cli.train as train_cli
    from cmfast import metrics
    monkeypatch.setattr(train_cli, "main", _fake_train([]))
    monkeypatch.setattr(metrics, "evaluate", lambda model, metric, **k: {"value": 1.0})
    monkeypatch.setattr(ref, "sampling_rate", lambda *a: 1.0)
    a = types.SimpleNamespace(out=str(tmp_path), data_dir=None, device="cpu", seed=0, cuda_graph=False)
    record = {}
    ref.run_one("edm", ref.PROFILES["cpu"], a, record)
    assert "plan" not in record and record["steps_planned"] == 1000 and record["images_seen"] == 20 * 32
    assert record["train_s"] == 15.5          # 4 steps x 32 images at each row's rate
    monkeypatch.setattr(train_cli, "main", _fake_train([], plan=False))
    record = {}     # a budget run whose time limit struck before its plan: the steps it made
    ref.run_one("ct", ref.PROFILES["smoke"], types.SimpleNamespace(out=str(tmp_path / "b"), data_dir=None,
                                                                    device="cpu", seed=0, cuda_graph=False), record)
    assert "plan" not in record and record["steps_planned"] == record["steps"] == 20
    monkeypatch.setattr(train_cli, "main", _fake_train([], rc=130))
    with pytest.raises(KeyboardInterrupt):
        ref.run_one("ct", ref.PROFILES["cpu"], a, {})
    monkeypatch.setattr(train_cli, "main", _fake_train([], rc=3))
    with pytest.raises(RuntimeError, match="cmfast-train exited with 3"):
        ref.run_one("ct", ref.PROFILES["cpu"], a, {})


def test_two_step_search_calls(ref, monkeypatch):
    """The search scores its trials on prof['search'] (fewer images, noise seed 1), the default levels first, then the
    level found on the evaluation's own samples (prof['num'], seed 0); the record says so."""
    from cmfast import metrics
    calls = []

    def evaluate(model, metric, **k):
        calls.append(k)
        return {"value": (math.log(k["sigmas"][1]) - math.log(0.3)) ** 2 + k["num"] / 1e4, "sigmas": k["sigmas"]}
    monkeypatch.setattr(metrics, "evaluate", evaluate)
    model = types.SimpleNamespace(sigma_min=0.002, sigma_max=80.0)
    prof = dict(ref.PROFILES["gpu"], search=dict(num=500, iters=4, seed=7))
    s = ref.search_two_step(model, prof, "dd", "cpu")
    *search, final = calls
    assert tuple(search[0]["sigmas"]) == (80.0, 0.821) and len(s["trials"]) == len(search) <= ref.search_evals(4)
    assert all((k["num"], k["seed"], k["batch_size"], k["data_dir"]) == (500, 7, 1000, "dd") for k in search)
    assert (final["num"], final["seed"], final["batch_size"]) == (10000, 0, 1000)
    assert final["sigmas"] == s["sigmas"] and s["sigmas"][0] == 80.0 and abs(math.log(s["sigmas"][1] / 0.3)) < 0.5
    assert (s["num"], s["seed"], s["iters"], s["eval"]["nfe"]) == (500, 7, 4, 2)
    assert s["search_fd"] == min(v for _, v in s["trials"])


def test_search_evals_bounds_the_search(ref):
    """search_evals(iters) is an upper bound of a search's evaluations; the final bracket's points count too (1 + 2
    iters alone is exceeded: a search of 5 rounds made 12 evaluations here)."""
    from cmfast.metrics import search_sigmas
    for iters in range(1, 7):
        n = [len(search_sigmas(lambda sg: (math.log(sg[1]) - math.log(best)) ** 2, iters=iters,
                               start=(80.0, 0.821))["trials"]) for best in (0.003, 0.3, 50.0)]
        assert 1 + 2 * iters < max(n) and max(n) <= ref.search_evals(iters), (iters, n)


# ---- the export of the best model --------------------------------------------------------------------------------
def _evals(fd1, fd2):
    return [{"nfe": 1, "value": fd1}, {"nfe": 2, "value": fd2}]


def test_the_best_one_step_consistency_model_is_exported(ref, tmp_path, monkeypatch):
    """The lowest 1-step FD-FMNIST among the consistency models that finished: not the teacher (lower still), not a
    run with an error, not one with a lower 2-step score; its export command in full, its return code recorded."""
    calls = []
    monkeypatch.setitem(sys.modules, "export_pretrained", types.SimpleNamespace(main=lambda argv: calls.append(argv)
                                                                                 or 3))
    run = dict(command="cmfast-train --x", train_s=90.0, images_seen=800)
    doc = {"device": "DEV", "runs": {
        "edm": dict(run, evals=[{"nfe": 35, "value": 1.0}], run_dir="o/edm"),
        "cd": dict(run, evals=_evals(2.0, 2.0), run_dir="o/cd", error="RuntimeError: scoring"),
        "ct": dict(run, evals=_evals(5.0, 1.5), run_dir="o/ct"),
        "ict": dict(run, evals=_evals(3.0, 4.0), run_dir="o/ict", sigma_search={"sigmas": [80.0, 0.0231]}),
        "sct": dict(run, evals=[], run_dir="o/sct")}}
    a = types.SimpleNamespace(export="fm", profile="smoke", export_dir="x", device="cpu", data_dir="d")
    ref.export_best(doc, a, str(tmp_path / "r.json"))
    assert calls == [["--checkpoint", "o/ict", "--name", "fm", "--num", "200", "--train-command", "cmfast-train --x",
                      "--device-note", "DEV, 1.5 min of training, 800 images", "--note",
                      "best 1-step FD-FMNIST of the reference runs (smoke profile): ict",
                      "--searched-sigmas", "80.0,0.0231", "--out-dir", "x", "--device", "cpu", "--data-dir", "d"]]
    assert doc["export"] == {"name": "fm", "method": "ict", "fd_1step": 3.0, "rc": 3}
    assert json.loads((tmp_path / "r.json").read_text())["export"] == doc["export"]
    doc["runs"] = {"edm": doc["runs"]["edm"], "cd": doc["runs"]["cd"]}
    ref.export_best(doc, a, str(tmp_path / "r.json"))
    assert doc["export"] == {"error": "no consistency model finished"} and len(calls) == 1


# ---- main ---------------------------------------------------------------------------------------------------------
def _main_with(ref, monkeypatch, tmp_path, fail=()):
    """main with run_one recording (method, profile) and failing for the methods in `fail`."""
    seen = []

    def run_one(method, prof, a, record):
        seen.append((method, prof))
        if method in fail:
            raise RuntimeError(f"{method} broke")
        record["evals"] = _evals(1.0, 1.0)
    monkeypatch.setattr(ref, "run_one", run_one)
    monkeypatch.setattr(ref, "ROOT", tmp_path / "root")
    return seen


def test_main_sequential_records_and_return_code(ref, tmp_path, monkeypatch):
    """A failed teacher: its error recorded, CD skipped (never started), the others run; exit 1. The results go to
    benchmarks/results/reference_runs-<device>-<profile>.json (smoke: into --out) with the profile's numbers."""
    seen = _main_with(ref, monkeypatch, tmp_path, fail=("edm",))
    assert ref.main(["--profile", "cpu", "--out", str(tmp_path / "o")]) == 1
    assert [m for m, _ in seen] == ["edm", "ct", "ict", "sct"]
    path = tmp_path / "root" / "benchmarks" / "results" / "reference_runs-cpu-cpu.json"
    doc = json.loads(path.read_text())
    assert doc["runs"]["edm"]["error"] == "RuntimeError: edm broke"
    assert doc["runs"]["cd"] == {"method": "cd", "error": "skipped: the EDM teacher run failed"}
    assert (doc["profile"], doc["preset"], doc["batch_size"], doc["precision"], doc["eval_num"]) == \
        ("cpu", "tiny", 32, "fp32", 2000)
    assert "export" not in doc
    _main_with(ref, monkeypatch, tmp_path)
    assert ref.main(["--profile", "smoke", "--out", str(tmp_path / "s"), "--only", "ict"]) == 0
    assert json.loads((tmp_path / "s" / "reference_runs.json").read_text())["eval_num"] == 200
    assert ref.main(["--profile", "gpu", "--out", str(tmp_path / "g"), "--only", "ict"]) == 0
    assert json.loads((path.parent / "reference_runs-cpu-gpu.json").read_text())["eval_num"] == 10000


def test_main_partial_rerun_merges_the_same_device_and_profile_only(ref, tmp_path, monkeypatch):
    """--only ict keeps the other runs of an earlier results file of the same device and profile (a failed one too:
    the exit status is this invocation's runs'), and none of another profile's."""
    _main_with(ref, monkeypatch, tmp_path)
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"device_slug": "cpu", "profile": "smoke", "runs": {
        "sct": {"method": "sct", "error": "kept"}, "ct": {"method": "ct"}, "ict": {"stale": 1}}}))
    assert ref.main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--only", "ict", "--results",
                     str(results)]) == 0
    assert json.loads(results.read_text())["runs"] == {"ct": {"method": "ct"}, "ict": {"method": "ict", "evals":
                                                       _evals(1.0, 1.0)}, "sct": {"method": "sct", "error": "kept"}}
    results.write_text(json.dumps({"device_slug": "cpu", "profile": "gpu", "runs": {"ct": {"method": "ct"}}}))
    assert ref.main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--only", "ict", "--results",
                     str(results)]) == 0
    assert list(json.loads(results.read_text())["runs"]) == ["ict"]


def test_main_cap_minutes_and_only(ref, tmp_path, monkeypatch, capsys):
    """A --parallel child's --cap-minutes replaces every run's cap (its steps stay the profile's); --only with an
    unknown method is refused, naming it."""
    seen = _main_with(ref, monkeypatch, tmp_path)
    assert ref.main(["--profile", "cpu", "--out", str(tmp_path / "o"), "--only", "ct", "--cap-minutes", "2.5",
                     "--results", str(tmp_path / "r.json")]) == 0
    assert seen[0][1]["runs"] == {"edm": (1000, 2.5), "cd": (500, 2.5), "ct": (600, 2.5), "ict": (600, 2.5),
                                  "sct": (500, 2.5)}
    assert ref.PROFILES["cpu"]["runs"]["ct"] == (600, 12.0)          # the profile itself is left as it was
    with pytest.raises(SystemExit):
        ref.main(["--profile", "cpu", "--out", str(tmp_path / "o"), "--only", "ct,xyz"])
    assert "--only: unknown method(s) xyz; expected some of edm, cd, ct, ict, sct" in capsys.readouterr().err


def test_main_exports_when_asked(ref, tmp_path, monkeypatch):
    _main_with(ref, monkeypatch, tmp_path)
    exported = []
    monkeypatch.setattr(ref, "export_best", lambda doc, a, results: exported.append(a.export))
    ref.main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--only", "ict"])
    ref.main(["--profile", "smoke", "--out", str(tmp_path / "o"), "--only", "ict", "--export", "m"])
    assert exported == ["m"]


# ---- the sampling rate ---------------------------------------------------------------------------------------------
def test_sampling_rate_is_the_batch_over_the_best_time(ref, monkeypatch):
    """Images/s = batch / the fastest of the timed repeats (3 for 1 or 2 steps, 1 for more), after an untimed
    warm-up; the consistency model samples at the default levels of its steps."""
    from cmfast import sampling
    calls, ticks = [], iter([0.0, 0.5, 1.0, 1.25, 2.0, 2.4, 10.0, 10.8])
    monkeypatch.setattr(ref, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    monkeypatch.setattr(sampling, "sample", lambda model, z, sigmas: calls.append((tuple(z.shape), sigmas)))
    model = types.SimpleNamespace(net=types.SimpleNamespace(in_channels=1, img_resolution=8))
    assert ref.sampling_rate(model, torch.device("cpu"), 10, 2) == 10 / 0.25      # repeats 0.5, 0.25, 0.4
    assert calls == [((10, 1, 8, 8), (80.0, 0.821))] * 4
    assert ref.sampling_rate(model, torch.device("cpu"), 10, 3) == pytest.approx(10 / 0.8)     # one timed repeat


# ---- export_pretrained: the card's device note, the EMA rate, errors ---------------------------------------------
def test_run_note_from_the_run_folder(tmp_path):
    """Wall time: the last elapsed_s of each stretch (a resume starts elapsed_s again), rows after the exported step
    left out; the device of the last start."""
    exp = _load("export_pretrained")
    rows = [(10, 30.0), (20, 60.0), (30, 90.0), (40, 12.0), (50, 42.0), (60, 72.0)]     # resumed at step 30
    (tmp_path / "stats.jsonl").write_text("".join(json.dumps({"step": s, "elapsed_s": e, "loss": 1.0}) + "\n"
                                                  for s, e in rows))
    (tmp_path / "log.txt").write_text("ict on cifar10 (10 images (3, 32, 32)), tiny 0.10M params, 1 rank(s) on cpu, "
                                      "steps 0 -> 60\nict on cifar10 (10 images (3, 32, 32)), tiny 0.10M params, "
                                      "1 rank(s) on cuda:0, steps 30 -> 60\n")
    ckpt = str(tmp_path / "ckpt-00000050.safetensors")
    assert exp.run_note(ckpt, 50, 400) == "cuda:0, 2.2 min of training, 400 images"       # 90 + 42 s
    assert exp.run_note(ckpt, 60, 480) == "cuda:0, 2.7 min of training, 480 images"       # 90 + 72 s
    (tmp_path / "log.txt").unlink()
    assert exp.run_note(ckpt, 60, 480) == ""


def test_export_takes_the_first_ema_rate_and_says_what_is_missing(tmp_path, monkeypatch, capsys):
    """Two EMA rates: 'ema' is the first (as load_model reads it); --which naming weights the file lacks, a missing
    checkpoint and failing scores are one line and exit 2, leaving nothing behind; an empty --device-note stays."""
    from cmfast.training import checkpoint
    exp = _load("export_pretrained")
    run = teacher_run(tmp_path / "run", (1, 32, 32), method="ict")
    modules, meta = checkpoint.load_weights(checkpoint.resolve(run))
    cfg = dict(meta["config"], ema=[0.5, 0.9], dataset="fashion-mnist")
    first = {k: v + 1 if v.is_floating_point() else v for k, v in modules["ema@0.9"].items()}
    checkpoint.save_checkpoint(run, 2, {"ema@0.5": first, "ema@0.9": modules["ema@0.9"]}, cfg, {})
    with open(os.path.join(run, "stats.jsonl"), "w") as f:      # what a run folder says of its device and time
        f.write(json.dumps({"step": 2, "elapsed_s": 30.0}) + "\n")
    with open(os.path.join(run, "log.txt"), "w") as f:
        f.write("ict on folder (4 images (1, 32, 32)), tiny 0.10M params, 1 rank(s) on cpu, steps 0 -> 2\n")
    out = tmp_path / "out"
    assert exp.main(["--checkpoint", run, "--name", "m", "--out-dir", str(out), "--metric", "none",
                     "--device-note", "", "--device", "cpu", "--num", "4"]) == 0
    card = json.loads((out / "m.json").read_text())
    assert card["weights"] == "ema@0.5 of step 2, fp16" and card["metric"] == "none measured: --metric none"
    assert card["training"] == {"command": "", "device": ""}      # given, even empty: not the folder's
    assert exp.main(["--checkpoint", run, "--name", "m", "--out-dir", str(out), "--metric", "none"]) == 0
    images = 2 * cfg["batch_size"]
    note = json.loads((out / "m.json").read_text())["training"]["device"]
    assert note == f"cpu, 0.5 min of training, {images} images"
    got = checkpoint.load_weights(str(out / "m.safetensors"))[0]["ema"]
    assert all(torch.equal(got[k], v.half()) for k, v in first.items())
    capsys.readouterr()
    for argv, why in ((["--checkpoint", run, "--which", "model"], "has no 'model' weights (ema@0.5, ema@0.9)"),
                      (["--checkpoint", str(tmp_path / "nope")], "checkpoint not found"),
                      (["--checkpoint", run, "--metric", "fd-fmnist", "--data-dir", str(tmp_path / "nodata"),
                        "--num", "1"], "fd-fmnist: num >= 2")):
        assert exp.main([*argv, "--name", "x", "--out-dir", str(tmp_path / "x"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("export_pretrained: error: ") and why in err[0], err
        assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []


def test_export_levels_are_checked(capsys):
    exp = _load("export_pretrained")
    assert exp._sigmas("80,2,0.5") == (80.0, 2.0, 0.5)
    for bad in ("80,80", "80,-1", "5", "2,4"):
        with pytest.raises(Exception):
            exp._sigmas(bad)


def test_fid_of_a_cifar10_model_is_against_cifar10_train(tmp_path, monkeypatch):
    """A CIFAR-10 model (3x32x32, the dataset's own shape: no image_shape on its card) scores FID against CIFAR-10
    train in --data-dir (not the folder the config names), with the given Inception weights."""
    exp = _load("export_pretrained")
    run = teacher_run(tmp_path / "run", (3, 32, 32), method="ict")
    from cmfast.training import checkpoint
    modules, meta = checkpoint.load_weights(checkpoint.resolve(run))
    cfg = dict(meta["config"], dataset="cifar10", data_dir="elsewhere")
    checkpoint.save_checkpoint(run, 2, modules, cfg, {})
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    calls = []
    monkeypatch.setattr(exp, "evaluate", lambda model, metric, **k: calls.append((metric, k)) or
                        {"value": 2.0, "sigmas": [80.0, 0.821][:k["steps"]]})
    assert exp.main(["--checkpoint", run, "--name", "c", "--out-dir", str(tmp_path / "o"), "--inception",
                     str(weights), "--data-dir", "cifar-here", "--num", "30", "--device", "cpu"]) == 0
    card = json.loads((tmp_path / "o" / "c.json").read_text())
    assert "image_shape" not in card and "classes" not in card and card["dataset"] == "cifar10"
    assert card["fid"]["note"] == "FID (Inception-V3, pytorch-fid's weights) against cifar10 train"
    assert card["fid"]["num_samples"] == 30
    assert [(m, k["dataset"], k["data_dir"], k["weights"]) for m, k in calls] == \
        [("fid", "cifar10", "cifar-here", str(weights))] * 2


def test_a_gray_32px_folder_model_gets_no_fd_fmnist(tmp_path, monkeypatch, capsys):
    """FD-FMNIST compares with Fashion-MNIST: a 1x32x32 model of another data set (an image folder) has the shape but
    not the data; auto leaves it unscored (no Inception weights here), and asking for it is refused."""
    monkeypatch.setenv("CMFAST_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    exp = _load("export_pretrained")
    run = teacher_run(tmp_path / "run", (1, 32, 32), method="ict")
    assert exp.main(["--checkpoint", run, "--name", "g", "--out-dir", str(tmp_path / "o"), "--device", "cpu",
                     "--num", "4"]) == 0      # a few samples: a wrong FD-FMNIST score ends soon
    card = json.loads((tmp_path / "o" / "g.json").read_text())
    assert card["image_shape"] == [1, 32, 32] and "fd_fmnist" not in card
    assert card["metric"].startswith("none measured: FD-FMNIST scores Fashion-MNIST models (1x32x32) only; FID: ")
    capsys.readouterr()
    assert exp.main(["--checkpoint", run, "--name", "g", "--out-dir", str(tmp_path / "o"), "--metric",
                     "fd-fmnist", "--num", "4"]) == 2
    assert "only; this one is folder 1x32x32" in capsys.readouterr().err


def test_export_of_diverged_weights_is_refused_in_one_line(tmp_path, capsys):
    """EMA weights holding a NaN: the staged file's load refuses them; one line naming why (no 'None: ' for the metric
    that was not asked), exit 2, nothing left in the output folder."""
    exp = _load("export_pretrained")
    run = teacher_run(tmp_path / "run", (1, 32, 32), method="ict", nan=True)
    capsys.readouterr()
    assert exp.main(["--checkpoint", run, "--name", "n", "--out-dir", str(tmp_path / "o"), "--metric", "none",
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export_pretrained: error: /"), err
    assert "bad ema weights" in err[0] and "NaN" in err[0] and os.listdir(tmp_path / "o") == []


def test_an_edm_teacher_exports_scored_by_heun_18(tmp_path, monkeypatch, capsys):
    """An EDM teacher (--method edm) has no one-step sampler (evaluate refuses steps=1 for it: the export failed with
    that error): its card holds the score of EDM's Heun sampler at 18 steps, 35 network evaluations, as the reference
    runs score the teacher; --searched-sigmas is refused for it in one line, before anything is written."""
    exp = _load("export_pretrained")
    run = teacher_run(tmp_path / "run", (1, 32, 32))        # method edm
    from cmfast.precond import EDMDenoiser
    from cmfast.training import checkpoint
    modules, meta = checkpoint.load_weights(checkpoint.resolve(run))
    checkpoint.save_checkpoint(run, 1, modules, dict(meta["config"], dataset="fashion-mnist"), {})
    calls = []

    def fake(model, metric, **k):
        calls.append((type(model), metric, k.get("steps"), k.get("sigmas"), k["num"]))
        return {"value": 3.14159, "sigmas": None}
    monkeypatch.setattr(exp, "evaluate", fake)
    assert exp.main(["--checkpoint", run, "--name", "t", "--out-dir", str(tmp_path / "o"), "--device", "cpu",
                     "--num", "6"]) == 0
    assert calls == [(EDMDenoiser, "fd-fmnist", 18, None, 6)]
    card = json.loads((tmp_path / "o" / "t.json").read_text())
    assert card["method"] == "edm" and "metric" not in card
    assert card["fd_fmnist"] == {"heun-18": 3.142, "num_samples": 6,
                                 "sampler": "EDM Heun, 18 steps (35 network evaluations)",
                                 "note": exp.METRIC_NOTES["fd-fmnist"]}
    capsys.readouterr()
    assert exp.main(["--checkpoint", run, "--name", "s", "--out-dir", str(tmp_path / "s"), "--device", "cpu",
                     "--searched-sigmas", "80,1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["export_pretrained: error: --searched-sigmas: an EDM teacher samples with its Heun schedule, "
                   "not at given levels"]
    assert not (tmp_path / "s").exists() and len(calls) == 1
