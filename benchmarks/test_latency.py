"""Latency benchmarks (pytest-benchmark) and the CPU regression gate.

GPU (the GPU check script):
    pytest benchmarks/test_latency.py -m gpu --benchmark-enable --benchmark-json=latency.json
    python benchmarks/regress.py compare latency.json      # vs benchmarks/results/baseline-<gpu>.json
CPU (CI): the gate tests below time the sampling path themselves (the project's addopts pass
--benchmark-disable, under which pytest-benchmark calls each function once and times nothing).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import regress  # noqa: E402

import cmfast  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- the compare step --------------------------------------------------------------------------------------
def _bench(**medians):
    return {"benchmarks": [{"name": k, "stats": {"median": v}, "extra_info": {"device_slug": "cpu"}}
                           for k, v in medians.items()]}


def test_compare_benchmarks_thresholds():
    base = {"medians": {"a": 1.0e-3, "b": 2.0e-3}}
    assert regress.compare_benchmarks(_bench(a=1.1e-3, b=1.5e-3), base, 0.15) == []
    fails = regress.compare_benchmarks(_bench(a=1.2e-3, b=2.0e-3), base, 0.15)
    assert len(fails) == 1 and fails[0].startswith("a:")
    assert "missing" in regress.compare_benchmarks(_bench(a=1.0e-3), base, 0.15)[0]
    ref = _bench(a=1.0e-3, b=9.0e-3)                  # b: a reference row (eager PyTorch), recorded, not gated
    ref["benchmarks"][1]["extra_info"] = {"gate": False}
    assert regress.compare_benchmarks(ref, base, 0.15) == []
    ref["benchmarks"][1]["extra_info"] = {"gate": True}
    assert regress.compare_benchmarks(ref, base, 0.15)[0].startswith("b:")
    # A reference row the baseline lists as ungated may be missing from a run (the H200 of the fifth GPU session cut
    # the eager rows at the gate step's time limit: 'in the baseline, missing from this run' failed the gate); a gated
    # row missing still fails.
    assert regress.compare_benchmarks(_bench(a=1.0e-3), dict(base, ungated=["b"]), 0.15) == []
    assert "a: in the baseline, missing" in regress.compare_benchmarks(_bench(b=1.0e-3), dict(base, ungated=["b"]),
                                                                      0.15)[0]


def test_cli_compare_exit_codes(tmp_path):
    bench, base = tmp_path / "latency.json", tmp_path / "base.json"
    bench.write_text(json.dumps(_bench(a=2e-3)))
    base.write_text(json.dumps({"medians": {"a": 1e-3}}))
    assert regress.main(["compare", str(bench), "--baseline", str(base)]) == 1
    base.write_text(json.dumps({"medians": {"a": 1.9e-3}}))
    assert regress.main(["compare", str(bench), "--baseline", str(base)]) == 0
    # No baseline for the device: records one, and says the run was not gated (not a pass)
    assert regress.main(["compare", str(bench), "--baseline", str(tmp_path / "none.json"),
                         "--write-baseline", str(tmp_path)]) == regress.NO_BASELINE == 3
    written = json.loads((tmp_path / "baseline-cpu.json").read_text())
    assert written["medians"] == {"a": 2e-3} and written["threshold"] == regress.GPU_THRESHOLD
    assert written["ungated"] == []
    ref = _bench(a=2e-3, e=9e-3)
    ref["benchmarks"][1]["extra_info"]["gate"] = False          # a reference row: recorded, listed as ungated
    bench.write_text(json.dumps(ref))
    assert regress.main(["compare", str(bench), "--baseline", str(base), "--write-baseline", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "baseline-cpu.json").read_text())
    assert written["medians"] == {"a": 2e-3, "e": 9e-3} and written["ungated"] == ["e"]
    bench.write_text(json.dumps(_bench(a=2e-3)))
    assert regress.main(["compare", str(bench), "--baseline", str(tmp_path / "baseline-cpu.json")]) == 0


def test_cli_compare_without_a_run_to_read(tmp_path, capsys):
    """The latency tests skipped or killed (no JSON), or all failed (no row names its device): exit 2 with one line,
    not a traceback (exit 1, which reads as 'slower than the baseline') or a comparison with the CPU baseline."""
    assert regress.main(["compare", str(tmp_path / "latency.json")]) == 2
    (tmp_path / "latency.json").write_text(json.dumps({"benchmarks": []}))
    assert regress.main(["compare", str(tmp_path / "latency.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("regress.py: error:") for e in err)


def test_cli_compare_with_a_damaged_file_is_exit_2(tmp_path, capsys):
    """A truncated baseline, or a run JSON that is a list, raised a traceback: exit 1, which reads as 'slower than
    the baseline'. Now exit 2 with one line naming the file, as for a missing run."""
    bench, base = tmp_path / "latency.json", tmp_path / "base.json"
    bench.write_text(json.dumps(_bench(a=1e-3)))
    base.write_text(json.dumps({"medians": {"a": 1e-3}})[:10])
    assert regress.main(["compare", str(bench), "--baseline", str(base)]) == 2
    bench.write_text("[1, 2]")
    assert regress.main(["compare", str(bench), "--baseline", str(base)]) == 2
    base.write_text('{"ratio": 1.0')
    assert regress.main(["cpu", "--baseline", str(base)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("regress.py: error: cannot read") for e in err)
    assert str(base) in err[0] and str(bench) in err[1] and str(base) in err[2]


def test_cli_compare_reads_the_baselines_threshold(tmp_path):
    bench, base = tmp_path / "latency.json", tmp_path / "base.json"
    bench.write_text(json.dumps(_bench(a=1.3e-3)))                       # 30% slower than the baseline
    base.write_text(json.dumps({"medians": {"a": 1e-3}, "threshold": 0.5}))
    assert regress.main(["compare", str(bench), "--baseline", str(base)]) == 0
    base.write_text(json.dumps({"medians": {"a": 1e-3}, "threshold": 0.1}))
    assert regress.main(["compare", str(bench), "--baseline", str(base)]) == 1
    assert regress.main(["compare", str(bench), "--baseline", str(base), "--threshold", "0.4"]) == 0
    base.write_text(json.dumps({"medians": {"a": 1e-3}}))               # none stored: GPU_THRESHOLD (0.15)
    assert regress.main(["compare", str(bench), "--baseline", str(base)]) == 1


# ---- the CPU gate (runs its own timing in CI) ---------------------------------------------------------------
def _cpu_baseline() -> dict:
    path = regress.RESULTS / "baseline-cpu.json"
    assert path.exists(), f"missing {path}: python benchmarks/regress.py cpu --write-baseline"
    return json.loads(path.read_text())


def test_cpu_gate_passes():
    ok, runs = regress.cpu_gate(_cpu_baseline())
    assert ok, f"CPU latency regression: {runs}"


def test_cpu_gate_fails_on_injected_slowdown():
    """Three times the sampling work per call (3x the ratio, against a 1.5x limit) must fail every try
    (8 pairs a try instead of 25 to keep the test short; 3x is far outside the measured spread either way)."""
    base = _cpu_baseline()
    ok, runs = regress.cpu_gate(base, inject=3, pairs=8)
    assert not ok and len(runs) == 3
    assert all(r["ratio"] > 2 * base["ratio"] for r in runs)


def test_sample_latency_cpu(benchmark):
    torch.manual_seed(0)
    model = cmfast.ConsistencyModel(cmfast.UNet.from_preset("tiny")).eval()
    z = torch.randn(2, 3, 32, 32)
    benchmark.extra_info["device_slug"] = "cpu"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # see regress.measure_cpu: 2 threads on 2 busy cores is ~50x slower here
    try:
        out = benchmark(lambda: cmfast.sample(model, z))
    finally:
        torch.set_num_threads(threads)
    assert out.shape == z.shape and torch.isfinite(out).all()


# ---- GPU: CUDA-synchronized latencies of the graphed sampler and the eager bf16 reference ---------------------
def _gpu_model():
    torch.manual_seed(0)
    return cmfast.ConsistencyModel(cmfast.UNet.from_preset("ddpmpp-cifar10")).cuda().eval()


def _slug():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _harness
    return _harness.device_slug(torch.device("cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 64])
def test_graphed_latency_gpu(benchmark, batch):
    sampler = cmfast.GraphedSampler(_gpu_model(), batch, (3, 32, 32), seed=0)
    sampler()                                                   # capture outside the timed rounds

    def run():
        out = sampler()
        torch.cuda.synchronize()
        return out
    benchmark.extra_info.update(device_slug=_slug(), backend=cmfast.ops.get_backend())
    out = benchmark.pedantic(run, rounds=100, warmup_rounds=10)
    assert out.shape == (batch, 3, 32, 32) and out.abs().max() <= 1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 64])
def test_eager_bf16_latency_gpu(benchmark, batch):
    model = _gpu_model().to(memory_format=torch.channels_last)
    sigma = torch.full((batch,), 80.0, device="cuda")

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), cmfast.ops.use_backend("torch"):
            x = 80.0 * torch.randn(batch, 3, 32, 32, device="cuda")
            F = model.backbone(x.contiguous(memory_format=torch.channels_last), sigma)
            out = cmfast.ops.skip_output_infer(x, F, sigma)
        torch.cuda.synchronize()
        return out
    benchmark.extra_info.update(device_slug=_slug(), backend="torch", gate=False)   # a reference, not our code
    out = benchmark.pedantic(run, rounds=50, warmup_rounds=5)
    assert out.shape == (batch, 3, 32, 32)
