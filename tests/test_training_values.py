"""The training mathematics where the other value tests left it open (mutation testing, round 3): each number here is
checked against an independent float64 transcription of the paper's formula (CM paper Alg. 2 / 3 and Appendix C;
iCT, Song & Dhariwal 2023; sCM, Lu & Song 2024; EDM), never against the code's own output. The comment of each test
names the planted error (mutation) that passed every test before it."""
import copy
import math

import pytest
import torch
from torch import nn

import cmfast
from cmfast import objectives as O
from cmfast.training.methods import get_method
from _small_nets import CondNet, _v


pytestmark = pytest.mark.usefixtures("one_thread")


def f64(net, x, t, smin=0.002, sd=0.5, labels=None):
    """CM paper Appendix C in float64: c_skip x + c_out F(c_in x, ln(t) / 4); EDM's denoiser with smin = 0."""
    net = copy.deepcopy(net).double()
    t = t.double()
    c_skip = sd ** 2 / ((t - smin) ** 2 + sd ** 2)
    c_out = sd * (t - smin) / torch.sqrt(sd ** 2 + t ** 2)
    c_in = 1 / torch.sqrt(t ** 2 + sd ** 2)
    with torch.no_grad():
        return _v(c_skip) * x + _v(c_out) * net(_v(c_in) * x, torch.log(t) / 4, labels)


def karras64(n, smin=0.002, smax=80.0, rho=7.0):
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return (smin ** (1 / rho) + (i - 1) / (n - 1) * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho


def ct_n_mu(k, K, s0, s1, mu0, reference_code=False):
    """CM paper Appendix C: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, mu(k) = exp(s0 ln mu0 / N(k))
    (openai/consistency_models: N(k) - 1)."""
    n = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
    return n, math.exp(s0 * math.log(mu0) / (n - 1 if reference_code else n))


def ict_n(k, K, s0, s1):
    """iCT Sec. 3.4: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    kp = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / kp), s1) + 1


def _cfg(method, total_steps=100, loss="l2", sd=0.5, **args):
    m = get_method(method)
    return dict(sigma_data=sd, sigma_min=0.002, sigma_max=80.0, total_steps=total_steps, loss=loss,
                method_args=dict(m.defaults, **args))


def _data(B=4, seed=1):
    return torch.rand(B, 2, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _move(model, seed=3):
    """Moves the online parameters away from the target's, as an optimizer step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("reference_code", [False, True])
def test_ct_method_target_ema_uses_mu_of_the_same_step(reference_code):
    """CT (CM Alg. 3 with Appendix C): step k trains with N(k) and then moves the target with mu(k) of that same k,
    theta- <- mu(k) theta- + (1 - mu(k)) theta; match_reference_code=true divides by N(k) - 1 (openai/
    consistency_models). Steps k where N(k + 1) != N(k) tell mu(k) from mu(k + 1). Before, after_step with
    mu(k + 1), or a method that did not pass match_reference_code on to ct_schedule, passed every test."""
    ct = get_method("ct")
    K, s0, s1, mu0 = 50, 2, 20, 0.9
    cfg = _cfg("ct", K, s0=s0, s1=s1, mu0=mu0, match_reference_code=reference_code)
    models = ct.build(CondNet(seed=0), cfg)
    # theta-: a frozen copy of its own (a target that is the online module itself passed every test)
    assert models["target"] is not models["model"] and not any(p.requires_grad for p in models["target"].parameters())
    init = [p.detach().clone() for p in models["model"].parameters()]
    _move(models["model"], seed=99)
    assert all(torch.equal(a, b) for a, b in zip(init, models["target"].parameters()))
    x = _data()
    for k in (1, 13, 28, 45):
        _move(models["model"], seed=k)
        n, mu = ct_n_mu(k, K, s0, s1, mu0, reference_code)
        assert ct_n_mu(k + 1, K, s0, s1, mu0, reference_code)[0] == n + 1
        _, info = ct.loss(models, x, k, cfg, torch.Generator().manual_seed(k))
        assert info["N"] == n and info["mu"] == pytest.approx(mu, rel=1e-12, abs=0)
        tgt = [p.detach().double().clone() for p in models["target"].parameters()]
        onl = [p.detach().double().clone() for p in models["model"].parameters()]
        ct.after_step(models, k, cfg)
        for a, b, got in zip(tgt, onl, models["target"].parameters()):
            torch.testing.assert_close(got.detach().double(), mu * a + (1 - mu) * b, rtol=1e-6, atol=1e-7)


def _ict64(net, x, N, seed, c, p_mean, p_std, sd=0.5):
    """iCT's per-sample loss in float64 (Song & Dhariwal 2023): levels n ~ p(n) proportional to
    erf((ln t_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln t_n - P_mean) / (sqrt 2 P_std)) on a Karras grid of N, the
    generator's draws (n, then z), theta- = theta, pseudo-Huber sqrt(||.||^2 + c^2) - c,
    lambda = 1 / (t_{n+1} - t_n)."""
    g = torch.Generator().manual_seed(seed)
    t = karras64(N)
    e = torch.erf((torch.log(t) - p_mean) / (math.sqrt(2) * p_std))
    p = (e[1:] - e[:-1]) / (e[1:] - e[:-1]).sum()
    n = torch.multinomial(p, x.shape[0], replacement=True, generator=g)
    z = torch.randn(x.shape, generator=g).double()
    x = x.double()
    pred = f64(net, x + _v(t[n + 1]) * z, t[n + 1], sd=sd)
    tgt = f64(net, x + _v(t[n]) * z, t[n], sd=sd)
    return (torch.sqrt(((pred - tgt) ** 2).flatten(1).sum(1) + c * c) - c) / (t[n + 1] - t[n])


def test_ict_loss_takes_its_c_p_mean_and_p_std():
    """ict_loss with c, P_mean, P_std other than the defaults (c = 0.05 is 7x iCT's 0.00054 sqrt(128)): the loss of
    the float64 transcription with those values. Before, ict_loss that dropped c (default c used) or P_mean / P_std
    (the default lognormal) passed every test: the only value test ran at the defaults."""
    net = CondNet(seed=0)
    model = cmfast.ConsistencyModel(net)
    x = _data(6)
    got = O.ict_loss(model, x, 11, c=0.05, p_mean=0.4, p_std=0.8, generator=torch.Generator().manual_seed(9))
    want = _ict64(net, x, 11, 9, c=0.05, p_mean=0.4, p_std=0.8)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)
    default = _ict64(net, x, 11, 9, c=0.00054 * math.sqrt(128), p_mean=-1.1, p_std=2.0)
    assert not torch.allclose(default, want, rtol=1e-2)


