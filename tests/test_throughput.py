"""benchmarks/throughput.py on CPU (the tiny preset, batch 1): rows with timings and kernel profiles, the JSON
written after every row (a run stopped at a time limit keeps its rows), and the compile rows' dynamo counts."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _harness  # noqa: E402
import throughput  # noqa: E402


def test_cpu_run_writes_rows_with_profiles(tmp_path):
    out = tmp_path / "tp.json"
    assert throughput.main(["--cpu", "--presets", "tiny", "--batches", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] is True and [r["mode"] for r in res["rows"]] == ["eager-fp32", "cmfast"]
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["images_per_s"] == pytest.approx(1e3 / r["median_ms"])
        prof = r["profile"]
        # the tiny UNet is some hundreds of operators (38 convolutions alone), each counted once per call
        assert prof["what"] == "top-level CPU operators" and 100 < prof["per_call"] < 2000
        assert 0 < prof["summed_ms_per_call"] and 0 < prof["busy"] < 5
        assert prof["top"][0]["ms_per_call"] >= prof["top"][-1]["ms_per_call"]
    assert res["rows"][0]["speedup_vs"]["eager-fp32"] == 1.0


def test_a_stopped_run_keeps_the_rows_measured(tmp_path, monkeypatch):
    out = tmp_path / "tp.json"
    calls = []
    real = _harness.time_ms

    def time_ms(*a, **k):            # the second row is where the time limit strikes (SIGINT from `timeout`)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(_harness, "time_ms", time_ms)
    monkeypatch.setattr(_harness, "ceilings", lambda *a: {"matmul_tflops": 0.1, "matmul_dtype": "float32",
                                                         "copy_gb_per_s": 10.0})
    with pytest.raises(KeyboardInterrupt):
        throughput.main(["--cpu", "--presets", "tiny", "--batches", "1", "--no-profile", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] is False and [r["mode"] for r in res["rows"]] == ["eager-fp32"]
    assert res["rows"][0]["median_ms"] > 0 and "profile" not in res["rows"][0]


def test_dynamo_counts_name_graph_breaks():
    def f(x):
        y = x.sin()
        print("", end="")            # a graph break
        return y.cos()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.compile(f, backend="eager")(torch.randn(3))
    counts = throughput.dynamo_counts()
    assert counts["unique_graphs"] >= 2 and counts["graph_breaks"] >= 1 and counts["break_reasons"]


def test_kernel_family_names():
    fam = _harness.kernel_family
    assert fam("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32") == "conv"
    assert fam("triton_per_fused_native_group_norm_silu_3") == "group_norm"
    assert fam("triton_poi_fused_add_mul_7") == "inductor"
    assert fam("nvjet_tst_128x64_64x8_1x1_v_bz_TNT") == "gemm"
    assert fam("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    assert fam("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == "elementwise"
    assert fam("Memcpy DtoD (Device -> Device)") == "copy/fill"
    assert fam("gn_fwd_finalize_kernel") == "group_norm"


def test_compile_budget_is_the_compile_rows_time(monkeypatch):
    # --budget-s is the compile rows' own time: the eager rows before them (kernel tuning on a cold GPU machine took
    # 133 s of the H200's session-4 run) and the training rows between the sampling and the training compile rows do
    # not use it up; each compile row's time (its compile, warm-up and timing) does.
    import argparse
    clock = [100.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(throughput.H, "time_ms", lambda fn, device, budget: {"median_ms": 1.0})
    monkeypatch.setattr(throughput, "dynamo_counts", lambda: {})
    r = throughput.Runner(argparse.Namespace(budget_s=200.0, quick=True, profile=False), torch.device("cpu"))

    def make(seconds):
        def fn():
            clock[0] += seconds / 2          # two calls before the timing: compile, then warm
        return lambda: fn
    r.row("sample", "tiny", 1, "eager-bf16", "torch", make(500.0))                  # eager rows
    assert r.left_s() == 200.0
    r.row("sample", "tiny", 1, "compile-reduce-overhead", "torch", make(90.0), compile_row=True)
    assert r.left_s() == 110.0
    r.row("ict", "tiny", 8, "cmfast", "triton", make(300.0))                        # training rows between
    assert r.left_s() == 110.0
    r.row("ict", "tiny", 8, "compile", "torch", make(60.0), compile_row=True)
    assert r.left_s() == 50.0 < throughput.COMPILE_COST_S
    r.row("ict", "tiny", 16, "compile", "torch", make(60.0), compile_row=True)     # skipped: no time taken
    assert r.rows[-1]["skipped"].startswith("time budget (--budget-s 200.0") and r.left_s() == 50.0
    assert [row.get("median_ms") for row in r.rows] == [1.0] * 4 + [None]
    unlimited = throughput.Runner(argparse.Namespace(budget_s=None, quick=True), torch.device("cpu"))
    assert unlimited.left_s() == float("inf")


def _busy_helper(n):
    return sum(i * i for i in range(n))


def test_host_profile_names_where_the_host_time_goes():
    def step():
        for _ in range(4):
            _busy_helper(20000)
    prof = _harness.host_profile(step, torch.device("cpu"), iters=3)
    assert prof["what"].startswith("host") and prof["iters"] == 3 and prof["ms_per_call"] > 0
    top = prof["top"]
    assert all(a["own_ms_per_call"] >= b["own_ms_per_call"] for a, b in zip(top, top[1:]))   # ranked by own time
    helper = next(t for t in top if t["name"].endswith("(_busy_helper)"))
    assert helper["calls_per_call"] == 4 and helper["cum_ms_per_call"] >= helper["own_ms_per_call"]
    assert _harness.host_profile(lambda: 1 / 0, torch.device("cpu"))["host_profile_error"].startswith(
        "ZeroDivisionError")


def test_gpu_timer_repeats_at_least_ten_calls():
    """do_bench repeats int(rep / its estimate) times: with the quick budget (100 ms) a 96 ms eager row was timed
    once, its median one run. The repetition time now covers MIN_RUNS calls of the call's measured time."""
    assert _harness.rep_ms(100.0, 2.0) == 100.0                       # a 2 ms call: the budget holds 50 of them
    assert _harness.rep_ms(100.0, 96.0) == pytest.approx(1200.0)      # 12.5 calls' worth: >= 10 after do_bench's floor
    assert int(_harness.rep_ms(100.0, 40.0) / 40.0) >= _harness.MIN_RUNS


