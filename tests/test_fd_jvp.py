"""cmfast.fd_jvp: finite-difference JVP against torch.func.jvp (fp64 truth), shared dropout masks, attention
backends, argument errors."""
import functools
import os

import torch

if not torch.cuda.is_available():   # the triton-backend case runs its kernels in the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import cmfast  # noqa: E402
from cmfast import ops  # noqa: E402
from cmfast.jvp import dropout_masks, exact_jvp, fd_jvp, fp64_call  # noqa: E402


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


class GNNet(nn.Module):
    """conv - GroupNorm+SiLU (cmfast.ops) - conv, with a time input (t scales the GroupNorm)."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x, t):
        y = self.c0(x)
        scale = torch.sin(t)[:, None].expand(-1, 8).to(y.dtype)
        return self.c1(ops.group_norm_act(y, 4, self.w, None, 1e-6, scale=scale, act="silu"))


class AttnNet(nn.Module):
    """Self-attention over pixels through cmfast.ops.attention, time added to the queries."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Conv2d(3, 24, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x, t):
        B, _, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, 3, 1, 8, H * W).transpose(-1, -2).unbind(1)
        q = q + torch.cos(t).reshape(B, 1, 1, 1).to(q.dtype)
        a = ops.attention(q, k, v).transpose(-1, -2).reshape(B, 8, H, W)
        return self.proj(a) + x


def _tiny():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=8, attn_resolutions=(4,))
    for p in net.parameters():   # EDM init zeroes the output convs: randomize so the JVP is not ~0
        nn.init.normal_(p, std=0.1)
    return net.eval()


NETS = {"groupnorm": GNNet, "attention": AttnNet, "tiny-unet": _tiny}


def _inputs(B=3, H=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, H, generator=g)
    t = torch.rand(B, generator=g) * 1.4 + 0.1
    v = torch.randn(B, 3, H, H, generator=g)
    return (x, t), (v, torch.ones(B))


@functools.lru_cache(maxsize=None)
def _case(name):
    """(net, primals, tangents, fp64 torch.func.jvp, fp64 fn(primals)) of NETS[name], computed once per module:
    the fp64 references of the tiny UNet take seconds on CPU."""
    torch.manual_seed(0)
    net = NETS[name]()
    if name != "tiny-unet":
        for p in net.parameters():
            nn.init.normal_(p, std=0.3)
    primals, tangents = _inputs()
    _, truth = exact_jvp(fp64_call(net), primals, tangents, precision="fp64")
    f64 = fp64_call(net)(primals[0].double(), primals[1].double())
    return net, primals, tangents, truth, f64


# The fp32 2-point estimate at eps 1e-3 is fp32 rounding over the step: its relative error over 60 seeds (net init,
# inputs) was at most 6.2e-4 / 2.2e-4 / 2.3e-3 (median 2.4e-4 / 1.2e-4 / 7.0e-4; the tiny UNet failed 1e-3 at 16 of
# them). bf16 at the same step errs by more than 4000x as much.
FP32_REL_BOUND = {"groupnorm": 2e-3, "attention": 1e-3, "tiny-unet": 7e-3}


@pytest.mark.parametrize("name", list(NETS))
def test_fd_matches_exact_jvp_fp64_and_fp32(name):
    net, primals, tangents, truth, f64 = _case(name)
    out64, jvp64 = fd_jvp(fp64_call(net), primals, tangents, eps=1e-5, relative_to=primals[1], precision="fp64")
    out32, jvp32 = fd_jvp(net, primals, tangents, eps=1e-3, relative_to=primals[1], precision="fp32")
    assert _rel(jvp64, truth) < 1e-6
    assert _rel(jvp32, truth) < FP32_REL_BOUND[name]
    assert jvp32.dtype == torch.float32 and jvp64.dtype == torch.float64
    # the first output is the mean of the two evaluations: fn(p) + O(h^2)
    assert _rel(out64, f64) < 1e-9
    # bf16 differences are noise at the same step (the reason the precision is a setting)
    _, jvp_bf = fd_jvp(net, primals, tangents, eps=1e-3, relative_to=primals[1], precision="bf16")
    assert _rel(jvp_bf, truth) > 10 * _rel(jvp32, truth)


def test_fd_is_one_forward_of_twice_the_batch():
    net, calls = GNNet(), []
    net.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0], torch.is_grad_enabled())))
    primals, tangents = _inputs(B=5)
    fd_jvp(net, primals, tangents)
    assert calls == [(10, False)]


