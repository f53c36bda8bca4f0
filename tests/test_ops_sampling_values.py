"""Values the op layer, sampling, editing and the graphed sampler's CPU pieces must give, each against a float64
transcription of its formula written out here (not imported from the code). Every test closes a gap a mutation study
found: a planted error (named in the docstring) that the other tests let through."""
from __future__ import annotations

import math

import pytest
import torch

import cmfast
from cmfast import edit, ops


def _g(seed):
    return torch.Generator().manual_seed(seed)


# ---- op layer: the torch backend and the public entries ------------------------------------------------------------
def test_torch_consistency_loss_l2_l1_and_weight_against_float64():
    """l2 = mean of squares, l1 = mean of absolute values over a sample's D elements, times its weight (planted: l2 as
    a sum, the weight dropped; the kernel tests only bound the kernels by the torch backend's own error, and the torch
    edge-case test has one element a sample, where a sum is a mean)."""
    g = _g(0)
    pred = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    target = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    D = 2 * 4 * 5
    d = (pred - target).reshape(3, D)
    l2 = torch.tensor([sum(float(e) ** 2 for e in row) / D for row in d], dtype=torch.float64)
    l1 = torch.tensor([sum(abs(float(e)) for e in row) / D for row in d], dtype=torch.float64)
    with ops.use_backend("torch"):
        for kind, want in (("l2", l2), ("l1", l1)):
            got = ops.consistency_loss(pred.float(), target.float(), kind)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
            got = ops.consistency_loss(pred.float(), target.float(), kind, weight=w.float())
            torch.testing.assert_close(got.double(), want * w, rtol=1e-6, atol=0)
        c = 0.3
        ph = torch.tensor([math.sqrt(sum(float(e) ** 2 for e in row) + c * c) - c for row in d], dtype=torch.float64)
        got = ops.consistency_loss(pred.float(), target.float(), "pseudo_huber", c, weight=w.float())
        torch.testing.assert_close(got.double(), ph * w, rtol=1e-6, atol=0)


def test_consistency_loss_default_c_is_ict():
    """Without c the pseudo-Huber constant is iCT's c = 0.00054 sqrt(D) (planted: 0.00054 D; every other test passes
    c explicitly)."""
    g = _g(1)
    pred, target = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    D = 3 * 8 * 8
    c = 0.00054 * math.sqrt(D)
    d = (pred.double() - target.double()).reshape(2, D)
    want = torch.tensor([math.sqrt(float((row * row).sum()) + c * c) - c for row in d], dtype=torch.float64)
    with ops.use_backend("torch"):
        got = ops.consistency_loss(pred, target)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # near zero difference the constant is what the loss is made of: sqrt(e^2 D + c^2) - c for a difference e
    e = 2.0 ** -12                                                      # exact in fp32
    want0 = math.sqrt(e * e * D + c * c) - c
    with ops.use_backend("torch"):
        got0 = ops.consistency_loss(torch.full((2, 3, 8, 8), e), torch.zeros(2, 3, 8, 8))
    torch.testing.assert_close(got0.double(), torch.full((2,), want0, dtype=torch.float64), rtol=1e-5, atol=0)


