"""The UNet presets: sizes of EDM's CIFAR-10 networks, FLOPs, shapes, conditioning, memory formats, errors."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cmfast
from cmfast.nets import PRESETS


def _params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name,want", [("ddpmpp-cifar10", 55.7e6), ("ncsnpp-cifar10", 56.4e6)])
def test_cifar10_parameter_counts_match_edm(name, want):
    # EDM reports 55.73M (DDPM++) and 56.38M (NCSN++) for its CIFAR-10 networks.
    assert abs(_params(cmfast.UNet.from_preset(name)) - want) / want < 0.01


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_runs(name):
    with torch.device("meta"):  # shapes only
        net = cmfast.UNet.from_preset(name).eval()
        r = net.img_resolution
        labels = torch.zeros(1, dtype=torch.long) if net.label_dim else None
        y = net(torch.randn(1, net.in_channels, r, r), torch.zeros(1), labels)
    assert y.shape == (1, net.out_channels, r, r)


def test_small_presets_sizes():
    assert 0.8e6 <= _params(cmfast.UNet.from_preset("fmnist-small")) <= 1.3e6   # 3 fp32 copies < 16 MiB
    assert _params(cmfast.UNet.from_preset("tiny")) <= 0.5e6


def test_ddpmpp_flops_per_image():
    with torch.device("meta"):  # shapes only: FLOPs are counted without computing anything
        net = cmfast.UNet.from_preset("ddpmpp-cifar10").eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            net(torch.randn(1, 3, 32, 32), torch.zeros(1))
    assert fc.get_total_flops() / 1e9 == pytest.approx(42.4, rel=0.02)


def test_forward_shapes_and_determinism():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 16, 16)
    y = net(x, torch.tensor([0.1, -0.5]))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(y, net(x, torch.tensor([0.1, -0.5])))
    # the noise level reaches the output
    assert not torch.allclose(y, net(x, torch.tensor([1.0, 1.0])))


def test_channels_last_gives_same_output():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16, adaptive_scale=False).eval()
    # output convs start near zero (EDM init): randomize so the comparison means something
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 16, 16)
    y = net(x, torch.zeros(2))
    net_cl = net.to(memory_format=torch.channels_last)
    y_cl = net_cl(x.to(memory_format=torch.channels_last), torch.zeros(2))
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-4)


def test_class_conditioning():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16, label_dim=10).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 16, 16)
    a = net(x, torch.zeros(2), torch.tensor([1, 2]))
    b = net(x, torch.zeros(2), torch.tensor([3, 4]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.zeros(2))


@pytest.mark.parametrize("arch", ["song", "adm"])
def test_class_labels_must_fit_the_batch_and_the_network(arch):
    """Labels given to an unconditional net were ignored (unconditional images, no word); one label for a batch of
    two was broadcast over it, and three failed inside an add with torch's 'size of tensor a (2) must match'."""
    kw = dict(model_channels=64, channel_mult=(1,), num_blocks=1, attn_resolutions=()) if arch == "adm" else {}
    cond = cmfast.UNet.from_preset("tiny", img_resolution=16, arch=arch, label_dim=10, **kw).eval()
    plain = cmfast.UNet.from_preset("tiny", img_resolution=16, arch=arch, **kw).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"class_labels: this network is unconditional"):
        plain(x, torch.zeros(2), torch.tensor([1, 2]))
    for bad in (torch.tensor([1]), torch.tensor([1, 2, 3]), torch.eye(10)[:1], torch.eye(10)[:3]):
        with pytest.raises(ValueError, match=rf"class_labels: expected one label per image \(2\), got {len(bad)}$"):
            cond(x, torch.zeros(2), bad)
    assert cond(x, torch.zeros(2), torch.tensor([1, 2])).shape == x.shape
    meta = cmfast.UNet.from_preset("tiny", img_resolution=16, arch=arch, label_dim=10, **kw).eval().to("meta")
    with pytest.raises(ValueError, match=r"^class_labels: expected a tensor on meta \(the images' device\), got one "
                                         r"on cpu$"):     # 'meta' stands in for CUDA: torch's device error before
        meta(x.to("meta"), torch.zeros(2, device="meta"), torch.tensor([1, 2]))
    assert meta(x.to("meta"), torch.zeros(2, device="meta"), [1, 2]).device.type == "meta"   # a list: made there
    consts = cond.constants(torch.zeros(1), torch.tensor([1, 2]))     # one noise level for the batch: as before
    torch.testing.assert_close(cond(x, None, constants=consts), cond(x, torch.zeros(2), torch.tensor([1, 2])),
                               rtol=1e-5, atol=1e-6)


