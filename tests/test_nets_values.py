"""cmfast.nets against numbers from outside the code: EDM's initialization of each layer role, inverted dropout in the
residual blocks, the mapping network's time scale, the presets' published configurations (EDM, the CM paper, the
shipped model), networks in another dtype than their weights, EDM's padding, widths and residual scales, the argument
checks. Written for mutants of cmfast/nets that the other network tests let through (mutation testing, round 7); each
test failed on its mutant."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import cmfast
from cmfast.nets import PRESETS
from cmfast.nets.layers import Conv2d, GroupNorm, Linear
from cmfast.nets.unet import UNetBlock


# ---- initialization: EDM's SongUNet init / init_zero / init_attn per layer role ------------------------------------

def _edm_gain(name: str) -> float:
    """EDM networks.py (SongUNet): conv1 and the attention proj of every block and the output conv use init_zero
    (xavier_uniform, init_weight=1e-5); qkv uses init_attn (init_weight=sqrt(0.2)); every other conv / linear init
    (init_weight=1). cmfast's ADM uses the same functions (its class docstring)."""
    if name.endswith(("conv1.weight", "proj.weight")) or name == "out_conv.weight":
        return 1e-5
    if name.endswith("qkv.weight"):
        return math.sqrt(0.2)
    return 1.0


@pytest.mark.parametrize("kw", [dict(arch="song", model_channels=16, channel_mult=(1, 2), attn_resolutions=(8,),
                                     embedding_type="fourier", encoder_type="residual", resample_filter=(1, 3, 3, 1)),
                                dict(arch="adm", model_channels=64, channel_mult=(1, 2), attn_resolutions=(8,))],
                         ids=["song", "adm"])
def test_fresh_network_weights_have_edms_init_per_layer_role(kw):
    """Every weight U(-a, a) with a = gain sqrt(6 / (fan_in + fan_out)) (fan = channels x kernel area), the gain of
    its role; biases 0; GroupNorm gains 1 and offsets 0. The EDM-equality tests load weights, so only this sees a
    network that starts from other scales (training from scratch)."""
    torch.manual_seed(0)
    net = cmfast.UNet(img_resolution=16, in_channels=3, label_dim=3, num_blocks=1, **kw)
    seen = set()
    for mname, m in net.named_modules():
        if isinstance(m, GroupNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), mname
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), mname
            continue
        if isinstance(m, Linear):
            fan_in, fan_out = m.in_features, m.out_features
        elif isinstance(m, Conv2d) and m.weight is not None:
            k = m.weight.shape[-1]
            fan_in, fan_out = m.in_channels * k * k, m.out_channels * k * k
        else:
            continue
        gain = _edm_gain(mname + ".weight")
        seen.add(gain)
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.detach().double().abs()
        assert w.max() <= bound * (1 + 1e-6), f"{mname}: max {w.max():.3g} > bound {bound:.3g}"
        assert w.max() >= 0.8 * bound, f"{mname}: max {w.max():.3g} < 0.8 x bound {bound:.3g}"   # >= 96 draws
        if m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), mname
    assert seen == {1e-5, math.sqrt(0.2), 1.0}


# ---- dropout ---------------------------------------------------------------------------------------------------------

def test_block_dropout_is_inverted_dropout_on_the_second_convolutions_input():
    """EDM's UNetBlock: conv1(dropout(silu(norm1(...)))), torch's inverted dropout (p zeroed, the rest x 1 / (1 - p)) in
    train mode only. With conv1 the identity (a centred 3x3 delta) and no skip convolution the block's output is
    (h' + x) sqrt(1/2), so h' / h, h from the same block in eval mode, is 0 or 1 / (1 - p) everywhere."""
    p = 0.25
    torch.manual_seed(0)
    blk = UNetBlock(8, 8, 12, dropout=p).double()
    assert blk.skip is None
    with torch.no_grad():
        blk.conv1.weight.zero_()
        blk.conv1.weight[:, :, 1, 1] = torch.eye(8, dtype=torch.float64)
        blk.conv1.bias.zero_()
    x, emb = torch.randn(4, 8, 8, 8, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        h = blk.eval()(x, emb) / math.sqrt(0.5) - x
        torch.manual_seed(1)
        h_drop = blk.train()(x, emb) / math.sqrt(0.5) - x
    keep = h.abs() > 1e-3
    ratio = (h_drop[keep] / h[keep]) * (1 - p)        # 0 (dropped) or 1 (kept)
    torch.testing.assert_close(ratio, ratio.round(), rtol=0, atol=1e-9)
    assert set(ratio.round().unique().tolist()) == {0.0, 1.0}
    dropped = 1 - ratio.round().mean().item()
    assert abs(dropped - p) < 0.06, dropped            # ~1900 elements: the share is p within a few std


@pytest.mark.parametrize("arch", ["song", "adm"])
def test_every_block_gets_the_networks_dropout(arch):
    kw = dict(model_channels=64 if arch == "adm" else 16)
    net = cmfast.UNet(img_resolution=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), dropout=0.3, arch=arch,
                      **kw)
    assert [b.dropout for b in net.blocks()] == [0.3] * 5      # block0; in0, in1, block0, block1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
        torch.manual_seed(0)
        train = net.train()(x, torch.zeros(2))
        ev = net.eval()(x, torch.zeros(2))
    assert (train - ev).abs().max() > 1e-3 and torch.equal(ev, net(x, torch.zeros(2)))


