"""Gaps a mutation round found in the tests of cmfast-train --cuda-graph (tests/test_cuda_graph_step.py and others):
sample_table_indices' count of the cdf at or below u; draw_pair_table's teacher step; each method's graph loss
against the composition it stands for (the pair, the target network, the weighting, the distance, c; sCT / sCD
against the eager loss at the same step); the graph inputs' info (mu) and iCT's schedule length and p_mean; the
uncaptured GraphedStep's loss sum, gradient norm before clipping, fresh gradients each call, batch and label copies,
its input buffers (a copy when a table comes back, no change of keys, no aliasing of the methods' cached tables),
autocast; the loop's graph path (the graph's gradient norm, no eager loss, the labels, the step, the precision);
the value checks staying on when not capturing; r's device check; reference_runs' run_one passing --cuda-graph;
throughput's graphed row under autocast. All on CPU (GraphedStep uncaptured), tiny shapes."""
import argparse
import json
import math
import os
import sys

import pytest
import torch

from cmfast import objectives, ops, precond
from cmfast.cli.train import main as train_main
from cmfast.jvp import fd_step
from cmfast.nets import UNet
from cmfast.precond import EDMDenoiser
from cmfast.schedules import ict_schedule, karras_sigmas, level_table, lognormal_level_probs, sample_table_indices
from cmfast.training.cuda_graph import GraphedStep
from cmfast.training.methods import get_method
from test_cuda_graph_step import _cfg as _graph_cfg, spy_graphed_steps
from train_fixtures import write_png_folder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))   # throughput


@pytest.fixture(autouse=True)
def _torch_backend():
    with ops.use_backend("torch"):      # the torch compositions: the Triton interpreter is slow on CPU
        yield


def _cfg(method, steps=100, **over):
    return _graph_cfg(method, steps, (1, 8, 8), **over)


def _randomize(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():      # EDM's zero-initialized output layers would hide the teacher, the target, the labels
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _models(method, cfg, perturb_target=True):
    m = get_method(method)
    torch.manual_seed(0)
    teacher = None
    if m.needs_teacher:
        teacher = _randomize(EDMDenoiser(UNet(**cfg["net"])), 7).eval().requires_grad_(False)
    models = m.build(_randomize(UNet(**cfg["net"]), 1), cfg, teacher)
    if perturb_target and "target" in models:      # theta- != theta, so the target network's choice shows
        _randomize(models["target"], 2)
    return m, models


def _x(seed=3, B=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, 8, 8, generator=g) * 2 - 1


# ---- sample_table_indices / draw_pair_table ----------------------------------------------------------------------
def test_table_indices_count_the_cdf_at_or_below_u(monkeypatch):
    t = level_table(karras_sigmas(5), 5)             # cdf 1, 2, 3, 4 (uniform)
    u = torch.tensor([0.0, 0.25, 0.5, 0.7499, 0.75, 0.99], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda n, **kw: u.to(kw.get("dtype", torch.float64)))
    # n = #{i: cdf[i] <= u cdf[-1]}: at u cdf[-1] = 1, 2, 3 exactly the next pair
    assert sample_table_indices(t["cdf"], t["last"], 6).tolist() == [0, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_draw_pair_table_takes_the_teachers_step(solver):
    net = _randomize(UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1,
                          attn_resolutions=(), label_dim=3), 5)
    teacher = EDMDenoiser(net).eval().requires_grad_(False)
    t = level_table(karras_sigmas(6), 9)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    torch.manual_seed(4)
    p = objectives.draw_pair_table(x, t, teacher, solver, y)
    want = objectives.teacher_step(teacher, p.x_hi, p.t_hi, p.t_lo, solver, y)
    assert torch.equal(p.x_lo, want)
    other = objectives.teacher_step(teacher, p.x_hi, p.t_hi, p.t_lo, {"heun": "euler", "euler": "heun"}[solver], y)
    assert float((want - other).abs().max()) > 1e-3      # a control: the solver shows (the labels reach the
    # conditional teacher, which refuses none)
    assert float((p.x_lo - (x + p.t_lo.view(-1, 1, 1, 1) * (p.x_hi - x) / p.t_hi.view(-1, 1, 1, 1))).abs().max()) > 1e-4


def test_draw_pair_table_checks_the_images():
    with pytest.raises((TypeError, ValueError)):
        objectives.draw_pair_table(torch.zeros(2, 1, 4, 4, dtype=torch.int64), level_table(karras_sigmas(4), 4))


# ---- the methods' graph losses -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method, over, target, weighting, c", [
    ("ct", dict(method_args={"weighting": "icm"}), "target", "icm", None),
    ("cd", dict(method_args={"solver": "euler"}), "target", "uniform", None),
    ("ict", dict(cond=True, method_args={"c": 0.07}), "model", "icm", 0.07),
])
def test_graph_loss_is_the_table_pair_and_the_masked_target_pass(method, over, target, weighting, c):
    cfg = _cfg(method, dropout=0.1, **over)
    m, models = _models(method, cfg)
    host, _ = m.graph_inputs(40, cfg)
    x = _x()
    y = torch.nn.functional.one_hot(torch.tensor([0, 3, 9, 3]), 10).float() if cfg["cond"] else None
    torch.manual_seed(11)
    got = m.graph_loss(models, x, host, cfg, y)
    torch.manual_seed(11)
    pair = objectives.draw_pair_table(x, host, models.get("teacher"), cfg["method_args"].get("solver", "heun"), y)
    want = objectives.consistency_pair_loss(models["model"], models[target], pair, cfg["loss"], weighting, c=c,
                                            class_labels=y, replay="masks")
    assert got.shape == (4,) and torch.allclose(got, want, rtol=1e-5, atol=0), (got, want)
    assert cfg["loss"] == ("pseudo_huber" if method == "ict" else "l2")


