"""Bad input to the public library API (DESIGN.md 3) is one clear error, raised before any work: a ValueError or
TypeError naming the argument and what was expected. Each case here was a deep or cryptic traceback, a hang or a
silent wrong result before its check (what it was is said beside it); the valid inputs next to them still run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cmfast
from cmfast import edit, metrics, ops

RES = 8


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return cmfast.UNet.from_preset("tiny", img_resolution=RES).eval()


@pytest.fixture(scope="module")
def cm(net):
    return cmfast.ConsistencyModel(net).eval()


@pytest.fixture(scope="module")
def z():
    return torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(2)) * 2 - 1


# ---- cmfast.sample / cmfast.edm_sample ---------------------------------------------------------------------------
def test_sample_refuses_a_list_as_z(cm, z):
    # was "can't multiply sequence by non-int of type 'float'" (sample) and "'list' object has no attribute
    # 'double'" (edm_sample)
    with pytest.raises(ValueError, match=r"^z: expected a torch\.Tensor \(N\(0, I\) noise\), got builtins\.list$"):
        cmfast.sample(cm, z.tolist())
    with pytest.raises(ValueError, match=r"^z: expected a torch\.Tensor"):
        cmfast.edm_sample(cmfast.EDMDenoiser(cm.net), z.tolist(), 2)


@pytest.mark.parametrize("bad", [[1.0], [None], 3.0])
def test_sample_noise_must_be_tensors(cm, z, bad):
    # a float or None in the list was "'float' object has no attribute 'shape'"; a number "has no len()"
    with pytest.raises(TypeError, match=r"^noise: expected a list of 1 tensor\(s\) shaped \(2, 3, 8, 8\), one per "
                                        r"level after the first, got"):
        cmfast.sample(cm, z, (80.0, 1.0), noise=bad)


def test_sample_takes_the_later_noise_stacked_in_one_tensor(cm, z):
    """noise[k] is the k-th later level's noise: one (K, *z.shape) tensor indexes like a list of K tensors (it was
    'Boolean value of Tensor with more than one value is ambiguous'). Expected: Algorithm 1 written out."""
    n = torch.randn(1, *z.shape, generator=torch.Generator().manual_seed(3))
    got = cmfast.sample(cm, z, (80.0, 1.0), noise=n)
    with torch.no_grad():
        x = cm(80.0 * z, 80.0)
        want = cm(x + math.sqrt(1.0 - 0.002 ** 2) * n[0], 1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_sample_refuses_a_model_of_the_wrong_kind(net, z):
    # the bare UNet was "'UNet' object has no attribute 'sigma_min'", a name "'str' object has no attribute ..."
    with pytest.raises(TypeError, match=r"^model: expected a consistency model \(cmfast\.ConsistencyModel\(net\)\), "
                                        r"got the bare network \(a cmfast\.UNet\): wrap it"):
        cmfast.sample(net, z)
    with pytest.raises(TypeError, match=r"^model: expected a consistency model .*, got str$"):
        cmfast.sample("fmnist", z)


def test_edm_sample_refuses_a_consistency_model(cm, net, z):
    """Heun's ODE steps on a consistency model's f(x, sigma) (not a denoiser) sampled without a word."""
    from cmfast.trigflow import TrigFlowModel
    for model, name in ((cm, "ConsistencyModel"), (torch.compile(cm, backend="eager"), "ConsistencyModel"),
                        (TrigFlowModel(net), "TrigFlowModel")):
        with pytest.raises(TypeError, match=rf"^denoiser: expected an EDM denoiser \(cmfast\.EDMDenoiser\(net\)\), "
                                            rf"got {name}: sample it with cmfast\.sample"):
            cmfast.edm_sample(model, z, 2)
    with pytest.raises(TypeError, match=r"^denoiser: expected an EDM denoiser .*, got the bare network"):
        cmfast.edm_sample(net, z, 2)     # was "'UNet' object has no attribute 'sigma_min'"


# ---- cmfast.edit -------------------------------------------------------------------------------------------------
def test_edit_noise_must_be_finite_float_tensors(cm, images):
    mask = torch.ones(1, 1, RES, RES)
    with pytest.raises(TypeError, match=r"^noise: expected a list of 1 tensor\(s\) shaped \(2, 3, 8, 8\), one per "
                                        r"level, got \['float'\]$"):
        edit.inpaint(cm, images, mask, (80.0,), noise=[1.0])      # was "'float' object has no attribute 'shape'"
    with pytest.raises(TypeError, match=r"^noise\[0\]: expected a floating-point tensor"):
        edit.inpaint(cm, images, mask, (80.0,), noise=[torch.zeros(2, 3, RES, RES, dtype=torch.uint8)])  # ran
    with pytest.raises(ValueError, match=r"^noise\[0\]: expected finite noise, got NaN / inf values$"):
        edit.inpaint(cm, images, mask, (80.0,), noise=[torch.full((2, 3, RES, RES), float("nan"))])  # NaN images


def test_edit_tasks_refuse_the_bare_network_and_a_teacher(cm, net, images, z):
    """The bare UNet took sigma as its c_noise input (inpaint made images without a word; denoise failed as
    "'float' object has no attribute 'reshape'"); an EDM teacher edited with Algorithm 4 as if it were a
    consistency model (cmfast-edit refuses it; the library did not). denoise of a teacher stays: D(x, sigma)."""
    mask = torch.ones(1, 1, RES, RES)
    bare = r"^model: expected a consistency model \(.*\), got the bare network \(a cmfast\.UNet\)"
    for run in (lambda m: edit.inpaint(m, images, mask, (80.0,)), lambda m: edit.colorize(m, images, (80.0,)),
                lambda m: edit.super_resolve(m, images, 2, (80.0,)), lambda m: edit.stroke_guided(m, images, 20.0),
                lambda m: edit.interpolate(m, z, z.flip(0), [0.5]), lambda m: edit.denoise(m, images, 1.0)):
        with pytest.raises(TypeError, match=bare):
            run(net)
    teacher = cmfast.EDMDenoiser(net).eval()
    with pytest.raises(TypeError, match=r"^model: expected .*, got EDMDenoiser: an EDM teacher is a denoiser, not a "
                                        r"consistency model"):
        edit.inpaint(teacher, images, mask, (80.0,))
    with pytest.raises(TypeError, match=r"got EDMDenoiser: an EDM teacher is a denoiser"):
        edit.stroke_guided(teacher, images, 20.0)
    with torch.no_grad():
        want = teacher(images, 1.0)
    assert torch.equal(edit.denoise(teacher, images, 1.0), want)
    with pytest.raises(TypeError, match=r"^model: expected a consistency model .*, got str$"):
        edit.inpaint("fmnist", images, mask, (80.0,))


def test_super_resolve_takes_numpy_integers(cm, images):
    """np.int64(2) was refused as 'factor: expected an integer >= 1, got np.int64(2)'. The 2 x 2 patch means of the
    input are kept (within float32 rounding)."""
    out = edit.super_resolve(cm, images, np.int64(2), (80.0,), torch.Generator().manual_seed(0))
    mean = lambda x: x.double().reshape(2, 3, RES // 2, 2, RES // 2, 2).mean((3, 5))
    torch.testing.assert_close(mean(out), mean(images), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"^factor: expected an integer >= 1, got 2\.0$"):
        edit.super_resolve(cm, images, 2.0, (80.0,))


def test_stroke_guided_levels_must_be_numbers(cm, images):
    # '51' was read as the levels 5 and 1; sigma_start '20' as 20.0, None failed inside float()
    with pytest.raises(TypeError, match=r"^sigmas: expected a number or a 1-D sequence of numbers \(noise levels\), "
                                        r"got '51'$"):
        edit.stroke_guided(cm, images, 20.0, "51")
    with pytest.raises(TypeError, match=r"^sigmas: expected a number .*, got None$"):
        edit.stroke_guided(cm, images, 20.0, None)
    for bad in ("20", None, torch.tensor([20.0, 10.0])):
        with pytest.raises(TypeError, match=r"^sigma_start: expected a number \(a noise level\), got"):
            edit.stroke_guided(cm, images, bad)


def test_interpolate_alphas_must_be_numbers(cm, z):
    with pytest.raises(TypeError, match=r"^alphas: expected a number or a sequence of interpolation weights, "
                                        r"got '0\.5'$"):
        edit.interpolate(cm, z, z.flip(0), "0.5")     # was "new(): invalid data type 'str'"


# ---- Schedules -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(sigma_max=math.inf), dict(rho=math.nan), dict(rho=math.inf)])
def test_karras_sigmas_refuses_non_finite_bounds(kw):
    # inf / NaN levels (sigma_max=inf, rho=nan) or all-equal ones (rho=inf) came back without a word
    with pytest.raises(ValueError, match=r"^expected 0 < sigma_min < sigma_max and rho > 0, got"):
        cmfast.karras_sigmas(5, **kw)


@pytest.mark.parametrize("kw", [dict(rho="7"), dict(sigma_min="0.002"), dict(sigma_max=None)])
def test_karras_sigmas_refuses_non_numbers(kw):
    # was "'<=' not supported between instances of 'str' and 'int'"
    with pytest.raises(TypeError, match=r"^sigma_min, sigma_max, rho: expected numbers, got"):
        cmfast.karras_sigmas(5, **kw)


@pytest.mark.parametrize("fn", [cmfast.ct_schedule, cmfast.ict_schedule])
def test_curricula_refuse_nan_inf_and_strings(fn):
    # NaN step: ict gave N = nan, ct 'cannot convert float NaN to integer'; total inf: N = s0 forever; s1 inf:
    # 'cannot convert float infinity to integer'; strings failed inside comparisons
    for step, total in ((math.nan, 10), (1, math.inf), (1, math.nan)):
        with pytest.raises(ValueError, match=r"^expected 0 <= step and total_steps > 0, got"):
            fn(step, total)
    with pytest.raises(TypeError, match=r"^step, total_steps: expected numbers, got step='1', total_steps=10$"):
        fn("1", 10)
    with pytest.raises(ValueError, match=r"^s0, s1: expected 1 <= s0 <= s1"):
        fn(1, 10, s1=math.inf)
    with pytest.raises(TypeError, match=r"^s0, s1: expected numbers, got s0='2'"):
        fn(1, 10, s0="2")
    assert cmfast.ict_schedule(0, 10) == 11 and cmfast.ct_schedule(0, 10) == (2, 0.9)


def test_ct_schedule_mu0_must_be_a_number():
    with pytest.raises(TypeError, match=r"^mu0: expected a number, got '0\.9'$"):
        cmfast.ct_schedule(1, 10, mu0="0.9")


def test_paper_step_sigmas_needs_a_non_empty_sequence():
    with pytest.raises(TypeError, match=r"^ts: expected a sequence of step indices \(e\.g\. \[0, 22, 39\]\), got 0$"):
        cmfast.paper_step_sigmas(0, 40)     # was "'int' object is not iterable"
    with pytest.raises(ValueError, match=r"^ts: expected one or more step indices, got none$"):
        cmfast.paper_step_sigmas([], 40)    # was () for sample to refuse later
    assert cmfast.paper_step_sigmas(iter([0]), 40) == (80.0,)


# ---- Preconditioning -----------------------------------------------------------------------------------------------
def test_scalings_sigma_and_sigma_data():
    for bad in ("1.0", None):      # "new(): invalid data type 'str'", "must be real number, not NoneType"
        with pytest.raises(TypeError, match=r"^sigma: expected a number or a tensor of noise levels, got"):
            cmfast.scalings(bad)
    for sd in (0.0, -0.5, math.nan, math.inf):      # c_skip = c_out = 0 (or NaN) without a word
        with pytest.raises(ValueError, match=r"^sigma_data: expected a positive finite number, got"):
            cmfast.scalings(1.0, sigma_data=sd)
    with pytest.raises(TypeError, match=r"^sigma_data: expected a number, got '0\.5'$"):
        cmfast.scalings(1.0, sigma_data="0.5")
    c_skip, c_out, c_in = cmfast.scalings(1.0, sigma_data=0.5, sigma_min=0.0)
    assert (float(c_skip), float(c_out), float(c_in)) == pytest.approx((0.2, 0.5 / math.sqrt(1.25),
                                                                        1 / math.sqrt(1.25)), rel=1e-6)


def test_consistency_model_needs_a_backbone_module(cm, net):
    # None or a name was kept until the first call ("'NoneType' object is not callable"); a ConsistencyModel
    # wrapped again was preconditioned twice without a word
    for bad, got in ((None, "NoneType"), ("ddpmpp", "str"), (cm, r"a ConsistencyModel \(already preconditioned")):
        for cls in (cmfast.ConsistencyModel, cmfast.EDMDenoiser):
            with pytest.raises(TypeError, match=rf"^net: expected the backbone network F \(an nn\.Module, e\.g\. "
                                                rf"cmfast\.UNet\), got {got}"):
                cls(bad)
    with pytest.raises(TypeError, match=r"^expected numbers for sigma_data, sigma_min, sigma_max, got "
                                        r"sigma_data='0\.5'"):
        cmfast.ConsistencyModel(net, sigma_data="0.5")


def test_model_call_sigma_must_be_a_number(cm, images):
    with pytest.raises(TypeError, match=r"^sigma: expected a number or a tensor of noise levels, got '1\.0'$"):
        cm(images, "1.0")


# ---- cmfast.ops ----------------------------------------------------------------------------------------------------
def test_skip_output_arguments():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"^x: expected a batch \(B, \.\.\.\), got shape \(\)$"):
        ops.skip_output(torch.tensor(1.0), torch.tensor(1.0), 1.0)      # was 'tuple index out of range'
    for fn in (ops.skip_output, ops.skip_output_infer):
        for sd in (0.0, -0.5, math.nan):        # zeros or NaN images without a word
            with pytest.raises(ValueError, match=r"^sigma_data: expected a positive finite number, got"):
                fn(x, x, 1.0, sigma_data=sd)
        with pytest.raises(TypeError, match=r"^sigma_data: expected a positive finite number, got '0\.5'$"):
            fn(x, x, 1.0, sigma_data="0.5")
        with pytest.raises(ValueError, match=r"^sigma_min: expected a finite number >= 0, got -1$"):
            fn(x, x, 1.0, sigma_min=-1)
        with pytest.raises(TypeError, match=r"^sigma: expected a number or a tensor of noise levels, got '1'$"):
            fn(x, x, "1")
    # c_skip x + c_out F at sigma 1, sigma_data 0.5, sigma_min 0: 0.2 x + (0.5 / sqrt(1.25)) F
    F = torch.randn(2, 4)
    torch.testing.assert_close(ops.skip_output(x, F, 1.0, 0.5, 0.0), 0.2 * x + 0.5 / math.sqrt(1.25) * F)


def test_group_norm_act_eps_must_be_a_finite_positive_number():
    x = torch.randn(2, 4, 3, 3)
    for bad in ("1e-6", None):      # "'>' not supported between instances of 'str' and 'int'"
        with pytest.raises(TypeError, match=r"^eps: expected a positive number, got"):
            ops.group_norm_act(x, 2, eps=bad)
    with pytest.raises(ValueError, match=r"^eps: expected a positive number, got inf$"):
        ops.group_norm_act(x, 2, eps=math.inf)      # a zero output without a word


def test_attention_needs_a_head_dim_a_key_and_a_finite_scale():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"^attention: expected D >= 1 and at least one key \(Lk >= 1\)"):
        ops.attention(q[..., :0], q[..., :0], q[..., :0])      # was a ZeroDivisionError
    with pytest.raises(ValueError, match=r"^attention: expected D >= 1 and at least one key"):
        ops.attention(q, q[:, :, :0], q[:, :, :0])              # a softmax over no keys
    with pytest.raises(ValueError, match=r"^scale: expected a finite number, got nan$"):
        ops.attention(q, q, q, scale=math.nan)                  # finite output without a word
    with pytest.raises(TypeError, match=r"^scale: expected a finite number, got 'x'$"):
        ops.attention(q, q, q, scale="x")
    for k in (q, q[:, :, :0]):      # no query: an empty result, as before, with keys or without
        assert ops.attention(q[:, :, :0], k, k).shape == (1, 2, 0, 8)


def test_consistency_loss_c_must_be_a_finite_positive_number():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"^c: expected a positive number for pseudo_huber, got '0\.1'$"):
        ops.consistency_loss(x, x, c="0.1")
    with pytest.raises(ValueError, match=r"^c: expected a positive number for pseudo_huber, got inf$"):
        ops.consistency_loss(x, x, c=math.inf)      # an inf - inf = NaN loss


def test_trig_tangent_loss_numbers():
    F = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"^sigma_data, c: expected numbers, got sigma_data='0\.5', c=0\.1$"):
        ops.trig_tangent_loss(F, F, F, torch.rand(2), dFdt=F, sigma_data="0.5")
    with pytest.raises(TypeError, match=r"^t: expected a number or a tensor of noise levels, got '0\.5'$"):
        ops.trig_tangent_loss(F, F, F, "0.5", dFdt=F)


# ---- cmfast.fd_jvp -------------------------------------------------------------------------------------------------
def test_fd_jvp_arguments():
    p = torch.randn(2, 3)
    double = lambda a: 2 * a
    for method in ("fd", "exact"):      # "'str' object is not callable", from inside torch.func for 'exact'
        with pytest.raises(TypeError, match=r"^fd_jvp: fn: expected a callable, got str$"):
            cmfast.fd_jvp("f", p, p, method=method)
    with pytest.raises(ValueError, match=r"^fd_jvp: expected a non-empty batch, got primal 0 of shape \(0, 3\)$"):
        cmfast.fd_jvp(double, p[:0], p[:0])     # was 'not enough values to unpack (expected 4, got 1)'
    with pytest.raises(ValueError, match=r"^fd_jvp: tangent 0: expected a tensor on the primal's device cpu, got one "
                                         r"on meta$"):
        cmfast.fd_jvp(double, p, p.to("meta"))   # torch's 'Tensor on device meta is not on the expected device'
    for kw in (dict(eps="0.01"), dict(eps=None), dict(relative_to=torch.ones(2), floor="1")):
        with pytest.raises(TypeError, match=r"^fd_jvp: eps, floor: expected numbers"):
            cmfast.fd_jvp(double, p, p, **kw)
    with pytest.raises(ValueError, match=r"^fd_jvp: expected a positive step \(number or \(2,\)\), got steps "
                                         r"\[inf, inf\]$"):
        cmfast.fd_jvp(double, p, p, eps=math.inf)    # p +- inf t: a NaN JVP without a word
    for fn, got in ((lambda a: (a, a), "tuple"), (lambda a: a.sum(0, keepdim=True), r"shape \(1, 3\)")):
        with pytest.raises(ValueError, match=rf"^fd_jvp: fn: expected one tensor with the batch of its input "
                                             rf"\(4, \.\.\.\): each sample on its own, got {got}$"):
            cmfast.fd_jvp(fn, p, p)
    two = lambda a, b: a + 3 * b
    for method in ("fd", "exact"):      # fd called fn with the first input alone (a TypeError from inside fn)
        with pytest.raises(ValueError, match=r"^fd_jvp: expected as many tangents as primals \(>= 1\), got 2 and "
                                             r"1$"):
            cmfast.fd_jvp(two, (p, p), (torch.ones_like(p),), method=method)
        with pytest.raises(ValueError, match=r"^fd_jvp: primal 1: expected batch 2 like primal 0, got 3$"):
            cmfast.fd_jvp(lambda a, b: a.sum(1) + b.sum(1)[:2], (p, torch.ones(3, 3)), (p, torch.ones(3, 3)),
                          method=method)    # was torch's 'The size of tensor a (2) must match ...'
    out, jvp = cmfast.fd_jvp(double, p, torch.ones_like(p))
    torch.testing.assert_close(jvp, torch.full_like(p, 2.0))


# ---- cmfast.GraphedSampler -----------------------------------------------------------------------------------------
def test_graphed_sampler_seed_must_be_an_integer(monkeypatch, cm):
    # a string or a float failed inside torch.Generator.manual_seed, after the weights were copied (or the graph
    # captured: on a GPU, minutes of warm-up and autotuning)
    with pytest.raises(TypeError, match=r"^seed: expected an integer or None, got '1'$"):
        cmfast.GraphedSampler(cm, 2, (3, RES, RES), seed="1")       # refused before the CUDA check, here too
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    sampler = cmfast.GraphedSampler(cm, 2, (3, RES, RES), dtype=torch.float32, seed=np.int64(3),
                                    channels_last=False)
    for call in (sampler, sampler._run_uncaptured):
        with pytest.raises(TypeError, match=r"^seed: expected an integer or None, got 1\.5$"):
            call(seed=1.5)


# ---- cmfast.metrics ------------------------------------------------------------------------------------------------
def test_frechet_distance_inputs():
    # None was read by numpy as a NaN object array ('expected mu (1,)'), a string as 'could not convert'
    with pytest.raises(TypeError, match=r"^frechet_distance: mu1: expected an array of numbers, got NoneType$"):
        metrics.frechet_distance(None, np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(TypeError, match=r"^frechet_distance: sigma2: expected an array of numbers, got str$"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), "eye")
    # tensors that need a gradient (or live on a GPU) failed in numpy's conversion; N(0, I) vs N(1, I) in 3-d: 3
    mu = torch.zeros(3, requires_grad=True)
    assert metrics.frechet_distance(mu, torch.eye(3), torch.ones(3), torch.eye(3)) == pytest.approx(3.0, abs=1e-9)


@pytest.fixture
def no_reference(monkeypatch):
    def ref(*a, **k):
        raise AssertionError("reference statistics computed before the argument check")
    monkeypatch.setattr(metrics, "reference_stats", ref)


def test_fd_fmnist_and_fid_check_their_arguments_first(no_reference):
    x1, x3 = torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 8, 8)
    for bs in (0, -1, "5", 2.5):    # 'range() arg 3 must not be zero' (or the like) while computing the reference
        with pytest.raises(ValueError, match=r"^batch_size: expected an integer >= 1, got"):
            metrics.fd_fmnist(x1, batch_size=bs)
        with pytest.raises(ValueError, match=r"^batch_size: expected an integer >= 1, got"):
            metrics.fid(x3, batch_size=bs)
    with pytest.raises(ValueError, match=r"^num_ref: expected an integer >= 1, got 0$"):
        metrics.fid(x3, num_ref=0)
    with pytest.raises(ValueError, match=r"^dataset must be one of \('fashion-mnist', 'cifar10', 'folder'\), got "
                                         r"'imagenet'$"):
        metrics.fid(x3, dataset="imagenet")
    with pytest.raises(ValueError, match=r"^images: expected 1 or 3 channels for FID's Inception network, got "
                                         r"\(2, 2, 8, 8\)$"):
        metrics.fid(torch.zeros(2, 2, 8, 8))


def test_evaluate_checks_its_arguments_before_the_reference_statistics(no_reference, cm, net):
    run = lambda model=cm, **kw: metrics.evaluate(model, "fid", **{"num": 4, "batch_size": 2, **kw})
    with pytest.raises(TypeError, match=r"^sigmas: expected a number or a 1-D sequence"):
        run(sigmas="80")        # was read as the levels 8 and 0
    with pytest.raises(ValueError, match=r"^sigmas: expected levels in \[0\.002, 80\.0\], got \(100\.0,\)$"):
        run(sigmas=(100.0,))
    with pytest.raises(ValueError, match=r"^engine: expected one of auto, graphed, eager, got 'fast'$"):
        run(engine="fast")
    with pytest.raises(ValueError, match=r"^dtype: expected float32, bfloat16 or float16, got torch\.float64$"):
        run(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^seed: expected an integer, got '1'$"):
        run(seed="1")       # '1' * 1000003: a megabyte string in the noise seeding
    with pytest.raises(ValueError, match=r"^num >= 2 and batch_size >= 1 expected, got num='10', batch_size=2$"):
        run(num="10")       # "'<' not supported between instances of 'str' and 'int'"
    with pytest.raises(ValueError, match=r"^dataset must be one of"):
        run(dataset="imagenet")
    with pytest.raises(TypeError, match=r"^model: expected a cmfast model \(ConsistencyModel or EDMDenoiser\), got "
                                        r"the bare network"):
        run(net)
    with pytest.raises(TypeError, match=r"^model: expected a cmfast model .*, got str$"):
        run("fmnist")       # was "'str' object has no attribute 'parameters'"


# ---- cmfast.UNet ---------------------------------------------------------------------------------------------------
def test_unet_construction_arguments():
    with pytest.raises(ValueError, match=r"^attn_resolutions: expected a tuple of resolutions \(ints, e\.g\. "
                                         r"\(16,\)\), got 16$"):
        cmfast.UNet.from_preset("tiny", img_resolution=RES, attn_resolutions=16)   # "argument of type 'int' ..."
    with pytest.raises(ValueError, match=r"^attn_resolutions: expected a tuple .*, got '16'$"):
        cmfast.UNet.from_preset("tiny", img_resolution=RES, attn_resolutions="16")
    with pytest.raises(ValueError, match=r"^channel_mult: expected one or more integers >= 1, got 2$"):
        cmfast.UNet(img_resolution=RES, model_channels=16, channel_mult=2)      # "'int' object is not iterable"
    with pytest.raises(ValueError, match=r"^num_heads: expected a divisor of the 32 channels of an attention block, "
                                         r"got 3$"):
        cmfast.UNet.from_preset("tiny", img_resolution=RES, num_heads=3)     # a reshape error at the first call


def test_unet_forward_inputs(net, images):
    with pytest.raises(TypeError, match=r"^noise_labels: expected a tensor of c_noise values \(B,\) "
                                        r"\(ln\(sigma\) / 4\), got float$"):
        net(images, 0.5)        # "'float' object has no attribute 'reshape'"
    with pytest.raises(ValueError, match=r"^noise_labels: expected one value or one per image \(2,\), got shape "
                                         r"\(3,\)$"):
        net(images, torch.zeros(3))     # torch's expand error
    with pytest.raises(ValueError, match=r"^x: expected images \(B, 3, 8, 8\) with B >= 1 for this network, got "
                                         r"\(0, 3, 8, 8\)$"):
        net(images[:0], torch.zeros(0))    # 'cannot reshape tensor of 0 elements'
    with pytest.raises(ValueError, match=r"^x: expected a tensor on cpu \(the network's device\), got one on meta$"):
        net(images.to("meta"), torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match=r"^noise_labels: expected a tensor on cpu \(the images' device\), got one "
                                         r"on meta$"):
        net(images, torch.zeros(2, device="meta"))
    with torch.no_grad():
        assert torch.equal(net(images, torch.zeros(1)), net(images, torch.zeros(2)))     # one value: every image


def test_a_preset_with_a_bad_channel_mult_override_gets_unets_own_error():
    """from_preset moves the attention levels for another resolution from channel_mult's length: channel_mult=2 failed
    there with "object of type 'int' has no len()" before UNet could name the argument."""
    with pytest.raises(ValueError, match=r"channel_mult: expected one or more integers >= 1, got 2"):
        cmfast.UNet.from_preset("tiny", img_resolution=8, channel_mult=2)
