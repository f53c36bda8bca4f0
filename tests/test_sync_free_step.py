"""cmfast-train's eager step makes one host sync, its own (the loss, the gradient norm and the stop request read
together at the end of the step). A sync in the middle of a GPU step drains the device's queue: the host then launches
the rest of the step while the GPU waits. Shown here on CPU by tracing on fake CUDA tensors:
- each method's loss inside precond.skip_value_checks() reads no value on the host (FakeTensorMode raises on one) and
  makes no blocking host-to-device copy (its level grid is copied once per grid, schedules.karras_sigmas_on);
- outside skip_value_checks the models' noise-level check does read values (the control);
- the batch is copied from pinned memory without blocking (data.to_device);
- the loop runs the loss inside skip_value_checks, and its stop flag is made on the device.
On a GPU, tests/test_sync_free_gpu.py runs the same step under torch.cuda.set_sync_debug_mode('error')."""
import contextlib

import pytest
import torch

from _checks import AtenOps
from cmfast import data, objectives, ops, precond, schedules
from cmfast.nets import UNet
from cmfast.precond import EDMDenoiser
from cmfast.training.config import resolve
from cmfast.training.methods import get_method
from test_cuda_graph_step import _CaptureLint


def _cfg(method, **over):
    args = dict(dataset="fashion-mnist", method=method, preset="tiny", batch_size=4, total_steps=100, dropout=0.1,
                loss="l2" if method in ("cd", "ct") else None, **over)
    if method in ("cd", "scd"):
        args["teacher"] = "unused"
    return resolve(args, 1, (1, 32, 32), 10)


@pytest.fixture
def fake_cuda_rng(monkeypatch):
    """The eager step's RNG replay (objectives._same_rng, torch.random.fork_rng) saves and restores the generators'
    seed and offset, which live on the host (no sync); without a CUDA driver they cannot be read, so the trace runs
    without them. The device copies made by the trace are dropped afterwards."""
    @contextlib.contextmanager
    def same_rng(device):
        yield lambda: None
    monkeypatch.setattr(objectives, "_same_rng", same_rng)
    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: contextlib.nullcontext())
    yield
    schedules._karras_on.cache_clear()


