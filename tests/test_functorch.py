"""torch.func over a consistency model: vmap of the model equals the batched call, and per-sample gradients
(vmap(grad)), the usual way to get them, equal one gradient per sample, class labels included. vmap refused the
model's sigma check (a value-dependent branch), the class-index range check (.tolist()) and the torch GroupNorm's
channels-last query."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import cmfast


def _model():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16, label_dim=3)
    with torch.no_grad():           # away from the zero-initialized output layer: the network term counts
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cmfast.ConsistencyModel(net).eval()


# torch's own note that SDPA has no vmap batching rule on CPU (it loops): not ours to act on
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_vmap_and_per_sample_gradients_equal_the_batched_and_one_at_a_time_results():
    m = _model()
    g = torch.Generator().manual_seed(1)
    x, s, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([80.0, 2.0, 0.01]), torch.tensor([0, 2, 1])
    with torch.no_grad():
        want = m(x, s, y)
        got = vmap(lambda xi, si, yi: m(xi[None], si[None], yi[None])[0])(x, s, y)
    assert (want - x).abs().max() > 0.05                       # a network term, not the skip alone
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, xi, si, yi):
        return functional_call(m, p, (xi[None], si[None], yi[None])).pow(2).mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, s, y)
    for i in range(3):
        one = grad(loss)(params, x[i], s[i], y[i])
        assert sum(float(v.abs().sum()) for v in one.values()) > 0
        for k in one:
            torch.testing.assert_close(per_sample[k][i], one[k], rtol=1e-4, atol=1e-6, msg=lambda m_: f"{k}: {m_}")


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_auto_takes_the_tables_kernels_under_vmap_and_grad(monkeypatch):
    """On CUDA 'auto' picks Triton or CUDA kernels from the measured table. Their autograd.Functions had no functorch
    rules, so auto ran the torch composition under any transform; now they have vmap and backward rules
    (cmfast/ops/_batching.py) and auto keeps the table's pick under vmap and grad (forward mode: see
    tests/test_ops_functorch.py). Here the table is made to pick triton (run by the interpreter on CPU)."""
    from cmfast import ops
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "_auto_choice", lambda *a, **k: "triton")
    if ops.interpreter_problem():
        pytest.skip(ops.interpreter_problem())
    cpu = torch.device("cpu")
    triton_gn = ops._module("triton").group_norm_act
    with ops.use_backend("auto"):
        assert ops.implementation("group_norm_act", cpu) is triton_gn   # the patch holds
        m = _model()
        x, s = torch.randn(2, 3, 16, 16), torch.tensor([5.0, 0.3])
        y = torch.tensor([1, 0])
        with torch.no_grad(), ops.use_backend("torch"):
            want = m(x, s, y)
        picked = []
        with torch.no_grad():
            got = vmap(lambda xi, si, yi: (picked.append(ops.implementation("group_norm_act", cpu)),
                                           m(xi[None], si[None], yi[None])[0])[1])(x, s, y)
        assert picked == [triton_gn]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        w = torch.randn(8)
        xi = torch.randn(8, 4, 4)
        g = grad(lambda a: ops.group_norm_act(a[None], 2, w, None, act="silu").sum())(xi)
        with ops.use_backend("torch"):
            g_torch = grad(lambda a: ops.group_norm_act(a[None], 2, w, None, act="silu").sum())(xi)
        assert bool(g.abs().sum() > 0)
        torch.testing.assert_close(g, g_torch, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_a_kernel_backend_named_under_vmap_or_grad_runs_its_kernels(transform, monkeypatch):
    """Named explicitly, triton ran under no transform (one line, BackendUnavailable); now its kernels run there and
    give the torch composition's numbers (every op and the cuda backend: tests/test_ops_functorch.py)."""
    from cmfast import ops
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if ops.interpreter_problem():
        pytest.skip(ops.interpreter_problem())
    w, x = torch.ones(4), torch.randn(2, 4, 4, 4)
    f = (lambda xi: ops.group_norm_act(xi[None], 2, w, None)[0]) if transform == "vmap" else \
        (lambda xi: ops.group_norm_act(xi[None], 2, w, None).square().sum())
    run = vmap(f) if transform == "vmap" else grad(f)
    arg = x if transform == "vmap" else x[0]
    calls = []
    kernels = ops._module("triton")._gn
    fwd = kernels.group_norm_act_fwd
    monkeypatch.setattr(kernels, "group_norm_act_fwd", lambda *a, **k: (calls.append(1), fwd(*a, **k))[1])
    with ops.use_backend("triton"):
        got = run(arg)
    with ops.use_backend("torch"):
        want = run(arg)
    assert calls          # the kernel ran
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
