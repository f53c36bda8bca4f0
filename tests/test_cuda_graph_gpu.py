"""cmfast-train --cuda-graph on a CUDA device: each method's step captured and replayed (new noise every replay,
the loss and gradient statistics of the eager step), and a few steps of the CLI. The CPU tests
(tests/test_cuda_graph_step.py) check what runs inside the graph without capturing it."""
import json
import math
import os

import pytest
import torch

from cmfast.cli.train import main as train_main
from cmfast.nets import UNet
from cmfast.precond import EDMDenoiser
from cmfast.training.config import resolve
from cmfast.training.cuda_graph import GraphedStep
from cmfast.training.methods import get_method
from train_fixtures import write_png_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _setup(method, dropout=0.1, batch=32, precision=torch.bfloat16, cuda_graph=True):
    """(method, models on the GPU, config, trained parameters, a batch, precision) of a tiny-net run of `method`."""
    args = dict(dataset="fashion-mnist", method=method, preset="tiny", dropout=dropout, batch_size=batch,
                total_steps=100, loss="l2" if method in ("cd", "ct") else None, cuda_graph=cuda_graph)
    if method in ("cd", "scd"):
        args["teacher"] = "unused"
    cfg = resolve(args, 1, (1, 32, 32), 10)
    m = get_method(method)
    torch.manual_seed(0)
    teacher = EDMDenoiser(UNet(**cfg["net"])).eval().requires_grad_(False) if m.needs_teacher else None
    models = m.build(UNet(**cfg["net"]), cfg, teacher)
    for v in models.values():
        v.cuda()
    params = [p for p in models["model"].parameters() if p.requires_grad]
    x = (torch.rand(batch, 1, 32, 32, device="cuda") * 2 - 1)
    return m, models, cfg, params, x, precision


@pytest.mark.parametrize("method", ["edm", "cd", "ct", "ict", "sct", "scd"])
def test_captured_step_replays_with_new_noise_and_inputs(method):
    m, models, cfg, params, x, dt = _setup(method)
    g = GraphedStep(m, models, cfg, params, dt)
    losses = []
    for k in (0, 1, 60):
        loss_sum, gnorm, info = g(x, None, k)
        losses.append(float(loss_sum))
        assert math.isfinite(losses[-1]) and float(gnorm) > 0
        if k == 0:
            assert g.graph is not None
            grads = [p.grad.clone() for p in params]
    assert len(set(losses)) == 3                                   # each replay draws new noise / levels
    assert any(not torch.equal(a, p.grad) for a, p in zip(grads, params))
    if method in ("ct", "ict"):
        assert info["N"] > 2 and torch.equal(g.inputs["sigmas"].cpu(), g.host["sigmas"])   # the copied grid
    if method in ("sct", "scd"):
        assert float(g.inputs["r"]) == pytest.approx(info["r"]) and info["r"] > 0   # the warm-up factor


@pytest.mark.parametrize("method", ["ct", "ict", "sct"])
def test_captured_step_matches_the_eager_step_in_distribution(method):
    # the same weights, 24 steps each way: the mean loss and gradient norm of the replays and of the eager method
    # agree within 15% (different random draws; batch 128 keeps the means' spread to a few percent)
    m, models, cfg, params, x, dt = _setup(method, dropout=0.0, batch=128)
    g = GraphedStep(m, models, cfg, params, dt)
    graph_l, graph_g, eager_l, eager_g = [], [], [], []
    for i in range(24):
        ls, gn, _ = g(x, None, 40)
        graph_l.append(float(ls) / x.shape[0])
        graph_g.append(float(gn))
    saved = [p.grad for p in params]
    for i in range(24):
        for p in params:
            p.grad = None
        gen = torch.Generator("cuda").manual_seed(1000 + i)
        with torch.autocast("cuda", dt):
            loss_vec, _ = m.loss(models, x, 40, cfg, gen)
        loss_vec.float().mean().backward()
        eager_l.append(float(loss_vec.detach().float().mean()))
        eager_g.append(float(torch.nn.utils.clip_grad_norm_(params, float("inf"))))
    for p, s in zip(params, saved):
        p.grad = s
    for a, b in ((graph_l, eager_l), (graph_g, eager_g)):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        assert abs(ma - mb) <= 0.15 * abs(mb), (method, ma, mb)


@pytest.mark.parametrize("method", ["ict", "sct"])
def test_cli_cuda_graph_run(tmp_path, monkeypatch, method):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.delenv("CMFAST_CUDA_GRAPH", raising=False)
    write_png_folder(tmp_path / "imgs", n=32, size=32)
    out = str(tmp_path / "run")
    assert train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method", method,
                       "--preset", "tiny", "--dropout", "0.1", "--batch-size", "16", "--steps", "6",
                       "--precision", "bf16", "--device", "cuda", "--sample-num", "4", "--log-every", "1",
                       "--output-dir", out, "--cuda-graph"]) == 0
    with open(os.path.join(out, "stats.jsonl")) as f:
        rows = [json.loads(r) for r in f]
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["skipped"] == 0
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [bool(r.get("compile_warmup")) for r in rows] == [True] + [False] * 5