def test_torch_group_norm_act_float64_is_float64_math():
    """A float64 x is normalised in float64 (the fp64 JVP references rely on it; planted: statistics in fp32, ~1e-7
    off): act((x - mean) / sqrt(biased var + eps) * w + b) * ... against the formula to 1e-12."""
    g = _g(2)
    N, C, H, W, G = 2, 6, 3, 5, 3
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    scale, shift = (torch.randn(N, C, generator=g, dtype=torch.float64) * 0.3 for _ in range(2))
    eps = 1e-6
    want = torch.empty_like(x)
    for n in range(N):
        for grp in range(G):
            cs = slice(grp * (C // G), (grp + 1) * (C // G))
            vals = x[n, cs].flatten().tolist()
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / len(vals)       # biased, as GroupNorm
            z = (x[n, cs] - mean) / math.sqrt(var + eps)
            z = (z * w[cs, None, None] + b[cs, None, None]) * (1 + scale[n, cs, None, None]) + shift[n, cs, None, None]
            want[n, cs] = z / (1 + torch.exp(-z))                     # SiLU
    with ops.use_backend("torch"):
        got = ops.group_norm_act(x, G, w, b, eps, scale, shift, "silu")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _gn64(x, G, eps=1e-6):
    """GroupNorm without affine, float64, from the definition (biased variance, eps inside the root)."""
    N, C = x.shape[:2]
    out = torch.empty_like(x)
    for n in range(N):
        for grp in range(G):
            cs = slice(grp * (C // G), (grp + 1) * (C // G))
            vals = x[n, cs].flatten().tolist()
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / len(vals)
            out[n, cs] = (x[n, cs] - mean) / math.sqrt(var + eps)
    return out


@pytest.mark.parametrize("rows", [2, 1], ids=["per-sample", "broadcast"])
def test_group_norm_act_pre_bias_is_added_before_the_norm(rows):
    """pre_bias (N, C) or (1, C) is added to x before the statistics: GN(x + pre_bias) (planted: subtracted; the
    torch backend takes the public entry's add, and the kernel tests compare against it)."""
    g = _g(3)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    pre = torch.randn(rows, 4, generator=g, dtype=torch.float64) * 2
    want = _gn64(x + pre[:, :, None, None], 2)
    with ops.use_backend("torch"):
        got = ops.group_norm_act(x.float(), 2, act=None, pre_bias=pre.float())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


def test_trig_tangent_loss_defaults_are_no_weighting():
    """Without logvar and weight the sCM loss is ||gn||^2 / D with gn = g / (||g|| + c) (logvar 0, weight 1;
    planted: a default logvar of 1, a default weight of 0.5; every other test passes both)."""
    g = _g(4)
    B, shape = 2, (2, 3, 4, 4)
    F, x, v, dF = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.25, 1.0], dtype=torch.float64)              # exact in fp32
    r, sd, c = 1.0, 0.5, 0.1
    D = 3 * 4 * 4
    want = []
    for b in range(B):
        ct, st = math.cos(float(t[b])), math.sin(float(t[b]))
        gv = [-ct * ct * (sd * f - vv) - r * ct * st * (xx + sd * d) for f, vv, xx, d in
              zip(F[b].flatten().tolist(), v[b].flatten().tolist(), x[b].flatten().tolist(), dF[b].flatten().tolist())]
        norm = math.sqrt(sum(e * e for e in gv))
        want.append(sum((e / (norm + c)) ** 2 for e in gv) / D)
    with ops.use_backend("torch"):
        got = ops.trig_tangent_loss(F, x, v, t, dFdt=dF, r=r, sigma_data=sd, c=c)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=0)


@pytest.mark.parametrize("call,msg", [
    (lambda: ops.group_norm_act(torch.ones(1, 4, 2, 2), 2, eps=0.0), r"^eps: expected a positive number, got 0\.0$"),
    (lambda: ops.group_norm_act(torch.ones(1, 4, 2, 2), 2, eps=float("nan")), r"^eps: expected a positive number"),
    (lambda: ops.group_norm_act(torch.ones(1, 6, 2, 2), 4),
     r"^num_groups: expected a positive divisor of the 6 channels, got 4$"),
    (lambda: ops.consistency_loss(torch.ones(2, 3), torch.ones(2, 1), "l2"),
     r"^target: expected the shape of pred \(2, 3\), got \(2, 1\)$"),
    (lambda: ops.consistency_loss(torch.ones(2, 3), torch.zeros(2, 3), "pseudo_huber", 0.0),
     r"^c: expected a positive number for pseudo_huber, got 0\.0$"),
    (lambda: ops.trig_tangent_loss(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2),
                                   F_plus=torch.ones(2, 3), F_minus=torch.ones(2, 3), h=torch.tensor([0.1, 0.0])),
     r"^h: expected positive finite-difference steps, got \[0\.1"),
], ids=["eps-0", "eps-nan", "groups", "loss-shape", "c-0", "h-0"])
def test_op_argument_errors_are_one_clear_line(call, msg):
    """Arguments the math cannot take are refused by the public entry, in one line, before a backend sees them
    (planted, one at a time: eps = 0 and NaN let through; the divisor check dropped, torch's own error instead; a
    target of another shape broadcast into a wrong loss; c = 0 (gradient 0 / 0 at pred = target) and h = 0 (a
    division by zero) let through)."""
    with ops.use_backend("torch"), pytest.raises(ValueError, match=msg):
        call()


