"""scripts/reference_runs.py (the Fashion-MNIST reference runs and the shipped model's export) and the README tables
benchmarks/make_tables.py generates from the results JSON."""
import json
import os
import re
from pathlib import Path

import pytest

from _repo import load_script as _load
from cmfast.data import FMNIST_SYSTEM_DIR

ROOT = Path(__file__).resolve().parents[1]


make_tables = _load(ROOT / "benchmarks" / "make_tables.py", "make_tables")


def _run(fd1, fd2, nfe=(1, 2), **extra):
    evals = [{"nfe": n, "value": v, "sample_img_per_s": 100.0} for n, v in zip(nfe, (fd1, fd2)) if v is not None]
    return {"steps": 10, "steps_planned": 10, "images_seen": 80, "train_wall_s": 1.0, "train_img_per_s": 80.0,
            "evals": evals, **extra}


def _doc(runs, slug="h100", date="2026-11-26"):
    return {"benchmark": "reference_runs", "profile": "gpu", "device": slug.upper(), "device_slug": slug,
            "date": date, "torch": "2.11", "preset": "fmnist-small", "batch_size": 256, "precision": "bf16",
            "eval_num": 10000, "runs": runs}


def _searched(fd, level=0.02):
    return {"sigmas": [80.0, level], "num": 5000, "seed": 1, "iters": 5, "search_fd": fd + 0.1, "trials": [],
            "eval": {"nfe": 2, "value": fd, "sigmas": [80.0, level], "num": 10000, "seed": 0}}


def test_goals_are_computed_from_the_numbers():
    good = _doc({"edm": _run(4.0, None, nfe=(35,)), "cd": _run(5.0, 4.5), "ct": _run(7.0, 5.5)})
    assert make_tables.reference_goals(good) == [
        "2 steps (default level 0.821) better than 1 for every method: met",
        "CD 1-step better than CT 1-step: met (5.00 vs 7.00)",
        "best 2-step (cd, default level 0.821) within 1.5x of the teacher: met (1.12x)"]
    bad = _doc({"edm": _run(2.0, None, nfe=(35,)), "cd": _run(8.0, 9.0), "ct": _run(7.0, 5.5)})
    assert make_tables.reference_goals(bad) == [
        "2 steps (default level 0.821) better than 1 for every method: missed (cd)",
        "CD 1-step better than CT 1-step: missed (8.00 vs 7.00)",
        "best 2-step (ct, default level 0.821) within 1.5x of the teacher: missed (2.75x)"]
    assert make_tables.reference_goals(_doc({"edm": _run(2.0, None, nfe=(35,))})) == [
        "not enough finished runs to check"]


def test_goals_are_checked_at_the_default_and_the_searched_level():
    # cd's 2-step is worse than its 1-step at 0.821 and better at its searched level; ict was not searched.
    run = _doc({"edm": _run(2.0, None, nfe=(35,)), "cd": _run(8.0, 9.0, sigma_search=_searched(2.9)),
                "ct": _run(7.0, 5.5, sigma_search=_searched(6.0, 0.05)), "ict": _run(6.0, 7.0)})
    assert make_tables.reference_goals(run) == [
        "2 steps (default level 0.821) better than 1 for every method: missed (cd, ict)",
        "2 steps (searched level; not searched: ict) better than 1 for every method: met",
        "CD 1-step better than CT 1-step: missed (8.00 vs 7.00)",
        "best 2-step (ct, default level 0.821) within 1.5x of the teacher: missed (2.75x)",
        "best 2-step (cd, searched level) within 1.5x of the teacher: met (1.45x)"]
    # A failed search (recorded as an error) leaves the method's default-level numbers and is not counted as searched.
    run["runs"]["ct"]["sigma_search"] = {"error": "RuntimeError: boom"}
    assert "2 steps (searched level; not searched: ct, ict) better than 1 for every method: met" in \
        make_tables.reference_goals(run)
    md = make_tables.reference_markdown([dict(run, _file="x.json")])
    assert "| cd | 10 (10) | 80 | 1 | 80 | 8.00 | 9.00 | 2.90 (0.02) | - | 100.0 |" in md
    assert "| ct | 10 (10) | 80 | 1 | 80 | 7.00 | 5.50 | - | - | 100.0 |" in md
    assert "search on FD-FMNIST of 5000 other samples (noise seed 1, 5 ternary rounds)" in md


def test_committed_results_render_with_and_without_the_search():
    # Results written before the search existed (the first H200 and CPU runs) keep rendering: '-' in the searched
    # column and the goals at the default level only.
    files = sorted(make_tables.RESULTS.glob("reference_runs-*.json"))
    assert files
    for path in files:
        run = dict(json.loads(path.read_text()), _file=path.name)
        md = make_tables.reference_markdown([run])
        rows = [x for x in md.splitlines() if x.startswith("| ") and not x.startswith("| method")]
        assert len(rows) == len(run["runs"]) and all(x.count("|") == 11 for x in rows if "error" not in x)
        has = {m for m, r in run["runs"].items() if (r.get("sigma_search") or {}).get("eval")}
        for m in set(run["runs"]) - has - {"edm"}:
            assert next(x for x in rows if x.startswith(f"| {m} |")).split("|")[8].strip() == "-"
        goals = make_tables.reference_goals(run)
        assert any(g.startswith("2 steps (searched level") for g in goals) == bool(has)
        assert "Goals (from the numbers above): " + "; ".join(goals) in md


