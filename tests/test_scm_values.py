"""The continuous-time consistency code (cmfast.trigflow, cmfast.training.methods_scm, cmfast.jvp) where the other
tests left it open (mutation testing, round 7): each number is checked against an independent float64 transcription
of sCM (Lu & Song 2024; /work/shared/PAPER.md) with torch.func.jvp as the derivative, or a hand computation, never
against the code's own output. Each test names the planted error (mutation) that passed every test before it."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cmfast
from cmfast import trigflow as TF
from cmfast.training.methods import get_method
from _small_nets import CondNet, _v

pytestmark = pytest.mark.usefixtures("one_thread")


def TimeNet(ch=2, seed=0, label_dim=0):
    """A strongly time-conditioned small net: 6 hidden channels, parameters N(0, 0.5^2)."""
    return CondNet(ch, seed, label_dim, hidden=6, scale=0.5)


def _data(n, seed=1):
    return torch.rand(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _c_noise(t, time_input, sd):
    if time_input == "edm":
        return torch.log(sd * torch.tan(t)) / 4
    return t * 1000.0 if time_input == "1000t" else t


def _scm64(net, x0, seed, sd=0.5, r=1.0, time_input="t", c=0.1, p_mean=-1.0, p_std=1.4, weight=None, dxdt_fn=None):
    """sCM Alg. 1 in float64 with the adaptive head at zero (logvar = 0) and F - F- = 0 in value: per-sample loss
    w ||g / (||g|| + c)||^2 / D, g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt), dF-/dt the exact
    JVP (torch.func.jvp on a float64 copy) of F(x_t / sd, c_noise(t)) along (dx_t/dt, 1); the draws tau ~ N(p_mean,
    p_std^2), then z ~ N(0, sd^2 I), from Generator(seed); tan t = e^tau / sd."""
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(x0.shape[0], generator=g).double() * p_std + p_mean
    z = torch.randn(x0.shape, generator=g).double() * sd
    t = torch.atan(torch.exp(tau) / sd)
    cos, sin = _v(torch.cos(t)), _v(torch.sin(t))
    x0 = x0.double()
    x_t = cos * x0 + sin * z
    dxdt = cos * z - sin * x0 if dxdt_fn is None else dxdt_fn(x_t, t)
    net = copy.deepcopy(net).double()
    sign = -1.0 if time_input == "edm" else 1.0
    with torch.no_grad():
        F, dFdt = torch.func.jvp(lambda x, s: sign * net(x / sd, _c_noise(s, time_input, sd)), (x_t, t),
                                 (dxdt, torch.ones_like(t)))
    gt = -cos ** 2 * (sd * F - dxdt) - r * cos * sin * (x_t + sd * dFdt)
    gn = gt / (gt.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + c)
    loss = (gn ** 2).flatten(1).sum(1) / x0[0].numel()
    return loss if weight is None else loss * weight(t)


# ---- argument checks ------------------------------------------------------------------------------------------------

def test_trigflow_model_refuses_a_zero_sigma_min_an_infinite_sigma_max_and_an_unknown_time_input():
    """TrigFlowModel takes 0 < sigma_min < sigma_max < inf and a known time input (mutants: sigma_min 0 allowed;
    sigma_max inf allowed (t = pi/2: the sampler's first x = inf z); the time-input check dropped: an unknown name ran
    as 't')."""
    net = TimeNet()
    for kw in (dict(sigma_min=0.0), dict(sigma_max=math.inf), dict(sigma_min=1.0, sigma_max=1.0),
               dict(sigma_data=0.0)):
        with pytest.raises(ValueError, match=r"expected sigma_data > 0 and 0 < sigma_min < sigma_max < inf"):
            TF.TrigFlowModel(net, **kw)
    with pytest.raises(ValueError, match=r"time_input: expected one of t, 1000t, edm, got 'T'"):
        TF.TrigFlowModel(net, time_input="T")
    m = TF.TrigFlowModel(net, sigma_data=0.5, sigma_min=1e-9, sigma_max=1e9)      # any finite positive range
    assert (m.sigma_min, m.sigma_max) == (1e-9, 1e9)


def test_teacher_velocity_refuses_a_teacher_of_another_sigma_data():
    """sCD's teacher must share the student's sigma_data: a teacher at 0.55 for a student at 0.5 is refused (mutant:
    a tolerance of 0.1 let it pass, and the velocity came from another data scale)."""
    teacher = cmfast.EDMDenoiser(TimeNet(), sigma_data=0.55)
    x, t = _data(2), torch.tensor([0.3, 1.0])
    with pytest.raises(ValueError, match=r"teacher: expected sigma_data 0.5 like the student, got 0.55"):
        TF.teacher_velocity(teacher, x, t, 0.5)
    assert TF.teacher_velocity(teacher, x, t, 0.55).shape == x.shape


def test_tangent_warmup_is_clamped_to_0_and_1():
    """r = clamp(step / warmup, 0, 1): 0 before the first step, 1 after the warm-up, linear between (mutants: the
    clamp at 0 dropped, a negative r; at 1 dropped)."""
    assert [TF.tangent_warmup(s, 8) for s in (-4, 0, 2, 8, 20)] == [0.0, 0.0, 0.25, 1.0, 1.0]


# ---- the sCT loss against the float64 transcription ---------------------------------------------------------------

@pytest.mark.parametrize("time_input", ["t", "1000t", "edm"])
def test_sct_fp64_forwards_take_the_time_input(time_input):
    """sCT with fd_precision fp64 (the backbone on float64 copies of the weights), a fine step (eps 1e-5: truncation
    ~1e-10) and r = 1: the float64 sCM loss whose dF/dt is torch.func.jvp of F(x_t / sd, c_noise(t)), c_noise = t,
    1000 t or ln(sd tan t) / 4 with F = -F_edm (mutant: the fp64 forwards fed t itself as c_noise: sCD's default
    input 'edm' then differentiated another function of t)."""
    net = TimeNet(seed=3)
    model = TF.TrigFlowModel(net, time_input=time_input)
    x0 = _data(4)
    loss = TF.sct_loss(model, x0, step=5, warmup_steps=1, precision="fp64", eps=1e-5,
                       generator=torch.Generator().manual_seed(7))
    want = _scm64(net, x0, 7, time_input=time_input)
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-4, atol=1e-7)    # fp32 elsewhere: 3e-5 measured


def _method_cfg(method, total_steps=100, sd=0.5, **args):
    m = get_method(method)
    return dict(sigma_data=sd, sigma_min=0.002, sigma_max=80.0, total_steps=total_steps, loss="l2",
                method_args=dict(m.defaults, **args))


def test_sct_method_warms_the_tangent_up_over_warmup_frac_of_the_run_in_the_loss_itself():
    """warmup_frac 0.5 of a 8-step run: a 4-step warm-up, so step 2 has r = 0.5 in the LOSS (the float64 sCM loss at
    r = 0.5, fp64 forwards at a fine step), not only in the reported info; the 10k-step warmup_steps would give
    r = 2e-4 (mutant: the loss was handed warmup_steps while the info row showed warmup_frac's r)."""
    sct = get_method("sct")
    cfg = _method_cfg("sct", total_steps=8, warmup_frac=0.5, fd_precision="fp64", fd_eps=1e-5)
    models = sct.build(TimeNet(seed=4), cfg)
    x0 = _data(4, seed=2)
    loss, info = sct.loss(models, x0, 2, cfg, torch.Generator().manual_seed(8))
    assert info == {"r": 0.5}
    want = _scm64(models["model"].net, x0, 8, r=0.5)
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(want, _scm64(models["model"].net, x0, 8, r=2e-4), rtol=1e-3)


def test_a_warmup_frac_shorter_than_one_step_is_still_one_step():
    """warmup_frac x K under half a step (0.01 x 10 = 0.1) rounds to a warm-up of 1 step, not 0: step 0 has r = 0
    (the tangent without its dF/dt term), step 1 r = 1 (mutant: max(1, .) dropped: a warm-up of 0 steps, r = 1 from
    step 0)."""
    sct = get_method("sct")
    cfg = _method_cfg("sct", total_steps=10, warmup_frac=0.01)
    assert sct.warmup_steps(cfg) == 1
    models = sct.build(TimeNet(seed=4), cfg)
    x0 = _data(2)
    assert sct.loss(models, x0, 0, cfg, torch.Generator().manual_seed(1))[1] == {"r": 0.0}
    assert sct.loss(models, x0, 1, cfg, torch.Generator().manual_seed(1))[1] == {"r": 1.0}


def test_dropout_masks_refuse_a_batch_that_is_not_a_multiple_of_repeat():
    """The shared-mask mode splits the batch into `repeat` blocks: a batch of 1 (or 3) with repeat 2 is refused with a
    one-line ValueError (mutant: the check dropped: batch 1 gave an EMPTY output (a mask of batch 0, broadcast),
    batch 3 a broadcasting RuntimeError)."""
    from cmfast.jvp import dropout_masks
    for b in (1, 3):
        with dropout_masks(2), pytest.raises(ValueError, match=rf"dropout_masks: batch {b} is not a multiple of "
                                                               r"repeat=2"):
            torch.nn.functional.dropout(torch.ones(b, 3), 0.5, True)
    with dropout_masks(2):
        out = torch.nn.functional.dropout(torch.ones(4, 3), 0.5, True)
    assert out.shape == (4, 3) and torch.equal(out[:2], out[2:]) and set(out.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("order", [2, 4])
def test_fd_jvp_refuses_a_fn_that_returns_a_larger_batch(order):
    """fn must map each sample on its own: one of batch 2 x order x B (it repeated its output) is refused with the
    one-line ValueError, as a reduced batch is (mutant: only a smaller batch refused: order 2 then split 4B into four
    blocks and took them for the 4-point stencil, a wrong JVP without an error)."""
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=rf"fd_jvp: fn: expected one tensor with the batch of its input "
                                         rf"\({order * 2}, \.\.\.\): each sample on its own, got shape \({order * 4}, 3\)"):
        cmfast.fd_jvp(lambda u: torch.cat([u, u]), x, torch.ones_like(x), order=order)


# ---- the boundary condition -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("time_input", ["t", "edm"])
def test_the_boundary_f_x_0_is_x_for_every_time_input(time_input):
    """f(x, 0) = cos 0 x - sin 0 sd F = x exactly (the VE call at sigma = 0, which it accepts), next to a sample at
    sigma = 0.3 that must be the float64 TrigFlow value: t = atan(sigma / sd), x_t = cos t x, f = cos t x_t -
    sin t sd F with F = F(x_t / sd, t) or -F_edm(x_t / sd, ln(sd tan t) / 4). Before the fix the time input 'edm'
    (sCD's default) gave NaN at sigma = 0: c_noise = ln(0) / 4 = -inf, the UNet's positional embedding cos(-inf) =
    NaN, and 0 x NaN = NaN."""
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=8, in_channels=2, out_channels=2, attn_resolutions=(4,),
                                  dropout=0.0)
    for p in net.parameters():       # EDM's init zeroes the output conv: randomize so that F matters
        nn.init.normal_(p, std=0.1)
    model = TF.TrigFlowModel(net, time_input=time_input).eval()
    x = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        got = model(x, torch.tensor([0.0, 0.3]))
    assert torch.equal(got[0], x[0])
    sd, t = 0.5, math.atan(0.3 / 0.5)
    x_t = math.cos(t) * x[1:].double()
    tt = torch.full((1,), t, dtype=torch.float64)
    with torch.no_grad():
        F = copy.deepcopy(net).double()(x_t / sd, _c_noise(tt, time_input, sd))
    F = -F if time_input == "edm" else F
    torch.testing.assert_close(got[1:].double(), math.cos(t) * x_t - math.sin(t) * sd * F, rtol=1e-5, atol=1e-6)


def test_warmup_frac_rounds_to_the_nearest_step():
    """warmup_frac x K rounded to the nearest step: 0.25 x 7 = 1.75 -> 2 steps (r = 0.5 at step 1), 0.1 x 12 = 1.2 -> 1
    (mutant: int(), truncation: 1 step, r = 1 at step 1)."""
    sct = get_method("sct")
    assert sct.warmup_steps(_method_cfg("sct", total_steps=7, warmup_frac=0.25)) == 2
    assert sct.warmup_steps(_method_cfg("sct", total_steps=12, warmup_frac=0.1)) == 1
    assert TF.tangent_warmup(1, sct.warmup_steps(_method_cfg("sct", total_steps=7, warmup_frac=0.25))) == 0.5


def test_dropout_masks_honour_torch_dropouts_train_keyword():
    """torch.dropout(x, p, train=False) inside the shared-mask mode is the identity, as outside it; train=True drops
    (mutant: the 'train' keyword ignored: the mode dropped out an evaluation-mode call)."""
    from cmfast.jvp import dropout_masks
    x = torch.ones(4, 64)
    with dropout_masks(2):
        off = torch.dropout(x, 0.5, train=False)
        on = torch.dropout(x, 0.5, train=True)
    assert torch.equal(off, x)
    assert set(on.unique().tolist()) == {0.0, 2.0} and torch.equal(on[:2], on[2:])


def test_sample_time_defaults_are_scms_lognormal():
    """sample_time's own defaults: tan t = e^tau / 0.5 with tau = -1.0 + 1.4 n, n ~ N(0, 1) from the generator (sCM
    Sec. 4.3; float64 by hand from the same draws) (mutants: P_mean -1.1 or P_std 2.0 as the default)."""
    n = torch.randn(5, generator=torch.Generator().manual_seed(4)).double()
    got = TF.sample_time(5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got.double(), torch.atan(torch.exp(-1.0 + 1.4 * n) / 0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_the_scm_methods_wrap_the_net_with_the_configs_levels_and_time_input(method):
    """wrap() builds the TrigFlowModel from the run's sigma_data / sigma_min / sigma_max and the time input (mutant:
    sigma_max fixed at EDM's 80 survived every test, all of which ran at 80)."""
    cfg = dict(_method_cfg(method, sd=0.8, time_input="1000t"), sigma_min=0.01, sigma_max=20.0)
    model = get_method(method).wrap(TimeNet(), cfg)
    assert (model.sigma_data, model.sigma_min, model.sigma_max, model.time_input) == (0.8, 0.01, 20.0, "1000t")


@pytest.mark.parametrize("order", [3, 4.5, True])
def test_scm_loss_refuses_another_order_before_any_forward(order):
    """order is checked on entry, for jvp='exact' too, which never reads it (mutant: without the check an order of
    3 trained silently with the exact JVP, and the fd path raised only after the online forward)."""
    calls = []
    net = TimeNet()
    net.register_forward_hook(lambda *a: calls.append(1))
    for jvp in ("exact", "fd"):
        with pytest.raises(ValueError, match=r"^order: expected 2 or 4 \(points of the central difference\), got "):
            TF.sct_loss(TF.TrigFlowModel(net), _data(2), jvp=jvp, order=order)
    assert calls == []


@pytest.mark.parametrize("drop, dims", [(F.dropout1d, 1), (F.dropout2d, 2), (F.dropout3d, 3)])
def test_dropout_masks_keep_channel_dropouts_per_channel(drop, dims):
    """dropout1d / 2d / 3d inside the shared-mask mode drop whole channels, as outside it: the mask, drawn by the same
    function, is one value per (sample, channel), 0 or 1 / (1 - p), tiled over the repeat blocks (mutant: every mask
    drawn by F.dropout, element by element)."""
    from cmfast.jvp import dropout_masks
    x = torch.ones(4, 32, *[3] * dims)
    rec = []
    with dropout_masks(2, record=rec):
        y = drop(x, 0.5, True)
    flat = y.flatten(2)
    assert torch.equal(flat, flat[:, :, :1].expand_as(flat))       # constant over each channel's positions
    assert set(flat.unique().tolist()) == {0.0, 2.0} and torch.equal(y[:2], y[2:])
    assert len(rec) == 1 and torch.equal(rec[0], y[:2])