@pytest.mark.triton_cpu
@pytest.mark.parametrize("path", ["split", "one-pass", "groups"])
def test_triton_group_norm_eps_inside_the_root_at_small_variance(path, monkeypatch):
    """rstd = 1 / sqrt(var + eps) in every statistics path of the Triton kernels (split partials merged, one program
    a group, several groups a program). The kernel tests draw std 3, where eps = 1e-6 moves rstd by 6e-8 (planted:
    1 / (sqrt(var) + eps), passed); at std 2e-3 eps is a fifth of the variance and the placement shows (12%)."""
    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1" or ops.interpreter_problem():
            pytest.skip("the Triton interpreter cannot run here")
    pytest.importorskip("triton")
    from cmfast.kernels import group_norm_act as k
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if path == "split":          # several programs a group, partials merged
        monkeypatch.setattr(k, "num_sms", lambda device: 132)
        monkeypatch.setattr(k, "MIN_CHUNK", 8)
        monkeypatch.setattr(k, "TILE", 16)
    C = 8 if path == "groups" else 6          # 4 channels a group: the several-groups kernel; 3: one program a group
    x = 1.5 + 2e-3 * torch.randn(2, C, 5, 7, generator=_g(6), dtype=torch.float64)
    x = x.float().double()                    # the values the kernel reads
    want = _gn64(x, 2)
    with ops.use_backend("triton"):
        got = ops.group_norm_act(x.float().to(dev), 2, act=None)
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=2e-3)


@pytest.mark.triton_cpu
@pytest.mark.parametrize("path", ["one-pass", "split"])
def test_triton_group_norm_merges_the_tiles_of_a_program(path, monkeypatch):
    """A program that reads its rows in several tiles merges their per-column statistics with Chan et al.'s formula,
    the between-tile term delta^2 n_a n_b / n included (planted: dropped; the kernel tests' programs each held one
    tile, so it passed). TILE = 16 (one program a group) or 8 with split chunks: 9 and 2 tiles a program."""
    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1" or ops.interpreter_problem():
            pytest.skip("the Triton interpreter cannot run here")
    pytest.importorskip("triton")
    from cmfast.kernels import group_norm_act as k
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(k, "TILE", 16 if path == "one-pass" else 8)
    if path == "split":
        monkeypatch.setattr(k, "num_sms", lambda device: 132)
        monkeypatch.setattr(k, "MIN_CHUNK", 8)
    ramp = torch.linspace(-3, 3, 35, dtype=torch.float64).reshape(1, 1, 5, 7)     # tile means far apart
    x = (ramp + torch.randn(2, 6, 5, 7, generator=_g(7), dtype=torch.float64)).float().double()
    plan = k.Plan(x.float().to(dev), 2)
    assert plan.Cg != plan.BLOCK_C and plan.chunk > plan.BLOCK_HW and (plan.S > 1) == (path == "split")
    want = _gn64(x, 2)
    with ops.use_backend("triton"):
        got = ops.group_norm_act(x.float().to(dev), 2, act=None)
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=1e-5)