def test_ict_method_curriculum_and_arguments_reach_the_loss():
    """The ict method at the last step of a stage and the first of the next (K = 40, s0 = 10, s1 = 80: K' = 10,
    N = 11 then 21) with c, P_mean, P_std set: its N and its loss are the transcription's. Before, N(k + 1) for
    N(k), or c / P_mean / P_std dropped or swapped on the way to ict_loss, passed every test."""
    ict = get_method("ict")
    cfg = _cfg("ict", 40, loss="pseudo_huber", s0=10, s1=80, c=0.05, p_mean=0.4, p_std=0.8)
    models = ict.build(CondNet(seed=0), cfg)
    x = _data(6)
    for k, n in ((9, 11), (10, 21)):
        assert ict_n(k, 40, 10, 80) == n
        loss, info = ict.loss(models, x, k, cfg, torch.Generator().manual_seed(k))
        assert info == {"N": n, "mu": 0.0}
        want = _ict64(models["model"].net, x, n, k, c=0.05, p_mean=0.4, p_std=0.8)
        torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=1e-6)


def _cd64(online, target, teacher, x, N, seed, solver="heun", weighting="uniform", dist="l2", labels=None):
    """CM Alg. 2 in float64 with the generator's draws (n ~ U{0..N-2}, then z): x_{t_{n+1}} = x + t_{n+1} z, one Euler
    or Heun step of the EDM teacher's ODE dx/dt = (x - D(x, t)) / t down to t_n, lambda = 1 or 1 / (t_{n+1} - t_n);
    teacher = None: CT (CM Alg. 3), x_hat = x + t_n z."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, N - 1, (x.shape[0],), generator=g)
    z = torch.randn(x.shape, generator=g).double()
    t = karras64(N)
    x = x.double()
    hi, lo = _v(t[n + 1]), _v(t[n])
    x_hi = x + hi * z
    if teacher is None:
        x_lo = x + lo * z
    else:
        d = (x_hi - f64(teacher, x_hi, t[n + 1], smin=0.0, labels=labels)) / hi
        x_lo = x_hi + (lo - hi) * d
        if solver == "heun":
            d2 = (x_lo - f64(teacher, x_lo, t[n], smin=0.0, labels=labels)) / lo
            x_lo = x_hi + (lo - hi) * (d + d2) / 2
    diff = (f64(online, x_hi, t[n + 1], labels=labels) - f64(target, x_lo, t[n], labels=labels)).flatten(1)
    d = diff.abs().mean(1) if dist == "l1" else (diff ** 2).mean(1)
    return d / (t[n + 1] - t[n]) if weighting == "icm" else d


def test_cd_method_solver_weighting_and_mu_reach_the_step():
    """The cd method with solver euler, weighting icm and a target EMA rate mu = 0.6 (CIFAR-10's mu is 0): its loss
    is Alg. 2's with the Euler teacher step and lambda = 1 / (t_{n+1} - t_n), and its after_step moves the target
    by mu. Before, a method that always ran Heun, dropped the weighting, or ignored mu (mu = 0 copies the online net)
    passed every test."""
    cd = get_method("cd")
    cfg = _cfg("cd", 10, loss="l1", num_scales=6, mu=0.6, solver="euler", weighting="icm")
    teacher = CondNet(seed=2)
    models = cd.build(CondNet(seed=0), cfg, teacher=cmfast.EDMDenoiser(teacher))
    _move(models["model"])
    x = _data(6)
    loss, info = cd.loss(models, x, 3, cfg, torch.Generator().manual_seed(4))
    assert info == {"N": 6, "mu": 0.6}
    want = _cd64(models["model"].net, models["target"].net, teacher, x, 6, 4, "euler", "icm", "l1")
    torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=1e-6)
    tgt = [p.detach().double().clone() for p in models["target"].parameters()]
    onl = [p.detach().double().clone() for p in models["model"].parameters()]
    cd.after_step(models, 3, cfg)
    for a, b, got in zip(tgt, onl, models["target"].parameters()):
        torch.testing.assert_close(got.detach().double(), 0.6 * a + 0.4 * b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["cd", "ct"])
def test_icm_weighting_of_cd_and_ct_losses_and_methods(method):
    """weighting='icm' (lambda(t_n) = 1 / (t_{n+1} - t_n), iCT's) in cd_loss / ct_loss and through the cd / ct
    methods' --method-arg weighting: the float64 transcription's numbers. Before, cd_loss or ct_loss that passed
    'uniform' on, or a ct method that dropped its weighting, passed every test."""
    online, target, teacher = CondNet(seed=0), CondNet(seed=1), CondNet(seed=2)
    model, tmodel = cmfast.ConsistencyModel(online), cmfast.ConsistencyModel(target)
    x = _data(6)
    gen = torch.Generator().manual_seed(7)
    if method == "cd":
        got = O.cd_loss(model, tmodel, cmfast.EDMDenoiser(teacher), x, 5, loss="l2", generator=gen, weighting="icm")
    else:
        got = O.ct_loss(model, tmodel, x, 5, loss="l2", generator=gen, weighting="icm")
    want = _cd64(online, target, teacher if method == "cd" else None, x, 5, 7, weighting="icm")
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)
    # the ct method's weighting (K = 100, s0 = 2, s1 = 20: N(30) = 17)
    ct = get_method("ct")
    cfg = _cfg("ct", 100, s0=2, s1=20, weighting="icm")
    models = ct.build(CondNet(seed=0), cfg)
    _move(models["model"])
    n = ct_n_mu(30, 100, 2, 20, 0.9)[0]
    loss, info = ct.loss(models, x, 30, cfg, torch.Generator().manual_seed(8))
    assert info["N"] == n
    want = _cd64(models["model"].net, models["target"].net, None, x, n, 8, weighting="icm")
    torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=1e-6)


def test_class_labels_reach_the_teacher_the_online_and_the_target_net():
    """Class-conditional CD and EDM (ImageNet 64x64's setting): the labels go to the teacher's two Heun evaluations,
    the online net and the target net (CD), and to the denoiser (EDM loss). Before, a label dropped on any of those
    ways passed every test (every value test ran unconditional nets)."""
    online, target, teacher = CondNet(seed=0, label_dim=3), CondNet(seed=1, label_dim=3), CondNet(seed=2, label_dim=3)
    model, tmodel = cmfast.ConsistencyModel(online), cmfast.ConsistencyModel(target)
    x, y = _data(6), torch.tensor([0, 1, 2, 2, 1, 0])
    got = O.cd_loss(model, tmodel, cmfast.EDMDenoiser(teacher), x, 5, loss="l2",
                    generator=torch.Generator().manual_seed(3), class_labels=y)
    want = _cd64(online, target, teacher, x, 5, 3, labels=y)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)
    # EDM eq. 8: lambda(sigma) ||D(x + sigma n, sigma, y) - x||^2, ln sigma ~ N(-1.2, 1.2^2),
    # lambda = (s^2 + sd^2) / (s sd)^2
    got = O.edm_loss(cmfast.EDMDenoiser(teacher), x, generator=torch.Generator().manual_seed(4), class_labels=y)
    g = torch.Generator().manual_seed(4)
    sigma = (torch.randn(6, generator=g).double() * 1.2 - 1.2).exp()
    noise = torch.randn(x.shape, generator=g).double()
    D = f64(teacher, x.double() + _v(sigma) * noise, sigma, smin=0.0, labels=y)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(got.double(), lam * ((D - x.double()) ** 2).flatten(1).mean(1), rtol=2e-4, atol=1e-6)


def test_lpips_distance_takes_the_icm_weight():
    """lambda(t_n) d with d = LPIPS (the CM paper's distance; iCT's weighting): the lpips network's own number on the
    images prepared as the CM paper says (gray repeated to RGB, bilinear to 224), times lambda. Before, the lpips
    branch of distance() dropped the weight and passed every test."""
    pytest.importorskip("lpips")
    lp = O.LPIPS("alex", pretrained_backbone=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1, torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    w = torch.tensor([1.0, 40.0, 0.25])

    def prep(a):
        return nn.functional.interpolate(a.repeat(1, 3, 1, 1), size=224, mode="bilinear", align_corners=False)
    with torch.no_grad():
        d = lp.model(prep(x), prep(y)).reshape(-1).double()
        got = O.distance(x, y, "lpips", weight=w, lpips_model=lp).double()
    torch.testing.assert_close(got, d * w.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wrap", ["cm", "edm"])
def test_preconditioning_at_another_sigma_data(wrap):
    """sigma_data = 0.8 (every other value test of the wrappers runs at 0.5, where a hard-coded 0.5 passes):
    c_skip = sd^2 / ((s - smin)^2 + sd^2), c_out = sd (s - smin) / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2)
    with smin = 0.002 (consistency model) or 0 (EDM denoiser), in float64. Before, the backbone's c_in or the skip
    connection's scalings at sigma_data 0.5 whatever the model's, or a method's wrap() at 0.5 whatever the config's,
    passed every test."""
    sd = 0.8
    net = CondNet(seed=0)
    x = _data(3) * 1.5
    s = torch.tensor([0.05, 0.9, 20.0], dtype=torch.float64)
    want = f64(net, x.double(), s, smin=0.002 if wrap == "cm" else 0.0, sd=sd)
    # the wrapper itself, and the one a training method builds from its config (--sigma-data 0.8)
    for model in ((cmfast.ConsistencyModel if wrap == "cm" else cmfast.EDMDenoiser)(net, sigma_data=sd),
                  get_method("ct" if wrap == "cm" else "edm").wrap(net, _cfg("ct" if wrap == "cm" else "edm", sd=sd))):
        with torch.no_grad():
            got = model(x, s.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_scm_methods_record_two_steps_at_t_1_1(method):
    """sCM's two-step sampling puts its middle step at TrigFlow time t = 1.1, the VE level sd tan(1.1) (0.982 at
    sd = 0.5; 1.572 at 0.8), after sigma_max. Before, 0.5 tan(1.1) at every sigma_data, t = 1.0, or sd x 1.1 (tan
    dropped) passed every test (the dry-run test that checks 0.5 tan 1.1 had started failing on its --teacher)."""
    m = get_method(method)
    for sd in (0.5, 0.8):
        cfg = _cfg(method, sd=sd)
        got = m.sampling_sigmas(cfg)
        assert got == {"2": [80.0, pytest.approx(sd * math.tan(1.1), rel=1e-12)]}
    assert get_method("ict").sampling_sigmas(_cfg("ict")) is None


def test_method_defaults_are_the_papers_constants():
    """The methods' hyperparameter defaults are the papers' CIFAR-10 settings (PAPER.md): CD N = 18, mu = 0, Heun
    (CM paper); CT s0 = 2, s1 = 150, mu0 = 0.9 (Appendix C); iCT s0 = 10, s1 = 1280, P_mean = -1.1, P_std = 2.0; EDM
    P_mean = -1.2, P_std = 1.2; sCM tau ~ N(-1.0, 1.4^2), tangent normalization c = 0.1, warm-up 10k steps; the
    wrappers' sigma_data = 0.5, sigma_min = 0.002, sigma_max = 80; cmfast.scalings(sigma) is the CM paper's (sigma_min =
    0.002, sd = 0.5). Before, a CD default of N = 17 or a scalings() default of sigma_min = 0 (EDM's) passed every test
    (the paper configs set N themselves)."""
    d = {m: get_method(m).defaults for m in ("cd", "ct", "ict", "edm", "sct", "scd")}
    assert (d["cd"]["num_scales"], d["cd"]["mu"], d["cd"]["solver"], d["cd"]["weighting"]) == (18, 0.0, "heun",
                                                                                                 "uniform")
    assert (d["ct"]["s0"], d["ct"]["s1"], d["ct"]["mu0"], d["ct"]["weighting"]) == (2, 150, 0.9, "uniform")
    assert (d["ict"]["s0"], d["ict"]["s1"], d["ict"]["p_mean"], d["ict"]["p_std"]) == (10, 1280, -1.1, 2.0)
    assert (d["edm"]["p_mean"], d["edm"]["p_std"]) == (-1.2, 1.2)
    for m in ("sct", "scd"):
        assert (d[m]["p_mean"], d[m]["p_std"], d[m]["c"], d[m]["warmup_steps"]) == (-1.0, 1.4, 0.1, 10_000)
        # the finite difference's measured defaults (cmfast/jvp.py; benchmarks/results/fd_jvp_accuracy-cpu.json), not
        # paper values: fp32 forwards, h = 1e-2 max(t, 1e-3), the 2-point stencil
        assert (d[m]["jvp"], d[m]["fd_precision"], d[m]["fd_eps"], d[m]["fd_order"]) == ("fd", "fp32", 1e-2, 2)
    from cmfast import jvp
    assert (jvp.DEFAULT_EPS, jvp.DEFAULT_FLOOR) == (1e-2, 1e-3)
    assert (d["sct"]["time_input"], d["scd"]["time_input"]) == ("t", "edm")
    for cls in (cmfast.ConsistencyModel, cmfast.EDMDenoiser):
        m = cls(CondNet())
        assert (m.sigma_data, m.sigma_min, m.sigma_max) == (0.5, 0.002, 80.0)
    s = torch.tensor([0.002, 0.3, 5.0], dtype=torch.float64)
    c_skip, c_out, c_in = cmfast.scalings(s)
    torch.testing.assert_close(c_skip, 0.25 / ((s - 0.002) ** 2 + 0.25), rtol=1e-14, atol=0)
    torch.testing.assert_close(c_out, 0.5 * (s - 0.002) / torch.sqrt(s ** 2 + 0.25), rtol=1e-14, atol=1e-300)
    torch.testing.assert_close(c_in, 1 / torch.sqrt(s ** 2 + 0.25), rtol=1e-14, atol=0)


def test_ict_curriculum_floors_s1_over_s0():
    """iCT's K' = floor(K / (log2 floor(s1 / s0) + 1)): with s1 / s0 not a power of two the inner floor matters
    (s0 = 3, s1 = 50, K = 100: floor(50 / 3) = 16, K' = 20, while log2(50 / 3) gives K' = 19). The existing test ran
    s1 / s0 = 128 only, where floor or not gives the same K'."""
    assert [cmfast.ict_schedule(k, 100, 3, 50) for k in (18, 19, 20, 39, 40, 99)] == \
        [ict_n(k, 100, 3, 50) for k in (18, 19, 20, 39, 40, 99)] == [4, 4, 7, 7, 13, 49]


def test_edm_method_takes_its_p_mean_and_p_std():
    """The edm method (the teacher, EDM eq. 8) with P_mean = -0.4, P_std = 0.7: ln sigma ~ N(P_mean, P_std^2),
    lambda(sigma) ||D(x + sigma n, sigma) - x||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2, in float64. Before,
    a method that passed them to edm_loss swapped passed every test."""
    edm = get_method("edm")
    cfg = _cfg("edm", p_mean=-0.4, p_std=0.7)
    models = edm.build(CondNet(seed=2), cfg)
    x = _data(6)
    loss, info = edm.loss(models, x, 0, cfg, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    sigma = (torch.randn(6, generator=g).double() * 0.7 - 0.4).exp()
    noise = torch.randn(x.shape, generator=g).double()
    D = f64(models["model"].net, x.double() + _v(sigma) * noise, sigma, smin=0.0)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss.double(), lam * ((D - x.double()) ** 2).flatten(1).mean(1), rtol=2e-4, atol=1e-6)


def test_paper_step_indices_must_strictly_increase():
    """Sampling times (CM Alg. 1) go strictly down: 'ts' indices into the Karras grid must strictly increase. A
    repeated index (0, 22, 22) was accepted once the check allowed equal neighbours (b > a for b >= a)."""
    assert cmfast.paper_step_sigmas([0, 22, 39], 40)[1] == pytest.approx(float(karras64(40).flip(0)[22]), rel=1e-12)
    for ts in ([0, 22, 22], [0, 0]):
        with pytest.raises(ValueError, match="strictly increasing"):
            cmfast.paper_step_sigmas(ts, 40)


def test_evaluation_ema_runs_without_dropout_and_defaults_to_0_9999():
    """The evaluation EMA (CM paper: rate 0.9999) is a frozen copy in eval mode: its forward has no dropout, so it
    equals the averaged weights' deterministic output; theta_ema <- 0.9999 theta_ema + 0.0001 theta by default."""
    from cmfast.ema import EMA
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    e = EMA(src)
    assert e.rate == 0.9999 and not e.module.training
    x = torch.randn(5, 4)
    w1, b1, w2, b2 = (p.detach().double() for p in src.parameters())
    want = (x.double() @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(e(x).double(), want, rtol=1e-5, atol=1e-6)
    old = [p.detach().double().clone() for p in e.parameters()]
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    e.update(src)
    for a, b, got in zip(old, src.parameters(), e.parameters()):
        torch.testing.assert_close(got.detach().double(), 0.9999 * a + 0.0001 * b.detach().double(), rtol=1e-6,
                                   atol=1e-7)


def test_scd_teacher_and_student_see_the_class_labels():
    """Class-conditional sCD at its first step (r = 0: the tangent is g = -cos^2 t (sd F- - dx_t/dt), no dF/dt term)
    with the adaptive head at its zero init: loss = ||g / (||g|| + c)||^2 / D (sCM Alg. 1), where dx_t/dt is the
    teacher's PF-ODE velocity (cos t x_t - D(x_t / cos t, sd tan t, y)) / sin t and F = -F_edm(x_t / sd,
    ln(sd tan t) / 4, y), t = atan(e^tau / sd), tau ~ N(-1, 1.4^2), z of std sd; all in float64. Before, a teacher
    asked without the labels passed every test (no sCD value test had labels)."""
    from cmfast.trigflow import TrigFlowModel, scd_loss
    sd = 0.5
    teacher_net, student_net = CondNet(seed=2, label_dim=3), CondNet(seed=0, label_dim=3)
    model = TrigFlowModel(student_net, time_input="edm")
    x0, y = _data(6), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = scd_loss(model, x0, cmfast.EDMDenoiser(teacher_net), step=0, warmup_steps=100,
                    generator=torch.Generator().manual_seed(5), class_labels=y)
    t, z, cos, sin, x_t = _trig_draw(x0, 5, sd)
    dxdt = (cos * x_t - f64(teacher_net, x_t / cos, sd * torch.tan(t), smin=0.0, labels=y)) / sin
    with torch.no_grad():
        F = -copy.deepcopy(student_net).double()(x_t / sd, torch.log(sd * torch.tan(t)) / 4, y)
    gt = -cos ** 2 * (sd * F - dxdt)
    gn = gt / (gt.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + 0.1)
    want = (gn ** 2).flatten(1).sum(1) / x0[0].numel()
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-4, atol=1e-7)


def test_sct_inv_sigma_weight_and_noise_at_another_sigma_data():
    """sCT at sigma_data = 0.8 with prior_weighting 'inv_sigma', first step (r = 0), adaptive head at its zero init
    (logvar(t) = 0 for every t: training starts uniform): loss = w(t) ||g / (||g|| + c)||^2 / D with
    g = -cos^2 t (sd F- - dx_t/dt), dx_t/dt = cos t z - sin t x0, x_t = cos t x0 + sin t z, z ~ N(0, sd^2 I),
    F = F(x_t / sd, t), w = 1 / (sd tan t), tan t = e^tau / sd; float64. Before, w(t) at sd 0.5 whatever the model's,
    or a head that did not start at zero, passed every test."""
    from cmfast.trigflow import TrigFlowModel, sct_loss
    sd = 0.8
    net = CondNet(seed=0)
    model = TrigFlowModel(net, sigma_data=sd)
    tt = torch.linspace(0.01, 1.56, 7)
    assert torch.equal(model.logvar(tt), torch.zeros(7))
    x0 = _data(6)
    loss = sct_loss(model, x0, step=0, warmup_steps=100, prior_weighting="inv_sigma",
                    generator=torch.Generator().manual_seed(6))
    t, z, cos, sin, x_t = _trig_draw(x0, 6, sd)
    dxdt = cos * z - sin * x0.double()
    with torch.no_grad():
        F = copy.deepcopy(net).double()(x_t / sd, t)
    gt = -cos ** 2 * (sd * F - dxdt)
    gn = gt / (gt.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + 0.1)
    want = (gn ** 2).flatten(1).sum(1) / x0[0].numel() / (sd * torch.tan(t))
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-4, atol=1e-7)


def test_trigflow_boundary_and_loss_defaults():
    """TrigFlow's boundary condition f(x, 0) = cos 0 x - sin 0 sd F = x exactly (sigma = 0 in the VE call, below the
    sampler's sigma_min); scm_loss's own defaults are sCM's (tau ~ N(-1.0, 1.4^2), c = 0.1, a 10k-step tangent
    warm-up); the adaptive head's Fourier frequencies are N(0, 1) cycles per unit of t (scale 1, not NCSN++'s 16)."""
    import inspect

    from cmfast.trigflow import TrigFlowModel, scm_loss, tangent_warmup
    model = TrigFlowModel(CondNet(seed=0))
    x = _data(3)
    with torch.no_grad():
        assert torch.equal(model(x, 0.0), x)
        got = model(x, 1e-3).double()       # below sigma_min = 0.002: t = atan(sigma / sd)
    t = math.atan(1e-3 / 0.5)
    with torch.no_grad():
        F = copy.deepcopy(model.net).double()(math.cos(t) * x.double() / 0.5, torch.full((3,), t, dtype=torch.float64))
    torch.testing.assert_close(got, math.cos(t) ** 2 * x.double() - math.sin(t) * 0.5 * F, rtol=1e-5, atol=1e-6)
    p = inspect.signature(scm_loss).parameters
    assert (p["p_mean"].default, p["p_std"].default, p["c"].default, p["warmup_steps"].default) == (-1.0, 1.4, 0.1,
                                                                                                    10_000)
    assert inspect.signature(tangent_warmup).parameters["warmup_steps"].default == 10_000
    f = TrigFlowModel(CondNet(seed=0), logvar_channels=512).logvar.embed.freqs
    assert 0.8 < float(f.std()) < 1.25


def _trig_draw(x0, seed, sd, p_mean=-1.0, p_std=1.4):
    """The sCM loss's draw in float64, in the loss's order from Generator(seed): tau ~ N(p_mean, p_std^2), then
    z ~ N(0, sd^2 I); tan t = e^tau / sd, x_t = cos t x0 + sin t z. -> (t, z, cos t, sin t, x_t), cos and sin
    shaped (B, 1, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(x0.shape[0], generator=g).double() * p_std + p_mean
    z = torch.randn(x0.shape, generator=g).double() * sd
    t = torch.atan(torch.exp(tau) / sd)
    cos, sin = _v(torch.cos(t)), _v(torch.sin(t))
    return t, z, cos, sin, cos * x0.double() + sin * z


def _sct64(net, x0, seed, sd=0.5, r=0.0, weight=None, c=0.1, p_mean=-1.0, p_std=1.4, fd_h=None, rms=False):
    """sCM Alg. 1 (sCT, time input t) in float64 with the adaptive head at zero (logvar = 0) and F - F- = 0 in value:
    loss = w ||g / (||g|| + c)||^2 / D, g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt), dF-/dt the
    exact JVP of F(x_t / sd, t) along (dx_t/dt, 1) (torch.func.jvp on a float64 copy). rms: ||g|| / sqrt(D) in place
    of ||g|| (FastGen's normalization)."""
    t, z, cos, sin, x_t = _trig_draw(x0, seed, sd, p_mean, p_std)
    dxdt = cos * z - sin * x0.double()
    net = copy.deepcopy(net).double()
    with torch.no_grad():
        F, dFdt = torch.func.jvp(lambda x, s: net(x / sd, s), (x_t, t), (dxdt, torch.ones_like(t)))
        if fd_h is not None:          # central difference (F(p + h v) - F(p - h v)) / (2 h), h = fd_h(t)
            h = fd_h(t)
            dFdt = (net((x_t + _v(h) * dxdt) / sd, t + h) - net((x_t - _v(h) * dxdt) / sd, t - h)) / _v(2 * h)
    gt = -cos ** 2 * (sd * F - dxdt) - r * cos * sin * (x_t + sd * dFdt)
    size = gt.flatten(1).norm(dim=1) / (x0[0].numel() ** 0.5 if rms else 1.0)
    gn = gt / (size.reshape(-1, 1, 1, 1) + c)
    loss = (gn ** 2).flatten(1).sum(1) / x0[0].numel()
    return loss if weight is None else loss * weight(t)


def test_sct_method_passes_fd_order_and_prior_weighting_on():
    """The sct method with fd_order 4 at a coarse step (fd_eps 0.1, fp64 forwards, r = 1) and with prior_weighting
    'inv_sigma': the float64 sCM loss (exact JVP; w = 1 / (sd tan t)). The 4-point stencil meets it where the 2-point
    one, at this step, does not; jvp 'exact' and fp64 forwards reach the loss too. Before, a method that always ran
    order 2, always the finite difference, always fp32 forwards, or dropped prior_weighting, passed every test."""
    sct = get_method("sct")
    x0 = _data(6)
    cfg = _cfg("sct", warmup_steps=1, fd_order=4, fd_eps=0.1, fd_precision="fp64")
    models = sct.build(CondNet(seed=0), cfg)
    loss, info = sct.loss(models, x0, 5, cfg, torch.Generator().manual_seed(3))
    assert info == {"r": 1.0}
    want = _sct64(models["model"].net, x0, 3, r=1.0)
    torch.testing.assert_close(loss.detach().double(), want, rtol=3e-5, atol=1e-9)     # max 8e-6 measured
    two = sct.loss(models, x0, 5, dict(cfg, method_args=dict(cfg["method_args"], fd_order=2)),
                   torch.Generator().manual_seed(3))[0]
    assert not torch.allclose(two.detach().double(), want, rtol=3e-5, atol=1e-9)    # 2-point: 4e-4
    # jvp 'exact' at a step that would make the difference coarse, and fp64 forwards at a step fp32 cannot resolve
    for args, tol in ((dict(jvp="exact", fd_eps=0.5), 2e-4), (dict(fd_precision="fp64", fd_eps=1e-6), 2e-4),
                      (dict(jvp="exact", fd_precision="fp64"), 1e-5)):     # forward AD in fp32: 5e-5, in fp64: 1e-7
        cfg = _cfg("sct", warmup_steps=1, **args)
        loss = sct.loss(models, x0, 5, cfg, torch.Generator().manual_seed(3))[0]
        torch.testing.assert_close(loss.detach().double(), want, rtol=tol, atol=1e-9)
    cfg = _cfg("sct", prior_weighting="inv_sigma")
    loss = sct.loss(models, x0, 0, cfg, torch.Generator().manual_seed(4))[0]
    want = _sct64(models["model"].net, x0, 4, weight=lambda t: 1 / (0.5 * torch.tan(t)))
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-4, atol=1e-7)


