"""cmfast.fd_jvp: finite-difference JVP against torch.func.jvp (fp64 truth), shared dropout masks, attention
backends, argument errors."""
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


@pytest.mark.parametrize("name", list(NETS))
def test_fd_matches_exact_jvp_fp64_and_fp32(name):
    torch.manual_seed(0)
    net = NETS[name]()
    if name != "tiny-unet":
        for p in net.parameters():
            nn.init.normal_(p, std=0.3)
    primals, tangents = _inputs()
    _, truth = exact_jvp(fp64_call(net), primals, tangents, precision="fp64")
    out64, jvp64 = fd_jvp(fp64_call(net), primals, tangents, eps=1e-5, relative_to=primals[1], precision="fp64")
    out32, jvp32 = fd_jvp(net, primals, tangents, eps=1e-3, relative_to=primals[1], precision="fp32")
    assert _rel(jvp64, truth) < 1e-6
    assert _rel(jvp32, truth) < 1e-3
    assert jvp32.dtype == torch.float32 and jvp64.dtype == torch.float64
    # the first output is the mean of the two evaluations: fn(p) + O(h^2)
    f64 = fp64_call(net)(primals[0].double(), primals[1].double())
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
    torch.testing.assert_close(out, online.detach(), rtol=1e-4, atol=1e-5)
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
    with pytest.raises(ValueError, match="positive step"):
        fd_jvp(torch.sin, (x,), (x,), eps=0.0)
    with pytest.raises(NotImplementedError, match="alpha_dropout"):
        fd_jvp(lambda y: F.alpha_dropout(y, 0.5, True), (x,), (x,))


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