# ---- the mapping network's time scale --------------------------------------------------------------------------------

def test_noise_scale_multiplies_c_noise_before_the_embedding():
    """noise_scale=1000 (openai/consistency_models' networks read 1000 ln(sigma) / 4): the mapping network sees
    1000 c_noise. Float64 transcription of SongUNet's mapping: positional f_i = (1/10000)^(i / (half - 1)), features
    [sin, cos] (EDM swaps the halves), then silu(map_layer1(silu(map_layer0(.))))."""
    torch.manual_seed(0)
    net = cmfast.UNet(img_resolution=16, model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
                      noise_scale=1000.0).double()
    c = torch.tensor([0.3, -0.7], dtype=torch.float64)
    half = 8
    f = torch.tensor([(1 / 10000) ** (i / (half - 1)) for i in range(half)], dtype=torch.float64)
    arg = torch.outer(1000 * c, f)
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    emb = F.silu(emb @ net.map_layer0.weight.t() + net.map_layer0.bias)
    want = F.silu(emb @ net.map_layer1.weight.t() + net.map_layer1.bias)
    with torch.no_grad():
        torch.testing.assert_close(net.embedding(c), want, rtol=1e-12, atol=1e-12)


# ---- the presets: the published configurations -----------------------------------------------------------------------

# EDM train.py: --arch=ddpmpp / ncsnpp set model_channels 128, channel_mult [2,2,2], the embedding, encoder,
# channel_mult_noise and resample filter; SongUNet's defaults num_blocks 4, attn_resolutions [16]; --dropout 0.13
# (train.py's default, CIFAR-10). EDM README: FFHQ/AFHQ 64x64 with --arch=ddpmpp --cres=1,2,2,2 --dropout=0.05;
# ImageNet 64x64 with --arch=adm --dropout=0.10 (DhariwalUNet: 192 channels, [1,2,3,4], 3 blocks, attention at
# 32, 16, 8). openai/consistency_models scripts/launch.sh, LSUN 256: 256 channels, 2 res blocks, attention 32,16,8,
# use_scale_shift_norm False, dropout 0.1; guided-diffusion's channel_mult for 256x256: (1, 1, 2, 2, 4, 4).
SONG = dict(arch="song", channel_mult_emb=4, adaptive_scale=None, num_heads=1, label_dim=0, noise_scale=1.0)
PUBLISHED = {
    "ddpmpp-cifar10": dict(SONG, img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                           num_blocks=4, attn_resolutions=(16,), dropout=0.13, embedding_type="positional",
                           channel_mult_noise=1, encoder_type="standard", resample_filter=(1, 1)),
    "ncsnpp-cifar10": dict(SONG, img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                           num_blocks=4, attn_resolutions=(16,), dropout=0.13, embedding_type="fourier",
                           channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1)),
    "ddpmpp-64": dict(SONG, img_resolution=64, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                      num_blocks=4, attn_resolutions=(16,), dropout=0.05, embedding_type="positional",
                      channel_mult_noise=1, encoder_type="standard", resample_filter=(1, 1)),
    "adm-imagenet64": dict(arch="adm", img_resolution=64, in_channels=3, model_channels=192, channel_mult=(1, 2, 3, 4),
                           channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10,
                           adaptive_scale=None, noise_scale=1.0),
    "adm-lsun256": dict(arch="adm", img_resolution=256, in_channels=3, model_channels=256,
                        channel_mult=(1, 1, 2, 2, 4, 4), channel_mult_emb=4, num_blocks=2, attn_resolutions=(32, 16, 8),
                        dropout=0.10, adaptive_scale=False, noise_scale=1.0),
}