def test_flop_count_includes_attention_on_cpu():
    """The CPU's fused SDPA kernel has no FLOP formula in torch's counter (0 counted): the count runs SDPA's math
    backend off CUDA. It then equals the count of the same network on the meta device, where the counter applies its
    SDPA formula (as it does on CUDA)."""
    import copy

    import cmfast
    from cmfast import ops
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny")).eval()
    x = torch.randn(1, 3, 32, 32)
    meta, xm = copy.deepcopy(model).to("meta"), x.to("meta")
    with torch.no_grad(), ops.use_backend("torch"):
        counted = _harness.count_flops(lambda: model(x, 80.0), torch.device("cpu"))
        with FlopCounterMode(display=False) as ref:
            meta.net(xm, torch.zeros(1, device="meta"))
        with FlopCounterMode(display=False) as fused:
            model.net(x, torch.zeros(1))
    attention = ref.get_total_flops() - fused.get_total_flops()          # what the fused CPU kernel left out
    assert attention > 0.1 * ref.get_total_flops()
    assert counted == ref.get_total_flops(), (counted, ref.get_total_flops())


def test_readme_table_keeps_the_newest_complete_run(tmp_path):
    """A run cut short (complete: false; saved row by row until a time limit) does not replace a whole one."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_tables", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "make_tables.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    base = {"benchmark": "throughput", "device_slug": "h200", "device_type": "cuda", "quick": True, "rows": []}
    (tmp_path / "a.json").write_text(json.dumps({**base, "date": "2026-11-26T10:00", "complete": True}))
    (tmp_path / "b.json").write_text(json.dumps({**base, "date": "2026-11-27T10:00", "complete": False}))
    assert [r["_file"] for r in mt.load_runs(tmp_path)] == ["a.json"]
    (tmp_path / "c.json").write_text(json.dumps({**base, "date": "2026-11-27T11:00", "complete": True}))
    assert [r["_file"] for r in mt.load_runs(tmp_path)] == ["c.json"]


def _two_steps(make):
    """Two calls of a training-step row's step (tiny net, batch 2, CPU): Adam (lr 1e-5) moves the weights."""
    torch.manual_seed(0)
    model = throughput._model("tiny", torch.device("cpu")).train()
    step = make(model, 2, torch.device("cpu"))
    before = [q.detach().clone() for q in model.parameters()]
    step()
    step()
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), before)) > 1e-7
    return model