def test_sct_method_passes_tangent_norm_on():
    """--method-arg tangent_norm=rms: g / (||g|| / sqrt(D) + c) (NVIDIA FastGen's g_norm_spatial_invariance) reaches
    the loss, against the float64 sCM loss; 'l2' (the default) stays the paper's g / (||g|| + c)."""
    sct = get_method("sct")
    x0 = _data(6)
    models = sct.build(CondNet(seed=0), _cfg("sct", warmup_steps=1))
    want = {norm: _sct64(models["model"].net, x0, 3, r=1.0, rms=norm == "rms") for norm in ("l2", "rms")}
    for norm in ("l2", "rms"):
        loss = sct.loss(models, x0, 5, _cfg("sct", warmup_steps=1, tangent_norm=norm),
                        torch.Generator().manual_seed(3))[0]
        torch.testing.assert_close(loss.detach().double(), want[norm], rtol=3e-4, atol=1e-9)
    assert float((want["rms"] / want["l2"]).min()) > 1.5         # the two differ here


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_scm_methods_wrap_at_the_configs_sigma_data_and_time_input(method):
    """The model an sct / scd run builds (--sigma-data 0.8; scd's time input 'edm', sct's 't') in the VE call:
    t = atan(sigma / sd), x_t = cos t x_sigma, f = cos t x_t - sin t sd F with F = F(x_t / sd, t) ('t') or
    -F_edm(x_t / sd, ln(sd tan t) / 4) ('edm'); float64. Before, wrap() at sd 0.5 or always time input 't' passed every
    test."""
    sd = 0.8
    net = CondNet(seed=0)
    m = get_method(method)
    model = m.wrap(net, _cfg(method, sd=sd))
    x = _data(3) * 2
    sigma = torch.tensor([0.01, 0.7, 30.0], dtype=torch.float64)
    t = torch.atan(sigma / sd)
    x_t = _v(torch.cos(t)) * x.double()
    with torch.no_grad():
        n64 = copy.deepcopy(net).double()
        F = n64(x_t / sd, t) if method == "sct" else -n64(x_t / sd, torch.log(sd * torch.tan(t)) / 4)
        got = model(x, sigma.float()).double()
    torch.testing.assert_close(got, _v(torch.cos(t)) * x_t - _v(torch.sin(t)) * sd * F, rtol=1e-5, atol=1e-5)