def _filled(name):
    import inspect
    full = {k: p.default for k, p in inspect.signature(cmfast.UNet.__init__).parameters.items() if k != "self"}
    full.update(PRESETS[name])
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in full.items()}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_are_the_published_configurations(name):
    got = _filled(name)
    assert {k: got[k] for k in PUBLISHED[name]} == PUBLISHED[name]


def test_fmnist_small_is_the_shipped_models_architecture():
    """The shipped Fashion-MNIST model (cmfast/assets/fmnist.safetensors) records the network it was trained with:
    the preset must still build that network, its dropout included (training from the preset again)."""
    from safetensors import safe_open
    from cmfast.pretrained import ASSETS
    with safe_open(f"{ASSETS}/fmnist.safetensors", "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    assert cfg["preset"] == "fmnist-small"
    got = _filled("fmnist-small")
    assert {k: got[k] for k in cfg["net"]} == {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["net"].items()}
    assert cfg["net"] == dict(img_resolution=32, in_channels=1, model_channels=24, channel_mult=[1, 2, 2],
                              num_blocks=2, attn_resolutions=[8], dropout=0.1, adaptive_scale=True)


# ---- dtypes ----------------------------------------------------------------------------------------------------------

def test_bfloat16_network_takes_the_fp32_noise_embedding():
    """A network converted with .bfloat16() is called with fp32 noise levels (the embedding is fp32): the layers cast
    their weights to the input's dtype outside autocast. Its output is the fp32 network's to bf16 accuracy."""
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16, label_dim=3).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    x, c, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, -0.7]), torch.tensor([0, 2])
    with torch.no_grad():
        want = net(x, c, y)
        got = net.bfloat16()(x.bfloat16(), c, y)
    assert got.dtype == torch.bfloat16 and want.abs().max() > 0.1
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()


# ---- layers ----------------------------------------------------------------------------------------------------------

def test_conv2d_pads_every_odd_kernel_to_the_same_size():
    """EDM Conv2d: padding w.shape[-1] // 2 ('same' for odd kernels); the nets use 1 and 3, a 5x5 is the plain
    convolution with padding 2."""
    torch.manual_seed(0)
    conv = Conv2d(2, 3, 5).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    want = F.conv2d(x, conv.weight, conv.bias, padding=2)
    assert want.shape == (1, 3, 6, 6)
    torch.testing.assert_close(conv(x), want, rtol=1e-12, atol=1e-12)


def test_float32_network_follows_a_float64_input():
    """Outside autocast every layer casts its weights, biases and resampling filter to the input's dtype: a float32
    network called with float64 images and noise levels computes in float64, the numbers of its .double() copy
    (NCSN++'s FIR up/down-sampling and residual encoder with its fused down-sampling; the positional embedding:
    the Fourier one forms 2 pi f from its float32 buffer, as EDM's)."""
    import copy
    torch.manual_seed(0)
    net = cmfast.UNet(img_resolution=16, in_channels=3, label_dim=3, model_channels=16, channel_mult=(1, 2),
                      num_blocks=1, attn_resolutions=(8,), channel_mult_noise=2,
                      encoder_type="residual", resample_filter=(1, 3, 3, 1)).eval()
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    x, c = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([0.3, -0.7], dtype=torch.float64)
    y = torch.tensor([0, 2])
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        want = copy.deepcopy(net).double()(x, c, y)
        got = net(x, c, y)
    assert got.dtype == torch.float64 and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---- argument checks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, msg", [
    (dict(dropout=1.0), r"^dropout: expected a probability in \[0, 1\), got 1.0$"),        # every activation zeroed
    (dict(channel_mult=(1, 0)), r"^channel_mult: expected one or more integers >= 1, got \(1, 0\)$"),
    (dict(model_channels=True), r"^model_channels: expected an integer >= 1, got True$"),
    (dict(num_blocks=False), r"^num_blocks: expected an integer >= 0, got False$"),
    (dict(channel_mult=(1, True)), r"^channel_mult: expected one or more integers >= 1, got \(1, True\)$"),
])
def test_unet_refuses_degenerate_sizes(bad, msg):
    with pytest.raises(ValueError, match=msg):
        cmfast.UNet(**{**dict(img_resolution=16, model_channels=16, channel_mult=(1, 2), num_blocks=1), **bad})


