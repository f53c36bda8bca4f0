"""benchmarks/throughput.py, the values a run rests on, checked on CPU without timing anything real: what the timed
sampler computes, the batch each row's call really runs at, the FLOPs / bytes / floor in its JSON, the timer budgets,
the rows a GPU plan chooses and the order main() runs them in (compile rows after the plain ones of their task), and where the JSON goes."""
import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _harness  # noqa: E402
import throughput  # noqa: E402

import cmfast  # noqa: E402

CPU = torch.device("cpu")
CEIL = {"matmul_tflops": 0.5, "matmul_dtype": "float32", "copy_gb_per_s": 4.0}     # 5e8 FLOP/ms, 4e6 B/ms


def _args(**kw):
    base = dict(budget_s=None, quick=False, profile=False, deadline_s=None)
    return argparse.Namespace(**{**base, **kw})


def test_one_step_sampler_is_the_model_at_sigma_80_clamped():
    """The timed sampler is CM Algorithm 1 with one level: z ~ N(0, I), x = 80 z, clamp(f(x, 80), -1, 1); the
    expectation is ConsistencyModel.forward on the same noise."""
    model = throughput._model("tiny", CPU)
    fn = throughput.one_step_fn(model, 2, CPU)
    torch.manual_seed(3)
    got = fn()
    torch.manual_seed(3)
    z = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(80.0 * z, 80.0).clamp(-1, 1)
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # dtype: the backbone under autocast (the GPU rows' bf16): close to the fp32 sample, not the same numbers
    torch.manual_seed(3)
    low = throughput.one_step_fn(model, 2, CPU, torch.bfloat16)()
    assert not torch.equal(low, got) and (low - got).abs().max() < 0.1


def test_timer_budgets_and_warm_up_calls(monkeypatch):
    """The timer gets --quick's 100 ms per row (1000 ms on CPU, 500 ms on a GPU without it), a training step at
    least TRAIN_BUDGET_MS (1.5 s: 5 repetitions of ~300 ms); the row's function runs twice (compile, capture)
    before the timed region."""
    seen, calls = [], []
    monkeypatch.setattr(_harness, "time_ms", lambda fn, device, budget: (seen.append((len(calls), budget)),
                                                                          {"median_ms": 2.0})[1])
    fn = lambda: calls.append(1)  # noqa: E731
    for quick, device, want in ((True, CPU, 100), (False, CPU, 1000), (False, torch.device("cuda"), 500)):
        r = throughput.Runner(_args(quick=quick), device)
        r.device = CPU                                    # the cuda Runner's row must not sync a GPU
        seen.clear()
        calls.clear()
        r.row("sample", "tiny", 4, "eager-fp32", "torch", lambda: fn)
        assert seen == [(2, want)], (quick, device)
        r.row("ict", "tiny", 4, "eager-bf16", "torch", lambda: fn, min_budget_ms=throughput.TRAIN_BUDGET_MS)
        assert seen[-1][1] == 1500
        r.row("ict", "tiny", 4, "eager-bf16", "torch", lambda: fn, min_budget_ms=10)
        assert seen[-1][1] == want
    assert throughput.TRAIN_BUDGET_MS == 1500


def test_training_rows_get_the_training_budget(monkeypatch):
    """run_training hands each step row TRAIN_BUDGET_MS (host=True, the step's own floor) whatever the row budget."""
    got = []
    monkeypatch.delenv("CMFAST_BENCH_BACKEND", raising=False)
    monkeypatch.setattr(throughput.Runner, "row", lambda self, *a, **k: got.append((a, k)))
    monkeypatch.setattr(throughput, "train_floor", lambda model, B, ceil, step: {"floor_ms": float(B)})
    r = throughput.Runner(_args(quick=True), CPU)
    throughput.run_training(r, "tiny", [2], ["eager-bf16", "cmfast"], CEIL)
    assert [(a[:5], k["min_budget_ms"], k["host"], k["compile_row"]) for a, k in got] == [
        (("ict", "tiny", 2, "eager-bf16", "torch"), 1500, True, False),
        (("ict", "tiny", 2, "cmfast", "triton"), 1500, True, False)]
    assert got[0][0][6] == {"floor_ms": 2.0}