def test_ncsnpp_small_runs():
    net = cmfast.UNet.from_preset("ncsnpp-cifar10", img_resolution=16, model_channels=16, num_blocks=1).eval()
    y = net(torch.randn(1, 3, 16, 16), torch.zeros(1))
    assert y.shape == (1, 3, 16, 16)


def test_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        cmfast.UNet.from_preset("resnet")
    net = cmfast.UNet.from_preset("tiny", img_resolution=16)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 16, 16\)"):
        net(torch.randn(1, 1, 16, 16), torch.zeros(1))
    assert set(PRESETS) >= {"ddpmpp-cifar10", "ncsnpp-cifar10", "fmnist-small", "tiny"}


@pytest.mark.parametrize("bad, msg", [(dict(in_channels=0), "in_channels: expected an integer >= 1, got 0"),
                                      (dict(model_channels=-1), "model_channels: expected an integer >= 1, got -1"),
                                      (dict(dropout=2.0), r"dropout: expected a probability in \[0, 1\), got 2.0"),
                                      (dict(label_dim=-1), "label_dim: expected an integer >= 0, got -1"),
                                      (dict(channel_mult=()), r"channel_mult: expected one or more integers >= 1"),
                                      (dict(img_resolution=32.0), "img_resolution: expected an integer >= 1")])
def test_sizes_are_checked_at_construction(bad, msg):
    """A negative size failed in a layer ('Trying to create tensor with negative dimension -2'); in_channels=0 or
    dropout=2 built a net that failed only at its first call (F.dropout: 'probability has to be between 0 and 1')."""
    with pytest.raises(ValueError, match=f"^{msg}"):
        cmfast.UNet.from_preset("tiny", **bad)
    assert cmfast.UNet.from_preset("tiny", num_blocks=0, dropout=0.0).in_channels == 3


@pytest.mark.parametrize("arch", ["song", "adm"])
def test_resolution_must_halve_evenly(arch):
    """A 30x30 net with 3 resolutions (30, 15, 8 down; 8, 16, 32 up) was built and failed in forward's skip concat
    with a RuntimeError (cmfast-train on a folder of 30x30 images: a traceback); now refused at construction."""
    kw = dict(model_channels=64, num_blocks=1, attn_resolutions=(), arch=arch)
    with pytest.raises(ValueError, match=r"img_resolution: expected a multiple of 4 \(3 resolutions.*got 30"):
        cmfast.UNet(img_resolution=30, channel_mult=(1, 2, 2), **kw)
    with pytest.raises(ValueError, match="expected a multiple of 2 .* got 31"):
        cmfast.UNet.from_preset("tiny", img_resolution=31)
    net = cmfast.UNet(img_resolution=30, channel_mult=(1, 2), **kw)      # 30 halves once: fine
    assert net(torch.randn(1, 3, 30, 30), torch.zeros(1)).shape == (1, 3, 30, 30)


def test_attention_moves_with_the_resolution_where_it_would_vanish():
    # tiny (32x32, attention at 16) built for 64x64 images had levels 64 and 32 and no attention at all, silently
    from cmfast.nets import preset_config

    def attention_levels(net):
        return sorted({int(k.split("x")[0]) for k, m in net.enc.items() if getattr(m, "num_heads", 0)})
    assert preset_config("tiny", img_resolution=64)["attn_resolutions"] == (32,)
    assert attention_levels(cmfast.UNet.from_preset("tiny", img_resolution=64)) == [32]
    assert preset_config("fmnist-small", img_resolution=64)["attn_resolutions"] == (16,)
    # where a level keeps the preset's resolution, or the caller names them, nothing moves (EDM's fixed resolutions)
    assert preset_config("tiny", img_resolution=16)["attn_resolutions"] == (16,)
    assert preset_config("ddpmpp-cifar10", img_resolution=64)["attn_resolutions"] == (16,)
    assert preset_config("tiny", img_resolution=64, attn_resolutions=())["attn_resolutions"] == ()
    assert preset_config("adm-imagenet64", img_resolution=32)["attn_resolutions"] == (32, 16, 8)