def _trace(method, cond=False, skip=True, steps=(3, 3)):
    """method.loss of steps `steps` traced on fake CUDA tensors; the host-to-device copies of the last one (a second
    step of the same level grid, by default: CT's N(k) of this short run changes from step to step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cfg = _cfg(method, cond=cond)
    m = get_method(method)
    torch.manual_seed(0)
    teacher = EDMDenoiser(UNet(**cfg["net"])).eval().requires_grad_(False) if m.needs_teacher else None
    models = m.build(UNet(**cfg["net"]), cfg, teacher)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for v in models.values():
            v.to("cuda")
        x = torch.zeros(4, 1, 32, 32, device="cuda")
        y = torch.zeros(4, dtype=torch.int64, device="cuda") if cond else None
        for k in steps:
            traffic = _CaptureLint()
            with ops.use_backend("torch"), (precond.skip_value_checks() if skip else contextlib.nullcontext()), \
                    traffic:
                loss, _ = m.loss(models, x, k, cfg, None, y)
    return loss, traffic


@pytest.mark.parametrize("method, cond", [("edm", False), ("cd", False), ("ct", False), ("ict", False),
                                          ("ict", True), ("sct", False), ("scd", False), ("sct", True)])
def test_eager_loss_reads_no_value_and_copies_nothing_blocking(fake_cuda_rng, method, cond):
    loss, traffic = _trace(method, cond)
    assert loss.shape == (4,) and loss.device.type == "cuda"
    assert traffic.copies == []


@pytest.mark.parametrize("method", ["ct", "ict", "cd"])
def test_the_level_grid_is_copied_once_per_grid(fake_cuda_rng, method):
    # the first step of a grid copies it; the next step of the same grid does not (iCT's pair probabilities are
    # computed on the device from it)
    _, first = _trace(method, steps=(3,))
    assert len(first.blocking) == 1, first.blocking
    assert schedules._karras_on.cache_info().currsize == 1


@pytest.mark.parametrize("method", ["cd", "ict", "edm", "scd"])
def test_without_skip_value_checks_the_models_read_their_levels(fake_cuda_rng, monkeypatch, method):
    # the control: the same trace with the models' noise-level checks on reads values on the host
    from torch._subclasses.fake_tensor import DataDependentOutputException
    monkeypatch.setattr(precond, "capturing", lambda t: False)     # (no CUDA driver to ask)
    with pytest.raises(DataDependentOutputException):
        _trace(method, skip=False)


def test_sct_value_checks_of_the_fd_step_are_the_reads():
    # sCT's model calls take no level check (the backbone is called); its reads are the FD step's and the tangent
    # loss's h > 0 checks, which skip_value_checks leaves out and a bad step still fails outside it
    from cmfast.jvp import fd_step
    t = torch.tensor([0.5, 1.0])
    eps = torch.tensor([1e-3, -1e-3], dtype=torch.float64)
    with pytest.raises(ValueError, match="positive step"):
        fd_step(eps, None, 2, "cpu")
    with precond.skip_value_checks():
        h = fd_step(eps, None, 2, "cpu")
    assert h.tolist() == [1e-3, -1e-3]
    F = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="positive finite-difference steps"):
        ops.trig_tangent_loss(F, F, F, t, F_plus=F, F_minus=F, h=torch.tensor([0.1, -0.1]))
    with precond.skip_value_checks():
        out = ops.trig_tangent_loss(F, F, F, t, F_plus=F, F_minus=F, h=torch.tensor([0.1, -0.1]))
    assert out.shape == (2,)


def test_skip_value_checks_nests_and_restores():
    x = torch.zeros(2, 1, 4, 4)
    assert not precond.value_checks_off(x)
    with precond.skip_value_checks():
        assert precond.value_checks_off(x)
        with precond.skip_value_checks():
            assert precond.value_checks_off(x)
        assert precond.value_checks_off(x)
        assert precond.check_sigma(torch.tensor([0.0, -1.0]), x, lo=0.002).tolist() == [0.0, -1.0]
    assert not precond.value_checks_off(x)
    with pytest.raises(ValueError, match="sigma_min"):
        precond.check_sigma(torch.tensor([0.0, -1.0]), x, lo=0.002)
    with pytest.raises(RuntimeError, match="boom"), precond.skip_value_checks():
        raise RuntimeError("boom")
    assert not precond.value_checks_off(x)


def test_skip_value_checks_is_per_thread():
    import threading
    seen = []
    with precond.skip_value_checks():
        th = threading.Thread(target=lambda: seen.append(precond.value_checks_off(torch.zeros(1, 1))))
        th.start()
        th.join()
    assert seen == [False]


# ---- schedules.karras_sigmas_on ---------------------------------------------------------------------------------
def test_karras_sigmas_on_a_device_is_the_hosts_grid_copied_once():
    from torch._subclasses.fake_tensor import FakeTensorMode
    schedules._karras_on.cache_clear()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            first = schedules.karras_sigmas_on("cuda:0", 18, 0.002, 80.0)
            assert first.device.type == "cuda" and first.dtype == torch.float64 and first.shape == (18,)
            assert schedules.karras_sigmas_on(torch.device("cuda:0"), 18, 0.002, 80.0) is first
            assert schedules.karras_sigmas_on("cuda:0", 19, 0.002, 80.0) is not first
            assert schedules.karras_sigmas_on("cuda:0", 18, 0.002, 40.0) is not first
        assert schedules._karras_on.cache_info().currsize == 3
    finally:
        schedules._karras_on.cache_clear()
    # on the host: the grid itself, made anew (the caller may write to it), nothing cached
    a, b = schedules.karras_sigmas_on("cpu", 18), schedules.karras_sigmas_on(torch.device("cpu"), 18)
    assert a is not b and torch.equal(a, schedules.karras_sigmas(18)) and torch.equal(a, b)
    assert schedules._karras_on.cache_info().currsize == 0
    with pytest.raises(ValueError, match="integer >= 2"):
        schedules.karras_sigmas_on("cuda:0", 1)
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        schedules.karras_sigmas_on("cuda:0", 5, 1.0, 0.5)


# ---- the batch ---------------------------------------------------------------------------------------------------
def test_batches_come_from_pinned_memory_without_blocking(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    pinned = []

    def pin(self):      # pinning needs a CUDA driver: recorded, the tensor returned as it is
        pinned.append(tuple(self.shape))
        return self
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    ds = data.ImageDataset(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.arange(6) % 3, "t", xflip=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        traffic = _CaptureLint()
        with traffic:
            x, y = ds.batch(torch.tensor([0, 2, 4]), torch.tensor([True, False, True]), "cuda")
    assert x.device.type == "cuda" and y.device.type == "cuda" and x.dtype == torch.float32
    assert traffic.blocking == [] and len(traffic.copies) == 3
    assert pinned == [(3, 1, 4, 4), (3,), (3,)]
    # on the CPU nothing is pinned, and the values are the batch's
    pinned.clear()
    ds.images[2] = 255
    x, y = ds.batch(torch.tensor([0, 2]), torch.tensor([False, True]), "cpu")
    assert pinned == [] and x[:, 0, 0, 0].tolist() == [-1.0, 1.0] and y.tolist() == [0, 2]


# ---- the loop ----------------------------------------------------------------------------------------------------
def test_the_loop_runs_the_loss_inside_skip_value_checks(monkeypatch, tmp_path):
    from cmfast.training import methods
    from cmfast.cli.train import main as train_main
    seen = []
    real = methods.ICT.loss

    def spy(self, *a, **k):
        seen.append(precond.value_checks_off(torch.zeros(1, 1)))
        return real(self, *a, **k)
    monkeypatch.setattr(methods.ICT, "loss", spy)
    rc = train_main(["--dataset", "fashion-mnist", "--preset", "tiny", "--method", "ict", "--steps", "2",
                     "--batch-size", "4", "--output-dir", str(tmp_path / "run"), "--sample-every", "100",
                     "--ckpt-every", "100", "--device", "cpu"])
    assert rc in (0, None) and seen == [True, True]
    assert not precond.value_checks_off(torch.zeros(1, 1))


# ---- sampling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cm", "trigflow", "edm"])
def test_eager_sampling_reads_no_value(monkeypatch, kind):
    """cmfast.sample and edm_sample check their levels on the host against the model's range, so the models' per-call
    level checks (a host sync each on a GPU: 35 for an 18-step Heun run) are left out; a bad level is still refused
    before any model call."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from cmfast import ConsistencyModel, sample
    from cmfast.sampling import edm_sample
    from cmfast.trigflow import TrigFlowModel
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from cmfast import sampling
    monkeypatch.setattr(precond, "capturing", lambda t: False)     # (no CUDA driver to ask)
    real = sampling.karras_sigmas

    def host_grid(*a, **k):     # a host computation: real CPU numbers under the fake mode, as without it
        with unset_fake_temporarily():
            return real(*a, **k)
    monkeypatch.setattr(sampling, "karras_sigmas", host_grid)
    torch.manual_seed(0)
    net = UNet.from_preset("tiny", in_channels=1)
    model = {"cm": ConsistencyModel, "trigflow": TrigFlowModel, "edm": EDMDenoiser}[kind](net).eval()
    run = (lambda m, z: edm_sample(m, z, num_steps=3)) if kind == "edm" else \
        (lambda m, z: sample(m, z, (80.0, 0.5)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to("cuda")
        z = torch.zeros(2, 1, 32, 32, device="cuda")
        with ops.use_backend("torch"):
            x = run(model, z)
            assert x.shape == (2, 1, 32, 32) and x.device.type == "cuda"
            if kind != "edm":
                with pytest.raises(ValueError, match="sigmas"):
                    sample(model, z, (80.0, 1e-4))


def test_compiled_model_takes_no_graph_break_for_the_checks():
    # torch.compile(model, fullgraph=True) traces check_sigma without a graph break, inside skip_value_checks or not
    from cmfast import ConsistencyModel
    torch._dynamo.reset()
    model = ConsistencyModel(UNet.from_preset("tiny", in_channels=1)).eval()
    x, s = torch.randn(2, 1, 32, 32), torch.tensor([1.0, 2.0])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    want = model(x, s)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, s), want.detach())
        with precond.skip_value_checks():
            torch.testing.assert_close(compiled(x, s), want.detach())
    torch._dynamo.reset()


# ---- the step's gradient norm ------------------------------------------------------------------------------------
def test_grad_norm_without_clipping_touches_no_gradient():
    # cmfast-train's default (--grad-clip 0): the norm clip_grad_norm_(params, inf) gave, bit for bit, without its
    # pass multiplying every gradient by 1.0; with --grad-clip the gradients are clipped as before
    from cmfast.training.cuda_graph import grad_norm
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 7, 3)]
    for p in params:
        p.grad = torch.randn_like(p) * 3

    before = [p.grad.clone() for p in params]
    with AtenOps() as ops:
        n = grad_norm(params)
    assert not any(name.startswith("_foreach_mul") for name in ops.names), ops.names
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))
    assert torch.equal(n, torch.nn.utils.clip_grad_norm_(params, float("inf")))
    total = float(n)
    clipped = grad_norm(params, 1.0)
    assert float(clipped) == pytest.approx(total) and total > 1
    assert float(torch.linalg.vector_norm(torch.cat([p.grad for p in params]))) == pytest.approx(1.0, rel=1e-5)
    assert float(grad_norm([torch.nn.Parameter(torch.zeros(2))])) == 0.0      # no gradient yet
