"""cmfast-train --cuda-graph on CPU: the fixed-shape level tables and their sampler, the pair and the mask-shared
target pass the captured step uses, each method's graph inputs, a capture lint (the step's loss traced on fake CUDA
tensors: no host sync, no host-to-device copy), the refusals, and the loop's graph path run uncaptured
(CMFAST_CUDA_GRAPH=eager). The capture itself runs in tests/test_cuda_graph_gpu.py."""
import json
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cmfast import objectives, ops, precond
from cmfast.cli.train import main as train_main
from cmfast.jvp import dropout_masks
from cmfast.nets import UNet
from cmfast.precond import EDMDenoiser
from cmfast.schedules import (ict_schedule, karras_sigmas, level_table, lognormal_level_probs,
                              sample_table_indices)
from cmfast.training.config import resolve
from cmfast.training.cuda_graph import GraphedStep
from cmfast.training.methods import METHODS, Method, get_method
from train_fixtures import write_png_folder


# ---- level_table / sample_table_indices --------------------------------------------------------------------------
def test_level_table_pads_the_grid_and_its_cdf():
    s = karras_sigmas(5)
    t = level_table(s, 8)
    assert t["sigmas"].shape == (8,) and t["sigmas"].dtype == torch.float32
    assert torch.equal(t["sigmas"][:5], s.float()) and torch.all(t["sigmas"][5:] == float(s[-1]))
    assert t["cdf"].shape == (7,) and t["cdf"].dtype == torch.float64
    assert torch.allclose(t["cdf"][:4], torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    assert torch.all(t["cdf"][4:] == 4.0) and int(t["last"]) == 3
    ln = level_table(s, 5, "lognormal", -1.1, 2.0)
    assert torch.allclose(torch.diff(ln["cdf"], prepend=torch.zeros(1, dtype=torch.float64)),
                          lognormal_level_probs(s, -1.1, 2.0), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n, size, dist, msg", [(9, 8, "uniform", "2 to 8 levels"), (1, 8, "uniform", "2 to 8"),
                                                (4, 8, "beta", "'uniform' or 'lognormal'")])
def test_level_table_refusals(n, size, dist, msg):
    s = karras_sigmas(n) if n >= 2 else torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=msg):
        level_table(s, size, dist)


@pytest.mark.parametrize("dist", ["uniform", "lognormal"])
def test_table_indices_follow_the_pair_probabilities(dist):
    s = karras_sigmas(11)
    t = level_table(s, 20, dist, -1.1, 2.0)
    torch.manual_seed(0)
    n = 200_000
    idx = sample_table_indices(t["cdf"], t["last"], n)
    assert idx.dtype == torch.int64 and int(idx.min()) >= 0 and int(idx.max()) <= 9
    freq = torch.bincount(idx, minlength=10).double() / n
    p = torch.full((10,), 0.1, dtype=torch.float64) if dist == "uniform" else lognormal_level_probs(s, -1.1, 2.0)
    # binomial standard errors: every pair's frequency within 5 of them
    assert torch.all((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n) + 1e-12), (freq, p)


def test_table_indices_never_pass_the_last_pair(monkeypatch):
    t = level_table(karras_sigmas(4), 10)
    # u * cdf[-1] == cdf[-1] (a rounding of u close to 1): searchsorted's index is past the grid; clamped to last
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n, **kw))
    assert sample_table_indices(t["cdf"], t["last"], 3).tolist() == [2, 2, 2]


# ---- the pair and the target pass --------------------------------------------------------------------------------
def test_draw_pair_table_gives_adjacent_levels_of_one_trajectory():
    s = karras_sigmas(7)
    t = level_table(s, 12)
    x = torch.rand(64, 1, 4, 4) * 2 - 1
    torch.manual_seed(1)
    p = objectives.draw_pair_table(x, t)
    grid = s.float()
    pos = torch.searchsorted(grid, p.t_lo)
    assert torch.equal(grid[pos], p.t_lo) and torch.equal(grid[pos + 1], p.t_hi)     # adjacent levels of the grid
    assert int(pos.max()) <= 5
    z_hi = (p.x_hi - x) / p.t_hi.view(-1, 1, 1, 1)
    z_lo = (p.x_lo - x) / p.t_lo.view(-1, 1, 1, 1)
    assert torch.allclose(z_hi, z_lo, rtol=1e-3, atol=1e-3)                           # the same noise z
    assert 0.8 < float(z_hi.std()) < 1.2