class _DropNet(CondNet):
    def forward(self, x, c_noise, labels=None):
        h = self.conv1(x) + self.emb(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        return self.conv2(nn.functional.dropout(torch.tanh(h), 0.3, self.training))


def test_sct_jvp_of_a_dropout_net_uses_the_online_forwards_masks():
    """theta- = stopgrad(theta) includes the dropout masks: dF-/dt is the JVP of the network the online forward ran,
    masks included, so the finite-difference loss (fp64 forwards, fine step) equals the exact-JVP loss of the same
    masks, and with dropout off both equal the float64 sCM loss. Before, an online forward that did not record its
    masks (the JVP then drew none to replay) passed every test: no sCM test trained a net with dropout."""
    from cmfast.trigflow import TrigFlowModel, sct_loss
    model = TrigFlowModel(_DropNet(seed=0)).train()
    x0 = _data(4)
    kw = dict(step=5, warmup_steps=1)
    out = {}
    for jvp in ("fd", "exact"):
        torch.manual_seed(123)                 # the same masks in the online forward of both
        out[jvp] = sct_loss(model, x0, jvp=jvp, precision="fp64", eps=1e-4,
                            generator=torch.Generator().manual_seed(2), **kw).detach().double()
    torch.testing.assert_close(out["fd"], out["exact"], rtol=1e-5, atol=1e-9)
    model.eval()
    got = sct_loss(model, x0, precision="fp64", eps=1e-4, generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(got.detach().double(), _sct64(model.net.eval(), x0, 2, r=1.0), rtol=2e-5, atol=1e-9)
    assert not torch.allclose(out["fd"], got.detach().double(), rtol=1e-3)      # dropout really acted


def test_scm_loss_takes_its_fd_floor():
    """The finite-difference step of scm_loss is h = eps max(t, floor), kept inside (0, pi/2) (at most half-way to
    either end): with floor = 3 every sample's step is 3 eps (then clipped), and the loss is the float64 sCM loss with
    that central difference. Before, scm_loss that passed the default floor on whatever its argument passed every
    test."""
    from cmfast.trigflow import TrigFlowModel, sct_loss
    model = TrigFlowModel(CondNet(seed=0))
    x0 = _data(6)
    got = sct_loss(model, x0, step=5, warmup_steps=1, eps=0.05, floor=3.0, precision="fp64",
                   generator=torch.Generator().manual_seed(3))

    def h(t):
        return torch.minimum(0.05 * torch.clamp(t, min=3.0), torch.minimum(t, math.pi / 2 - t) * 0.5)
    want = _sct64(model.net, x0, 3, r=1.0, fd_h=h)
    torch.testing.assert_close(got.detach().double(), want, rtol=2e-5, atol=1e-9)
    exact = _sct64(model.net, x0, 3, r=1.0)
    assert not torch.allclose(want, exact, rtol=1e-4)        # the step matters at this size
