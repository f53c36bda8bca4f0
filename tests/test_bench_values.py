"""The benchmark scripts' arithmetic from measurements to claims, checked against numbers computed here: the auto
table's winners at the documented bounds (benchmarks/make_auto_table.py), the latency gate's limits
(benchmarks/regress.py), the README tables' ratios and goal verdicts (benchmarks/make_tables.py) and the roofline
floor and speedup ratios (benchmarks/_harness.py, benchmarks/throughput.py). Synthetic JSON in tmp_path only."""
import argparse
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import _harness  # noqa: E402
import make_auto_table  # noqa: E402
import regress  # noqa: E402
import throughput  # noqa: E402

_spec = importlib.util.spec_from_file_location("make_tables", BENCH / "make_tables.py")
make_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tables)


# ---- make_auto_table ----------------------------------------------------------------------------------------------

def _table(tmp_path, *results):
    files = []
    for i, res in enumerate(results):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(res))
    out = tmp_path / "t.json"
    rc = make_auto_table.main([*map(str, files), "--out", str(out)])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def _cuda(rows, device="GPU A", device_type="cuda"):
    return {"device": device, "device_type": device_type, "dtype": "bfloat16", "rows": rows}


def _case(op, shape, times, pass_="fwd", **kw):
    return [dict(op=op, shape=shape, backend=b, median_ms=t, **{"pass": pass_}, **kw) for b, t in times.items()]


def test_auto_table_batch_bound_is_inclusive(tmp_path):
    """Batch SMALL_BATCH (8) is 'small', 9 is 'large': triton wins at 8 (torch 1.5x), torch at 9 (triton 3x); over
    both, torch's geometric mean sqrt(1.5) beats triton's sqrt(3)."""
    assert make_auto_table.SMALL_BATCH == 8
    rows = _case("attention", [8, 4, 64, 64], dict(torch=1.5, triton=1.0)) + \
        _case("attention", [9, 4, 64, 64], dict(torch=1.0, triton=3.0))
    rc, t = _table(tmp_path, _cuda(rows))
    assert rc == 0 and t["attention"] == {"default": "torch", "fwd/small": "triton"}
    assert t["_meta"]["ratios"]["attention"]["torch"] == pytest.approx(math.sqrt(1.5))
    assert t["_meta"]["ratios"]["attention"]["triton"] == pytest.approx(math.sqrt(3.0))


def test_auto_table_counts_cuda_files_only(tmp_path):
    """Only device_type 'cuda' counts: a ROCm-less 'mps' file or one without a device_type is no CUDA result."""
    rows = _case("attention", [1, 4, 64, 64], dict(torch=1.0, triton=0.5))
    for dt in ("mps", None):
        rc, _ = _table(tmp_path, _cuda(rows, device_type=dt))
        assert rc == 2
    rc, t = _table(tmp_path, _cuda(rows), _cuda(_case("attention", [1], dict(torch=1.0)), "CPU X", "cpu"))
    assert rc == 0 and t["_meta"]["devices"] == ["GPU A"]


def test_auto_table_drops_zero_times(tmp_path):
    """A median (or replay time) of 0 is no measurement: torch's 0.0 is dropped, triton (1.0) beats cuda (2.0), and a
    graph time of 0 for one backend leaves the case to its eager times."""
    rows = _case("attention", [1, 4, 64, 64], dict(torch=0.0, triton=1.0, cuda=2.0))
    rc, t = _table(tmp_path, _cuda(rows))
    assert rc == 0 and t["attention"] == "triton" and set(t["_meta"]["ratios"]["attention"]) == {
        "triton", "cuda", "cases"}
    rows = [dict(r, graph_median_ms=g) for r, g in zip(_case("attention", [1, 4, 64, 64], dict(torch=1.0, triton=2.0)),
                                                         (0.0, 0.5))]
    rc, t = _table(tmp_path, _cuda(rows))
    assert t["attention"] == "torch" and t["_meta"]["ratios"]["attention"]["triton"] == pytest.approx(2.0)


def test_auto_table_ties_go_to_the_simpler_backend(tmp_path):
    rows = _case("attention", [1, 4, 64, 64], dict(cuda=1.0, triton=1.0, torch=1.0))
    rc, t = _table(tmp_path, _cuda(rows))
    assert t["attention"] == "torch"
    rows = _case("attention", [1, 4, 64, 64], dict(cuda=1.0, triton=1.0, torch=2.0))
    rc, t = _table(tmp_path, _cuda(rows))
    assert t["attention"] == "triton"