def test_edm_graph_loss_is_edm_loss_with_its_labels():
    cfg = _cfg("edm", cond=True)
    m, models = _models("edm", cfg)
    x, y = _x(), torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4]), 10).float()
    a = cfg["method_args"]
    assert a["p_mean"] != a["p_std"]
    torch.manual_seed(5)
    got = m.graph_loss(models, x, {}, cfg, y)
    torch.manual_seed(5)
    want = objectives.edm_loss(models["model"], x, None, a["p_mean"], a["p_std"], y)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)      # (the conditional network refuses no labels)


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_scm_graph_loss_is_the_eager_loss_at_the_step(method, monkeypatch):
    import cmfast.trigflow as trigflow
    eps_seen, real_fd_step = [], trigflow.fd_step
    monkeypatch.setattr(trigflow, "fd_step", lambda eps, *a, **k: eps_seen.append(eps) or real_fd_step(eps, *a, **k))
    # non-default hyperparameters, so each one the graph loss passes on shows; r from the graph inputs (a tensor)
    args = {"warmup_steps": 8, "fd_order": 4, "fd_eps": 0.2, "c": 0.3, "prior_weighting": "inv_sigma",
            "tangent_norm": "rms", "p_mean": -0.5, "p_std": 1.1}
    cfg = _cfg(method, method_args=args)
    a = cfg["method_args"]
    assert (a["fd_order"], a["fd_eps"], a["warmup_frac"]) == (4, 0.2, 0.0)     # large steps: the order shows
    m, models = _models(method, cfg)
    x = _x()
    for step in (3, 6):      # r = 3/8, 6/8
        host, info = m.graph_inputs(step, cfg)
        assert float(host["r"]) == info["r"] == step / 8
        torch.manual_seed(9)
        got = m.graph_loss(models, x, host, cfg)
        torch.manual_seed(9)
        want, _ = m.loss(models, x, step, cfg, None)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (step, got, want)
    torch.manual_seed(9)
    r0 = m.graph_loss(models, x, {"r": torch.zeros(1)}, cfg)
    assert not torch.allclose(r0, got, rtol=1e-3, atol=0)          # r's value reaches the loss
    assert eps_seen == [0.2] * 5                                   # the graph's FD step is the eager one's


# ---- the methods' graph inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ct", "cd"])
def test_graph_inputs_info_is_the_eager_steps(method):
    cfg = _cfg(method, method_args={"mu": 0.7} if method == "cd" else {})
    m = get_method(method)
    for k in (0, 50, 99):
        _, info = m.graph_inputs(k, cfg)
        want = (cfg["method_args"]["mu"] if method == "cd" else m._schedule(k, cfg)[1])
        assert info["mu"] == want and want > 0


def test_ict_graph_inputs_follow_the_schedule_length_and_p_mean():
    cfg = _cfg("ict", method_args={"schedule_mult": 0.5, "p_mean": -0.4, "p_std": 1.5})
    m = get_method("ict")
    for k in (10, 30, 60):
        host, info = m.graph_inputs(k, cfg)
        n = info["N"]
        assert n == ict_schedule(k, 50, 10, 1280)                  # the curriculum over 0.5 K
        p = torch.diff(host["cdf"][:n - 1], prepend=torch.zeros(1, dtype=torch.float64))
        assert torch.allclose(p, lognormal_level_probs(karras_sigmas(n, 0.002, 80.0), -0.4, 1.5), atol=1e-15)


