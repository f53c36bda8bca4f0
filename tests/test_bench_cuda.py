"""benchmarks/bench_cuda.py runs end to end (CPU smoke: torch rows only) and benchmarks/make_auto_table.py picks
per-op winners from result rows by the documented rule (synthetic rows here, written to a temp dir only)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_cuda  # noqa: E402
import make_auto_table  # noqa: E402


def _result(device_type, rows, dtype="bfloat16"):
    return {"device": "test", "device_slug": "test", "device_type": device_type, "dtype": dtype, "rows": rows}


def _row(op, shape, backend, ms, **kw):
    return dict(op=op, shape=shape, backend=backend, median_ms=ms, **{"pass": "fwd"}, **kw)


def test_auto_table_rule(tmp_path):
    rows = [
        # group_norm_act: cuda 2x faster at one shape, triton 1.1x faster at the other -> cuda by geometric mean
        _row("group_norm_act", [1, 128, 32, 32], "torch", 10.0), _row("group_norm_act", [1, 128, 32, 32], "cuda", 2.0),
        _row("group_norm_act", [1, 128, 32, 32], "triton", 4.0),
        _row("group_norm_act", [8, 256, 8, 8], "torch", 10.0), _row("group_norm_act", [8, 256, 8, 8], "cuda", 3.3),
        _row("group_norm_act", [8, 256, 8, 8], "triton", 3.0),
        _row("group_norm_act", [8, 256, 8, 8], "torch.compile", 0.1),  # not a backend: ignored
        # consistency_loss: triton missing at one shape -> only the complete case counts
        _row("consistency_loss", [8, 3, 32, 32], "torch", 1.0), _row("consistency_loss", [8, 3, 32, 32], "cuda", 2.0),
        _row("consistency_loss", [8, 3, 32, 32], "triton", 1.5),
        _row("consistency_loss", [64, 3, 32, 32], "torch", 9.0), _row("consistency_loss", [64, 3, 32, 32], "cuda", 1.0),
        _row("skip_output_infer", [1, 3, 32, 32], "torch", 1.0, error="x"),  # no median: never a candidate
    ]
    rows[-1].pop("median_ms")
    cpu = _result("cpu", [_row("attention", [1], "cuda", 0.001), _row("attention", [1], "torch", 1.0)])
    # Another run (file) without cuda rows: its triton time must not meet the first file's cuda time.
    other = _result("cuda", [_row("group_norm_act", [1, 128, 32, 32], "triton", 0.01),
                             _row("group_norm_act", [1, 128, 32, 32], "torch", 10.0)])
    files = []
    for i, res in enumerate([_result("cuda", rows), cpu, other]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(res))
    out = tmp_path / "auto_table.json"
    assert make_auto_table.main([*map(str, files), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["group_norm_act"] == "cuda"
    # consistency_loss: torch over the complete case; at batch 64 ('large'), where triton has no row, the measured
    # pair (torch 9, cuda 1) decides that size class
    assert table["consistency_loss"] == {"default": "torch", "fwd/large": "cuda"}
    assert "attention" not in table and "skip_output_infer" not in table  # CPU rows and failed rows count for nothing
    assert table["_meta"]["ratios"]["consistency_loss"]["cases"] == 1
    assert table["_meta"]["ratios"]["group_norm_act"]["cuda"] == pytest.approx((1.0 * 1.1) ** 0.5)


def test_auto_table_per_shape_class(tmp_path):
    """Where a (pass, layout) class has another winner than the op overall, the entry lists the classes (the H200
    data: group_norm_act's NHWC forward went to triton, everything else to cuda)."""
    def case(shape, layout, pass_, times):
        return [dict(op="group_norm_act", shape=shape, layout=layout, backend=b, median_ms=t, **{"pass": pass_})
                for b, t in times.items()]
    rows = (case([1, 128, 32, 32], "nhwc", "fwd", dict(torch=3.0, triton=1.0, cuda=2.0))
            + case([1, 128, 32, 32], "nhwc", "fwd+bwd", dict(torch=3.0, triton=2.0, cuda=1.0))
            + case([1, 128, 32, 32], "nchw", "fwd", dict(torch=3.0, triton=1.2, cuda=1.0))
            + case([1, 128, 32, 32], "nchw", "fwd+bwd", dict(torch=3.0, triton=2.0, cuda=1.0)))
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_result("cuda", rows)))
    out = tmp_path / "t.json"
    assert make_auto_table.main([str(f), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["group_norm_act"] == {"default": "cuda", "fwd/nhwc": "triton", "fwd+bwd/nhwc": "cuda",
                                       "fwd/nchw": "cuda", "fwd+bwd/nchw": "cuda"}
    assert table["_meta"]["ratios"]["group_norm_act"]["classes"]["fwd/nhwc"]["cuda"] == 2.0


def test_auto_table_per_batch_size(tmp_path):
    """A backend that wins at batch 1 and loses at 256 within one class gets that class's '/small' entry (the H100
    data: the Triton flash attention forward beat SDPA at batch 1 by graph time and lost at 256)."""
    def case(shape, times):
        return [dict(op="attention", shape=shape, backend=b, median_ms=t, **{"pass": "fwd"}) for b, t in times.items()]
    rows = case([1, 1, 256, 256], dict(torch=1.2, triton=1.0)) + case([256, 1, 256, 256], dict(torch=1.0, triton=1.8))
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_result("cuda", rows)))
    out = tmp_path / "t.json"
    assert make_auto_table.main([str(f), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["attention"] == {"default": "torch", "fwd/small": "triton"}
    assert table["_meta"]["ratios"]["attention"]["classes"]["fwd/small"]["torch"] == pytest.approx(1.2)
    assert make_auto_table.SMALL_BATCH == __import__("cmfast").ops.SMALL_BATCH


def test_auto_table_fills_an_unmeasured_batch_size_from_the_other_layouts(tmp_path):
    """A class measured at one batch size only (GroupNorm forward + backward NHWC, with the CUDA kernel, at batch 1
    and 8 in the H100 and H200 files) does not carry that winner to the other size: it takes the winner measured at
    that size and pass in another layout (NCHW at batch 256: Triton), marked as a proxy. A class measured at both sizes
    and a proxy that agrees with the inherited winner add nothing."""
    def case(shape, layout, times, pass_="fwd+bwd"):   # replay times too: at batch 256 fwd+bwd votes only with them
        return [dict(op="group_norm_act", shape=shape, layout=layout, backend=b, median_ms=t, graph_median_ms=t,
                     **{"pass": pass_}) for b, t in times.items()]
    rows = (case([8, 128, 32, 32], "nhwc", dict(torch=3.0, triton=2.0, cuda=1.0))
            + case([8, 128, 32, 32], "nchw", dict(torch=3.0, triton=2.0, cuda=1.0))
            + case([256, 128, 32, 32], "nchw", dict(torch=3.0, triton=1.0))
            + case([8, 128, 32, 32], "nhwc", dict(torch=3.0, triton=1.0, cuda=2.0), "fwd")
            + case([256, 128, 32, 32], "nchw", dict(torch=3.0, triton=1.0), "fwd"))
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_result("cuda", rows)))
    out = tmp_path / "t.json"
    assert make_auto_table.main([str(f), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    gn = table["group_norm_act"]
    assert gn["fwd+bwd/nhwc"] == "cuda" and gn["fwd+bwd/nhwc/large"] == "triton"
    assert gn["fwd+bwd/nchw/large"] == "triton"                     # measured there
    assert "fwd/nhwc/large" not in gn and "fwd+bwd/nhwc/small" not in gn     # agrees with what it inherits; measured
    classes = table["_meta"]["ratios"]["group_norm_act"]["classes"]
    assert "proxy" in classes["fwd+bwd/nhwc/large"] and "proxy" not in classes["fwd+bwd/nchw/large"]


def test_auto_table_eager_training_times_at_batch_256_do_not_vote(tmp_path):
    """Forward + backward at batch 256 with eager times only (host launch cost: the H200's 0.6-1.3 ms for ~0.1 ms of
    kernels ranked CUDA's GroupNorm first, its step profile Triton's) does not vote; the class takes the op's winner
    at that size. With replay times for every backend the same case votes."""
    def case(shape, times, graph=None, pass_="fwd+bwd"):
        return [dict(op="group_norm_act", shape=shape, layout="nhwc", backend=b, median_ms=t, **{"pass": pass_},
                     **({"graph_median_ms": graph[b]} if graph else {})) for b, t in times.items()]
    small = case([8, 128, 32, 32], dict(torch=3.0, triton=2.0, cuda=1.0))
    fwd = case([256, 128, 32, 32], dict(torch=4.0, triton=1.0, cuda=3.0), pass_="fwd")
    eager_large = case([256, 128, 32, 32], dict(torch=3.0, triton=2.0, cuda=1.0))
    graphed_large = case([256, 128, 32, 32], dict(torch=3.0, triton=2.0, cuda=1.0), dict(torch=3.0, triton=1.0,
                                                                                        cuda=1.5))
    tables = []
    for rows in (small + fwd + eager_large, small + fwd + graphed_large):
        f = tmp_path / "r.json"
        f.write_text(json.dumps(_result("cuda", rows)))
        out = tmp_path / "t.json"
        assert make_auto_table.main([str(f), "--out", str(out)]) == 0
        tables.append(json.loads(out.read_text()))
    eager, graphed = (t["group_norm_act"] for t in tables)
    assert eager == {"default": "triton", "fwd+bwd/nhwc": "cuda", "fwd+bwd/nhwc/large": "triton", "fwd/nhwc": "triton"}
    assert "proxy" in tables[0]["_meta"]["ratios"]["group_norm_act"]["classes"]["fwd+bwd/nhwc/large"]
    assert tables[0]["_meta"]["ratios"]["group_norm_act"]["cases"] == 2        # the eager batch-256 case left out
    assert graphed["fwd+bwd/nhwc/large"] == "triton"                             # measured: replay times
    assert "proxy" not in tables[1]["_meta"]["ratios"]["group_norm_act"]["classes"]["fwd+bwd/nhwc/large"]


def test_auto_table_prefers_graph_replay_times_when_every_backend_has_one(tmp_path):
    def row(shape, backend, ms, graph=None):
        r = dict(op="group_norm_act", shape=shape, layout="nhwc", backend=backend, median_ms=ms, **{"pass": "fwd"})
        if graph is not None:
            r["graph_median_ms"] = graph
        return r
    rows = [row([8, 256, 8, 8], "cuda", 0.12, 0.004), row([8, 256, 8, 8], "triton", 0.04, 0.006),   # graphed: cuda
            row([1, 128, 32, 32], "cuda", 0.08, 0.005), row([1, 128, 32, 32], "triton", 0.05)]    # triton lacks one
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_result("cuda", rows)))
    out = tmp_path / "t.json"
    assert make_auto_table.main([str(f), "--out", str(out)]) == 0
    ratios = json.loads(out.read_text())["_meta"]["ratios"]["group_norm_act"]
    # case 1 by graph times (cuda 1, triton 1.5), case 2 by eager times (cuda 1.6, triton 1)
    assert ratios["cuda"] == pytest.approx(1.6 ** 0.5) and ratios["triton"] == pytest.approx(1.5 ** 0.5)