def test_auto_table_cases_differ_by_every_case_key(tmp_path):
    """Rows that differ only in groups (or kind, uint8) are two cases: groups 32 (torch 2x triton) and 8 (triton 3x
    torch) give torch sqrt(2), triton sqrt(3), torch wins over 2 cases."""
    rows = _case("group_norm_act", [1, 64, 8, 8], dict(torch=2.0, triton=1.0), groups=32) + \
        _case("group_norm_act", [1, 64, 8, 8], dict(torch=1.0, triton=3.0), groups=8)
    rc, t = _table(tmp_path, _cuda(rows))
    r = t["_meta"]["ratios"]["group_norm_act"]
    assert t["group_norm_act"] == "torch" and r["cases"] == 2
    assert r["torch"] == pytest.approx(math.sqrt(2.0)) and r["triton"] == pytest.approx(math.sqrt(3.0))


def test_auto_table_size_entry_compares_with_its_class(tmp_path):
    """fwd/nhwc's winner (triton) differs from the op's (torch, from fwd/nchw); its batch sizes agree with it and add
    nothing, while fwd/nchw/small (triton) differs from fwd/nchw (torch) and is listed."""
    rows = (_case("group_norm_act", [1, 64, 8, 8], dict(torch=2.0, triton=1.0), layout="nhwc")
            + _case("group_norm_act", [64, 64, 8, 8], dict(torch=2.0, triton=1.0), layout="nhwc")
            + _case("group_norm_act", [1, 64, 8, 8], dict(torch=1.2, triton=1.0), layout="nchw")
            + _case("group_norm_act", [64, 64, 8, 8], dict(torch=1.0, triton=4.0), layout="nchw")
            + _case("group_norm_act", [128, 64, 8, 8], dict(torch=1.0, triton=4.0), layout="nchw"))
    rc, t = _table(tmp_path, _cuda(rows))
    # op: torch gm (2*2*1.2*1*1)^(1/5) = 4.8^0.2, triton (1*1*1*4*4)^(1/5) = 16^0.2
    assert t["_meta"]["ratios"]["group_norm_act"]["torch"] == pytest.approx(4.8 ** 0.2)
    assert t["group_norm_act"] == {"default": "torch", "fwd/nhwc": "triton", "fwd/nchw": "torch",
                                   "fwd/nchw/small": "triton"}


def test_auto_table_pass_without_a_layout_is_its_own_class(tmp_path):
    """An op without a layout keys its classes by pass alone: 'fwd' (triton 2x faster) and 'fwd+bwd' (torch 3x
    faster); over both torch's geometric mean sqrt(2) beats triton's sqrt(3)."""
    rows = _case("consistency_loss", [64, 3, 32, 32], dict(torch=2.0, triton=1.0)) + \
        _case("consistency_loss", [64, 3, 32, 32], dict(torch=1.0, triton=3.0), "fwd+bwd")
    rows = [dict(r, graph_median_ms=r["median_ms"]) for r in rows]      # fwd+bwd at batch 64 votes with replay times
    rc, t = _table(tmp_path, _cuda(rows))
    assert t["consistency_loss"] == {"default": "torch", "fwd": "triton", "fwd+bwd": "torch"}


def test_auto_table_unvoted_size_adds_nothing_when_it_inherits_the_ops_winner(tmp_path):
    """fwd+bwd/nhwc measured at batch 8 (triton) and at 256 with eager times only (no vote): the op's winner is
    triton too, so batch 256 inherits triton with no entry of its own."""
    rows = (_case("group_norm_act", [8, 64, 8, 8], dict(torch=2.0, triton=1.0), "fwd+bwd", layout="nhwc")
            + _case("group_norm_act", [256, 64, 8, 8], dict(torch=1.0, triton=5.0), "fwd+bwd", layout="nhwc")
            + _case("group_norm_act", [8, 64, 8, 8], dict(torch=1.0, triton=1.5), "fwd", layout="nchw"))
    rc, t = _table(tmp_path, _cuda(rows))
    # op: torch (2 * 1)^(1/2) = 1.41, triton (1 * 1.5)^(1/2) = 1.22 -> triton; classes: fwd+bwd/nhwc triton, fwd/nchw
    # torch, so the entry lists both; fwd+bwd/nhwc/large is unvoted and would inherit triton, the op's winner
    assert t["group_norm_act"] == {"default": "triton", "fwd+bwd/nhwc": "triton", "fwd/nchw": "torch"}
    assert t["_meta"]["ratios"]["group_norm_act"]["cases"] == 2