def _cuda_wrappers(monkeypatch):
    """cmfast/ops/_cuda.py with its device check relaxed to let CPU tensors reach the checks after it (as
    tests/test_csrc_emulated.py does); those checks run before the extension is touched."""
    from cmfast import _build
    if _build.unavailable_reason():
        pytest.skip(_build.unavailable_reason())
    from _checks import cuda_check_on_cpu

    from cmfast.ops import _cuda
    monkeypatch.setattr(_cuda, "_check", cuda_check_on_cpu)
    monkeypatch.setattr(_cuda, "_ext", lambda device: pytest.fail("the extension was reached"))
    return _cuda


def test_cuda_wrappers_check_their_arguments_before_launching(monkeypatch):
    """The cuda backend's wrappers are called directly too (benchmarks, the emulated tests): each refuses what its
    kernel cannot take, in one line, before a launch (planted one at a time, each passed: the num_groups divisor,
    the loss kind, the act name, pre_bias's shape and sigma's dtype checks removed; a kernel would have read past a
    group, taken kind 'huber' as code -1, or read a float64 sigma as float32 pairs)."""
    _cuda = _cuda_wrappers(monkeypatch)
    x = torch.randn(2, 6, 3, 3)
    cases = [
        (lambda: _cuda.group_norm_act(x, 4, None, None, 1e-6, None, None, "silu"),
         ValueError, r"^num_groups: expected a positive divisor of the 6 channels, got 4$"),
        (lambda: _cuda.group_norm_act(x, 3, None, None, 1e-6, None, None, "gelu"),
         ValueError, r"^act: expected 'silu' or 'none', got 'gelu'$"),
        (lambda: _cuda.group_norm_act(x, 3, None, None, 1e-6, None, None, "silu", pre_bias=torch.ones(3, 6)),
         ValueError, r"^pre_bias: expected shape \(2, 6\) or \(1, 6\), got \(3, 6\)$"),
        (lambda: _cuda.consistency_loss(x, x, "huber", 0.1, None),
         ValueError, r"^kind: expected one of pseudo_huber, l2, l1, got 'huber'$"),
        (lambda: _cuda.skip_output_infer(x, x, torch.ones(2, dtype=torch.float64), 0.5, 0.002, False),
         TypeError, r"^sigma: expected a float32 tensor on cpu, got torch.float64 on cpu$"),
    ]
    for call, err, msg in cases:
        with pytest.raises(err, match=msg):
            call()


@pytest.mark.parametrize("N,C,HW", [(1, 32, 1024), (1, 64, 64), (2, 128, 256), (1, 3, 35)])
def test_cuda_group_norm_split_counts_keep_their_chunk_sizes(N, C, HW, monkeypatch):
    """_num_splits' documented floors: an NHWC chunk holds >= 32 rows, an NCHW chunk >= 256 elements, so a split
    never makes chunks smaller than a block reads (planted: the NHWC bound HW instead of ceil(HW / 32), which the range
    test, 1 <= S <= HW, let through)."""
    _cuda = _cuda_wrappers(monkeypatch)
    for nhwc, rows in ((True, 32), (False, 256)):
        S = _cuda._num_splits(N, C, HW, nhwc, 132)
        assert 1 <= S <= max(1, -(-HW // rows)), (nhwc, S)
    assert _cuda._num_splits(1, 32, 1024, True, 132) == 32      # batch 1 at 32x32 NHWC: 32 chunks of 32 rows


# ---- sampling ------------------------------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    """A stand-in backbone with a closed form: F(x_in, c_noise) = tanh(W x_in + b) + c_noise / 2 (1x1 convolution)."""
    in_channels, img_resolution, label_dim = 2, 4, 0

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.5, -0.7], [0.4, 1.1]]).reshape(2, 2, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.2, -0.3]))

    def forward(self, x, noise_labels, class_labels=None):
        return torch.tanh(self.conv(x)) + noise_labels.reshape(-1, 1, 1, 1) / 2


def _F64(x_in, c_noise):
    W = torch.tensor([[1.5, -0.7], [0.4, 1.1]], dtype=torch.float64)
    b = torch.tensor([0.2, -0.3], dtype=torch.float64)
    return torch.tanh(torch.einsum("dc,bchw->bdhw", W, x_in) + b.reshape(1, 2, 1, 1)) + c_noise / 2


