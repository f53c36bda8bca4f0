"""Gaps that mutation testing of stop 31's changes found (each test was seen failing on its mutant): reference_runs'
export (a failed run, export_pretrained's exit status, the searched levels, an sCD model), regress --write-baseline's
order of the ungated rows, throughput's compile budget for a compile row that fails and its run order on CPU, and
wrapper_overhead's restore after an error and its row labels."""
import argparse
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from _repo import load_script as _load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _harness  # noqa: E402
import regress  # noqa: E402
import throughput  # noqa: E402


def _export(monkeypatch, tmp_path, runs, rc=None, **a_kw):
    """reference_runs.export_best on a doc of `runs` ({method: run}), export_pretrained.main recorded (its exit
    status rc[name], 0 by default) -> (doc, [argv of each export])."""
    ref = _load(ROOT / "scripts" / "reference_runs.py", "reference_runs")
    argvs = []

    def main(argv):
        argvs.append(argv)
        return (rc or {}).get(argv[argv.index("--name") + 1], 0)
    monkeypatch.setitem(sys.modules, "export_pretrained", types.SimpleNamespace(main=main))
    full = {m: {"run_dir": f"runs/{m}", "command": f"cmfast-train --method {m}", "train_s": 90.0,
                "images_seen": 500, **r} for m, r in runs.items()}
    doc = {"device": "GPU", "runs": full}
    a = types.SimpleNamespace(**{"export": "shipped", "profile": "gpu", "export_dir": None, "device": None,
                                 "data_dir": None, **a_kw})
    ref.export_best(doc, a, str(tmp_path / "r.json"))
    return doc, argvs