def test_group_count_lowered_to_a_divisor():
    # EDM's min(32, C // 4) does not divide C = 168 (fmnist-small's old 56 channels x 3): 28 groups of 6 channels.
    from cmfast.nets.layers import GroupNorm
    assert [GroupNorm(c).num_groups for c in (168, 128, 24, 6, 3)] == [28, 32, 6, 1, 1]
    with torch.device("meta"):  # a whole net with such widths builds and runs
        net = cmfast.UNet.from_preset("fmnist-small", model_channels=56).eval()
        assert net(torch.randn(1, 1, 32, 32), torch.zeros(1)).shape == (1, 1, 32, 32)
    assert {m.num_groups for m in net.modules() if isinstance(m, GroupNorm) and m.weight.shape[0] == 168} == {28}


def _edm_block(blk, x, emb):
    """EDM's UNetBlock.forward (networks.py), transcribed: every convolution adds its own bias."""
    import torch.nn.functional as F
    orig = x
    x = blk.conv0(blk.norm0(x, act="silu"))
    params = blk.affine(emb).to(x.dtype)
    if blk.adaptive_scale:
        scale, shift = params.chunk(2, dim=1)
        x = blk.norm1(x, scale=scale, shift=shift, act="silu")
    else:
        x = blk.norm1(x + params[:, :, None, None], act="silu")
    x = blk.conv1(F.dropout(x, p=blk.dropout, training=blk.training))
    x = (x + (blk.skip(orig) if blk.skip is not None else orig)) * blk.skip_scale
    if blk.num_heads:
        N, C, H, W = x.shape
        qkv = blk.qkv(blk.norm2(x)).reshape(N, blk.num_heads, C // blk.num_heads, 3, H * W)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = (blk.proj(a.transpose(-1, -2).reshape(N, C, H, W)) + x) * blk.skip_scale
    return x


@pytest.mark.parametrize("kw", [dict(), dict(down=True), dict(up=True, attention=True),
                                dict(adaptive_scale=True, attention=True, num_heads=2),
                                dict(down=True, resample_filter=(1, 3, 3, 1), resample_proj=False),
                                dict(up=True, resample_filter=(1, 3, 3, 1))],
                         ids=["ddpmpp", "down", "up-attn", "adm-attn", "fir-down-noproj", "fir-up"])
def test_block_equals_edm_with_its_biases_moved(kw):
    """UNetBlock adds its convolutions' biases inside later adds (the embedding add, ops.residual); in float64 it
    equals EDM's block, where each convolution adds its own, output and every gradient."""
    from cmfast.nets.unet import UNetBlock
    torch.manual_seed(0)
    blk = UNetBlock(8, 16 if "attention" not in kw else 8, 12, **kw).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.3)             # non-zero biases everywhere (EDM initializes them to 0)
    x, emb = torch.randn(2, 8, 8, 8, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    with cmfast.ops.use_backend("torch"):
        out = blk(x, emb)
        g = torch.autograd.grad(out.square().sum(), list(blk.parameters()))
        want = _edm_block(blk, x, emb)
        g_want = torch.autograd.grad(want.square().sum(), list(blk.parameters()))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_attention_gets_dense_q_k_v(monkeypatch, channels_last):
    """The block hands ops.attention q, k, v with a unit head-dim stride, made in one copy (the strided views of the
    qkv output ran the Triton forward 12x slower on the H200). The values are the EDM block's (tests above)."""
    from cmfast.nets.unet import UNetBlock
    seen, real = [], cmfast.ops.attention

    def spy(q, k, v, scale=None):
        seen.append([t.stride(-1) for t in (q, k, v)] + [q.is_contiguous() and k.is_contiguous() and v.is_contiguous()])
        return real(q, k, v, scale)
    torch.manual_seed(0)
    blk = UNetBlock(8, 8, 12, attention=True, num_heads=2)
    x = torch.randn(2, 8, 4, 4)
    if channels_last:
        blk, x = blk.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 12)
    monkeypatch.setattr(cmfast.ops, "attention", spy)
    with cmfast.ops.use_backend("torch"):
        blk(x, emb)
    assert seen == [[1, 1, 1, True]]