def test_auto_table_skips_rows_of_inputs_the_network_no_longer_passes(tmp_path):
    # Attention timed on the strided q, k, v views (the UNet now copies them dense): those rows do not vote.
    rows = [_row("attention", [1, 1, 256, 256], "torch", 0.02, qkv="unet-nhwc-views"),
            _row("attention", [1, 1, 256, 256], "triton", 0.12, qkv="unet-nhwc-views"),
            _row("attention", [1, 1, 256, 256], "torch", 0.012, qkv="unet-dense"),
            _row("attention", [1, 1, 256, 256], "triton", 0.009, qkv="unet-dense")]
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_result("cuda", rows)))
    out = tmp_path / "t.json"
    assert make_auto_table.main([str(f), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["attention"] == "triton" and table["_meta"]["ratios"]["attention"]["cases"] == 1


def test_auto_table_refuses_empty_input(tmp_path, capsys):
    f = tmp_path / "cpu.json"
    f.write_text(json.dumps(_result("cpu", [_row("group_norm_act", [1], "torch", 1.0)])))
    assert make_auto_table.main([str(f), "--out", str(tmp_path / "t.json")]) == 2
    assert "make_auto_table: error: no CUDA rows" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_bench_cuda_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    # --budget-s 0: every torch.compile variant is past the time budget (no CPU compile here); the JSON says so
    assert bench_cuda.main(["--device", "cpu", "--quick", "--budget-s", "0", "--ops", "consistency_loss",
                            "--dtype", "float32", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "bench_cuda" and res["device_type"] == "cpu" and "cuda" in res["skipped"]
    assert res["skipped"]["torch.compile"].startswith("time budget (--budget-s 0.0): ")
    assert int(res["skipped"]["torch.compile"].split(": ")[1].split()[0]) == 3     # the three quick shapes
    # triton rows appear on CPU only under TRITON_INTERPRET=1 (set for the whole suite by conftest.py)
    backends = {r["backend"] for r in res["rows"]}
    assert "torch" in backends and backends <= {"torch", "triton"}
    for r in (r for r in res["rows"] if r["backend"] == "torch"):
        assert r["median_ms"] > 0 and r["bytes"] == 3 * 4 * r["shape"][0] * 3 * 32 * 32
        assert r["speedup_vs_eager"] == 1.0
    from cmfast import _build
    assert res["csrc_ops"] == {"consistency_loss": _build.op_digest("consistency_loss")}   # what was measured
    assert len(res["csrc_ops"]["consistency_loss"]) == 16


def test_op_digest_follows_the_ops_own_sources(tmp_path, monkeypatch):
    """An op's digest changes with its kernel file and the shared helpers, not with another op's file."""
    import shutil

    from cmfast import _build
    csrc = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, csrc)
    monkeypatch.setattr(_build, "CSRC", csrc)
    before = {op: _build.op_digest(op) for op in ("group_norm_act", "consistency_loss", "skip_output_infer")}
    assert _build.op_digest("attention") is None and len(set(before.values())) == 3
    with open(csrc / "group_norm_act.cu", "a") as f:
        f.write("// changed\n")
    after = {op: _build.op_digest(op) for op in before}
    assert after["group_norm_act"] != before["group_norm_act"]
    assert [after[o] for o in ("consistency_loss", "skip_output_infer")] == \
        [before[o] for o in ("consistency_loss", "skip_output_infer")]
    with open(csrc / "common.cuh", "a") as f:
        f.write("// changed\n")
    assert all(_build.op_digest(op) != after[op] for op in before)
    (csrc / "skip_output.cu").unlink()
    assert _build.op_digest("skip_output_infer") is None


def test_auto_table_leaves_out_rows_of_rewritten_kernels(tmp_path, monkeypatch):
    """Only measurements of an op's current CUDA sources vote: a file that recorded other sources never does; one
    from before the digests (none recorded) votes only while no file has measured the current ones. Other ops' rows
    and the other backends' rows of the same files still vote; _meta names what was left out."""
    from cmfast import _build
    assert make_auto_table.current_digests() == {op: _build.op_digest(op) for op in _build.OP_SOURCES}

    def case(cuda, triton, shape=(1, 128, 32, 32), op="group_norm_act"):
        return [_row(op, list(shape), b, ms) for b, ms in (("torch", 10.0), ("triton", triton), ("cuda", cuda))]
    old = _result("cuda", case(1.0, 2.0) + case(1.0, 2.0, op="consistency_loss", shape=(8, 3, 32, 32)))
    stale = dict(_result("cuda", case(1.0, 2.0, shape=(8, 128, 32, 32))), csrc_ops={"group_norm_act": "a" * 16})
    new = dict(_result("cuda", case(3.0, 2.0)), csrc_ops={"group_norm_act": "b" * 16})
    files = []
    for i, res in enumerate((old, stale, new)):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(res))
    out = tmp_path / "t.json"

    def table(current, *which):
        monkeypatch.setattr(make_auto_table, "current_digests", lambda: current)
        assert make_auto_table.main([*(str(files[i]) for i in which), "--out", str(out)]) == 0
        return json.loads(out.read_text())
    now = {"group_norm_act": "b" * 16, "consistency_loss": "c" * 16}
    t = table(now, 0, 1, 2)
    assert t["group_norm_act"] == "triton" and t["consistency_loss"] == "cuda"   # the new kernel is slower here
    assert t["_meta"]["superseded_cuda_rows"] == ["r0.json: group_norm_act", "r1.json: group_norm_act"]
    t = table(now, 0, 1)                       # the current sources unmeasured: the file from before digests votes
    assert t["group_norm_act"] == "cuda" and t["_meta"]["superseded_cuda_rows"] == ["r1.json: group_norm_act"]
    t = table(None, 0, 1, 2)                   # no csrc/ here: every row votes
    assert "superseded_cuda_rows" not in t["_meta"]
    assert t["_meta"]["ratios"]["group_norm_act"]["cases"] == 3



@pytest.mark.parametrize("script", ["benchmarks/make_auto_table.py", "scripts/triton_compile_check.py"])
def test_help_describes_the_script_in_whole_sentences(script):
    """--help's description is the docstring's first paragraph: its first line alone stopped mid-sentence ('... and
    print', '... into'). A subprocess: triton_compile_check drops TRITON_INTERPRET from the environment on import."""
    import ast
    import subprocess
    path = Path(__file__).resolve().parent.parent / script
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "".join(doc.split("\n\n")[0].split()) in "".join(out.split())     # argparse re-wraps it