# ---- GraphedStep uncaptured --------------------------------------------------------------------------------------
def _graphed(method="edm", autocast=None, **over):
    cfg = _cfg(method, **over)
    m, models = _models(method, cfg, perturb_target=False)
    params = [p for p in models["model"].parameters() if p.requires_grad]
    return GraphedStep(m, models, cfg, params, autocast, capture=False), cfg, models, params


def _manual(g, x, y, step, seed):
    """The step's loss (B,) and its unclipped gradients, eagerly."""
    for p in g.params:
        p.grad = None
    host, _ = g.method.graph_inputs(step, g.cfg)
    torch.manual_seed(seed)
    vec = g.method.graph_loss(g.models, x, host, g.cfg, y)
    vec.float().mean().backward()
    grads = [p.grad.clone() for p in g.params]
    for p in g.params:
        p.grad = None
    return vec.detach(), grads


def _norm(grads):
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in grads))


def test_step_returns_the_loss_sum_and_the_norm_before_clipping():
    g, cfg, _, params = _graphed("edm", grad_clip=1e-3)
    x = _x()
    vec, grads = _manual(g, x, None, 0, 21)
    torch.manual_seed(21)
    loss_sum, gnorm, _ = g(x, None, 0)
    assert float(loss_sum) == pytest.approx(float(vec.sum()), rel=1e-5)     # a sum over the batch of 4
    assert float(gnorm) == pytest.approx(_norm(grads), rel=1e-4) and float(gnorm) > 1e-2
    assert _norm([p.grad for p in params]) == pytest.approx(1e-3, rel=1e-3)   # the gradients clipped


def test_step_gradients_are_the_calls_own():
    g, _, _, params = _graphed("edm")
    x = _x()
    _, grads = _manual(g, x, None, 0, 22)
    for _ in range(2):
        torch.manual_seed(22)
        g(x, None, 0)
        assert all(torch.allclose(p.grad, w, rtol=1e-5, atol=1e-8) for p, w in zip(params, grads))   # not summed


def test_step_copies_each_batch_and_its_labels():
    g, cfg, _, _ = _graphed("edm", cond=True)
    eye = torch.eye(10)
    x1, y1, x2, y2 = _x(1), eye[[0, 1, 2, 3]], _x(2), eye[[9, 8, 7, 6]]
    torch.manual_seed(23)
    g(x1, y1, 0)
    for x, y in ((x2, y1), (x2, y2)):
        want, _ = _manual(g, x, y, 0, 23)
        torch.manual_seed(23)
        loss_sum, _, _ = g(x, y, 0)
        assert float(loss_sum) == pytest.approx(float(want.sum()), rel=1e-5)
        assert torch.equal(g.x, x) and torch.equal(g.y, y)       # the graph's inputs hold this call's batch


def test_step_buffers_follow_the_tables_and_leave_them_unchanged(monkeypatch):
    g, cfg, _, _ = _graphed("ct")
    m = g.method
    first = {k: v.clone() for k, v in m.graph_inputs(0, cfg)[0].items()}
    x = _x()
    for k in (0, 99, 0):       # a table that comes back is copied in again
        g(x, None, k)
        host, _ = m.graph_inputs(k, cfg)
        assert all(torch.equal(g.inputs[key], host[key]) for key in host), k
    # the buffers are the step's own: the methods' cached tables keep their values (the first was overwritten)
    assert all(torch.equal(first[k], v) for k, v in m.graph_inputs(0, cfg)[0].items())
    real = m.graph_inputs
    monkeypatch.setattr(m, "graph_inputs", lambda k, c: ({**real(k, c)[0], "extra": torch.zeros(1)}, {}))
    with pytest.raises(RuntimeError, match="graph_inputs changed its keys"):
        g(x, None, 1)


def test_step_runs_under_its_autocast_dtype():
    g, _, models, _ = _graphed("edm", autocast=torch.bfloat16)
    seen = []
    models["model"].net.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    g(_x(), None, 0)
    assert seen == [torch.bfloat16]


