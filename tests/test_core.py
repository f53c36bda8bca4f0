"""Scalings, boundary condition, noise levels and curricula against independent float64 formulas (CM paper,
iCT, EDM)."""
import math

import numpy as np
import pytest
import torch

import cmfast
from cmfast import schedules


def test_scalings_match_float64_formulas():
    s = np.array([0.002, 0.01, 0.3, 1.0, 7.5, 80.0])
    sd, smin = 0.5, 0.002
    c_skip, c_out, c_in = cmfast.scalings(torch.tensor(s, dtype=torch.float64), sd, smin)
    np.testing.assert_allclose(c_skip.numpy(), sd**2 / ((s - smin) ** 2 + sd**2), rtol=1e-14)
    np.testing.assert_allclose(c_out.numpy(), sd * (s - smin) / np.sqrt(s**2 + sd**2), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(c_in.numpy(), 1 / np.sqrt(s**2 + sd**2), rtol=1e-14)
    # float32 input keeps float32 and a shape like sigma
    out = cmfast.scalings(torch.full((2, 3), 1.0))
    assert all(t.shape == (2, 3) and t.dtype == torch.float32 for t in out)
    # EDM denoiser: sigma_min = 0
    c_skip0, c_out0, _ = cmfast.scalings(torch.tensor([2.0], dtype=torch.float64), sd, 0.0)
    assert c_skip0.item() == pytest.approx(0.25 / 4.25, rel=1e-15)
    assert c_out0.item() == pytest.approx(0.5 * 2 / math.sqrt(4.25), rel=1e-15)


class _Wild(torch.nn.Module):
    """A backbone with a large, nonzero output, so the boundary condition cannot hold by accident."""

    def forward(self, x, c_noise, labels=None):
        return 1e3 * torch.sin(x * 7 + c_noise.reshape(-1, 1, 1, 1)) + 5


def test_boundary_condition_is_exact_in_fp32():
    model = cmfast.ConsistencyModel(_Wild())
    x = torch.randn(4, 3, 8, 8)
    y = model(x, 0.002)
    assert y.dtype == torch.float32
    assert torch.equal(y, x)  # bit for bit
    assert not torch.allclose(model(x, 0.01), x, atol=1e-3)


def test_consistency_model_equals_formula():
    net = _Wild()
    model = cmfast.ConsistencyModel(net)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    s = torch.tensor([0.5, 3.0, 80.0], dtype=torch.float64)
    sd, smin = 0.5, 0.002
    c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
    c_out = sd * (s - smin) / torch.sqrt(s**2 + sd**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    F = net(c_in.view(-1, 1, 1, 1) * x, torch.log(s) / 4)
    want = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * F
    got = model(x.float(), s.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)  # F is ~1e3: fp32 of the backbone


@pytest.mark.parametrize("bad", [0.001, float("nan"), float("inf"), -1.0])
def test_sigma_errors(bad):
    model = cmfast.ConsistencyModel(_Wild())
    with pytest.raises(ValueError, match="sigma"):
        model(torch.randn(2, 1, 4, 4), bad)
    with pytest.raises(ValueError, match=r"one value per sample"):
        model(torch.randn(2, 1, 4, 4), torch.ones(3))


def test_integer_images_are_refused_by_dtype():
    """DESIGN.md 2: images are float in [-1, 1], uint8 only at file edges; errors name the dtype that came. A uint8
    or int64 batch ran through model(x, sigma), cmfast.sample and cmfast.edit.denoise as if 0..255 were [-1, 1]."""
    model = cmfast.ConsistencyModel(_Wild())
    for dt in (torch.uint8, torch.int64):
        x = torch.zeros(2, 1, 4, 4, dtype=dt)
        with pytest.raises(TypeError, match=f"x: expected a floating-point tensor .*got {dt}"):
            model(x, 1.0)
        with pytest.raises(TypeError, match="floating-point"):
            cmfast.sample(model, x)
    assert model(torch.zeros(2, 1, 4, 4, dtype=torch.float16), 1.0).dtype == torch.float32


def test_karras_sigmas_formula_and_order():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    got = cmfast.karras_sigmas(n, smin, smax, rho)
    i = np.arange(1, n + 1)
    want = (smin ** (1 / rho) + (i - 1) / (n - 1) * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert got[0].item() == smin and got[-1].item() == smax
    assert bool((got[1:] > got[:-1]).all())
    with pytest.raises(ValueError):
        cmfast.karras_sigmas(1)


def test_ct_schedule_paper_values():
    K = 800_000
    # k = 0: N = ceil(sqrt(s0^2) - 1) + 1 = s0 = 2, mu = exp(s0 ln mu0 / 2) = mu0
    assert cmfast.ct_schedule(0, K) == (2, pytest.approx(0.9))
    # k = K: N = s1 + 1 = 151
    n, mu = cmfast.ct_schedule(K, K)
    assert n == 151 and mu == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    # k = K/2: sqrt(0.5 (151^2 - 4) + 4) = 106.79 -> ceil(105.79) + 1 = 107
    n, mu = cmfast.ct_schedule(K // 2, K)
    assert n == math.ceil(math.sqrt(0.5 * (151**2 - 4) + 4) - 1) + 1 == 107
    assert mu == pytest.approx(0.9 ** (2 / 107))
    # openai/consistency_models divides by N - 1
    assert cmfast.ct_schedule(0, K, match_reference_code=True)[1] == pytest.approx(0.81)
    # mu0 = 0: the limit mu = 0 (target = online network), not a math domain error; out of range: one line
    assert cmfast.ct_schedule(K // 2, K, mu0=0.0) == (107, 0.0)
    with pytest.raises(ValueError, match=r"mu0: expected a rate in \[0, 1\], got 1.5"):
        cmfast.ct_schedule(0, K, mu0=1.5)


def test_ict_schedule_stage_boundaries():
    K = 400_000
    kp = math.floor(K / (math.log2(1280 // 10) + 1))  # 50000: 8 stages
    assert kp == 50_000
    assert cmfast.ict_schedule(0, K) == 11
    assert cmfast.ict_schedule(kp - 1, K) == 11
    assert cmfast.ict_schedule(kp, K) == 21
    assert cmfast.ict_schedule(3 * kp, K) == 81
    assert cmfast.ict_schedule(7 * kp, K) == 1281
    assert cmfast.ict_schedule(K, K) == 1281  # capped at s1 + 1


def test_lognormal_level_probabilities():
    sig = cmfast.karras_sigmas(11)
    p = schedules.lognormal_level_probs(sig)
    assert p.shape == (10,) and p.sum().item() == pytest.approx(1.0, abs=1e-12)
    e = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sig.tolist()]
    w = np.diff(e)
    np.testing.assert_allclose(p.numpy(), w / w.sum(), rtol=1e-12)
    g = torch.Generator().manual_seed(0)
    idx = schedules.sample_level_indices(sig, 20000, "lognormal", generator=g)
    freq = torch.bincount(idx, minlength=10).double() / 20000
    np.testing.assert_allclose(freq.numpy(), p.numpy(), atol=0.012)
    with pytest.raises(ValueError, match="distribution"):
        schedules.sample_level_indices(sig, 4, "beta")


def test_paper_step_indices():
    s = cmfast.paper_step_sigmas([0, 22, 39], 40)
    grid = cmfast.karras_sigmas(40).flip(0)
    assert s == (80.0, grid[22].item(), 0.002)
    with pytest.raises(ValueError):
        cmfast.paper_step_sigmas([22, 0], 40)


def test_ema_update():
    from cmfast.ema import EMA, ema_update_
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    want = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    ema_update_(a, b, 0.9)
    torch.testing.assert_close(a.weight.detach(), want)
    ema_update_(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)
    e = EMA(b, rate=0.5)
    assert not any(p.requires_grad for p in e.parameters())
    with pytest.raises(ValueError):
        ema_update_(a, b, 1.5)


def test_triton_interpreter_problem_is_named(monkeypatch):
    # triton < 3.7's interpreter breaks on numpy >= 2.4 (triton-lang/triton#9171): one clear line, not 86 tracebacks.
    import numpy as np
    import triton

    from cmfast import ops
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.4.1")
    msg = ops.interpreter_problem()
    assert msg.startswith("the Triton 3.6.0 interpreter fails with numpy 2.4.1 (triton-lang/triton#9171)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 4, 3, 3)
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailable, match=r"cannot run on cpu: the Triton 3\.6"):
        ops.group_norm_act(x, 2, None, None)
    monkeypatch.setattr(triton, "__version__", "3.7.0+git1234")
    assert ops.interpreter_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.3.5")
    assert ops.interpreter_problem() is None


def test_group_norm_act_pre_bias_arguments():
    """pre_bias is (N, C) or (1, C) on x's device; the torch backend adds it in x's dtype before the norm."""
    from cmfast import ops
    x, pre = torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    with ops.use_backend("torch"):
        want = ops.group_norm_act(x + pre[:, :, None, None], 2)
        assert torch.equal(ops.group_norm_act(x, 2, pre_bias=pre), want)
        assert torch.equal(ops.group_norm_act(x, 2, pre_bias=pre[:1]),
                           ops.group_norm_act(x + pre[:1, :, None, None], 2))
        assert (want - ops.group_norm_act(x, 2)).abs().max() > 0.1
    for bad, match in ((torch.randn(4), "pre_bias: expected shape"), (torch.randn(3, 4), "pre_bias: expected shape"),
                       (torch.randn(2, 4, 1, 1), "pre_bias: expected shape"), (torch.ones(2, 4, dtype=torch.long),
                                                                                "pre_bias")):
        with pytest.raises((ValueError, TypeError), match=match):
            ops.group_norm_act(x, 2, pre_bias=bad)
    with pytest.raises(ValueError, match="pre_bias: expected device"):
        ops.group_norm_act(x, 2, pre_bias=torch.randn(2, 4, device="meta"))


def test_ct_schedule_holds_past_the_curriculum_and_keeps_two_levels():
    """Past k = K (schedule_steps shorter than the run) N(k) stays at s1 + 1 and mu at its last value: the formula
    itself would go on growing. With s0 = 1 the formula gives N(0) = 1 (no pair of levels): at least 2."""
    K = 1000
    n, mu = cmfast.ct_schedule(K, K)
    assert cmfast.ct_schedule(3 * K, K) == (n, mu) == (151, pytest.approx(math.exp(2 * math.log(0.9) / 151)))
    assert math.ceil(math.sqrt(1) - 1) + 1 == 1
    n0, mu0 = cmfast.ct_schedule(0, K, s0=1)
    assert n0 == 2 and mu0 == pytest.approx(math.exp(math.log(0.9) / 2))


def test_ema_copies_buffers_and_takes_a_per_step_rate():
    """Buffers (BatchNorm running statistics here) are copied, not averaged; EMA.update(model, rate) uses that step's
    rate over the fixed one (CT's mu(k)); forward runs the averaged copy."""
    from cmfast.ema import EMA, ema_update_
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    tgt = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    src(torch.randn(8, 3) * 3 + 1)                          # training-mode forward: running stats move
    w_t, w_s = tgt[0].weight.detach().double().clone(), src[0].weight.detach().double()
    ema_update_(tgt, src, 0.75)
    torch.testing.assert_close(tgt[0].weight.detach().double(), 0.75 * w_t + 0.25 * w_s, rtol=1e-6, atol=1e-7)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(tgt[1], name), getattr(src[1], name)), name
    e = EMA(tgt, rate=0.9)
    w_e = e.module[0].weight.detach().double().clone()
    e.update(src, rate=0.5)
    torch.testing.assert_close(e.module[0].weight.detach().double(), 0.5 * w_e + 0.5 * w_s, rtol=1e-6, atol=1e-7)
    e.update(src)
    torch.testing.assert_close(e.module[0].weight.detach().double(), 0.9 * (0.5 * w_e + 0.5 * w_s) + 0.1 * w_s,
                               rtol=1e-6, atol=1e-7)
    x = torch.randn(5, 3)
    assert torch.equal(e(x), e.module(x))


@pytest.mark.parametrize("s0, s1", [(0, 150), (-3, 150), (10, 5)])
def test_curricula_refuse_s0_outside_1_to_s1(s0, s1):
    """ict_schedule(s0=0) divided by zero, s1 < s0 was a 'math domain error' from inside math.log2, and
    ct_schedule(s0=-3) returned an EMA rate mu = 1.009 (> 1: a target that diverges) without a word."""
    for schedule in (cmfast.ct_schedule, cmfast.ict_schedule):
        with pytest.raises(ValueError, match=rf"^s0, s1: expected 1 <= s0 <= s1 .*got s0={s0}, s1={s1}$"):
            schedule(5, 100, s0=s0, s1=s1)


def test_level_grids_take_numpy_and_tensor_integers():
    """karras_sigmas(np.int64(5)) was refused as 'n: expected an integer >= 2, got 5', and paper_step_sigmas of a
    numpy array or tensor of indices (np.array([0, 22, 39])) as 'ts: expected integers'; floats still are."""
    want = cmfast.paper_step_sigmas([0, 22, 39], 40)
    assert cmfast.paper_step_sigmas(np.array([0, 22, 39]), np.int64(40)) == want
    assert cmfast.paper_step_sigmas(torch.tensor([0, 22, 39]), 40) == want
    assert torch.equal(cmfast.karras_sigmas(np.int64(5)), cmfast.karras_sigmas(5))
    with pytest.raises(ValueError, match=r"^n: expected an integer >= 2, got 2\.0$"):
        cmfast.karras_sigmas(2.0)
    with pytest.raises(ValueError, match=r"^ts: expected integers in \[0, 39\], got 1\.5$"):
        cmfast.paper_step_sigmas([0, 1.5], 40)


def test_model_call_with_images_on_another_device_is_one_clear_error():
    """model(x, sigma) with x on the CPU and the model elsewhere (CUDA; 'meta' stands in here) failed in the first
    convolution with torch's 'Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor) should be the
    same' (on meta: 'Tensor on device meta is not on the expected device cpu!')."""
    from cmfast.trigflow import TrigFlowModel
    net = cmfast.UNet.from_preset("tiny", img_resolution=8).to("meta")
    x = torch.randn(2, 3, 8, 8)
    for model in (cmfast.ConsistencyModel(net), cmfast.EDMDenoiser(net), TrigFlowModel(net)):
        with pytest.raises(ValueError, match=r"^x: expected a tensor on meta \(the model's device\), got one on cpu$"):
            model(x, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):        # autocast skipped the dtype step: checked there too
        with pytest.raises(ValueError, match=r"^x: expected a tensor on meta"):
            cmfast.ConsistencyModel(net)(x, 1.0)