def test_training_step_row_runs_the_whole_step(monkeypatch):
    """The timed step is cmfast-train's: Adam moves the weights, the gradient norm and the host sync run, and the
    evaluation EMA (a frozen copy of the net) is updated once a step."""
    calls = {"ema": [], "norm": 0}
    real_norm = throughput.grad_norm

    def norm(*a, **k):
        calls["norm"] += 1
        return real_norm(*a, **k)
    monkeypatch.setattr(throughput, "ema_update_", lambda t, s, mu: calls["ema"].append((t, s, mu)))
    monkeypatch.setattr(throughput, "grad_norm", norm)
    model = _two_steps(throughput.ict_step_fn)
    assert calls["norm"] == 2 and len(calls["ema"]) == 2
    target, source, mu = calls["ema"][0]
    assert source is model.net and target is not model.net and mu == 0.9999
    assert not any(q.requires_grad for q in target.parameters())
    assert [q.shape for q in target.parameters()] == [q.shape for q in model.net.parameters()]


def test_graphed_training_step_row_runs_the_loops_graph_step(monkeypatch):
    """The cmfast-graph row times cmfast-train --cuda-graph's step: GraphedStep (here uncaptured: the CPU hook) with
    iCT at 80 levels, then Adam and the EMA update; the graph's inputs stay one buffer."""
    from test_cuda_graph_step import spy_graphed_steps
    monkeypatch.setenv("CMFAST_CUDA_GRAPH", "eager")
    calls, made = [], spy_graphed_steps(monkeypatch)
    monkeypatch.setattr(throughput, "ema_update_", lambda t, s, mu: calls.append(mu))
    _two_steps(throughput.graphed_ict_step_fn)
    assert calls == [0.9999, 0.9999] and len(made) == 1
    g = made[0]
    assert g.method.name == "ict" and g.cfg["loss"] == "pseudo_huber" and int(g.inputs["last"]) == 78   # 80 levels
    assert throughput.cmfast_backend("cmfast-graph") == "auto"


def test_help_states_the_default_presets_and_batches(capsys):
    """--help's defaults of --presets and --batches are plan()'s, with --quick and on CPU too (it gave only the full
    GPU run's presets, and no batches)."""
    import argparse
    with pytest.raises(SystemExit):
        throughput.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for label, quick, device in (("default", False, "cuda"), ("--quick", True, "cuda"), ("CPU", False, "cpu")):
        args = argparse.Namespace(presets=None, batches=None, quick=quick)
        presets, batches = throughput.plan(args, torch.device(device))[:2]
        assert f"{label}: {' '.join(presets)}" in text
        assert f"{label}: {' '.join(map(str, batches))}" in text


def test_deadline_skips_rows_that_would_run_into_it(monkeypatch):
    """--deadline-s (gpu_check.sh: its step's time limit less a margin): a compile row needs COMPILE_COST_S of it
    left, whatever --budget-s still allows, and any other row ROW_COST_S; counted from main's start."""
    import argparse
    clock = [100.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    r = throughput.Runner(argparse.Namespace(budget_s=150.0, quick=True, deadline_s=200.0), torch.device("cpu"),
                          t_start=90.0)
    assert r.deadline_left_s() == 190.0
    clock[0] += 100.0                       # eager rows: 110 s of the deadline used
    assert r.left_s() == 90.0               # the deadline's 90 s, not the compile budget's 150
    clock[0] += 40.0
    assert r.left_s() == 50.0 < throughput.COMPILE_COST_S
    assert r.deadline_left_s() == 50.0 > throughput.ROW_COST_S
    clock[0] += 35.0
    assert r.deadline_left_s() == 15.0 < throughput.ROW_COST_S


def test_deadline_ends_the_run_complete(tmp_path):
    """A run whose deadline has passed skips its rows and still writes complete: true (a run cut by the time limit's
    SIGINT wrote complete: false, which make_tables.py leaves out of the README)."""
    out = tmp_path / "tp.json"
    assert throughput.main(["--cpu", "--presets", "tiny", "--batches", "1", "--no-profile", "--deadline-s", "0",
                            "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] is True and [r["mode"] for r in res["rows"]] == ["eager-fp32", "cmfast"]
    assert all(r["skipped"] == "time limit (--deadline-s 0)" and "median_ms" not in r for r in res["rows"])