def _f64(x, s, boundary, sd=0.5):
    """c_skip x + c_out F(c_in x, ln(s) / 4) with the CM paper's scalings (boundary 0: EDM's denoiser), float64."""
    c_skip = sd ** 2 / ((s - boundary) ** 2 + sd ** 2)
    c_out = sd * (s - boundary) / math.sqrt(s ** 2 + sd ** 2)
    c_in = 1 / math.sqrt(s ** 2 + sd ** 2)
    return c_skip * x + c_out * _F64(c_in * x, math.log(s) / 4)


def test_edm_sample_returns_the_noise_dtype_and_heun_values():
    """EDM's Heun sampler runs in float64 inside and returns z's dtype (planted: the float64 state returned; the
    transcription test compared got.double()). Values against the sampler written out on the closed-form backbone."""
    den = cmfast.EDMDenoiser(_Net()).eval()
    z = torch.randn(2, 2, 4, 4, generator=_g(5))
    got = cmfast.edm_sample(den, z, num_steps=3)
    assert got.dtype == torch.float32
    rho, lo, hi = 7.0, 0.002, 80.0
    t = [(hi ** (1 / rho) + i / 2 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(3)] + [0.0]
    x = z.double() * t[0]
    for tc, tn in zip(t[:-1], t[1:]):
        d = (x - _f64(x, tc, 0.0)) / tc
        xn = x + (tn - tc) * d
        if tn > 0:
            xn = x + (tn - tc) * (d + (xn - _f64(xn, tn, 0.0)) / tn) / 2
        x = xn
    torch.testing.assert_close(got.double(), x, rtol=0, atol=2e-4)      # the backbone runs in fp32 on |x| ~ 80


def test_auto_engine_keeps_an_edm_teacher_eager_on_cuda(monkeypatch):
    """'auto' samples an EDM teacher with its Heun solver (eager) even on a GPU (planted: auto chose 'graphed' for it
    there, which then refused it); a consistency model on a GPU is graphed. (Parameters shown 'on cuda'.)"""
    import types
    on_cuda = lambda self, recurse=True: iter([types.SimpleNamespace(device=torch.device("cuda"))])  # noqa: E731
    monkeypatch.setattr(cmfast.EDMDenoiser, "parameters", on_cuda)
    monkeypatch.setattr(cmfast.ConsistencyModel, "parameters", on_cuda)
    assert cmfast.sampling.resolve_engine("auto", cmfast.EDMDenoiser(_Net())) == "eager"
    assert cmfast.sampling.resolve_engine("auto", cmfast.ConsistencyModel(_Net())) == "graphed"


@pytest.mark.parametrize("sigmas,ok", [((90.0, 1.0), False), ((80.0, 1.0, 0.001), False), ((80.0000001, 0.002), True)])
def test_every_level_is_checked_against_the_model_range(sigmas, ok):
    """Algorithm 1's levels must all lie in [sigma_min, sigma_max]: the first against sigma_max, the last against
    sigma_min (planted: the upper bound tested on the last level; a single out-of-range level, the only case the
    other tests try, is both). 80.0000001 is inside the 1e-6 relative slack."""
    model = cmfast.ConsistencyModel(_Net()).eval()
    z = torch.randn(1, 2, 4, 4, generator=_g(8))
    if ok:
        assert cmfast.sample(model, z, sigmas).shape == z.shape
    else:
        with pytest.raises(ValueError, match=r"^sigmas: expected levels in \[0\.002, 80\.0\], got "):
            cmfast.sample(model, z, sigmas)


class _Labels(torch.nn.Module):
    """A class-conditional stand-in (3 classes) whose image is the label it was given; it checks nothing itself."""
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Module()
        self.net.in_channels, self.net.img_resolution, self.net.label_dim = 1, 2, 3
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        return class_labels.to(x.dtype).reshape(-1, 1, 1, 1).expand_as(x).clone()


def test_generate_batches_class_label_range():
    """class_label must be a class of the model, 0 <= label < label_dim (planted: <= label_dim, which the UNet's own
    check happened to catch with the same words; a network that does not check sampled class 3 of 3)."""
    from cmfast.sampling import generate_batches
    got = torch.cat([x for _, x in generate_batches(_Labels(), 3, sigmas=(80.0,), class_label=2, engine="eager")])
    assert got.flatten().tolist() == [2.0] * 12
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"^class label: expected 0 <= label < 3, got {bad}$"):
            next(generate_batches(_Labels(), 3, sigmas=(80.0,), class_label=bad, engine="eager"))