def test_dropout_masks_are_shared_by_both_halves():
    # fn = dropout(x): with a zero tangent any mask difference between the halves shows up as a huge JVP; with the
    # tangent = x the JVP must equal the mean output exactly (linear in x with ONE mask).
    torch.manual_seed(0)
    x = torch.randn(4, 64, 5)
    fn = lambda y: F.dropout(y, p=0.5, training=True)  # noqa: E731
    out, jvp0 = fd_jvp(fn, (x,), (torch.zeros_like(x),), eps=1e-3)
    assert torch.count_nonzero(out) < 0.7 * out.numel()     # dropout did act
    assert torch.equal(jvp0, torch.zeros_like(x))
    out, jvp = fd_jvp(fn, (x,), (x,), eps=0.25)
    torch.testing.assert_close(jvp, out, rtol=1e-6, atol=1e-6)
    # the masks are drawn for B and tiled: the same holds inside a module using nn.Dropout and UNet's F.dropout
    net = cmfast.UNet.from_preset("tiny", img_resolution=8, attn_resolutions=(4,), dropout=0.5).train()
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    primals, tangents = _inputs(B=2)
    _, jvp0 = fd_jvp(net, primals, (torch.zeros_like(tangents[0]), torch.zeros_like(tangents[1])))
    assert torch.equal(jvp0, torch.zeros_like(jvp0))
    # without the mode the halves do get different masks (the test above could fail)
    with torch.no_grad():
        y = net(torch.cat([primals[0]] * 2), torch.cat([primals[1]] * 2))
    assert not torch.allclose(y[:2], y[2:])


def test_recorded_masks_replay_in_fd_and_exact():
    # the online forward records its masks; the JVP (fd and exact) then differentiates THAT network
    net = cmfast.UNet.from_preset("tiny", img_resolution=8, attn_resolutions=(4,), dropout=0.3).train()
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    primals, tangents = _inputs(B=2)
    masks = []
    with dropout_masks(record=masks):
        online = net(*primals)
    blocks = sum(isinstance(m, cmfast.nets.UNetBlock) for m in net.modules())
    assert len(masks) == blocks and all(m.shape[0] == 2 for m in masks)   # one F.dropout per residual block
    out, jvp = fd_jvp(net, primals, tangents, relative_to=primals[1], replay=masks)
    # out = (f(p + h v) + f(p - h v)) / 2 = f(p) + O(h^2), h = 1e-2 t: over 40 seeds that truncation took up to 1.02x
    # of rtol 1e-4 / atol 1e-5 (0.84x at this seed), <= 0.2x of this tolerance; one recorded mask redrawn: >= 13x.
    torch.testing.assert_close(out, online.detach(), rtol=5e-4, atol=5e-5)
    _, truth = exact_jvp(net, primals, tangents, replay=masks)
    assert _rel(jvp, truth) < 1e-3


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_cpu)])
def test_fd_runs_with_any_attention_backend(backend):
    # the finite difference needs forwards only, so the fused kernels (no forward-AD formula) serve it
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the triton backend runs on CPU only under TRITON_INTERPRET=1")
    net = AttnNet()
    primals, tangents = _inputs(B=2, H=4)
    _, truth = exact_jvp(fp64_call(net), primals, tangents, precision="fp64")
    with ops.use_backend(backend):
        _, jvp = fd_jvp(net, primals, tangents, relative_to=primals[1])
    assert _rel(jvp, truth) < 1e-3


def test_exact_jvp_needs_math_attention():
    # why exact_jvp switches SDPA to the math kernel: the fused CPU kernel has no forward-AD formula
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, a, a), (q,), (q,))
    net = AttnNet()
    primals, tangents = _inputs(B=2, H=4)
    _, jvp = exact_jvp(net, primals, tangents)
    assert torch.isfinite(jvp).all()


def test_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="tangent 0"):
        fd_jvp(torch.sin, (x,), (torch.randn(3, 3),))
    with pytest.raises(ValueError, match="method"):
        fd_jvp(torch.sin, (x,), (x,), method="forward")
    with pytest.raises(ValueError, match="precision"):
        fd_jvp(torch.sin, (x,), (x,), precision="fp8")
    with pytest.raises(ValueError, match=r"positive step \(number or \(2,\)\), got steps \[0.0, 0.0\]"):
        fd_jvp(torch.sin, (x,), (x,), eps=0.0)      # it said 'got shape (2,)': the shape was right, the value not
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        fd_jvp(torch.sin, (x,), (x,), eps=torch.ones(3))
    with pytest.raises(NotImplementedError, match="alpha_dropout"):
        fd_jvp(lambda y: F.alpha_dropout(y, 0.5, True), (x,), (x,))