def test_a_partial_run_does_not_replace_the_reference_set(tmp_path):
    # An iCT-only probe (reference_runs.py --only ict), newer than the full set of the same device, profile and batch,
    # is kept in its file but the table shows the full set.
    full = _doc({m: _run(5.0, 4.0) for m in make_tables.REFERENCE_METHODS}, date="2026-11-26T10:00:00")
    probe = _doc({"ict": _run(19.0, 31.0)}, date="2026-11-26T21:00:00")
    for name, doc in (("reference_runs-full.json", full), ("reference_runs-probe.json", probe)):
        (tmp_path / name).write_text(json.dumps(doc))
    runs = make_tables.load_reference(tmp_path)
    assert [r["_file"] for r in runs] == ["reference_runs-full.json"]


def test_results_write_is_all_or_nothing(tmp_path):
    """The results JSON is rewritten after every run and when a time limit stops the job: written in place, a write
    cut short left a truncated file that the next --only rerun's merge could not read (and the runs it held were
    gone). Here the write fails halfway (an object json cannot serialize after the first run): the old file stays."""
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    path = tmp_path / "results.json"
    first = _doc({"edm": _run(5.0, 4.0)})
    ref.write(first, str(path))
    assert json.loads(path.read_text()) == first
    broken = _doc({"edm": _run(5.0, 4.0), "ict": {"evals": object()}})
    with pytest.raises(TypeError):
        ref.write(broken, str(path))
    assert json.loads(path.read_text()) == first and os.listdir(tmp_path) == ["results.json"]


def test_train_commands_record_the_method_settings():
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    prof = ref.PROFILES["gpu"]
    cd = ref.train_argv("cd", prof, "out", "data", None, 0)
    assert cd[cd.index("--teacher") + 1] == os.path.join("out", "edm") and cd[cd.index("--loss") + 1] == "pseudo_huber"
    ict = ref.train_argv("ict", prof, "out", None, "cuda", 0)
    assert "--loss" not in ict and ict[ict.index("--preset") + 1] == "fmnist-small"
    assert float(ict[ict.index("--time-limit") + 1]) == prof["runs"]["ict"][1]
    assert int(ict[ict.index("--batch-size") + 1]) == prof["batch"]
    # sCT's tangent warm-up ends inside every profile's planned steps (its default, 10,000 steps, never would):
    # a fraction of the planned length in budget mode, else a step count below the profile's steps.
    for name, p in ref.PROFILES.items():
        sct = ref.train_argv("sct", p, "out", None, None, 0)
        arg = sct[sct.index("--method-arg") + 1]
        if p.get("budget"):
            assert arg == f"warmup_frac={ref.SCT_WARMUP}" and "--steps" not in sct, name
            budget = float(sct[sct.index("--time-budget") + 1])
            assert budget == pytest.approx(p.get("budget_fill", ref.BUDGET_FILL) * p["runs"]["sct"][1]), name
            assert float(sct[sct.index("--time-limit") + 1]) == p["runs"]["sct"][1] > budget, name
        else:
            assert 1 <= int(arg.removeprefix("warmup_steps=")) < p["runs"]["sct"][0], name
            assert "--time-budget" not in sct, name
        ict = ref.train_argv("ict", p, "out", None, None, 0)
        if p.get("ict_schedule_mult"):   # the gpu profile: iCT's curriculum spans a multiple of the run
            assert ict[ict.index("--method-arg") + 1] == f"schedule_mult={p['ict_schedule_mult']:g}", name
        else:
            assert "--method-arg" not in ict, name
        assert "--method-arg" not in ref.train_argv("ct", p, "out", None, None, 0)
    # The GPU profile fits one device call: the five runs' time caps leave room for the evaluations.
    assert sum(m for _, m in prof["runs"].values()) * 60 <= 360