@pytest.mark.parametrize("up", [False, True], ids=["down", "up"])
@pytest.mark.parametrize("kernel", [3, 1, 0])
def test_box_resampling_equals_edm_filter(up, kernel):
    """The [1, 1] box filter runs as a 2x2 mean / nearest copy; EDM convolves with the tiled filter (float64: output
    and input gradient)."""
    import torch.nn.functional as F
    from cmfast.nets.layers import Conv2d
    torch.manual_seed(0)
    conv = Conv2d(4, 4 if kernel == 0 else 6, kernel, up=up, down=not up).double()
    assert conv.box
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    f = conv.resample_filter.double()
    if up:
        y = F.conv_transpose2d(x, f.mul(4).tile([4, 1, 1, 1]), groups=4, stride=2)
    else:
        y = F.conv2d(x, f.tile([4, 1, 1, 1]), groups=4, stride=2)
    if kernel:
        y = F.conv2d(y, conv.weight, conv.bias, padding=kernel // 2)
    out = conv(x)
    torch.testing.assert_close(out, y, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    gx, = torch.autograd.grad(y, x, g)
    gx2, = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx2, gx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(adaptive_scale=False), dict(adaptive_scale=True), dict(label_dim=3),
                                dict(arch="adm", label_dim=3, noise_scale=1000.0)],
                         ids=["pre-add", "scale-shift", "conditional", "adm-time-scaled"])
def test_constants_path_equals_live_path(kw):
    """forward(constants=UNet.constants(...)) is the same computation as the live forward (fp32: bit for bit);
    a wrong count of constants is one clear error. Also for ADM with the released models' time scale."""
    torch.manual_seed(0)
    if kw.get("arch") == "adm":
        net = cmfast.UNet(img_resolution=16, model_channels=64, channel_mult=(1, 2), num_blocks=1,
                          attn_resolutions=(8,), **kw).eval()
    else:
        net = cmfast.UNet.from_preset("tiny", img_resolution=16, **kw).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, c = torch.randn(2, 3, 16, 16), torch.tensor([0.3, -0.7])
    labels = torch.tensor([0, 2]) if kw.get("label_dim") else None
    live = net(x, c, labels)
    consts = net.constants(c, labels, torch.float32)
    assert len(consts) == len(net.blocks())
    assert torch.equal(net(x, None, None, constants=consts), live)
    assert not torch.equal(net(x, None, None, constants=net.constants(c.flip(0), labels, torch.float32)), live)
    with pytest.raises(ValueError, match="constants: expected one entry per residual block"):
        net(x, None, None, constants=consts[:-1])


# ---- arch="adm": EDM's DhariwalUNet (ADM), the CM paper's ImageNet 64x64 network -----------------------------
def test_adm_imagenet64_parameter_count():
    """EDM Table 7 lists ADM (ImageNet 64x64, conditional) at 296M parameters (augmentation embedding unused)."""
    with torch.device("meta"):
        net = cmfast.UNet.from_preset("adm-imagenet64", label_dim=1000)
    assert abs(_params(net) - 295.9e6) < 0.05e6
    heads = {b.out_channels: b.num_heads for b in net.blocks() if b.num_heads}
    assert heads == {384: 6, 576: 9, 768: 12}            # 64 channels a head; none at 64x64 (192 channels)