# ---- order=4: the 4-point stencil ---------------------------------------------------------------------------------
def test_fourth_order_error_falls_like_h4():
    # f(x) = sin(3x) e^x in fp64 (no rounding at these steps): halving eps divides the 4-point error by 2^4 = 16
    # (measured 15.9, 16.0, 16.0 over eps 0.1 -> 0.0125) and the 2-point one by 4; the 4-point primal estimate
    # (-f(2h) + 4 f(h) + 4 f(-h) - f(-2h)) / 6 is O(h^4) as well
    x = torch.linspace(0.2, 1.5, 7, dtype=torch.float64).reshape(7, 1)
    fn = lambda y: torch.sin(3 * y) * torch.exp(y)  # noqa: E731
    truth = (3 * torch.cos(3 * x) + torch.sin(3 * x)) * torch.exp(x)
    err = {}
    for order in (2, 4):
        for eps in (0.1, 0.05, 0.025):
            out, jvp = fd_jvp(fn, (x,), (torch.ones_like(x),), eps, precision="fp64", order=order)
            err[order, eps] = (_rel(jvp, truth), _rel(out, fn(x)))
    for e, e2 in ((0.1, 0.05), (0.05, 0.025)):
        assert 14 < err[4, e][0] / err[4, e2][0] < 18, err
        assert 14 < err[4, e][1] / err[4, e2][1] < 18, err
        assert 3.5 < err[2, e][0] / err[2, e2][0] < 4.5, err
        assert err[4, e][0] < err[2, e][0] / 50
    # the folded pair of fd_pair (what the fused sCM loss takes) gives the same derivative
    from cmfast.jvp import fd_pair, fd_step
    h = fd_step(0.05, None, 7, "cpu")
    Fp, Fm = fd_pair(fn, (x,), (torch.ones_like(x),), h, "fp64", order=4)
    torch.testing.assert_close((Fp - Fm) / (2 * h[:, None]),
                               fd_jvp(fn, (x,), (torch.ones_like(x),), 0.05, precision="fp64", order=4)[1])


@pytest.mark.parametrize("name", list(NETS))
def test_fourth_order_matches_exact_jvp_fp64(name):
    # measured (fp64, vs torch.func.jvp): eps 1e-3 -> 4e-12 / 2e-13 / 1e-12 (groupnorm / attention / tiny UNet);
    # at eps 3e-2 the 4-point error is 4e-6 / 9e-8 / 9e-7 against 2-point 9e-4 / 9e-5 / 3e-4
    net, primals, tangents, truth, f64 = _case(name)
    fn64 = fp64_call(net)
    out, jvp = fd_jvp(fn64, primals, tangents, eps=1e-3, relative_to=primals[1], precision="fp64", order=4)
    assert _rel(jvp, truth) < 1e-6 and jvp.dtype == torch.float64
    assert _rel(out, f64) < 1e-9
    _, j2 = fd_jvp(fn64, primals, tangents, eps=3e-2, relative_to=primals[1], precision="fp64")
    _, j4 = fd_jvp(fn64, primals, tangents, eps=3e-2, relative_to=primals[1], precision="fp64", order=4)
    assert _rel(j4, truth) < _rel(j2, truth) / 20
    # fp32 (TF32 off) at a 4-point step: as good as the 2-point default
    _, j32 = fd_jvp(net, primals, tangents, eps=3e-2, relative_to=primals[1], precision="fp32", order=4)
    assert _rel(j32, truth) < 1e-3 and j32.dtype == torch.float32


def test_fourth_order_is_one_forward_of_four_times_the_batch():
    net, calls = GNNet(), []
    net.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0], torch.is_grad_enabled())))
    primals, tangents = _inputs(B=5)
    fd_jvp(net, primals, tangents, order=4)
    assert calls == [(20, False)]