def _tiny_model(dropout=0.2, label_dim=0):
    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1,
               attn_resolutions=(), dropout=dropout, label_dim=label_dim)
    with torch.no_grad():      # EDM's zero-initialized output convolutions would hide the masks' effect
        for p in net.parameters():
            p.normal_(0, 0.2)
    return precond.ConsistencyModel(net)


@pytest.mark.parametrize("replay", ["masks", "rng"])
def test_target_pass_shares_the_online_dropout_masks(replay):
    model = _tiny_model(0.3).train()
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 1.5)
    pair = objectives.Pair(x, t, x.clone(), t.clone())      # the same input twice: only the masks could differ
    loss = objectives.consistency_pair_loss(model, model, pair, "l2", replay=replay)
    assert float(loss.detach().abs().max()) == 0.0
    with dropout_masks(record=[]):      # the control: a second forward with new masks does differ
        a = model(x, t)
    assert float((a - model(x, t)).detach().abs().max()) > 1e-3


def test_masks_replay_trains_the_online_pass_only():
    model = _tiny_model(0.3).train()
    x = torch.randn(4, 1, 8, 8)
    pair = objectives.Pair(x + 0.1, torch.full((4,), 1.0), x, torch.full((4,), 0.8))
    objectives.consistency_pair_loss(model, model, pair, "l2", replay="masks").mean().backward()
    g = [p.grad for p in model.parameters() if p.grad is not None]
    assert g and sum(float(v.abs().sum()) for v in g) > 0
    with pytest.raises(ValueError, match="replay: expected 'rng' or 'masks'"):
        objectives.consistency_pair_loss(model, model, pair, "l2", replay="state")


# ---- the methods' graph inputs -----------------------------------------------------------------------------------
def _cfg(method, steps=100, shape=(1, 32, 32), **over):
    """The resolved config of a --cuda-graph run of `method` (tiny preset, batch 4) on images of `shape`."""
    args = dict(dataset="fashion-mnist", method=method, preset="tiny", batch_size=4, total_steps=steps,
                loss="l2" if method in ("cd", "ct") else None, cuda_graph=True, **over)
    if method in ("cd", "scd"):
        args["teacher"] = "unused"
    return resolve(args, 1, shape, 10)


def spy_graphed_steps(monkeypatch) -> list:
    """Every GraphedStep made from now on (cuda_graph.GraphedStep replaced by a subclass that records itself)."""
    from cmfast.training import cuda_graph
    made = []

    class Spy(cuda_graph.GraphedStep):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    monkeypatch.setattr(cuda_graph, "GraphedStep", Spy)
    return made


@pytest.mark.parametrize("method", ["ct", "ict", "cd"])
def test_graph_inputs_keep_their_shapes_and_give_the_loss_grid(method):
    cfg = _cfg(method)
    m = get_method(method)
    shapes, ns = set(), []
    for k in (0, 37, 99, 100):
        host, info = m.graph_inputs(k, cfg)
        shapes.add(tuple((key, tuple(v.shape)) for key, v in sorted(host.items())))
        n = info["N"]
        ns.append(n)
        assert torch.equal(host["sigmas"][:n], karras_sigmas(n, cfg["sigma_min"], cfg["sigma_max"]).float())
        assert int(host["last"]) == n - 2
        if method == "ict":
            assert n == ict_schedule(k, 100, 10, 1280)
            p = torch.diff(host["cdf"][:n - 1], prepend=torch.zeros(1, dtype=torch.float64))
            assert torch.allclose(p, lognormal_level_probs(karras_sigmas(n, 0.002, 80.0), -1.1, 2.0), atol=1e-15)
    assert len(shapes) == 1                     # one graph for the whole run
    assert (ns[0] < ns[-1]) == (method != "cd")     # the curricula grow; CD's N is fixed


