"""cmfast.nets against numbers from outside the code: EDM's initialization of each layer role, inverted dropout in the
residual blocks, networks in another dtype than their weights, EDM's 'same' padding and the class-index checks.
Written for mutants of cmfast/nets that the other network tests let through (mutation testing, round 7); each test
failed on its mutant."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import cmfast
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