def test_auto_table_retired_input_rows_never_vote(tmp_path):
    """qkv is no case key: the strided-view rows would share the dense rows' case and, listed after them, replace
    their times. Dense at batch 1: triton 0.9 vs torch 1.2 (triton); the views rows after them (triton 12x slower)
    and a shape measured on views only (batch 64) count for nothing."""
    rows = (_case("attention", [1, 1, 256, 256], dict(torch=1.2, triton=0.9), qkv="unet-dense")
            + _case("attention", [1, 1, 256, 256], dict(torch=1.0, triton=12.0), qkv="unet-nhwc-views")
            + _case("attention", [64, 1, 256, 256], dict(torch=1.0, triton=12.0), qkv="unet-nhwc-views"))
    rc, t = _table(tmp_path, _cuda(rows))
    r = t["_meta"]["ratios"]["attention"]
    assert t["attention"] == "triton" and r["cases"] == 1 and r["torch"] == pytest.approx(1.2 / 0.9)


# ---- regress ------------------------------------------------------------------------------------------------------

def _bench(medians, slug="nvidia-h200", ungated=()):
    return {"benchmarks": [{"name": n, "stats": {"median": m, "mean": m * 10},
                            "extra_info": {"device_slug": slug, **({"gate": False} if n in ungated else {})}}
                           for n, m in medians.items()]}


def test_compare_fails_above_the_threshold_only():
    """Baseline 2.0 s, threshold 0.5: the limit is 3.0 (exactly at it passes, 3.01 fails); a faster run passes; a
    missing row fails; an ungated row (gate: false) does not count however slow."""
    base = {"medians": {"at": 2.0, "over": 2.0, "faster": 2.0, "gone": 2.0, "eager": 2.0}}
    cur = _bench({"at": 3.0, "over": 3.01, "faster": 0.5, "eager": 50.0}, ungated=("eager",))
    fails = regress.compare_benchmarks(cur, base, 0.5)
    assert [f.split(":")[0] for f in fails] == ["over", "gone"]
    assert "median 3010.000 ms > baseline 2000.000 ms x 1.50" in fails[0]
    assert regress.compare_benchmarks(_bench({"a": 1.1}), {"medians": {"a": 1.0}}, 0.15) == []


def test_cpu_gate_limit_and_tries(monkeypatch):
    def gate(ratios, baseline, threshold=None):
        it = iter(ratios)
        monkeypatch.setattr(regress, "measure_cpu", lambda **kw: {"ratio": next(it)})
        ok, runs = regress.cpu_gate(baseline, threshold)
        return ok, [r["ratio"] for r in runs]
    base = {"ratio": 2.0, "threshold": 0.5}                          # limit 3.0
    assert gate([3.5, 3.2, 3.0], base) == (True, [3.5, 3.2, 3.0])     # the third try, at the limit, passes
    assert gate([3.5, 3.2, 3.1, 1.0], base) == (False, [3.5, 3.2, 3.1])
    assert gate([2.8], {"ratio": 2.0}) == (True, [2.8])              # CPU_THRESHOLD 0.5: limit 2.0 x 1.5
    assert gate([2.6] * 3, {"ratio": 2.0, "threshold": 0.25}) == (False, [2.6] * 3)     # the baseline's own 0.25
    assert gate([2.6], {"ratio": 2.0, "threshold": 0.25}, threshold=0.5) == (True, [2.6])


def test_cpu_main_uses_the_baseline_threshold_and_writes_the_median(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"ratio": 2.0, "threshold": 0.25}))
    monkeypatch.setattr(regress, "measure_cpu", lambda **kw: {"ratio": 2.6, "measured_ms": 2.6, "reference_ms": 1.0})
    assert regress.main(["cpu", "--baseline", str(base)]) == 1              # 2.6 > 2.0 x 1.25
    assert "FAIL" in capsys.readouterr().out
    base.write_text(json.dumps({"ratio": 2.2, "threshold": 0.25}))
    assert regress.main(["cpu", "--baseline", str(base)]) == 0              # 2.6 <= 2.75
    it = iter([1.0, 5.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(regress, "measure_cpu", lambda **kw: {"ratio": next(it)})
    monkeypatch.setattr(regress, "_cpu_model", lambda: "Test CPU")
    assert regress.main(["cpu", "--baseline", str(base), "--write-baseline"]) == 0
    written = json.loads(base.read_text())
    assert written["ratio"] == 3.0 and written["threshold"] == regress.CPU_THRESHOLD


def test_cpu_baseline_without_a_threshold_is_gated_at_the_default(tmp_path, monkeypatch, capsys):
    """A baseline with a ratio and no threshold (the reader accepts it; cpu_gate defaults to CPU_THRESHOLD) was
    gated and then a KeyError traceback printing the limit: exit 1 read as a slowdown, even for a pass."""
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"ratio": 2.0}))
    for ratio, rc in ((2.9, 0), (3.1, 1)):                   # limit 2.0 x 1.5 = 3.0
        monkeypatch.setattr(regress, "measure_cpu", lambda **kw: {"ratio": ratio, "measured_ms": 1.0,
                                                                   "reference_ms": 1.0})
        assert regress.main(["cpu", "--baseline", str(base)]) == rc
        assert "limit x1.50" in capsys.readouterr().out