def test_edm_has_no_graph_inputs_and_sct_its_warmup_factor():
    assert get_method("edm").graph_inputs(5, _cfg("edm")) == ({}, {})
    cfg = _cfg("sct", method_args={"warmup_frac": 0.5})       # r: 0 -> 1 over the first 50 of 100 steps
    for k, r in ((0, 0.0), (10, 0.2), (49, 0.98), (50, 1.0), (99, 1.0)):
        host, info = get_method("sct").graph_inputs(k, cfg)
        assert host["r"].shape == (1,) and host["r"].dtype == torch.float32
        assert float(host["r"]) == pytest.approx(r) and info == {"r": pytest.approx(r)}
    with pytest.raises(NotImplementedError, match="has no CUDA-graph step"):
        Method().graph_loss({}, None, {}, {})


# ---- the capture lint: the step's loss on fake CUDA tensors ------------------------------------------------------
class _CaptureLint(TorchDispatchMode):
    """Records the host-to-device copies of a traced call (illegal in a CUDA-graph capture), and apart the blocking
    ones (an eager step's host sync); FakeTensorMode below it raises on a host sync (a value read: .item(), bool(),
    .tolist())."""

    def __init__(self):
        super().__init__()
        self.copies, self.blocking = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        name = func.__name__.split(".")[0]
        if name in ("_to_copy", "copy_") and any(t.device.type == "cpu" for t in ins) \
                and any(o.device.type == "cuda" for o in outs):
            self.copies.append(str(func))
            if not kwargs.get("non_blocking", args[2] if name == "copy_" and len(args) > 2 else False):
                self.blocking.append(str(func))
        return out


def _lint(method, loss_fn=None, cond=False, monkeypatch=None):
    from torch._subclasses.fake_tensor import FakeTensorMode
    cfg = _cfg(method, dropout=0.1, cond=cond)
    m = get_method(method)
    torch.manual_seed(0)
    teacher = EDMDenoiser(UNet(**cfg["net"])).eval().requires_grad_(False) if m.needs_teacher else None
    models = m.build(UNet(**cfg["net"]), cfg, teacher)
    host, _ = m.graph_inputs(3, cfg)
    lint = _CaptureLint()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for v in models.values():
            v.to("cuda")
        inputs = {k: v.to("cuda") for k, v in host.items()}
        x = torch.zeros(4, 1, 32, 32, device="cuda")
        y = torch.zeros(4, dtype=torch.int64, device="cuda") if cond else None
        with ops.use_backend("torch"), lint:
            loss = (loss_fn or m.graph_loss)(models, x, inputs, cfg, y)
    return loss, lint.copies


@pytest.fixture
def capturing(monkeypatch):
    monkeypatch.setattr(precond, "capturing", lambda t: True)   # as while torch.cuda.graph captures


@pytest.mark.parametrize("method, cond", [("edm", False), ("cd", False), ("ct", False), ("ict", False),
                                          ("ict", True), ("sct", False), ("scd", False), ("sct", True)])
def test_graph_loss_has_no_host_sync_or_copy(capturing, method, cond):
    loss, copies = _lint(method, cond=cond)
    assert loss.shape == (4,) and loss.device.type == "cuda" and copies == []


def test_capture_lint_finds_a_sync_and_a_copy(capturing):
    from torch._subclasses.fake_tensor import DataDependentOutputException

    def synced(models, x, inputs, cfg, y):
        return x.flatten(1).mean(1) * float(inputs["sigmas"][0])
    with pytest.raises(DataDependentOutputException):
        _lint("ct", synced)

    def copied(models, x, inputs, cfg, y):
        return x.flatten(1).mean(1) + karras_sigmas(5).float().to(x.device)[:1]
    assert _lint("ct", copied)[1] == ["aten._to_copy.default"]


def test_sigma_checks_sync_unless_capturing(monkeypatch):
    # not capturing, the model's noise-level check reads its values: the lint refuses it
    from torch._subclasses.fake_tensor import DataDependentOutputException
    monkeypatch.setattr(precond, "capturing", lambda t: False)
    with pytest.raises(DataDependentOutputException):
        _lint("ct")


# ---- GraphedStep uncaptured --------------------------------------------------------------------------------------
def _step(method="ct", **over):
    cfg = _cfg(method, **over)
    m = get_method(method)
    torch.manual_seed(0)
    models = m.build(UNet(**cfg["net"]), cfg)
    params = [p for p in models["model"].parameters() if p.requires_grad]
    return GraphedStep(m, models, cfg, params, capture=False), cfg, params


