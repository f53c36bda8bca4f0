"""TrigFlow / sCM: the VE convention (cmfast.sample unchanged), the EDM teacher as a TrigFlow velocity on known
cases, time sampling, fd vs exact JVP inside the loss, a short CPU sCT run, the sct/scd training methods."""
import copy
import math

import pytest
import torch
from torch import nn

import cmfast
from cmfast.trigflow import (TrigFlowModel, sample_time, scd_loss, scm_loss, sct_loss, sigma_to_t,
                             teacher_velocity)

SD = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(res=8, seed=0, **kw):
    torch.manual_seed(seed)
    net = cmfast.UNet.from_preset("tiny", img_resolution=res, attn_resolutions=(res // 2,), **kw)
    for p in net.parameters():   # EDM init zeroes the output conv: randomize so F matters
        nn.init.normal_(p, std=0.1)
    return net


def _b(v):
    return v.reshape(-1, 1, 1, 1)


def test_ve_call_is_the_trigflow_consistency_function():
    model = TrigFlowModel(_net()).eval()
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.01, 0.7, 30.0])
    t = torch.atan(sigma / SD)
    # x_sigma = x0 + sigma n is x_t / cos t with z = sd n:  cos t (x0 + sigma n) = cos t x0 + sin t (sd n)
    x_t = _b(torch.cos(t)) * x0 + _b(torch.sin(t)) * SD * n
    torch.testing.assert_close(_b(torch.cos(t)) * (x0 + _b(sigma) * n), x_t, rtol=1e-5, atol=1e-5)  # fp32 at |x| ~ 30
    with torch.no_grad():
        F = model.net(x_t / SD, t)     # c_noise(t) = t
        want = _b(torch.cos(t)) * x_t - _b(torch.sin(t)) * SD * F
        got = model(x0 + _b(sigma) * n, sigma)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # boundary: f(x, 0) = x exactly
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.consistency(x, torch.zeros(2)), x)


def test_cmfast_sample_runs_trigflow_unchanged():
    model = TrigFlowModel(_net()).eval()
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t0 = math.atan(80.0 / SD)
    with torch.no_grad():
        one = cmfast.sample(model, z, (80.0,))
        want = model.consistency(math.cos(t0) * 80.0 * z, torch.full((2,), t0))
        torch.testing.assert_close(one, want, rtol=1e-5, atol=1e-5)
        # x_t at sigma_max = 80 is 0.49999 z: the start of TrigFlow sampling (t = pi/2, x = sd z) to 2e-5
        assert abs(math.cos(t0) * 80.0 - SD) < 2e-5
        two = cmfast.sample(model, z, (80.0, 0.821), torch.Generator().manual_seed(5))
        n = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
        x = one + math.sqrt(0.821 ** 2 - model.sigma_min ** 2) * n
        t1 = math.atan(0.821 / SD)
        want2 = model.consistency(math.cos(t1) * x, torch.full((2,), t1))
        torch.testing.assert_close(two, want2, rtol=1e-5, atol=1e-5)


class _Denoiser(nn.Module):
    """Exact posterior means D(x_sigma, sigma) of two known data distributions."""

    def __init__(self, kind, a=None, s=None):
        super().__init__()
        self.kind, self.a, self.s, self.sigma_data = kind, a, s, SD

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        if self.kind == "point":               # data = the single image a
            return self.a.expand_as(x)
        return self.s ** 2 / (self.s ** 2 + sigma ** 2) * x   # data ~ N(0, s^2 I)