def test_measure_cpu_is_the_median_of_measured_over_reference(monkeypatch):
    clock = [0.0]
    a_steps = iter([9.0, 9.0, 3.0, 1.0, 4.0, 1.0, 5.0])       # two warm-up calls, then five timed
    monkeypatch.setattr(regress.time, "perf_counter", lambda: clock[0])

    def a():
        clock[0] += next(a_steps)

    def b():
        clock[0] += 2.0
    monkeypatch.setattr(regress, "_sampling_path", lambda inject: a)
    monkeypatch.setattr(regress, "_reference_workload", lambda: b)
    r = regress.measure_cpu(pairs=5, inject=1)
    # ratios 1.5, 0.5, 2.0, 0.5, 2.5: median 1.5; measured median 3 s, reference 2 s
    assert r["ratio"] == 1.5 and r["measured_ms"] == 3000.0 and r["reference_ms"] == 2000.0


def test_compare_main_picks_the_device_baseline_and_its_threshold(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(regress, "RESULTS", tmp_path)
    (tmp_path / "baseline-nvidia-h200.json").write_text(json.dumps({"medians": {"a": 1.0}, "threshold": 0.5}))
    (tmp_path / "baseline-cpu.json").write_text(json.dumps({"medians": {"a": 10.0}, "threshold": 0.5}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_bench({"a": 1.4})))
    assert regress.main(["compare", str(bench)]) == 0                        # 1.4 <= 1.0 x 1.5
    assert regress.main(["compare", str(bench), "--threshold", "0.2"]) == 1  # 1.4 > 1.0 x 1.2
    bench.write_text(json.dumps(_bench({"a": 1.6})))
    assert regress.main(["compare", str(bench)]) == 1
    bench.write_text(json.dumps(_bench({"a": 1.6}, slug="nvidia-h100-80gb-hbm3")))
    assert regress.main(["compare", str(bench)]) == regress.NO_BASELINE == 3
    assert "NOT GATED" in capsys.readouterr().out
    out = tmp_path / "new"
    out.mkdir()
    assert regress.main(["compare", str(bench), "--write-baseline", str(out), "--threshold", "0.3"]) == 3
    written = json.loads((out / "baseline-nvidia-h100-80gb-hbm3.json").read_text())
    assert written == {"device_slug": "nvidia-h100-80gb-hbm3", "medians": {"a": 1.6}, "ungated": [], "threshold": 0.3,
                       "date": written["date"]}


# ---- make_tables --------------------------------------------------------------------------------------------------

def _ev(nfe, value, rate=100.0):
    return {"nfe": nfe, "value": value, "sample_img_per_s": rate}


def _ref(runs):
    return {"benchmark": "reference_runs", "profile": "gpu", "device": "H", "device_slug": "h", "date": "2026-11-26",
            "torch": "2", "preset": "p", "batch_size": 256, "precision": "bf16", "eval_num": 100, "runs": runs}


def _m(*evals):
    return {"steps": 1, "steps_planned": 1, "images_seen": 1, "train_wall_s": 1.0, "train_img_per_s": 1.0,
            "evals": list(evals)}


def test_goal_verdicts_at_their_bounds():
    """2-step equal to 1-step is not better (cd: missed); CD equal to CT is not better (missed); the best 2-step (by
    2-step score: ict's 3.0, not cd's better 1-step) at exactly 1.5x the teacher (2.0) is within it (met). The
    teacher's own 1- and 2-step scores are no consistency model's."""
    run = _ref({"edm": _m(_ev(1, 50.0), _ev(2, 60.0), _ev(35, 2.0)),
                "cd": _m(_ev(2, 5.0), _ev(1, 5.0)),               # 2-step listed first: _fd matches nfe exactly
                "ct": _m(_ev(1, 5.0), _ev(2, 4.0)),
                "ict": _m(_ev(1, 9.0), _ev(2, 3.0))})
    assert make_tables.reference_goals(run) == [
        "2 steps (default level 0.821) better than 1 for every method: missed (cd)",
        "CD 1-step better than CT 1-step: missed (5.00 vs 5.00)",
        "best 2-step (ict, default level 0.821) within 1.5x of the teacher: met (1.50x)"]
    run["runs"]["ict"]["evals"][1]["value"] = 3.02                # 1.51x
    assert make_tables.reference_goals(run)[2] == \
        "best 2-step (ict, default level 0.821) within 1.5x of the teacher: missed (1.51x)"


def test_reference_row_rate_is_the_one_step_rate():
    run = dict(_ref({"edm": _m(_ev(1, 50.0, rate=7.0), _ev(35, 2.0, rate=3.0))}), _file="x.json")
    row = next(x for x in make_tables.reference_markdown([run]).splitlines() if x.startswith("| edm |"))
    assert row.rstrip().endswith("| 50.00 | - | - | 2.00 | 7.0 |")


def test_summary_ratios_and_the_best_compile(tmp_path):
    rows = [{"task": "sample", "batch": 256, "mode": "cmfast", "median_ms": 0.5},
            {"task": "sample", "batch": 1, "mode": "eager-fp32", "median_ms": 1.0},
            {"task": "sample", "batch": 1, "mode": "eager-bf16", "median_ms": 10.0},
            {"task": "sample", "batch": 1, "mode": "compile-default", "median_ms": 5.0},
            {"task": "sample", "batch": 1, "mode": "compile-max-autotune", "median_ms": 4.0},
            {"task": "sample", "batch": 1, "mode": "cmfast", "median_ms": 2.0}]
    (tmp_path / "x.json").write_text(json.dumps({"rows": rows}))
    md = make_tables.summary_markdown(tmp_path, runs=(("X", "x.json"),), rows=(("t", "sample", 1),))
    # vs eager bf16: 10 / 2 = 5x; vs the best compile (4.0 ms, max-autotune): 4 / 2 = 2x
    assert md.splitlines()[2] == "| t | 1 | 2.00 ms | 10.0 ms | 4.00 ms (max-autotune) | 5.00x | 2.00x |"


def test_sct_table_speedup_is_exact_over_fd_at_the_same_batch(tmp_path):
    rows = [{"row": "sct-exact", "batch": 128, "time_ms": 100.0},
            {"row": "sct-fd", "batch": 64, "time_ms": 10.0, "time_vs_ict": 1.2, "mem_vs_ict": 0.9},
            {"row": "sct-exact", "batch": 64, "time_ms": 25.0}]
    (tmp_path / "s.json").write_text(json.dumps({"rows": rows}))
    md = make_tables.sct_markdown(tmp_path, runs=(("L", "s.json", "sct-fd"),))
    assert md.splitlines()[2:] == ["| L | 64 | 1.20x | 2.50x | 0.90x |"]


def test_throughput_table_shows_x_floor():
    run = {"rows": [{"task": "sample", "preset": "tiny", "batch": 1, "mode": "cmfast", "median_ms": 3.0,
                     "images_per_s": 333.3, "floor_ms": 0.5, "x_floor": 6.0,
                     "speedup_vs": {"eager-bf16": 2.0, "best-compile": 1.5}}]}
    assert make_tables.table(run, "sample")[2] == "| tiny | 1 | cmfast | 3.000 | 333.3 | 2.00x | 1.50x | 6.00x |"


def test_newest_run_is_kept_per_device_quick_and_batch(tmp_path):
    base = {"benchmark": "throughput", "device_slug": "h200", "device_type": "cuda", "rows": [], "complete": True}
    (tmp_path / "a.json").write_text(json.dumps({**base, "date": "2026-11-26", "quick": False}))
    (tmp_path / "b.json").write_text(json.dumps({**base, "date": "2026-11-27", "quick": True}))
    assert sorted(r["_file"] for r in make_tables.load_runs(tmp_path)) == ["a.json", "b.json"]
    full = {m: _m(_ev(1, 5.0), _ev(2, 4.0)) for m in make_tables.REFERENCE_METHODS}
    (tmp_path / "r1.json").write_text(json.dumps(dict(_ref(full), batch_size=256)))
    (tmp_path / "r2.json").write_text(json.dumps(dict(_ref(full), batch_size=1024, date="2026-11-27")))
    assert [r["batch_size"] for r in make_tables.load_reference(tmp_path)] == [256, 1024]


# ---- _harness / throughput ----------------------------------------------------------------------------------------

CEIL = {"matmul_tflops": 1.0, "copy_gb_per_s": 100.0}      # 1e9 FLOP/ms, 1e8 B/ms


def test_floor_is_the_larger_of_compute_and_bandwidth():
    assert _harness.floor_ms(2e12, 1e9, CEIL) == pytest.approx(2000.0)       # compute 2000 ms, bytes 10 ms
    assert _harness.floor_ms(1e9, 5e9, CEIL) == pytest.approx(50.0)          # compute 1 ms, bytes 50 ms


def test_ceilings_arithmetic(monkeypatch):
    monkeypatch.setattr(_harness, "time_ms", lambda fn, device, budget: {"median_ms": 2.0})
    c = _harness.ceilings(torch.device("cpu"), quick=True)
    assert c["matmul_tflops"] == pytest.approx(2 * 1024 ** 3 / 2e-3 / 1e12)     # 2 n^3 FLOP in 2 ms
    assert c["copy_gb_per_s"] == pytest.approx(2 * (64 << 20) / 2e-3 / 1e9)     # read + write in 2 ms


def test_device_slug_of_a_gpu_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: " NVIDIA H100 80GB HBM3 ")
    assert _harness.device_slug(torch.device("cuda")) == "nvidia-h100-80gb-hbm3"