def test_class_indices_are_checked_against_the_label_count():
    """Indices 0 .. label_dim - 1 are classes; label_dim itself (one past the end: F.one_hot's error, or a silent
    extra row under vmap), negatives, floats and bools are refused on the CPU with one line."""
    net = cmfast.UNet(img_resolution=16, model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
                      label_dim=3).eval()
    x, c = torch.randn(2, 3, 16, 16), torch.zeros(2)
    with torch.no_grad():
        assert net(x, c, torch.tensor([0, 2])).shape == x.shape
        for bad, msg in ((torch.tensor([0, 3]), r"expected 0 <= label < 3, got 3$"),
                         (torch.tensor([-1, 0]), r"expected 0 <= label < 3, got -1$"),
                         (torch.tensor([True, False]), r"expected integer class indices, got torch.bool$"),
                         (torch.tensor([0.0, 1.0]), r"expected integer class indices, got torch.float32$")):
            with pytest.raises(ValueError, match="^class_labels: " + msg):
                net(x, c, bad)


def test_one_image_takes_one_label():
    """A batch of one with two labels was broadcast to two embeddings (only a lone noise level for constants(), batch
    None, may take a batch of labels)."""
    net = cmfast.UNet(img_resolution=16, model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
                      label_dim=3).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"^class_labels: expected one label per image \(1\), got 2$"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1), torch.tensor([0, 1]))


# ---- widths (EDM networks.py bookkeeping) ----------------------------------------------------------------------------

def test_widths_follow_edms_bookkeeping():
    """SongUNet: the first conv has model_channels outputs whatever channel_mult[0], the noise embedding
    model_channels x channel_mult_noise, the mapping network model_channels x channel_mult_emb. DhariwalUNet: the first
    conv has model_channels x channel_mult[0], the noise embedding model_channels."""
    song = cmfast.UNet(img_resolution=8, model_channels=16, channel_mult=(2,), channel_mult_emb=3,
                       channel_mult_noise=2, num_blocks=1, attn_resolutions=())
    assert (song.enc["8x8_conv"].out_channels, song.enc["8x8_block0"].out_channels) == (16, 32)
    assert (song.map_noise.num_channels, song.map_layer0.out_features, song.map_layer1.out_features) == (32, 48, 48)
    assert song.blocks()[0].affine.in_features == 48
    adm = cmfast.UNet(arch="adm", img_resolution=8, model_channels=64, channel_mult=(2,), channel_mult_emb=3,
                      num_blocks=1, attn_resolutions=())
    assert (adm.enc["8x8_conv"].out_channels, adm.enc["8x8_block0"].out_channels) == (128, 128)
    assert adm.map_noise.num_channels == 64
    assert (adm.map_layer0.out_features, adm.blocks()[0].affine.in_features) == (192, 192)


@pytest.mark.parametrize("arch, scale", [("song", math.sqrt(0.5)), ("adm", 1.0)])
def test_residual_join_scale(arch, scale):
    """EDM: SongUNet's blocks join (branch + x) x sqrt(1/2) (block_kwargs skip_scale=np.sqrt(0.5)); DhariwalUNet's
    keep UNetBlock's skip_scale=1. With the branch's last convolution zeroed, a block without a skip convolution
    returns x times that scale."""
    kw = dict(model_channels=64 if arch == "adm" else 16)
    net = cmfast.UNet(img_resolution=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), arch=arch, **kw).double()
    blk = net.dec["8x8_in1"]
    assert blk.skip is None and not blk.num_heads
    with torch.no_grad():
        blk.conv1.weight.zero_()
    x, emb = torch.randn(2, blk.in_channels, 8, 8, dtype=torch.float64), torch.randn(2, 4 * kw["model_channels"],
                                                                                      dtype=torch.float64)
    with cmfast.ops.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(blk.eval()(x, emb), x * scale, rtol=1e-14, atol=0)


def test_from_preset_records_the_config_with_its_overrides():
    """UNet.from_preset keeps the arguments it was built with (the preset with the overrides) in net.config: a
    checkpoint stores them to build the same network again."""
    net = cmfast.UNet.from_preset("tiny", img_resolution=16, label_dim=4)
    assert net.preset == "tiny"
    assert net.config == dict(img_resolution=16, in_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                              attn_resolutions=(16,), dropout=0.0, channel_mult_emb=2, adaptive_scale=True,
                              label_dim=4)