def _opt(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_export_skips_a_run_that_failed_after_scoring(monkeypatch, tmp_path):
    # ict scored best but then failed: not exported; ct (the next best of cd / ct / ict) is NAME
    doc, argvs = _export(monkeypatch, tmp_path, {"ict": {"evals": [{"value": 5.0}], "error": "killed"},
                                                 "ct": {"evals": [{"value": 7.0}]}, "cd": {"evals": [{"value": 9.0}]}})
    assert [(_opt(v, "--name"), _opt(v, "--checkpoint")) for v in argvs] == [("shipped", "runs/ct")]
    assert doc["export"] == {"name": "shipped", "method": "ct", "fd_1step": 7.0, "rc": 0}


def test_export_records_export_pretrained_exit_status(monkeypatch, tmp_path):
    doc, _ = _export(monkeypatch, tmp_path, {"ict": {"evals": [{"value": 8.0}]}, "sct": {"evals": [{"value": 6.0}]}},
                     rc={"shipped": 1, "shipped-sct": 2})
    assert (doc["export"]["rc"], doc["export_trigflow"]["rc"]) == (1, 2)


def test_export_passes_the_searched_levels_and_the_paths(monkeypatch, tmp_path):
    runs = {"ict": {"evals": [{"value": 8.0}], "sigma_search": {"sigmas": [80.0, 0.75]}},
            "sct": {"evals": [{"value": 6.0}]}}
    _, argvs = _export(monkeypatch, tmp_path, runs, export_dir="out", device="cuda:1", data_dir="data")
    ict, sct = argvs
    assert _opt(ict, "--searched-sigmas") == "80.0,0.75" and "--searched-sigmas" not in sct
    assert [(_opt(v, "--out-dir"), _opt(v, "--device"), _opt(v, "--data-dir")) for v in argvs] == \
        [("out", "cuda:1", "data")] * 2
    assert _opt(ict, "--device-note") == "GPU, 1.5 min of training, 500 images"


def test_an_scd_model_is_never_name_and_ships_beside_it(monkeypatch, tmp_path):
    # sCD is a TrigFlow model too (TRIGFLOW_METHODS): it ships as NAME-scd, NAME stays the best of cd / ct / ict
    doc, argvs = _export(monkeypatch, tmp_path, {"ct": {"evals": [{"value": 7.0}]}, "sct": {"evals": [{"value": 6.0}]},
                                                 "scd": {"evals": [{"value": 5.0}]}})
    assert [(_opt(v, "--name"), _opt(v, "--checkpoint")) for v in argvs] == [("shipped", "runs/ct"),
                                                                            ("shipped-scd", "runs/scd")]
    assert _opt(argvs[0], "--note") == ("best 1-step FD-FMNIST of the reference runs' consistency models (cd, ct, "
                                        "ict) (gpu profile): ct")
    assert doc["export_trigflow"] == {"name": "shipped-scd", "method": "scd", "fd_1step": 5.0, "rc": 0}


def _bench(*rows):
    return {"benchmarks": [{"name": n, "stats": {"median": v}, "extra_info": {"device_slug": "cpu", **extra}}
                           for n, v, extra in rows]}


def test_write_baseline_lists_the_ungated_rows_sorted(tmp_path):
    bench = tmp_path / "latency.json"
    bench.write_text(json.dumps(_bench(("z_eager", 9e-3, {"gate": False}), ("a", 2e-3, {}),
                                       ("m_eager", 8e-3, {"gate": False}), ("b", 1e-3, {"gate": True}))))
    assert regress.main(["compare", str(bench), "--baseline", str(tmp_path / "none.json"),
                         "--write-baseline", str(tmp_path)]) == regress.NO_BASELINE
    assert json.loads((tmp_path / "baseline-cpu.json").read_text())["ungated"] == ["m_eager", "z_eager"]


def test_a_compile_row_that_fails_still_spends_the_budget(monkeypatch):
    # a compile that runs 80 s and then raises: its 80 s are gone from --budget-s
    clock = [100.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(throughput, "dynamo_counts", lambda: {})
    r = throughput.Runner(argparse.Namespace(budget_s=200.0, quick=True, profile=False), torch.device("cpu"))

    def make():
        clock[0] += 80.0
        raise RuntimeError("compile failed")
    row = r.row("sample", "tiny", 1, "compile-reduce-overhead", "torch", make, compile_row=True)
    assert row["error"].startswith("RuntimeError") and r.left_s() == 120.0


def test_cpu_run_has_no_compile_sampling_pass(monkeypatch):
    # on CPU no mode compiles: each preset's sampling runs once (no second pass with no modes, a model built for
    # nothing); no training rows
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(_harness, "environment", lambda d: {"device": "cpu", "device_slug": "cpu", "device_type": "cpu",
                                                            "torch": "x", "triton": "x", "cuda": "x",
                                                            "date": "2026-01-01T00:00"})
    monkeypatch.setattr(_harness, "ceilings", lambda device, quick: {"matmul_tflops": 1.0, "matmul_dtype": "fp32",
                                                                     "copy_gb_per_s": 10.0})
    monkeypatch.setattr(_harness, "write_result", lambda *a, **k: None)
    monkeypatch.setattr(throughput, "run_sampling", lambda r, p, b, modes, c: calls.append(("sample", p, modes)))
    monkeypatch.setattr(throughput, "run_training", lambda r, p, b, modes, c: calls.append(("ict", p, modes)))
    assert throughput.main(["--cpu", "--presets", "tiny", "fmnist-small"]) == 0
    assert calls == [("sample", "tiny", ["eager-fp32", "cmfast"]), ("sample", "fmnist-small", ["eager-fp32", "cmfast"]),
                     ("ict", "tiny", []), ("ict", "fmnist-small", [])]


def _wrapper_overhead():
    from cmfast import _build
    if _build.unavailable_reason():      # the cuda wrappers' module refuses to import without a CUDA toolchain
        pytest.skip(_build.unavailable_reason())
    return _load(ROOT / "benchmarks" / "wrapper_overhead.py", "wrapper_overhead")


def test_no_op_kernels_restores_every_name_after_an_error():
    wo = _wrapper_overhead()
    import cmfast.kernels.group_norm_act as kgn
    from cmfast.ops import _cuda
    before = {(m.__name__, n): getattr(m, n) for m in (kgn, _cuda) for n in dir(m) if not n.startswith("__")}
    with pytest.raises(RuntimeError, match="inside"):
        with wo.no_op_kernels():
            assert _cuda._stream(None) == 0
            raise RuntimeError("inside")
    after = {(m.__name__, n): getattr(m, n) for m in (kgn, _cuda) for n in dir(m) if not n.startswith("__")}
    assert [k for k, v in before.items() if after[k] is not v] == []


def test_rows_are_labelled_with_the_backend_and_layout_they_ran(monkeypatch):
    wo = _wrapper_overhead()
    from cmfast.ops import _cuda, _triton
    seen = []
    for name, mod in (("cuda", _cuda), ("triton", _triton)):
        def rec(x, *args, _real=mod.group_norm_act, _name=name, **kw):
            seen.append((_name, "nhwc" if x.is_contiguous(memory_format=torch.channels_last) and
                         not x.is_contiguous() else "nchw"))
            return _real(x, *args, **kw)
        monkeypatch.setattr(mod, "group_norm_act", rec)
    rows = wo.measure(calls=3, repeats=1, shapes=(((2, 8, 4, 4), 4, False), ((2, 8, 4, 4), 4, True)))
    runs = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]      # one entry per row's calls
    assert [(r["backend"], r["layout"]) for r in rows] == runs == [("cuda", "nchw"), ("triton", "nchw"),
                                                                   ("cuda", "nhwc"), ("triton", "nhwc")]