def test_edm_sample_passes_the_labels_to_every_evaluation():
    """A class-conditional teacher gets its labels at every evaluation of the Heun sampler (planted: dropped from the
    first evaluation of each step). With a denoiser D(x, t) = c (the label) the ODE dx/dt = (x - c) / t is solved
    exactly by each Euler and Heun step: x(t) = c + (x0 - c) t / t0, so the sample is c exactly."""
    den = _Labels()
    z = torch.randn(3, 1, 2, 2, generator=_g(9))
    got = cmfast.edm_sample(den, z, num_steps=4, class_labels=torch.tensor([2, 0, 1]))
    torch.testing.assert_close(got, torch.tensor([2.0, 0.0, 1.0]).reshape(3, 1, 1, 1).expand_as(z), rtol=0,
                               atol=1e-9)


def test_generate_batches_graphs_at_most_num_images(monkeypatch):
    """The graphed engine captures its sampler at min(batch_size, num) (planted: at batch_size, which captured and
    replayed a 256-image graph for 3 images)."""
    seen = []

    class Sampler:
        def __init__(self, model, batch_size, shape, **kw):
            seen.append(batch_size)
            self.B = batch_size

        def __call__(self, seed=None, class_labels=None):
            return torch.zeros(self.B, 1, 2, 2)
    monkeypatch.setattr(cmfast.graphed, "GraphedSampler", Sampler)
    monkeypatch.setattr(cmfast.sampling, "resolve_engine", lambda engine, model, dtype=None: "graphed")
    out = list(cmfast.sampling.generate_batches(_Labels(), 3, sigmas=(80.0,), batch_size=8, class_label=1))
    assert seen == [3] and [b0 for b0, _ in out] == [0] and out[0][1].shape == (3, 1, 2, 2)


# ---- graphed.py on CPU: the captured computation run uncaptured ---------------------------------------------------
def _sampler(monkeypatch, model, batch, sigmas, **kw):
    monkeypatch.setattr(cmfast.graphed, "_cuda_device", lambda net: next(net.parameters()).device)
    return cmfast.GraphedSampler(model, batch, (2, 4, 4), dtype=torch.float32, sigmas=sigmas, **kw)


def _algorithm_1(z, noises, sigmas, boundary, sigma_min=0.002):
    x = _f64(sigmas[0] * z.double(), sigmas[0], boundary)
    for s, n in zip(sigmas[1:], noises):
        x = _f64(x + math.sqrt(s * s - sigma_min ** 2) * n.double(), s, boundary)
    return x.clamp(-1, 1)


@pytest.mark.parametrize("wrap,sigma_min,boundary", [(cmfast.ConsistencyModel, 0.002, 0.002),
                                                     (cmfast.ConsistencyModel, 0.02, 0.02),
                                                     (cmfast.EDMDenoiser, 0.002, 0.0)],
                         ids=["consistency-model", "sigma-min-0.02", "edm-denoiser"])