def _fake_model():
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(10))
    m.net = types.SimpleNamespace(in_channels=3, img_resolution=4)
    return m


def test_sample_and_train_floors():
    f = throughput.sample_floor(_fake_model(), 4, CEIL, lambda: 1e6)
    # 4e6 FLOPs; bytes: 10 weights x 2 (bf16) + 4 x 3 x 4 x 4 x (4 + 4) = 1556; floor = 4e6 / 1e9 = 4e-3 ms
    assert f == {"flops": 4e6, "bytes": 1556, "floor_ms": pytest.approx(4e-3)}
    a, b = torch.randn(2, 3), torch.randn(3, 5)
    f = throughput.train_floor(_fake_model(), 4, CEIL, lambda: a @ b)
    assert f == {"flops": 2 * 2 * 3 * 5, "bytes": 10 * 4 * 11, "floor_ms": pytest.approx(440 / 1e8)}


def test_row_images_per_s_and_x_floor(monkeypatch):
    monkeypatch.setattr(_harness, "time_ms", lambda fn, device, budget: {"median_ms": 4.0})
    r = throughput.Runner(argparse.Namespace(budget_s=None, quick=True, profile=False, deadline_s=None),
                          torch.device("cpu"))
    row = r.row("sample", "tiny", 8, "cmfast", "auto", lambda: (lambda: None), {"floor_ms": 0.5})
    assert row["images_per_s"] == 2000.0 and row["x_floor"] == 8.0
    # --profile: busy = the kernels' (here operators') summed time per call over the median, 1 ms of 4
    monkeypatch.setattr(_harness, "kernel_profile", lambda fn, device: {"summed_ms_per_call": 1.0})
    r.args.profile = True
    row = r.row("sample", "tiny", 8, "cmfast", "auto", lambda: (lambda: None))
    assert row["profile"]["busy"] == 0.25 and "x_floor" not in row


def test_add_ratios_against_eager_and_the_best_compile_of_the_same_batch():
    def r(mode, ms, batch=1):
        return {"task": "sample", "preset": "tiny", "batch": batch, "mode": mode, "median_ms": ms}
    rows = [r("cmfast", 0.1, 2), r("compile-default", 0.01, 2), r("eager-bf16", 1.0, 2),
            r("eager-bf16", 10.0), r("cmfast", 2.0), r("compile-default", 5.0), r("compile-max-autotune", 4.0),
            {"task": "sample", "preset": "tiny", "batch": 1, "mode": "compile-x", "error": "boom"}]
    throughput.add_ratios(rows, "eager-bf16")
    assert rows[4]["speedup_vs"] == {"eager-bf16": 5.0, "best-compile": 2.0}
    assert rows[6]["speedup_vs"] == {"eager-bf16": 2.5, "best-compile": 1.0}
    assert rows[0]["speedup_vs"] == {"eager-bf16": 10.0, "best-compile": pytest.approx(0.1)}
    assert "speedup_vs" not in rows[7]