def test_backend_of_the_cmfast_rows(monkeypatch):
    monkeypatch.delenv("CMFAST_BENCH_BACKEND", raising=False)
    assert throughput.cmfast_backend("cmfast") == "triton" and throughput.cmfast_backend("cmfast-auto") == "auto"
    monkeypatch.setenv("CMFAST_BENCH_BACKEND", "cuda")
    assert throughput.cmfast_backend("cmfast") == "cuda" and throughput.cmfast_backend("cmfast-auto") == "auto"
    assert throughput.cmfast_backend("cmfast-graph") == "auto"      # the loop's --cuda-graph step: auto's kernels


def test_gpu_plans_follow_the_docstring():
    """--quick: the CIFAR net at batch 1 and 256 and the iCT step at 256, each with eager bf16 (the reference) and a
    torch.compile row; the full run: three networks, batch 1..1024, the step at 128 and 256."""
    cuda = torch.device("cuda")
    presets, batches, modes, tb, tm = throughput.plan(_args(quick=True, presets=None, batches=None), cuda)
    assert presets == ["ddpmpp-cifar10"] and batches == [1, 256] and tb == [256]
    assert "eager-bf16" in modes and any(m.startswith("compile-") for m in modes)
    assert "eager-bf16" in tm and "compile" in tm and "cmfast" in tm and "cmfast-graph" in tm
    presets, batches, modes, tb, tm = throughput.plan(_args(presets=None, batches=None), cuda)
    assert presets == ["ddpmpp-cifar10", "ddpmpp-64", "adm-imagenet64"] and batches == [1, 8, 64, 256, 1024]
    assert tb == [128, 256] and "compile" in tm and sum(m.startswith("compile-") for m in modes) == 2
    # given presets and batches win; training batches stay the plan's
    presets, batches, *_ = throughput.plan(_args(presets=["tiny"], batches=[3], quick=True), cuda)
    assert presets == ["tiny"] and batches == [3]


def _meta_flops_at_batch_1(preset):
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset(preset).to("meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, net.in_channels, net.img_resolution, net.img_resolution, device="meta"),
            torch.zeros(1, device="meta"))
    return fc.get_total_flops(), sum(p.numel() for p in net.parameters())


def test_cpu_rows_run_their_batch_and_carry_the_floor(tmp_path, monkeypatch):
    """--cpu --batches 2: both rows' timed calls make 2 images (eager: the torch backend; cmfast: cmfast.sample,
    backend auto); the row's FLOPs are 2 x the network's at batch 1 (counted here on the meta device), its bytes
    the bf16 weights + fp32 noise in and image out, its floor the larger of FLOPs / matmul rate and bytes / copy
    rate. The run sets torch to --threads (default 1) and says so in the JSON."""
    shapes = []

    def time_ms(fn, device, budget):
        shapes.append(tuple(fn().shape))
        return {"median_ms": 4.0}
    monkeypatch.setattr(_harness, "time_ms", time_ms)
    monkeypatch.setattr(_harness, "ceilings", lambda device, quick: dict(CEIL))
    out = tmp_path / "tp.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert throughput.main(["--cpu", "--presets", "tiny", "--batches", "2", "--no-profile", "--out",
                                str(out)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert shapes == [(2, 3, 32, 32)] * 2
    assert res["threads"] == 1 and res["reference_mode"] == "eager-fp32" and res["complete"] is True
    flops1, n_params = _meta_flops_at_batch_1("tiny")
    nbytes = n_params * 2 + 2 * 3 * 32 * 32 * (4 + 4)
    floor = max(2 * flops1 / 5e8, nbytes / 4e6)
    eager, cm = res["rows"]
    assert (eager["mode"], eager["backend"], cm["mode"], cm["backend"]) == ("eager-fp32", "torch", "cmfast", "auto")
    assert "no CUDA graph" in cm["note"] and "note" not in eager
    for row in res["rows"]:
        assert row["batch"] == 2 and row["images_per_s"] == 500.0
        assert row["flops"] == 2 * flops1 and row["bytes"] == nbytes
        assert row["floor_ms"] == pytest.approx(floor) and row["x_floor"] == pytest.approx(4.0 / floor)


def test_batches_must_be_positive(capsys):
    assert throughput.main(["--cpu", "--batches", "1", "0"]) == 2
    assert capsys.readouterr().err.strip() == "throughput.py: error: --batches: expected positive ints"