def test_graphed_algorithm_against_float64(monkeypatch, wrap, sigma_min, boundary):
    """The graph's computation (run uncaptured) is Algorithm 1 with the model's own boundary in c_skip, c_out
    (sigma_min for a consistency model, 0 for an EDM denoiser) and its own sigma_min in the noise scale
    sqrt(s^2 - sigma_min^2) (planted: sigma_min as the boundary of both; sigma_min taken as 0.002 whatever the
    model's; the noise scaled by s: tests/test_graphed.py's levels, 2 and 0.5, hide that under its 1e-5 tolerance).
    A low last level, 0.05, makes each error visible (4% of c_out; 8% of the noise's scale at sigma_min 0.02)."""
    sigmas = (80.0, 0.05)
    sampler = _sampler(monkeypatch, wrap(_Net(), sigma_min=sigma_min).eval(), 2, sigmas, channels_last=False)
    out = sampler._run_uncaptured(seed=3)
    gen = _g(3)
    z = torch.randn(2, 2, 4, 4, generator=gen)
    n = torch.randn(2, 2, 4, 4, generator=gen)
    want = _algorithm_1(z, [n], sigmas, boundary, sigma_min)
    assert (want.abs() < 1).float().mean() > 0.9
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5)


def test_graphed_sampler_dtypes(monkeypatch):
    """The backbone runs in bfloat16, float16 or float32 (autocast's dtypes); float64 is refused at construction
    (planted: accepted, to fail or be ignored by autocast at the first call)."""
    model = cmfast.ConsistencyModel(_Net()).eval()
    with pytest.raises(TypeError, match=r"^dtype: expected torch\.bfloat16, torch\.float16 or torch\.float32, "
                                        r"got torch\.float64$"):
        cmfast.GraphedSampler(model, 2, (2, 4, 4), dtype=torch.float64)


def test_graphed_batch_size_argument_and_graph_keys(monkeypatch):
    """batch_size= runs that many images (planted: the default batch size used whatever was asked), and each
    (batch size, uint8, ops backend) has its own graph buffers (planted: a key without the backend: a graph captured
    under one backend replayed under another)."""
    sampler = _sampler(monkeypatch, cmfast.ConsistencyModel(_Net()).eval(), 2, (80.0,))
    out = sampler._run_uncaptured(seed=1, batch_size=3)
    assert out.shape == (3, 2, 4, 4)
    z = torch.randn(3, 2, 4, 4, generator=_g(1))
    torch.testing.assert_close(out.double(), _algorithm_1(z, [], (80.0,), 0.002), rtol=0, atol=2e-5)
    keys = set()
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            for B, u8 in ((None, False), (None, True), (3, False)):
                keys.add(sampler._buffers(B, u8)[0])
    assert len(keys) == 6


# ---- editing ------------------------------------------------------------------------------------------------------
def test_fit_box_reaches_a_kept_value_near_saturation():
    """The last replacement's box fit finds, per group, the nearest image in [-1, 1] with the kept coefficient; the
    bisection's range must let every pixel of a group saturate (planted: the bound without its + 1, which left the
    blue of a near-white kept luminance at 0: luminance 0.886 instead of 0.999)."""
    Q = edit.luminance_basis()
    A = lambda x: torch.einsum("bchw,cd->bdhw", x, Q)                  # noqa: E731
    A_inv = lambda c: torch.einsum("bdhw,cd->bchw", c, Q)              # noqa: E731
    known = torch.tensor([1.0, 0, 0]).reshape(1, 3, 1, 1)
    lum = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)
    y = torch.full((1, 3, 1, 1), 0.999)                                # a near-white reference pixel
    kept = A(y) * known
    x = torch.tensor([0.3, 0.2, -1.2]).reshape(1, 3, 1, 1)            # its generated colour, blue out of range
    out = edit._fit_box(x, kept, A, A_inv, known).double()
    assert out.abs().max() <= 1
    torch.testing.assert_close((out.flatten() * lum).sum(), (lum * 0.999).sum(), rtol=0, atol=2e-6)
    # the nearest such point is clamp(x + lam w) for one lam: R and G saturate at 1, B = (Y - wR - wG) / wB
    want_b = (0.999 * float(lum.sum()) - float(lum[0]) - float(lum[1])) / float(lum[2])
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 1.0, want_b], dtype=torch.float64), rtol=0,
                               atol=2e-5)