def _edm_adm(net, x, c_noise, labels):
    """EDM's DhariwalUNet.forward (networks.py), transcribed; blocks as EDM's UNetBlock (_edm_block)."""
    import math

    import torch.nn.functional as F
    half = net.map_noise.num_channels // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=x.dtype) / half)             # endpoint=False
    emb = torch.outer(c_noise, freqs)
    emb = torch.cat([emb.cos(), emb.sin()], dim=1)                                  # no sin/cos swap
    emb = net.map_layer1(F.silu(net.map_layer0(emb)))
    if labels is not None:
        emb = emb + F.one_hot(labels, net.label_dim).to(x.dtype) @ net.map_label.weight.t()   # no sqrt(label_dim)
    emb = F.silu(emb)
    skips = []
    for blk in net.enc.values():
        x = _edm_block(blk, x, emb) if hasattr(blk, "affine") else F.conv2d(x, blk.weight, blk.bias, padding=1)
        skips.append(x)
    for blk in net.dec.values():
        if x.shape[1] != blk.in_channels:
            x = torch.cat([x, skips.pop()], dim=1)
        x = _edm_block(blk, x, emb)
    x = F.silu(F.group_norm(x, net.out_norm.num_groups, net.out_norm.weight, net.out_norm.bias, eps=1e-5))
    assert math.isclose(net.out_norm.eps, 1e-5)
    return F.conv2d(x, net.out_conv.weight, net.out_conv.bias, padding=1)


@pytest.mark.parametrize("adaptive", [None, False], ids=["scale-shift", "additive"])
def test_adm_equals_edm_dhariwalunet(adaptive):
    """A small arch='adm' net (64 and 128 channels: 1 and 2 heads) equals the transcription of EDM's forward in
    float64, conditional, with every parameter non-zero: ADM's layout (attention in every block at 8x8, all encoder
    outputs skipped, resampling-only skips), eps 1e-5 and its embedding."""
    torch.manual_seed(0)
    net = cmfast.UNet(img_resolution=16, in_channels=3, label_dim=4, arch="adm", model_channels=64,
                      channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0,
                      adaptive_scale=adaptive).double().eval()
    assert all(b.adaptive_scale is (adaptive is None) for b in net.blocks())
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    assert [k for k, b in net.dec.items() if getattr(b, "num_heads", 0)] == ["8x8_in0", "8x8_block0", "8x8_block1"]
    assert all(b.skip is None or b.skip.weight is None for k, b in net.enc.items() if "down" in k)
    from cmfast.nets.layers import GroupNorm
    assert {m.eps for m in net.modules() if isinstance(m, GroupNorm)} == {1e-5}    # EDM's UNetBlock / out_norm default
    x, c = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([-0.3, 1.2], dtype=torch.float64)
    labels = torch.tensor([1, 3])
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        out = net(x, c, labels)
        want = _edm_adm(net, x, c, labels)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_adm_refuses_songunet_options():
    for kw in (dict(embedding_type="fourier"), dict(encoder_type="residual"), dict(resample_filter=(1, 3, 3, 1)),
               dict(num_heads=2), dict(channel_mult_noise=2)):
        with pytest.raises(ValueError, match="fixed in arch 'adm'"):
            cmfast.UNet(arch="adm", **kw)
    with pytest.raises(ValueError, match="arch: expected"):
        cmfast.UNet(arch="unet3d")


def test_adm_trains_and_samples():
    """The rest of cmfast takes an ADM backbone as it takes a SongUNet: an iCT loss reaches every parameter, and
    class-conditional Algorithm 1 samples."""
    from cmfast import objectives
    torch.manual_seed(0)
    net = cmfast.UNet(img_resolution=16, in_channels=3, label_dim=4, arch="adm", model_channels=64,
                      channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.1)
    model = cmfast.ConsistencyModel(net)
    labels = torch.tensor([0, 3])
    objectives.ict_loss(model, torch.rand(2, 3, 16, 16) * 2 - 1, num_scales=10, class_labels=labels).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    out = cmfast.sample(model.eval(), torch.randn(2, 3, 16, 16), (80.0, 0.821), class_labels=labels)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