def test_gpu_profile_is_sized_from_the_measured_gpu_run():
    """The gpu profile against the committed H200 runs it was sized from (same time caps): batch 256 as in the first
    (the batch-1024 run made fewer steps in every method: its step was not host-bound), the steps planned by each run
    (the first stopped short of its curricula); and gpu_check.sh's reference stage (440 s) holds the caps, the measured
    overheads and the 2-step search as costed from the first run's evaluation times."""
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    prof = ref.PROFILES["gpu"]
    measured = json.loads((make_tables.RESULTS / ref.GPU_MEASURED).read_text())
    b1024 = json.loads((make_tables.RESULTS / ref.GPU_MEASURED_B1024).read_text())
    assert measured["profile"] == b1024["profile"] == "gpu" and measured["preset"] == prof["preset"]
    assert measured["precision"] == prof["precision"] and prof["batch"] == measured["batch_size"] == 256
    assert b1024["batch_size"] == 1024 and b1024["wall_s"] < 440
    for m, r in b1024["runs"].items():
        assert r["steps"] < measured["runs"][m]["steps"], m
        assert r["train_s"] / r["steps"] > 1.4 * measured["runs"][m]["train_s"] / measured["runs"][m]["steps"], m
    assert prof["budget"]          # each run plans its steps from its own speed (cmfast-train --time-budget)
    for m, (planned, minutes) in prof["runs"].items():
        r = measured["runs"][m]
        cap = float(r["command"].split("--time-limit ")[1].split()[0])
        assert r["steps"] < r["steps_planned"]          # it stopped on --time-limit, short of its curriculum's end
        assert planned is None and minutes == cap, m     # the same caps, no fixed step count
        # Activation memory grows with the batch (the parameters and optimizer state do not): an upper bound.
        assert r["mem_mb"] * prof["batch"] / measured["batch_size"] <= 40 * 1024, m
    runs = measured["runs"].values()
    caps_s = sum(minutes * 60 for _, minutes in prof["runs"].values())
    startup_s = sum(r["train_wall_s"] - r["train_s"] for r in runs)           # data, model, checkpoint, grid
    evals_s = measured["wall_s"] - sum(r["train_wall_s"] for r in runs)       # scores and sampling rates
    two_step_s = max(e["seconds"] for r in runs for e in r["evals"] if e["nfe"] == 2)   # 10k images, 2 steps
    assert two_step_s < 1.0 and measured["eval_num"] == prof["num"]
    cms = len(prof["runs"]) - 1
    search_s = cms * (ref.search_evals(prof["search"]["iters"]) * (two_step_s * prof["search"]["num"] / prof["num"]
                                                                   + 0.1) + two_step_s)
    assert search_s < 40, search_s
    export_s = 3 * two_step_s + 10          # its three scores, loading and writing (the whole export took ~6 s)
    stage_s = int(re.search(r"^REF_LIMIT=(\d+)$", (ROOT / "scripts" / "gpu_check.sh").read_text(), re.M)[1])
    assert caps_s + startup_s + evals_s + search_s + export_s <= stage_s - 30, \
        (stage_s, caps_s, startup_s, evals_s, search_s, export_s)   # 30 s: interpreter, imports and the unexpected


@pytest.mark.skipif(not os.path.isdir(FMNIST_SYSTEM_DIR), reason="needs the Debian package dataset-fashion-mnist")
def test_smoke_profile_trains_scores_and_exports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    results = tmp_path / "ref.json"
    # A partial rerun keeps the other methods' results of the same device and profile.
    results.write_text(json.dumps({"benchmark": "reference_runs", "profile": "smoke", "device_slug": "cpu",
                                   "runs": {"sct": {"method": "sct", "error": "kept"}, "ict": {"stale": 1}}}))
    rc = ref.main(["--profile", "smoke", "--out", str(tmp_path / "runs"), "--only", "ict", "--results",
                   str(results), "--export", "smoke-model", "--export-dir", str(tmp_path / "export")])
    assert rc == 0
    doc = json.loads(results.read_text())
    assert list(doc["runs"]) == ["ict", "sct"] and doc["runs"]["sct"]["error"] == "kept"
    r = doc["runs"]["ict"]
    assert "stale" not in r
    # budget mode: the run planned its length after its 10-step probe and ran to it (3 s planned in a 120 s cap)
    assert r["steps"] == r["steps_planned"] == r["plan"]["total_steps"] >= 10 and r["images_seen"] == 8 * r["steps"]
    assert r["command"].startswith("cmfast-train --dataset fashion-mnist --method ict --preset tiny")
    assert [e["nfe"] for e in r["evals"]] == [1, 2] and r["evals"][1]["sigmas"] == [80.0, 0.821]
    assert all(0 < e["value"] < 400 and e["num"] == 200 for e in r["evals"])   # FD of noise is ~150-200
    # The 2-step level searched on other samples (fewer, another seed), then scored on the evaluation's samples.
    s, sp = r["sigma_search"], ref.PROFILES["smoke"]["search"]
    assert (s["num"], s["seed"], s["iters"]) == (sp["num"], sp["seed"], sp["iters"]) and s["seed"] != 0
    assert s["trials"][0][0] == [80.0, 0.821] and 3 <= len(s["trials"]) <= ref.search_evals(sp["iters"])
    assert s["sigmas"][0] == 80.0 and 0.002 < s["sigmas"][1] < 80.0
    assert s["search_fd"] == min(v for _, v in s["trials"])
    e = s["eval"]
    assert e["sigmas"] == s["sigmas"] and (e["num"], e["seed"], e["nfe"]) == (200, 0, 2) and 0 < e["value"] < 400
    if s["sigmas"] == [80.0, 0.821]:          # the default won: the same samples give the same score
        assert e["value"] == pytest.approx(r["evals"][1]["value"], rel=1e-6)
    md = make_tables.reference_markdown([dict(doc, _file="ref.json", date="2026-11-27", torch="x", preset="tiny",
                                              batch_size=8, precision="fp32", eval_num=200)])
    assert f"| {e['value']:.2f} ({s['sigmas'][1]:.3g}) |" in md
    assert "2 steps (searched level) better than 1 for every method:" in md
    assert doc["export"] == {"name": "smoke-model", "method": "ict", "fd_1step": r["evals"][0]["value"], "rc": 0}
    card = json.loads((tmp_path / "export" / "smoke-model.json").read_text())
    assert card["steps"] == r["steps"] and card["method"] == "ict" and card["training"]["command"] == r["command"]
    assert card["fd_fmnist"]["sigmas"]["2-step-searched"] == s["sigmas"]
    assert 0 < card["fd_fmnist"]["2-step-searched"] < 400
    assert (tmp_path / "export" / "smoke-model.safetensors").stat().st_size < 1e6