def test_json_goes_to_the_results_folder_once_complete(monkeypatch):
    """Without --out the JSON is written once, complete, as benchmarks/results/<device>-<date>.json (the date's
    day only); rows are not saved there one by one."""
    writes = []
    monkeypatch.setattr(_harness, "write_result", lambda result, out, name, quiet=False:
                        writes.append((result["complete"], out, name, quiet)))
    monkeypatch.setattr(_harness, "ceilings", lambda device, quick: dict(CEIL))
    threads = torch.get_num_threads()
    days = [datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")]
    try:
        assert throughput.main(["--cpu", "--presets", "tiny", "--batches", "1", "--no-profile",
                                "--deadline-s", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    days.append(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))   # a run across midnight UTC
    assert len(writes) == 1 and writes[0] in [(True, None, f"{_harness.device_slug(CPU)}-{day}.json", False)
                                              for day in days]


def _orchestration(monkeypatch, argv):
    """main() as on a GPU, with the rows themselves replaced: -> [(kind, preset, batches, modes)] in run order and
    the Runner's args."""
    calls, runner = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(_harness, "environment", lambda d: {"device": "stand-in GPU", "device_slug": "gpu",
                                                            "device_type": d.type, "torch": "x", "triton": "x",
                                                            "cuda": "x", "date": "2026-01-01T00:00"})
    monkeypatch.setattr(_harness, "ceilings", lambda device, quick: dict(CEIL))
    monkeypatch.setattr(_harness, "write_result", lambda *a, **k: None)

    def record(kind):
        def run(r, preset, batches, modes, ceil):
            runner.append(r)
            calls.append((kind, preset, list(batches), list(modes)))
        return run
    monkeypatch.setattr(throughput, "run_sampling", record("sample"))
    monkeypatch.setattr(throughput, "run_training", record("ict"))
    assert throughput.main(argv) == 0
    assert all(r.device.type == "cuda" for r in runner)
    return calls, runner[0].args


def test_gpu_run_order_sampling_compile_rows_before_training(monkeypatch):
    """--quick on a GPU: every preset's eager / cmfast sampling rows, then the torch.compile sampling rows, then the
    training steps (and the host-bound fmnist-small step), then the compiled training step; --budget-s 240 by
    default. (With the sampling compile rows after the training rows, the H200's sessions 4 and 5 never reached
    them.) Given presets: no host-bound step; --no-train: no training row at all, compiled or not."""
    calls, args = _orchestration(monkeypatch, ["--quick"])
    assert args.budget_s == 240.0
    _, _, modes, tb, tm = throughput.plan(_args(quick=True, presets=None, batches=None), torch.device("cuda"))
    plain = [m for m in modes if not m.startswith("compile")]
    assert calls == [("sample", "ddpmpp-cifar10", [1, 256], plain),
                     ("sample", "ddpmpp-cifar10", [1, 256], [m for m in modes if m.startswith("compile")]),
                     ("ict", "ddpmpp-cifar10", tb, [m for m in tm if m != "compile"]),
                     ("ict", "fmnist-small", [256], ["eager-bf16", "cmfast", "cmfast-auto", "cmfast-graph"]),
                     ("ict", "ddpmpp-cifar10", tb, ["compile"])]
    calls, args = _orchestration(monkeypatch, ["--quick", "--presets", "tiny", "--budget-s", "50"])
    assert args.budget_s == 50.0 and [c[:2] for c in calls] == [("sample", "tiny"), ("sample", "tiny"),
                                                                ("ict", "tiny"), ("ict", "tiny")]
    calls, _ = _orchestration(monkeypatch, ["--quick", "--no-train"])
    assert [c[0] for c in calls] == ["sample", "sample"]
    calls, args = _orchestration(monkeypatch, ["--presets", "tiny", "ddpmpp-64"])
    assert args.budget_s is None
    assert [c[:2] for c in calls] == [("sample", "tiny"), ("sample", "ddpmpp-64"), ("sample", "tiny"),
                                      ("sample", "ddpmpp-64"), ("ict", "tiny"), ("ict", "ddpmpp-64"),
                                      ("ict", "tiny"), ("ict", "ddpmpp-64")]