def test_dropout_masks_are_shared_by_all_four_evaluations():
    # as for two points: a zero tangent gives exactly zero, the tangent x (fn linear in x with ONE mask m) gives
    # exactly m x for both outputs: the stencils' weights sum to 1 (primal) and to 12 h / (12 h) (derivative)
    torch.manual_seed(0)
    x = torch.randn(4, 64, 5)
    fn = lambda y: F.dropout(y, p=0.5, training=True)  # noqa: E731
    out, jvp0 = fd_jvp(fn, (x,), (torch.zeros_like(x),), eps=1e-3, order=4)
    assert torch.count_nonzero(out) < 0.7 * out.numel()     # dropout did act
    assert torch.equal(jvp0, torch.zeros_like(x))
    out, jvp = fd_jvp(fn, (x,), (x,), eps=0.25, order=4)
    torch.testing.assert_close(jvp, out, rtol=1e-6, atol=1e-6)
    kept = (out / x)[out != 0]             # out = m x with m in {0, 1 / (1 - p)}: the primal saw the same mask too
    torch.testing.assert_close(kept, torch.full_like(kept, 2.0))
    # inside the UNet (F.dropout per residual block): zero tangent -> exactly zero; the four quarters of a plain
    # no-grad forward would differ
    net = cmfast.UNet.from_preset("tiny", img_resolution=8, attn_resolutions=(4,), dropout=0.5).train()
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    primals, tangents = _inputs(B=2)
    _, jvp0 = fd_jvp(net, primals, (torch.zeros_like(tangents[0]), torch.zeros_like(tangents[1])), order=4)
    assert torch.equal(jvp0, torch.zeros_like(jvp0))
    # recorded masks of an online forward replay into all four quarters: F and dF/dt see one network
    masks = []
    with dropout_masks(record=masks):
        online = net(*primals)
    out, jvp = fd_jvp(net, primals, tangents, eps=3e-2, relative_to=primals[1], replay=masks, order=4)
    torch.testing.assert_close(out, online.detach(), rtol=1e-4, atol=1e-5)
    _, truth = exact_jvp(net, primals, tangents, replay=masks)
    assert _rel(jvp, truth) < 1e-3