def test_teacher_velocity_point_mass_and_gaussian():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.05, 0.6, 1.2, 1.5], dtype=torch.float64, requires_grad=True)
    # point mass at a: every trajectory is x_t = cos t a + sin t z, so dx_t/dt = -sin t a + cos t z
    a, z = torch.randn(1, 3, 4, 4, generator=g).double(), torch.randn(4, 3, 4, 4, generator=g).double() * SD
    x_t = _b(torch.cos(t)) * a + _b(torch.sin(t)) * z
    v = teacher_velocity(_Denoiser("point", a=a), x_t.detach(), t.detach(), SD)
    torch.testing.assert_close(v, (-_b(torch.sin(t)) * a + _b(torch.cos(t)) * z).detach(), rtol=1e-10, atol=1e-10)
    # Gaussian data N(0, s^2), s != sd: the EDM ODE scales x_sigma by sqrt(s^2 + sigma^2), so in TrigFlow
    # x_t = cos t sqrt(s^2 + sd^2 tan^2 t) c for a fixed c; its time derivative by autograd
    s, c = 1.3, torch.randn(1, 3, 4, 4, generator=g).double()
    x_t = _b(torch.cos(t) * torch.sqrt(s ** 2 + SD ** 2 * torch.tan(t) ** 2)) * c
    dx = torch.autograd.grad(x_t, t, torch.ones_like(x_t))[0]          # sum over the image of dx_t/dt
    v = teacher_velocity(_Denoiser("gauss", s=s), x_t.detach(), t.detach(), SD)
    torch.testing.assert_close(v.sum((1, 2, 3)), dx, rtol=1e-9, atol=1e-9)
    # and per element: v = c d/dt[cos t sqrt(s^2 + sd^2 tan^2 t)]
    assert float((v / c - (v / c)[:, :1, :1, :1]).abs().max()) < 1e-9


def test_edm_time_input_makes_an_edm_net_the_teacher():
    # F_trig = -F_edm with c_noise = ln(sd tan t) / 4: same weights, same function (sCD starts from the teacher)
    net = _net()
    teacher = cmfast.EDMDenoiser(net).eval()
    model = TrigFlowModel(net, time_input="edm").eval()
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.05, 1.0, 20.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma), teacher(x, sigma), rtol=1e-4, atol=1e-5)
        t = sigma_to_t(sigma)
        x_t = _b(torch.cos(t)) * x
        torch.testing.assert_close(SD * model.backbone(x_t, t), teacher_velocity(teacher, x_t, t, SD),
                                   rtol=1e-4, atol=1e-4)


def test_time_sampling_is_lognormal_in_sigma():
    t = sample_time(200_000, SD, -1.0, 1.4, torch.Generator().manual_seed(0))
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2
    ln_sigma = torch.log(SD * torch.tan(t.double()))
    assert abs(float(ln_sigma.mean()) + 1.0) < 0.01 and abs(float(ln_sigma.std()) - 1.4) < 0.01