# ---- the loop's graph path ---------------------------------------------------------------------------------------
def test_loop_graph_path_uses_the_graphs_norm_labels_step_and_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.setenv("CMFAST_CUDA_GRAPH", "eager")
    for i, c in enumerate("ab"):      # two subfolders: two classes
        write_png_folder(tmp_path / "imgs" / c, n=4, size=8, channels=1, seed=i)
    calls = []
    real_call = GraphedStep.__call__

    def spy(self, x, y, step):
        calls.append((self.autocast_dtype, None if y is None else y.shape, step))
        return real_call(self, x, y, step)
    monkeypatch.setattr(GraphedStep, "__call__", spy)
    ct = get_method("ct")
    monkeypatch.setattr(type(ct), "loss", lambda *a, **k: pytest.fail("the eager loss ran in the graph path"))
    out = str(tmp_path / "run")
    assert train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--cond", "--method", "ct",
                       "--loss", "l2", "--preset", "tiny", "--batch-size", "4", "--steps", "3", "--device", "cpu",
                       "--backend", "torch", "--sample-num", "0", "--log-every", "1", "--grad-clip", "1e-6",
                       "--precision", "bf16", "--output-dir", out, "--cuda-graph"]) == 0
    assert [c[2] for c in calls] == [0, 1, 2]
    assert all(c[0] == torch.bfloat16 and c[1] is not None and c[1][0] == 4 for c in calls)
    with open(os.path.join(out, "stats.jsonl")) as f:
        rows = [json.loads(r) for r in f]
    with open(os.path.join(out, "config.json")) as f:
        run_cfg = json.load(f)
    assert [r["N"] for r in rows] == [ct._schedule(k, run_cfg)[0] for k in range(3)]     # each step's N
    assert rows[0]["N"] < rows[-1]["N"]
    assert all(r["grad_norm"] > 1e-4 for r in rows)        # the norm before clipping to 1e-6


# ---- checks and small passings -----------------------------------------------------------------------------------
def test_value_checks_stay_on_when_not_capturing():
    assert precond.capturing(torch.zeros(1)) is False
    with pytest.raises(ValueError, match="positive step"):
        fd_step(-1e-3, torch.ones(2), 2, "cpu")
    F = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="h: expected positive"):
        ops.trig_tangent_loss(F, F, F, torch.full((2,), 0.5), F_plus=F, F_minus=F, h=torch.tensor([1e-3, -1e-3]))


def test_r_tensor_on_another_device_refused():
    F = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="r: expected device cpu"):
        ops.trig_tangent_loss(F, F, F, torch.full((2,), 0.5), dFdt=F, r=torch.ones(1, device="meta"))


def test_reference_run_one_passes_cuda_graph(monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "reference_runs_gaps", os.path.join(os.path.dirname(__file__), "..", "scripts", "reference_runs.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    import cmfast.cli.train as cli

    class Stop(Exception):
        pass
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or (_ for _ in ()).throw(Stop()))
    for flag in (True, False):
        a = type("A", (), dict(out="o", data_dir=None, device="cuda", seed=0, cuda_graph=flag))
        record = {}
        with pytest.raises(Stop):
            ref.run_one("ict", ref.PROFILES["gpu"], a, record)
        assert ("--cuda-graph" in seen[-1]) == flag and ("--cuda-graph" in record["command"]) == flag


def test_graph_row_times_the_graphed_step(monkeypatch):
    import throughput
    made = []
    monkeypatch.setattr(throughput, "ict_step_fn", lambda *a, **k: made.append("eager") or (lambda: None))
    monkeypatch.setattr(throughput, "graphed_ict_step_fn", lambda *a, **k: made.append("graph") or (lambda: None))
    monkeypatch.setattr(throughput.Runner, "row", lambda self, *a, **k: made.append(a[3]))
    monkeypatch.setattr(throughput, "train_floor", lambda *a: None)
    r = throughput.Runner(argparse.Namespace(quick=True), torch.device("cpu"))
    throughput.run_training(r, "tiny", [2], ["cmfast", "cmfast-graph"], None)
    assert made == ["eager", "cmfast", "graph", "cmfast-graph"]


def test_gpu_plans_time_the_graphed_step():
    import throughput
    for quick in (True, False):      # the training-step goal gets the captured step's row in both plans
        *_, modes = throughput.plan(argparse.Namespace(quick=quick, presets=None, batches=None), torch.device("cuda"))
        assert "cmfast-graph" in modes and modes.index("cmfast-graph") > modes.index("cmfast"), (quick, modes)


def test_graphed_throughput_row_passes_its_autocast(monkeypatch):
    import throughput
    monkeypatch.setenv("CMFAST_CUDA_GRAPH", "eager")
    made = spy_graphed_steps(monkeypatch)
    monkeypatch.setattr(throughput, "ema_update_", lambda t, s, mu: None)
    torch.manual_seed(0)
    model = throughput._model("tiny", torch.device("cpu")).train()
    throughput.graphed_ict_step_fn(model, 2, torch.device("cpu"), torch.bfloat16)()
    assert made[0].autocast_dtype == torch.bfloat16