def test_export_checks_the_searched_levels(capsys):
    exp = _load(ROOT / "scripts" / "export_pretrained.py", "export_pretrained")
    assert exp._sigmas("80,0.0231") == (80.0, 0.0231)
    for bad in ("80", "0.02,80", "80,x", "80,0"):
        with pytest.raises(SystemExit):
            exp.main(["--checkpoint", "nope", "--name", "n", "--searched-sigmas", bad])
        assert "--searched-sigmas" in capsys.readouterr().err


def test_export_stopped_during_its_evaluation_keeps_the_shipped_model(tmp_path, monkeypatch):
    """export_pretrained wrote the new weights over the shipped file first and its card only after minutes of
    evaluation: stopped in between (the reference stage's time limit), the package shipped new weights under the old
    model's card. Now the weights are staged and both files replaced at the end; stopped, nothing changes."""
    import torch
    from cmfast import ConsistencyModel, UNet
    from cmfast.nets import preset_config
    from cmfast.pretrained import model_card
    from cmfast.training.checkpoint import load_model, save_checkpoint
    exp = _load(ROOT / "scripts" / "export_pretrained.py", "export_pretrained")
    torch.manual_seed(0)
    net = preset_config("tiny", in_channels=1, out_channels=1)     # a Fashion-MNIST model: FD-FMNIST on its card
    cm = ConsistencyModel(UNet(**net))
    cfg = dict(method="ict", net=net, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, ema=[0.99],
               dataset="fashion-mnist", batch_size=8)
    (tmp_path / "run").mkdir()
    save_checkpoint(str(tmp_path / "run"), 7, {"ema@0.99": cm.state_dict()}, cfg, {})
    out = tmp_path / "assets"
    out.mkdir()
    (out / "m.safetensors").write_bytes(b"the shipped weights")
    (out / "m.json").write_text('{"name": "m", "steps": 1}')
    argv = ["--checkpoint", str(tmp_path / "run"), "--name", "m", "--num", "4", "--out-dir", str(out),
            "--device", "cpu"]

    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(exp, "evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        exp.main(argv)
    assert sorted(os.listdir(out)) == ["m.json", "m.safetensors"]
    assert (out / "m.safetensors").read_bytes() == b"the shipped weights"
    assert json.loads((out / "m.json").read_text())["steps"] == 1
    monkeypatch.setattr(exp, "evaluate", lambda *a, **k: {"value": 3.0, "sigmas": k.get("sigmas") or [80.0]})
    assert exp.main(argv) == 0
    assert sorted(os.listdir(out)) == ["m.json", "m.safetensors"]
    card = json.loads((out / "m.json").read_text())
    assert card["steps"] == 7 and card["fd_fmnist"]["1-step"] == 3.0
    model, meta = load_model(str(out / "m.safetensors"))
    x, s = torch.randn(2, 1, 32, 32), torch.full((2,), 2.0)
    torch.testing.assert_close(model(x, s), cm.eval()(x, s), rtol=2e-2, atol=2e-2)     # fp16 weights


def test_export_card_names_the_levels_it_scored(tmp_path):
    """The card's sigmas are the levels of its scores: evaluate starts them at the model's sigma_max (80 was written
    whatever the model's was); the searched ones as given. FD-FMNIST here against cached random reference statistics
    (as tests/test_metrics.py), of 4 samples."""
    import numpy as np
    import torch
    from cmfast import metrics
    from cmfast._fd_classifier import FEATURE_DIM
    from cmfast.nets import preset_config
    from cmfast.training.checkpoint import save_checkpoint
    exp = _load(ROOT / "scripts" / "export_pretrained.py", "export_pretrained")
    stats = metrics.FeatureStats(FEATURE_DIM).update(np.random.default_rng(0).standard_normal((300, FEATURE_DIM)))
    stats.save(metrics.reference_cache_path("fd-fmnist", "fashion-mnist", str(tmp_path), 60000))
    net = preset_config("tiny", in_channels=1, out_channels=1)
    from cmfast import ConsistencyModel, UNet
    torch.manual_seed(0)
    cm = ConsistencyModel(UNet(**net), sigma_max=40.0)
    cfg = dict(method="ict", net=net, sigma_data=0.5, sigma_min=0.002, sigma_max=40.0, ema=[0.99],
               dataset="fashion-mnist", batch_size=8)
    (tmp_path / "run").mkdir()
    save_checkpoint(str(tmp_path / "run"), 3, {"ema@0.99": cm.state_dict()}, cfg, {})
    assert exp.main(["--checkpoint", str(tmp_path / "run"), "--name", "m", "--num", "4", "--out-dir",
                     str(tmp_path / "out"), "--device", "cpu", "--data-dir", str(tmp_path),
                     "--searched-sigmas", "40,0.5"]) == 0
    card = json.loads((tmp_path / "out" / "m.json").read_text())["fd_fmnist"]
    assert card["sigmas"] == {"1-step": [40.0], "2-step": [40.0, 0.821], "2-step-searched": [40.0, 0.5]}
    assert all(card[k] > 0 for k in card["sigmas"])


FAKE_CHILD = r"""
import json, os, pathlib, sys, time
method, results, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.time()
if method != "edm":  # a barrier, not a sleep margin: the four after the teacher each wait until all have started
    flags = pathlib.Path(out + "-started")
    flags.mkdir(parents=True, exist_ok=True)
    (flags / method).touch()
    while len(os.listdir(flags)) < (3 if "fail-edm" in out else 4) and time.time() - t0 < 60:
        time.sleep(0.01)
time.sleep({"edm": 0.5}.get(method, 0.1))
if method == "edm" and "fail-edm" in out:
    sys.exit(3)
ev = [{"nfe": 35 if method == "edm" else 1, "value": 5.0, "sample_img_per_s": 1.0}]
json.dump({"runs": {method: {"method": method, "t0": t0, "t1": time.time(), "evals": ev, "run_dir": out,
                              "omp": os.environ.get("OMP_NUM_THREADS")}}}, open(results, "w"))
print(method, "done")
"""


@pytest.mark.parametrize("edm_fails", [False, True])
def test_parallel_mode_trains_the_teacher_first_then_the_rest_together(tmp_path, monkeypatch, capsys, edm_fails):
    """--parallel: edm alone first; when its process has ended, cd, ct, ict and sct together (cd skipped when edm
    failed, the others still run), each with its share of the CPU cores as OMP_NUM_THREADS; each child's results
    merge in table order; the caps, the thread counts and the schedule are recorded; the sampling rates are measured
    again afterwards. The children here are stand-ins that sleep and write a record (the real child is this script
    with --only, which the smoke test runs)."""
    import sys
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    out = tmp_path / ("runs-fail-edm" if edm_fails else "runs")
    monkeypatch.setattr(ref, "child_argv", lambda m, a, res, cap=None: [sys.executable, "-c", FAKE_CHILD, m, res,
                                                                         str(out)])
    measured = []
    monkeypatch.setattr(ref, "remeasure_rates", lambda doc, prof, a, only: measured.append(sorted(doc["runs"])))
    results = tmp_path / "ref.json"
    rc = ref.main(["--profile", "smoke", "--out", str(out), "--results", str(results), "--parallel"])
    doc = json.loads(results.read_text())
    assert list(doc["runs"]) == list(ref.ORDER) and rc == (1 if edm_fails else 0)
    runs = doc["runs"]
    rest = ("ct", "ict", "sct") if edm_fails else ("cd", "ct", "ict", "sct")
    share = str(max(1, (os.cpu_count() or 1) // len(rest)))      # the teacher alone: every core (no count set)
    assert doc["parallel"] == {"caps_min": ref.PARALLEL_CAPS["smoke"], "first": ["edm"],
                               "then": ["cd", "ct", "ict", "sct"], "omp_threads": {"edm": None, **{m: share
                                                                                                   for m in rest}}}
    assert [runs[m]["omp"] for m in rest] == [share] * len(rest) and runs["edm"].get("omp") is None
    assert max(runs[m]["t0"] for m in rest) < min(runs[m]["t1"] for m in rest)     # side by side
    if edm_fails:
        assert runs["edm"]["error"].startswith("process exited with 3")
        assert runs["cd"] == {"method": "cd", "error": "skipped: the EDM teacher run failed"}
    else:
        assert runs["edm"]["t1"] <= min(runs[m]["t0"] for m in rest)               # the teacher first, alone
        assert all("error" not in r for r in runs.values())
    assert measured == [sorted(ref.ORDER)]
    assert "reference_runs: edm ended" in capsys.readouterr().out
    assert "Trained side by side on the one device: edm alone, then cd, ct, ict, sct at once after edm" in \
        make_tables._parallel_note(doc)
    old = dict(doc, parallel={"caps_min": {}, "first": ["edm", "ct", "ict", "sct"], "then": ["cd"]})  # session 5's
    assert "device: edm, ct, ict, sct at once, then cd after edm (caps" in make_tables._parallel_note(old)


def test_a_method_in_neither_group_still_starts_after_the_teacher(tmp_path, monkeypatch):
    """A method missing from THEN (a future one, or a list edited wrongly) starts with the group after the teacher
    instead of waiting forever (mutation round: dropping sct from THEN hung run_parallel)."""
    import sys
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    out = tmp_path / "runs"
    monkeypatch.setattr(ref, "THEN", ("cd", "ct", "ict"))
    monkeypatch.setattr(ref, "child_argv", lambda m, a, res, cap=None: [sys.executable, "-c", FAKE_CHILD, m, res,
                                                                         str(out)])
    monkeypatch.setattr(ref, "remeasure_rates", lambda *args: None)
    results = tmp_path / "ref.json"
    import signal

    def hung(signum, frame):       # a method left waiting would loop forever: fail instead
        raise TimeoutError("run_parallel still waiting after 60 s")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        assert ref.main(["--profile", "smoke", "--out", str(out), "--results", str(results), "--parallel"]) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    runs = json.loads(results.read_text())["runs"]
    assert all("error" not in runs[m] for m in ref.ORDER)
    assert runs["edm"]["t1"] <= runs["sct"]["t0"] < min(runs[m]["t1"] for m in ("cd", "ct", "ict"))


def test_a_child_beside_others_gets_its_share_of_the_cores(monkeypatch):
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ref.os, "cpu_count", lambda: 16)
    assert ref.child_env(4)["OMP_NUM_THREADS"] == "4" and "OMP_NUM_THREADS" not in ref.child_env(1)
    monkeypatch.setattr(ref.os, "cpu_count", lambda: 2)
    assert ref.child_env(4)["OMP_NUM_THREADS"] == "1"                 # at least one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "7")                        # the user's count is kept
    assert ref.child_env(4)["OMP_NUM_THREADS"] == "7"


def test_deadline_shortens_the_cap_of_a_run_started_late(tmp_path, monkeypatch):
    """--deadline-s (gpu_check.sh: the stage's limit less 10 s): a run started when the teacher ends gets the cap that
    leaves DEADLINE_RESERVE_S before the deadline, its PARALLEL_CAPS one at most; the teacher, started at once, keeps
    its own. At GPU_CHECK_BUDGET_S=440 the stage gets ~430 s; the 3.2-minute caps, started after edm's cap and
    scores, end inside it by the measured times (test_parallel_caps_fit_the_stage)."""
    import sys
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    a = type("A", (), dict(profile="gpu", deadline_s=390.0))
    assert ref.parallel_cap("edm", a, 0.5) == 1.6 and ref.parallel_cap("ct", a, 100.0) == 3.2
    assert ref.parallel_cap("cd", a, 200.0) == pytest.approx((390 - 200 - ref.DEADLINE_RESERVE_S) / 60) == 130 / 60
    assert ref.parallel_cap("sct", a, 100.0) == 3.2 and ref.parallel_cap("cd", a, 389.0) == 0.1
    a.deadline_s = None
    assert ref.parallel_cap("cd", a, 1000.0) == 3.2
    # In a run: the caps the children get are recorded; cd starts at least edm's 0.5 s later, with that much less.
    out = tmp_path / "runs"
    caps = {}

    def child(m, a, res, cap=None):
        caps[m] = cap
        return [sys.executable, "-c", FAKE_CHILD, m, res, str(out)]
    monkeypatch.setattr(ref, "child_argv", child)
    monkeypatch.setattr(ref, "remeasure_rates", lambda *args: None)
    deadline = ref.DEADLINE_RESERVE_S + 0.6 * 60 - 3       # every smoke cap (0.6 min) shortened
    results = tmp_path / "ref.json"
    assert ref.main(["--profile", "smoke", "--out", str(out), "--results", str(results), "--parallel",
                     "--deadline-s", str(deadline)]) == 0
    doc = json.loads(results.read_text())
    assert 0.45 < caps["edm"] <= 33 / 60                  # started within 6 s of the start
    for m in ("cd", "ct", "ict", "sct"):                   # started at least edm's 0.5 s later, with that much less
        assert 0.1 <= caps[m] <= caps["edm"] - 0.5 / 60, m
    assert doc["parallel"]["caps_min"] == caps
    assert f"cd {caps['cd']:.3g}, " in make_tables._parallel_note(doc) and f"{caps['cd']:.3g}" != f"{caps['cd']:g}"


def test_parallel_caps_fit_the_stage():
    """The parallel gpu caps against the measured runs: the critical path, the teacher alone (its training time in
    the sequential GPU run, GPU_MEASURED, whose cap was 1.6 minutes, plus the start-up and scores its process took in
    the first --parallel set, GPU_MEASURED_PARALLEL, beside three other runs), then the slowest of the four after it
    (each one's training time in that set scaled by its cap's change, plus the largest start-up and score time any
    consistency run took there), the sampling rates again (15 s) and two exports (20 s) fit gpu_check.sh's reference
    stage with 30 s to spare. The teacher gets at least its sequential cap; CD more than in that set; CT, iCT and sCT
    at least 3x their sequential training time; each child gets its method's cap."""
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    caps = ref.PARALLEL_CAPS["gpu"]
    par = json.loads((make_tables.RESULTS / ref.GPU_MEASURED_PARALLEL).read_text())
    was, runs = par["parallel"]["caps_min"], par["runs"]
    measured_path = runs["edm"]["process_wall_s"] + runs["cd"]["process_wall_s"]
    assert measured_path < par["wall_s"] < measured_path + 15      # that set's path explains its stage
    sequential = json.loads((make_tables.RESULTS / ref.GPU_MEASURED).read_text())["runs"]
    overhead = {m: r["process_wall_s"] - r["train_wall_s"] for m, r in runs.items()}
    edm = sequential["edm"]["train_wall_s"] * caps["edm"] / 1.6 + overhead["edm"]
    after = {m: runs[m]["train_wall_s"] * caps[m] / was[m] + max(overhead[k] for k in ref.THEN) for m in ref.THEN}
    path = edm + max(after.values())
    stage_s = int(re.search(r"^REF_LIMIT=(\d+)$", (ROOT / "scripts" / "gpu_check.sh").read_text(), re.M)[1])
    assert path + 15 + 20 <= stage_s - 30, (path, stage_s)
    assert ref.FIRST == ("edm",) and set(ref.THEN) | {"edm"} == set(ref.ORDER)
    assert caps["edm"] >= 1.6 and caps["cd"] > was["cd"]
    for m in ("ct", "ict", "sct"):
        assert caps[m] * 60 > 3 * sequential[m]["train_s"], m
    a = type("A", (), dict(profile="gpu", out="o", seed=0, data_dir="d", device=None, cuda_graph=False))
    argv = ref.child_argv("ict", a, "r.json")
    assert argv[argv.index("--cap-minutes") + 1] == f"{caps['ict']:g}" and argv[argv.index("--only") + 1] == "ict"
    assert "--cuda-graph" not in argv


def test_cuda_graph_reaches_the_runs_that_have_a_graph_step():
    """--cuda-graph (gpu_check.sh: GPU_CHECK_CUDA_GRAPH=1): a --parallel child gets it, and so does every run's
    cmfast-train."""
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    a = type("A", (), dict(profile="gpu", out="o", seed=0, data_dir=None, device=None, cuda_graph=True))
    assert "--cuda-graph" in ref.child_argv("sct", a, "r.json")
    prof = ref.PROFILES["gpu"]
    for m in ref.ORDER:
        assert "--cuda-graph" in ref.train_argv(m, prof, "out", None, "cuda", 0, cuda_graph=True)
        assert "--cuda-graph" not in ref.train_argv(m, prof, "out", None, "cuda", 0)
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert 'GPU_CHECK_CUDA_GRAPH:-0}" = "1" ] && CUDA_GRAPH=(--cuda-graph)' in text
    assert '"${CUDA_GRAPH[@]}"' in text.split("run reference-runs", 1)[1].split("\n\n", 1)[0]


def test_readme_tables_are_the_generated_ones(tmp_path):
    """Every generated block of the committed README (summary, throughput, reference runs, sCT step) is what make_tables.py
    writes from the committed results: a hand edit or a results file added without regenerating fails here."""
    copy = tmp_path / "README.md"
    copy.write_text((ROOT / "README.md").read_text())
    assert make_tables.main(["--readme", str(copy)]) == 0
    assert copy.read_text() == (ROOT / "README.md").read_text()
    for begin in (make_tables.SUM_BEGIN, make_tables.BEGIN, make_tables.REF_BEGIN, make_tables.SCT_BEGIN):
        assert begin in copy.read_text()


def test_summary_table_from_named_runs(tmp_path):
    row = lambda task, batch, mode, ms: {"task": task, "batch": batch, "mode": mode, "median_ms": ms}
    (tmp_path / "a.json").write_text(json.dumps({"rows": [
        row("sample", 1, "cmfast", 2.0), row("sample", 1, "eager-bf16", 40.0),
        row("sample", 1, "compile-reduce-overhead", 2.5), row("sample", 1, "compile-max-autotune-no-cudagraphs", 3.0)]}))
    md = make_tables.summary_markdown(tmp_path, runs=(("A", "a.json"), ("B", "missing.json")),
                                      rows=(("sampling", "sample", 1), ("training", "ict", 256)))
    lines = md.splitlines()
    assert lines[0].startswith("| | batch | cmfast A / B |")
    assert lines[2] == ("| sampling | 1 | 2.00 / - ms | 40.0 / - ms | 2.50 / - ms (reduce-overhead) | 20.00x / - | "
                        "1.25x / - |")
    assert lines[3] == "| training | 256 | - / - ms | - / - ms | - / - ms | - / - | - / - |"


def test_rates_are_measured_again_only_for_the_runs_just_trained(monkeypatch):
    """--parallel --only ct beside kept results (an earlier file's ict, its checkpoint elsewhere, its evals without
    'steps'): only ct's rate is measured again; the kept run is left as it was, not loaded (that had raised)."""
    import cmfast.training.checkpoint as ckpt
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    loaded = []
    monkeypatch.setattr(ckpt, "load_model", lambda path, which, map_location: (loaded.append(path), {})[::-1])
    monkeypatch.setattr(ref, "sampling_rate", lambda model, device, batch, steps: 10.0 * steps)
    doc = {"runs": {"ct": {"run_dir": "here/ct", "evals": [{"steps": 1, "sample_img_per_s": 3.0},
                                                           {"steps": 2, "sample_img_per_s": 2.0}]},
                    "ict": {"run_dir": "elsewhere/ict", "evals": [{"nfe": 1, "sample_img_per_s": 5.0}]}}}
    a = type("A", (), dict(device="cpu"))
    ref.remeasure_rates(doc, ref.PROFILES["smoke"], a, ["ct"])
    assert loaded == ["here/ct"]
    assert [e["sample_img_per_s"] for e in doc["runs"]["ct"]["evals"]] == [10.0, 20.0]
    assert [e["sample_img_per_s_beside_runs"] for e in doc["runs"]["ct"]["evals"]] == [3.0, 2.0]
    assert doc["runs"]["ict"]["evals"] == [{"nfe": 1, "sample_img_per_s": 5.0}]


@pytest.mark.parametrize("name", ["reference_runs", "export_pretrained"])
def test_help_describes_the_script_in_whole_sentences(name, capsys):
    """--help's description is the docstring's first paragraph: its first line alone stopped mid-sentence
    ('... train an EDM teacher, CD from')."""
    mod = _load(ROOT / "scripts" / f"{name}.py", name)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    out = "".join(capsys.readouterr().out.split())      # argparse re-wraps it (also after hyphens)
    assert "".join(mod.__doc__.split("\n\n")[0].split()) in out


@pytest.mark.parametrize("fds, want", [
    ({"cd": 9.0, "ct": 8.0, "ict": 7.5, "sct": 6.0}, [("shipped", "ict"), ("shipped-sct", "sct")]),
    ({"cd": 9.0, "ct": 8.0, "ict": 5.5, "sct": 6.0}, [("shipped", "ict")]),
    ({"sct": 6.0}, [("shipped-sct", "sct")]),
    ({}, []),
])
def test_export_ships_a_consistency_model_by_its_name_and_a_better_sct_model_beside_it(monkeypatch, tmp_path, fds,
                                                                                       want):
    """--export NAME: NAME is the best 1-step of cd / ct / ict (load_pretrained(NAME) is a ConsistencyModel, as
    DESIGN's contract and the CUDA-graph sampler need); a TrigFlow sCT model that scored better still ships as
    NAME-sct beside it (the fifth H200 session: sct 5.95, ict 7.69), never as NAME."""
    import sys
    import types
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    calls = []

    notes = []

    def main(argv):
        calls.append((argv[argv.index("--name") + 1], argv[argv.index("--note") + 1].rsplit(": ", 1)[1]))
        notes.append(argv[argv.index("--note") + 1])
        return 0
    monkeypatch.setitem(sys.modules, "export_pretrained", types.SimpleNamespace(main=main))
    runs = {m: {"evals": [{"value": fd}], "run_dir": f"runs/{m}", "command": f"cmfast-train --method {m}",
                "train_s": 60.0, "images_seen": 1000} for m, fd in fds.items()}
    runs["edm"] = {"evals": [{"value": 1.0}], "run_dir": "runs/edm"}      # the teacher: never exported
    doc = {"device": "GPU", "runs": runs}
    a = types.SimpleNamespace(export="shipped", profile="gpu", export_dir=None, device=None, data_dir=None)
    ref.export_best(doc, a, str(tmp_path / "r.json"))
    assert calls == want
    runs_note = "best 1-step FD-FMNIST of the reference runs"
    assert notes == [f"{runs_note}' consistency models (cd, ct, ict) (gpu profile): ict" if n == "shipped" and
                     "shipped-sct" in dict(want) else f"{runs_note} (gpu profile): {m}" for n, m in want]
    got = [doc[k] for k in ("export", "export_trigflow") if k in doc and "name" in doc[k]]
    assert [(e["name"], e["method"], e["fd_1step"], e["rc"]) for e in got] == [(n, m, fds[m], 0) for n, m in want]
    if "ict" not in fds:
        assert doc["export"]["error"] == ("no skip-parameterized consistency model (cd, ct, ict) finished" if fds
                                          else "no consistency model finished")
    assert json.loads((tmp_path / "r.json").read_text())["runs"].keys() == runs.keys()