def test_fd_and_exact_jvp_give_the_same_loss_and_gradient():
    model = TrigFlowModel(_net())
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    out = {}
    for jvp in ("fd", "exact"):
        model.zero_grad()
        loss = sct_loss(model, x0, jvp=jvp, warmup_steps=0, generator=torch.Generator().manual_seed(3))
        loss.sum().backward()
        out[jvp] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.net.parameters()]))
    (l_fd, g_fd), (l_ex, g_ex) = out["fd"], out["exact"]
    assert torch.isfinite(l_fd).all()
    torch.testing.assert_close(l_fd, l_ex, rtol=1e-4, atol=1e-5)
    assert float((g_fd - g_ex).norm() / g_ex.norm()) < 1e-3
    # fp64 forwards through fp64 copies of the weights agree as well
    model.zero_grad()
    l64 = sct_loss(model, x0, jvp="fd", precision="fp64", warmup_steps=0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(l64.detach(), l_ex, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", [2, 4])
def test_fd_stencil_stays_inside_the_time_range(monkeypatch, order):
    """sCD (time_input 'edm': c_noise = ln(sd tan t) / 4) at times whose stencil t +- h crossed pi/2 (h = 1e-2 t)
    or 0 (the floor): the loss was NaN there. The step is shortened to half-way to the end; fp64 forwards then agree
    with the exact JVP, and the step of every other sample is unchanged."""
    import cmfast.trigflow as T
    from cmfast.jvp import fd_step
    t = torch.tensor([0.5, 1.555, 1.5605, 1.5705, 1e-5])
    monkeypatch.setattr(T, "sample_time", lambda B, sd, pm, ps, g, dev: t)
    teacher = cmfast.EDMDenoiser(_net(seed=1))
    model = TrigFlowModel(_net(), time_input="edm")
    x0 = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    kw = dict(step=10 ** 6, order=order, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fd = scd_loss(model, x0, teacher, jvp="fd", precision="fp64", **kw)
        kw["generator"] = torch.Generator().manual_seed(3)
        ex = scd_loss(model, x0, teacher, jvp="exact", precision="fp64", **kw)
    assert torch.isfinite(fd).all()
    torch.testing.assert_close(fd, ex, rtol=1e-3, atol=1e-6)
    h = T.stencil_inside(fd_step(1e-2, t, 5, "cpu"), t, order)
    reach = h * (2 if order == 4 else 1)
    assert bool(((t - reach > 0) & (t + reach < math.pi / 2)).all())
    assert h[0] == fd_step(1e-2, t, 5, "cpu")[0]                  # t = 0.5: as before


def test_scd_starts_at_zero_tangent_when_the_student_is_the_teacher():
    # student = teacher (time_input 'edm', same weights), r = 0: g = -cos^2 t (sd F - v_teacher) = 0 exactly in
    # exact arithmetic, so the loss is ~0 (= logvar, 0 at init) and the gradient of F ~ 0
    net = _net(dropout=0.0)
    teacher = cmfast.EDMDenoiser(net).eval()
    student = TrigFlowModel(_net(dropout=0.0), time_input="edm")
    student.net.load_state_dict(net.state_dict())
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    loss = scd_loss(student, x0, teacher, step=0, warmup_steps=100, generator=torch.Generator().manual_seed(0))
    assert float(loss.detach().abs().max()) < 1e-6
    # a different student: a clearly nonzero loss, finite gradients
    other = TrigFlowModel(_net(seed=1, dropout=0.0), time_input="edm")
    loss = scd_loss(other, x0, teacher, step=50, warmup_steps=100, generator=torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert float(loss.detach().min()) > 1e-3
    assert all(torch.isfinite(p.grad).all() for p in other.net.parameters() if p.grad is not None)


def _images(K=2, H=8):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, H), indexing="ij")
    out = []
    for k in range(K):
        a = k * math.pi / K
        base = torch.sin(2.5 * (math.cos(a) * xx + math.sin(a) * yy) + k)
        out.append(torch.stack([base, torch.roll(base, k, 0), -base]) * 0.8)
    return torch.stack(out)


def _nn_distance(model, data, n=32):
    """Mean RMS distance of 1-step samples (cmfast.sample from sigma_max) to their nearest training image."""
    z = torch.randn(n, *data.shape[1:], generator=torch.Generator().manual_seed(123))
    s = cmfast.sample(model.eval(), z, (80.0,))
    model.train()
    return float(((s[:, None] - data[None]) ** 2).flatten(2).mean(2).sqrt().min(1).values.mean())


def test_sct_cpu_run_loss_falls_and_samples_move_toward_the_data():
    import copy

    from cmfast.ema import ema_update_
    data = _images()
    torch.manual_seed(0)
    model = TrigFlowModel(cmfast.UNet.from_preset("tiny", img_resolution=8, attn_resolutions=(4,)))
    ema = copy.deepcopy(model)          # sampled from, as the training loop does (one step is noisy)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = _nn_distance(model, data)
    g, losses = torch.Generator().manual_seed(0), []
    for step in range(120):
        idx = torch.randint(0, len(data), (16,), generator=g)
        loss = sct_loss(model, data[idx], step=step, warmup_steps=50, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update_(ema, model, 0.9)
        losses.append(loss.item())
    after = _nn_distance(ema, data)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0
    # untrained: samples ~ 0, at about the data's RMS from every image (0.553); after 120 steps 0.19 at this seed, and
    # 0.14-0.35 (0.25-0.63 x before) over 20 seeds (init, batches, noise): the former bar 0.6 x failed one of them.
    # Untrained steps (lr 0) leave the EMA's samples where they were (1.0 x).
    assert before > 0.5 and after < 0.8 * before, (before, after)


def test_sct_scd_training_methods():
    from cmfast.training.methods import get_method
    sct, scd = get_method("sct"), get_method("scd")
    assert scd.needs_teacher and not sct.needs_teacher and sct.kind == "cm"
    cfg = dict(sigma_data=SD, sigma_min=0.002, sigma_max=80.0, method_args=dict(sct.defaults, warmup_steps=10))
    models = sct.build(_net(), cfg)
    assert isinstance(models["model"], TrigFlowModel) and set(models) == {"model"}
    loss, info = sct.loss(models, torch.randn(2, 3, 8, 8), 5, cfg, torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and torch.isfinite(loss).all() and info == {"r": 0.5}
    # sCD defaults to the EDM time input, so the teacher's weights load into the student as is
    assert scd.wrap(_net(), dict(cfg, method_args=scd.defaults)).time_input == "edm"
    with pytest.raises(ValueError, match="jvp"):
        scm_loss(models["model"], torch.randn(2, 3, 8, 8), jvp="forward")
    # warmup_frac: the warm-up as a fraction of K (a --time-budget run learns K only after its probe)
    frac = dict(cfg, total_steps=40, method_args=dict(cfg["method_args"], warmup_frac=0.25))
    assert sct.warmup_steps(frac) == 10 and sct.warmup_steps(dict(cfg, total_steps=40)) == 10
    assert sct.warmup_steps(dict(frac, total_steps=400)) == 100
    _, info = sct.loss(models, torch.randn(2, 3, 8, 8), 50, dict(frac, total_steps=400),
                       torch.Generator().manual_seed(0))
    assert info == {"r": 0.5}
    with pytest.raises(ValueError, match="warmup_frac"):
        sct.check_args(dict(sct.defaults, warmup_frac=1.5))


def test_sct_runs_record_the_papers_two_step_time(capsys, tmp_path):
    """sCT / sCD configs record two-step sampling at the sCM paper's t = 1.1 (VE level 0.5 tan 1.1 = 0.982), which
    cmfast-sample / cmfast-eval read from the checkpoint and the loop's grids use; they had ECT's 0.821 (t = 1.024).
    Other methods record nothing and keep the defaults. (The dry run checks sCD's teacher: a generated one.)"""
    import json

    from train_fixtures import teacher_run

    from cmfast.cli.train import main as train_main
    teacher = teacher_run(tmp_path / "teacher", (1, 32, 32))   # Fashion-MNIST is padded to 32
    for method, extra in (("sct", []), ("scd", ["--teacher", teacher])):
        assert train_main(["--dataset", "fashion-mnist", "--method", method, "--preset", "tiny", "--dry-run",
                           "--output-dir", str(tmp_path / "out"), *extra]) == 0
        cfg = json.loads(capsys.readouterr().out)
        assert cfg["sampling_sigmas"] == {"2": [80.0, pytest.approx(SD * math.tan(1.1))]}
        assert math.atan(cfg["sampling_sigmas"]["2"][1] / SD) == pytest.approx(1.1)
    assert train_main(["--dataset", "fashion-mnist", "--method", "ict", "--preset", "tiny", "--dry-run",
                       "--output-dir", str(tmp_path / "out")]) == 0
    assert "sampling_sigmas" not in json.loads(capsys.readouterr().out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sct_step_on_gpu_fused_kernels_match_reference():
    # the whole continuous-time step on CUDA: bf16 online forward, fp32 (TF32 off) finite difference through the
    # Triton GroupNorm / flash attention / tangent-loss kernels, against the torch backend and torch.func.jvp
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16, attn_resolutions=(8,), dropout=0.1)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    model = TrigFlowModel(net).to(dev)
    x0 = torch.rand(8, 3, 16, 16, device=dev) * 2 - 1
    out = {}
    for name, backend, jvp in (("triton", "triton", "fd"), ("torch", "torch", "fd"), ("exact", "torch", "exact")):
        model.zero_grad()
        torch.manual_seed(2)   # the same dropout masks in every run
        with cmfast.ops.use_backend(backend), torch.autocast("cuda", torch.bfloat16):
            loss = sct_loss(model, x0, jvp=jvp, warmup_steps=0, generator=torch.Generator(dev).manual_seed(1))
        loss.mean().backward()
        out[name] = (loss.detach().float(), torch.cat([p.grad.flatten() for p in model.net.parameters()]))
    for name in ("triton", "exact"):
        torch.testing.assert_close(out[name][0], out["torch"][0], rtol=2e-2, atol=2e-3)
        g, ref = out[name][1], out["torch"][1]
        assert float((g - ref).norm() / ref.norm()) < 5e-2, name   # bf16 online forward on both sides


@pytest.mark.parametrize("jvp", ["fd", "exact"])
def test_prior_weighting_inv_sigma_scales_each_sample_by_one_over_sigma(jvp):
    """prior_weighting 'inv_sigma': each sample's squared error times 1 / (sd tan t) = 1 / sigma, t the sample's own
    time (drawn first from the generator). With the adaptive head at its zero init (logvar = 0) the loss is the bare
    weighted error, so the ratio to the unweighted loss is exactly the weight; the gradient scales the same way."""
    model = TrigFlowModel(_net(dropout=0.0))
    x0 = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    out = {}
    for w in ("none", "inv_sigma"):
        model.zero_grad()
        loss = sct_loss(model, x0, jvp=jvp, warmup_steps=0, generator=torch.Generator().manual_seed(7),
                        prior_weighting=w)
        loss[0].backward()
        out[w] = (loss.detach().double(), model.net.enc["8x8_conv"].weight.grad.clone())
    t = sample_time(6, SD, -1.0, 1.4, torch.Generator().manual_seed(7)).double()
    w = 1.0 / (SD * torch.tan(t))
    assert float(w.max() / w.min()) > 2                       # the draws span levels whose weights differ
    torch.testing.assert_close(out["inv_sigma"][0], out["none"][0] * w, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["inv_sigma"][1], out["none"][1] * float(w[0]), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="prior_weighting: expected one of none, inv_sigma, got 'tan'"):
        sct_loss(model, x0, prior_weighting="tan")


def test_sct_warns_of_a_fourier_time_embedding():
    """sCM Sec. 4.1: large Fourier scales (NCSN++'s embedding) make continuous-time training unstable. The method
    says so in one line at the start of a run (positional-embedding presets, and the discrete methods, say nothing)."""
    from cmfast.training.config import resolve
    from cmfast.training.methods import get_method
    for method in ("sct", "scd", "ict"):
        for preset in ("ncsnpp-cifar10", "ddpmpp-cifar10"):
            cfg = resolve({"method": method, "preset": preset, "dataset": "cifar10", "teacher": "t"})
            notes = get_method(method).warnings(cfg)
            if method != "ict" and preset == "ncsnpp-cifar10":
                assert len(notes) == 1 and f"--method {method} with the Fourier time embedding" in notes[0]
            else:
                assert notes == []


def _scm_loss_f64(model, x0, seed, r, c=0.1, p_mean=-1.0, p_std=1.4, teacher_D=None):
    """sCT's per-sample loss and its gradients, written from PAPER.md in float64 with torch.func.jvp on a float64
    copy of the network: the draws are the generator's (tau first, then z), everything after them is recomputed."""
    g = torch.Generator().manual_seed(seed)
    B = x0.shape[0]
    tau = torch.randn(B, generator=g).double() * p_std + p_mean
    z = torch.randn(x0.shape, generator=g).double() * SD                 # z ~ N(0, sd^2 I)
    t = torch.atan(torch.exp(tau) / SD)                                   # tan t = e^tau / sd
    x0 = x0.double()
    cos, sin = _b(torch.cos(t)), _b(torch.sin(t))
    x_t = cos * x0 + sin * z
    dxdt = cos * z - sin * x0                                             # -sin t x0 + cos t z
    if teacher_D is not None:     # sCD: the teacher's PF-ODE velocity (cos t x_t - D(x_t / cos t, sd tan t)) / sin t
        with torch.no_grad():
            D = teacher_D(x_t / cos, _b(SD * torch.tan(t)))
        dxdt = (cos * x_t - D) / sin
    net = copy.deepcopy(model.net).double()
    def Fn(x, s):     # c_noise: t, 1000 t, or EDM's ln(sd tan t) / 4 with F = -F_edm
        if model.time_input == "edm":
            return -net(x / SD, torch.log(SD * torch.tan(s)) / 4)
        return net(x / SD, s * (1000.0 if model.time_input == "1000t" else 1.0))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with torch.no_grad(), cmfast.ops.use_backend("torch"), sdpa_kernel(SDPBackend.MATH):   # kernels with forward AD
        _, dFdt = torch.func.jvp(Fn, (x_t, t), (dxdt, torch.ones_like(t)))
    F = Fn(x_t, t)
    Fm = F.detach()
    gt = -cos ** 2 * (SD * Fm - dxdt) - r * cos * sin * (x_t + SD * dFdt)
    gt = gt / (gt.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + c)
    # adaptive weighting head: logvar(t) = W [cos 2 pi f t, sin 2 pi f t] + b
    head = model.logvar
    W = head.linear.weight.detach().double().clone().requires_grad_(True)
    bias = head.linear.bias.detach().double().clone().requires_grad_(True)
    ang = torch.outer(t, 2 * math.pi * head.embed.freqs.double())
    lv = (torch.cat([ang.cos(), ang.sin()], 1) @ W.T).reshape(-1) + bias
    D = x0[0].numel()
    loss = ((F - Fm - gt) ** 2).flatten(1).sum(1) / (torch.exp(lv) * D) + lv
    loss.sum().backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    return loss.detach(), grads, torch.cat([W.grad.flatten(), bias.grad])


@pytest.mark.parametrize("jvp,time_input,precision,warmup", [("exact", "t", "fp32", 100), ("fd", "t", "fp32", 100),
                                                             ("exact", "1000t", "fp32", 0), ("fd", "edm", "fp64", 100)])
def test_sct_loss_and_gradients_match_float64_paper_formulas(jvp, time_input, precision, warmup):
    """scm_loss against PAPER.md recomputed in float64 (x_t = cos t x0 + sin t z with z of std sd, dx_t/dt, the
    tangent with warm-up r, g / (||g|| + c), the adaptive weighting e^-logvar / D and + logvar, c_noise of the time
    input): the per-sample loss and the gradients of the backbone and of the logvar head. The adaptive head is set
    away from its zero init so that it weighs in. Before, x0 and z swapped in x_t, z of std 1, c_noise 100 t for
    '1000t', a dropped logvar, r = 1 at every step, r = 0 without a warm-up (--warmup-steps 0), or F_edm's sign lost
    in the fp64 forwards (time input 'edm', fd_precision fp64: sCD's default input) passed every test."""
    torch.manual_seed(11)
    model = TrigFlowModel(_net(dropout=0.0), time_input=time_input)
    with torch.no_grad():
        model.logvar.linear.weight.normal_(0.0, 0.3)
        model.logvar.linear.bias.fill_(0.4)
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    step = 30                                          # r = 0.3 over a warm-up of 100 steps, r = 1 without one
    loss = sct_loss(model, x0, step=step, warmup_steps=warmup, jvp=jvp, precision=precision,
                    generator=torch.Generator().manual_seed(9))
    loss.sum().backward()
    want, want_g, want_head = _scm_loss_f64(model, x0, 9, r=step / warmup if warmup else 1.0)
    tol = 1e-4 if jvp == "exact" else 1e-3
    torch.testing.assert_close(loss.detach().double(), want, rtol=tol, atol=1e-6)
    got_g = torch.cat([p.grad.flatten() for p in model.net.parameters()]).double()
    assert float((got_g - want_g).norm() / want_g.norm()) < 10 * tol
    got_head = torch.cat([model.logvar.linear.weight.grad.flatten(), model.logvar.linear.bias.grad]).double()
    torch.testing.assert_close(got_head, want_head, rtol=10 * tol, atol=1e-6)


def test_tangent_warmup_ramps_r_from_0_to_1():
    """r = min(1, k / warmup) (sCM Sec. 4.2); no warm-up (warmup_steps 0) is r = 1 from the first step."""
    from cmfast.trigflow import tangent_warmup
    assert [tangent_warmup(k, 10) for k in (0, 5, 10, 25)] == [0.0, 0.5, 1.0, 1.0]
    assert tangent_warmup(0, 0) == tangent_warmup(3, -1) == 1.0


def test_sct_method_args_reach_the_loss():
    """--method-arg c / p_mean / p_std / warmup_steps / fd_eps of sct change the loss as the formulas say: the method's
    loss equals the float64 sCM loss with those values (c = 0.5, tau ~ N(-0.5, 1.0^2), r = 0.5), and fd_eps is the
    finite difference's step. (A method that passed the default c or fd_eps along survived every test.)"""
    from cmfast.training.methods import get_method
    sct = get_method("sct")
    args = dict(sct.defaults, c=0.5, p_mean=-0.5, p_std=1.0, warmup_steps=20, jvp="exact")
    cfg = dict(sigma_data=SD, sigma_min=0.002, sigma_max=80.0, total_steps=100, method_args=args)
    models = sct.build(_net(dropout=0.0), cfg)
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    loss, info = sct.loss(models, x0, 10, cfg, torch.Generator().manual_seed(9))
    want = _scm_loss_f64(models["model"], x0, 9, r=0.5, c=0.5, p_mean=-0.5, p_std=1.0)[0]
    assert info == {"r": 0.5}
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-4, atol=1e-6)
    # fd_eps: the sCT loss at a coarse step (0.3) is the scm_loss of that step, not of the default 1e-2
    fd = dict(cfg, method_args=dict(args, jvp="fd", fd_eps=0.3))
    got = sct.loss(models, x0, 10, fd, torch.Generator().manual_seed(9))[0].detach()
    kw = dict(step=10, warmup_steps=20, c=0.5, p_mean=-0.5, p_std=1.0)
    coarse = sct_loss(models["model"], x0, eps=0.3, generator=torch.Generator().manual_seed(9), **kw).detach()
    fine = sct_loss(models["model"], x0, eps=1e-2, generator=torch.Generator().manual_seed(9), **kw).detach()
    assert torch.equal(got, coarse) and not torch.equal(got, fine)


def test_ve_call_with_another_sigma_data():
    """sigma_data = 0.8 (not the default 0.5): t = atan(sigma / sd), x_t = cos t x_sigma, F of x_t / sd, f = cos t x_t
    - sin t sd F, from the formulas in float64 (every other test runs at sd = 0.5, where a hard-coded 0.5 passes)."""
    sd = 0.8
    model = TrigFlowModel(_net(), sigma_data=sd).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    sigma = torch.tensor([0.01, 0.7, 30.0], dtype=torch.float64)
    t = torch.atan(sigma / sd)
    x_t = _b(torch.cos(t)) * x.double()
    with torch.no_grad():
        F = copy.deepcopy(model.net).double()(x_t / sd, t)
        want = _b(torch.cos(t)) * x_t - _b(torch.sin(t)) * sd * F
        got = model(x, sigma.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def _edm_D64(net):
    """EDM's denoiser in float64: c_skip x + c_out F(c_in x, ln(sigma) / 4) with sigma_min = 0."""
    net = copy.deepcopy(net).double()

    def D(x, sigma):
        rs = 1 / torch.sqrt(sigma ** 2 + SD ** 2)
        return SD ** 2 * rs ** 2 * x + sigma * SD * rs * net(x * rs, torch.log(sigma.reshape(-1)) / 4)
    return D


@pytest.mark.parametrize("teacher,jvp", [("edm", "exact"), ("gauss", "exact"), ("gauss", "fd")])
def test_scd_loss_and_gradients_match_float64_paper_formulas(teacher, jvp):
    """sCD (time input 'edm', a student other than its teacher): dx_t/dt is the teacher's PF-ODE velocity at the
    sample's own (x_t, t), from a float64 D: EDM's c_skip, c_out, c_in around a random network, or the exact posterior
    mean of N(0, 1.3^2) data (whose velocity depends on t strongly; a random network's hardly does). Loss and
    gradients as for sCT. (The teacher asked at 0.99 t or at 1.01 x_t passed the zero-tangent test.)"""
    if teacher == "edm":
        den = cmfast.EDMDenoiser(_net(seed=1, dropout=0.0))
        D = _edm_D64(den.net)
    else:
        den = _Denoiser("gauss", s=1.3)
        D = lambda x, sigma: 1.3 ** 2 / (1.3 ** 2 + sigma ** 2) * x     # noqa: E731
    model = TrigFlowModel(_net(seed=2, dropout=0.0), time_input="edm")
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    loss = scd_loss(model, x0, den, step=30, warmup_steps=100, jvp=jvp, generator=torch.Generator().manual_seed(9))
    loss.sum().backward()
    want, want_g, _ = _scm_loss_f64(model, x0, 9, r=0.3, teacher_D=D)
    tol = 1e-4 if jvp == "exact" else 1e-3
    torch.testing.assert_close(loss.detach().double(), want, rtol=tol, atol=1e-6)
    got_g = torch.cat([p.grad.flatten() for p in model.net.parameters()]).double()
    assert float((got_g - want_g).norm() / want_g.norm()) < 10 * tol


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_ve_call_refuses_a_bad_sigma(bad):
    """The VE call takes sigma >= 0 (t = atan(sigma / sd) in [0, pi/2)): a negative level gave a negative t and an
    image without an error."""
    model = TrigFlowModel(_net())
    with pytest.raises(ValueError, match="sigma"):
        model(torch.randn(2, 3, 8, 8), bad)
    assert torch.equal(model(torch.ones(2, 3, 8, 8), 0.0), torch.ones(2, 3, 8, 8))      # f(x, 0) = x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("jvp", ["fd", "exact"])
def test_half_model_trains_with_fp32_tangent_forwards(dtype, jvp, monkeypatch):
    """A TrigFlowModel made .half() / .bfloat16() trains: before, its adaptive-weight head fed fp32 features to half
    weights ('mat1 and mat2 must have the same dtype'). The loss is fp32, the gradients are in the model's dtype, and
    the tangent's forwards at precision 'fp32' run on fp32 copies of the weights: the finite-difference pair (or the
    exact JVP) equals float64 forwards of the same weights to fp32 rounding. In the model's own dtype they were off by
    its rounding (bf16: 3e-3 of F), which the difference then divides by 2h."""
    from cmfast import ops
    from cmfast.jvp import exact_jvp, fp64_call
    model = TrigFlowModel(_net(dropout=0.0)).to(dtype)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    seen, real = {}, ops.trig_tangent_loss
    monkeypatch.setattr(ops, "trig_tangent_loss", lambda F, x_t, dxdt, t, **kw: seen.update(kw, x_t=x_t, dxdt=dxdt, t=t)
                        or real(F, x_t, dxdt, t, **kw))
    loss = sct_loss(model, x0, jvp=jvp, warmup_steps=0, generator=torch.Generator().manual_seed(3))
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss).all())
    loss.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and bool(torch.isfinite(p.grad).all()), name
    assert float(model.logvar.linear.weight.grad.float().abs().sum()) > 0     # the adaptive head learns
    net64 = fp64_call(model.net)
    f64 = lambda x, s: net64(x / SD, model.c_noise(s), None)      # noqa: E731  (time input 't': F(x_t / sd, t))
    x_t, v, t = (seen[k].double() for k in ("x_t", "dxdt", "t"))
    if jvp == "fd":
        h = seen["h"].double()
        want = (f64(x_t + _b(h) * v, t + h), f64(x_t - _b(h) * v, t - h))
        got = (seen["F_plus"], seen["F_minus"])
    else:
        want = (exact_jvp(f64, (x_t, t), (v, torch.ones_like(t)), "fp64")[1],)
        got = (seen["dFdt"],)
    for g, w in zip(got, want):
        assert float((g.double() - w).norm() / w.norm()) < 2e-5