def test_bad_order_is_a_one_line_value_error():
    from cmfast.trigflow import TrigFlowModel, sct_loss
    x = torch.randn(2, 3)
    for bad in (3, 1, "4", True, None):
        with pytest.raises(ValueError, match=r"^order: expected 2 or 4") as e:
            fd_jvp(torch.sin, (x,), (x,), order=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^order: expected 2 or 4"):
        fd_jvp(torch.sin, (x,), (x,), method="exact", order=3)
    with pytest.raises(ValueError, match=r"^order: expected 2 or 4"):
        sct_loss(TrigFlowModel(_tiny()), torch.randn(2, 3, 8, 8), order=3)


def test_training_accepts_fd_order(capsys):
    # cmfast-train --method sct --method-arg fd_order=4: resolved into method_args, a bad value is the CLI's one
    # line error before any data or model; one tiny sCT step with order 4 gives a finite loss close to the exact
    # JVP's, class-conditional included (labels tiled over the four quarters)
    from cmfast.cli.train import main as train_main
    from cmfast.training.config import resolve
    from cmfast.training.methods import get_method
    from cmfast.trigflow import sct_loss
    base = dict(method="sct", dataset="fashion-mnist")
    assert resolve(dict(base, method_args={"fd_order": 4}))["method_args"]["fd_order"] == 4
    assert resolve(base)["method_args"]["fd_order"] == 2                     # the default is unchanged
    with pytest.raises(ValueError, match=r"^fd_order: expected 2 or 4"):
        resolve(dict(base, method_args={"fd_order": 3}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_main(["--method", "sct", "--dataset", "fashion-mnist", "--method-arg", "fd_order=8", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "fd_order: expected 2 or 4" in err, err

    sct = get_method("sct")
    cfg = dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0,
               method_args=dict(sct.defaults, warmup_steps=0, fd_order=4, fd_eps=3e-2))
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=8, attn_resolutions=(4,), label_dim=4)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    models = sct.build(net, cfg)
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    y = torch.tensor([0, 3, 1])
    loss, _ = sct.loss(models, x0, 5, cfg, torch.Generator().manual_seed(3), class_labels=y)
    loss.mean().backward()
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    assert all(torch.isfinite(p.grad).all() for p in models["model"].parameters() if p.grad is not None)
    exact = sct_loss(models["model"], x0, jvp="exact", warmup_steps=0, generator=torch.Generator().manual_seed(3),
                     class_labels=y)
    torch.testing.assert_close(loss.detach(), exact.detach(), rtol=1e-4, atol=1e-5)


def test_precision_mode_sets_and_restores_tf32_and_autocast():
    from cmfast.jvp import precision_mode
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = (mm.allow_tf32, cudnn.allow_tf32)
    with precision_mode("fp32", torch.device("cpu")):
        assert (mm.allow_tf32, cudnn.allow_tf32) == (False, False) and not torch.is_autocast_enabled("cpu")
    with precision_mode("tf32", torch.device("cpu")):
        assert (mm.allow_tf32, cudnn.allow_tf32) == (True, True)
    assert (mm.allow_tf32, cudnn.allow_tf32) == old
    with torch.autocast("cpu", torch.bfloat16), precision_mode("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")    # the fd forwards leave the training loop's autocast
    with precision_mode("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with precision_mode("fp16", torch.device("cpu")):     # fp16 is fp16, not bf16 (that mutation passed every test)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16


@pytest.mark.parametrize("order", [2, 4])
def test_fp16_forwards_inside_a_bf16_step(order):
    # The H100 run's sct-fd4-fp16 rows failed ('mat1 and mat2 must have the same dtype, Half and BFloat16'): the
    # training step's bf16 autocast had cached bf16 copies of the weights, and the tangent's fp16 autocast, nested
    # in it, was handed those. The fd forwards now run without autocast's cache: same numbers as outside the step.
    net = _tiny()
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3) + 0.2
    tangents = (torch.randn_like(x), torch.ones_like(t))
    fn = lambda a, s: net(a, s, None)  # noqa: E731
    alone = fd_jvp(fn, (x, t), tangents, eps=0.1, precision="fp16", order=order)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, t, None)                                 # the step's own forward fills the bf16 weight cache
        nested = fd_jvp(fn, (x, t), tangents, eps=0.1, precision="fp16", order=order)
        assert net(x, t, None).dtype == torch.bfloat16  # and the step's autocast is unchanged after it
    for a, b in zip(alone, nested):
        assert torch.equal(a, b)


def test_relative_step_has_a_floor_near_t_0():
    """h = eps * max(|t|, floor): relative to |t|, but never below eps * floor, so a time at (or next to) 0 still
    gets a usable step (without the floor t = 0 was a zero step, and t = 1e-6 a step fp32 cannot resolve)."""
    from cmfast.jvp import DEFAULT_FLOOR, fd_step
    t = torch.tensor([0.0, 1e-6, -0.5, 1.2], dtype=torch.float64)
    want = torch.tensor([1e-5, 1e-5, 5e-3, 1.2e-2], dtype=torch.float64)
    assert DEFAULT_FLOOR == 1e-3
    torch.testing.assert_close(fd_step(1e-2, t, 4, "cpu"), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(fd_step(1e-2, t, 4, "cpu", floor=1e-2), torch.tensor([1e-4, 1e-4, 5e-3, 1.2e-2],
                               dtype=torch.float64), rtol=1e-12, atol=0)
    x = t.reshape(4, 1)
    _, jvp = fd_jvp(lambda y: torch.sin(3 * y), (x,), (torch.ones_like(x),), 1e-2, relative_to=t, precision="fp64")
    torch.testing.assert_close(jvp, 3 * torch.cos(3 * x), rtol=1e-3, atol=0)    # O(h^2) at t = 1.2


def test_relative_step_floor_argument_against_the_cubic():
    """fd_jvp's step h = eps max(|t|, floor) with the caller's floor: for fn(x) = x^3 the central difference is exactly
    ((x + h v)^3 - (x - h v)^3) / (2 h) = 3 x^2 v + h^2 v^3, so the estimate shows h (float64 throughout). Before,
    fd_jvp that used the default floor whatever its argument passed every test."""
    x = torch.tensor([[0.7, -1.3], [2.0, 0.4], [-0.5, 1.1]], dtype=torch.float64)
    v = torch.tensor([[1.5, 2.0], [-3.0, 0.5], [2.5, -1.0]], dtype=torch.float64)
    t = torch.tensor([1e-4, 0.02, 0.8], dtype=torch.float64)
    for floor in (1e-3, 0.05, 0.5):
        _, d = fd_jvp(lambda a: a ** 3, x, v, 0.2, relative_to=t, floor=floor, precision="fp64")
        h = (0.2 * torch.clamp(t.abs(), min=floor)).reshape(-1, 1)
        torch.testing.assert_close(d, 3 * x ** 2 * v + h ** 2 * v ** 3, rtol=1e-12, atol=1e-12)