def test_uncaptured_step_updates_its_inputs_and_gradients():
    g, cfg, params = _step("ct")
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    loss_sum, gnorm, info = g(x, None, 0)
    assert info["N"] == 2 and torch.isfinite(loss_sum) and float(gnorm) > 0
    table = g.inputs["sigmas"]
    first = [p.grad.clone() for p in params]
    loss2, _, info2 = g(x, None, 99)
    assert info2["N"] > 2 and g.inputs["sigmas"] is table                      # the same buffer, new values
    assert torch.equal(g.inputs["sigmas"][:info2["N"]], karras_sigmas(info2["N"]).float())
    assert float(loss2) != float(loss_sum)
    assert any(not torch.equal(a, p.grad) for a, p in zip(first, params))
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    g2, _, _ = _step("ct", grad_clip=0.5)
    _, gn2, _ = g2(x, None, 99)
    clipped = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in g2.params))
    assert total > 0 and abs(clipped - min(0.5, float(gn2))) < 1e-4           # clipping inside the step


def test_uncaptured_step_refuses_a_new_batch_shape_or_input_shape(monkeypatch):
    g, cfg, _ = _step("ict")
    g(torch.zeros(4, 1, 32, 32), None, 0)
    with pytest.raises(RuntimeError, match=r"batch of shape \(2, 1, 32, 32\)"):
        g(torch.zeros(2, 1, 32, 32), None, 1)
    real = g.method.graph_inputs
    monkeypatch.setattr(g.method, "graph_inputs", lambda k, c: ({**real(k, c)[0], "sigmas": torch.zeros(3)}, {}))
    with pytest.raises(RuntimeError, match="sigmas changed shape"):
        g(torch.zeros(4, 1, 32, 32), None, 2)


# ---- refusals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, world, msg", [
    (dict(method="sct", method_args={"jvp": "exact"}), 1, "--method sct: --method-arg jvp=exact"),
    (dict(method="nograph"), 1, "--method nograph has no CUDA-graph step"),
    (dict(precision="fp16"), 1, "fp16's loss scaling"),
    (dict(compile="default"), 1, "--compile default"),
    (dict(batch_gpu=2), 1, "--batch-gpu 2 of a batch of 4"),
    ({}, 2, "one process only"),
])
def test_cuda_graph_refusals(monkeypatch, over, world, msg):
    no_graph = type("NoGraph", (Method,), {"name": "nograph"})()       # a registered method without a graph step
    monkeypatch.setitem(METHODS, "nograph", no_graph)
    args = dict(dataset="fashion-mnist", method="ict", preset="tiny", batch_size=4, cuda_graph=True)
    args.update(over)
    with pytest.raises(ValueError, match=msg):
        resolve(args, world, (1, 32, 32), 10)
    resolve({**args, "cuda_graph": None}, world, (1, 32, 32), 10)      # the same run without the flag: fine


def test_cuda_graph_refused_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.delenv("CMFAST_CUDA_GRAPH", raising=False)
    write_png_folder(tmp_path / "imgs", n=8, size=32)
    with pytest.raises(SystemExit):
        train_main(["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method", "ict", "--preset",
                    "tiny", "--batch-size", "4", "--steps", "2", "--device", "cpu", "--cuda-graph",
                    "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "--cuda-graph: CUDA graphs need a CUDA device, got cpu" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ---- the loop's graph path, uncaptured ---------------------------------------------------------------------------
def test_loop_graph_path_trains_checkpoints_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CMFAST_OFFLINE", "1")
    monkeypatch.setenv("CMFAST_CUDA_GRAPH", "eager")
    write_png_folder(tmp_path / "imgs", n=16, size=32)
    out = str(tmp_path / "run")
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--method", "ct", "--loss", "l2",
            "--preset", "tiny", "--dropout", "0.1", "--batch-size", "4", "--steps", "6", "--device", "cpu",
            "--backend", "torch", "--sample-num", "0", "--log-every", "1", "--ema", "0.9", "--output-dir", out,
            "--cuda-graph"]
    assert train_main([*argv, "--stop-at", "3"]) == 0
    assert train_main([*argv, "--resume", "latest"]) == 0
    with open(os.path.join(out, "stats.jsonl")) as f:
        rows = [json.loads(r) for r in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    # the first row of each process includes the capture (here: the uncaptured step's first call)
    assert [bool(r.get("compile_warmup")) for r in rows] == [True, False, False, True, False, False]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["cuda_graph"] is True
