"""An independent float64 reference of EDM's SongUNet (NVlabs/edm, training/networks.py: SongUNet with its UNetBlock,
Conv2d, GroupNorm, Linear, PositionalEmbedding, FourierEmbedding and AttentionOp), for tests.

It is a functional transcription written from EDM's source, not from cmfast: it imports nothing from cmfast and takes
a flat state dict keyed by EDM's own parameter names (those of `net.model.state_dict()` for an EDMPrecond network in
EDM's pickles, without the leading 'model.'), e.g. 'map_layer0.weight', 'enc.16x16_conv.weight',
'enc.8x8_block0.norm0.weight', 'enc.8x8_aux_residual.weight', 'dec.16x16_aux_conv.bias'.

    sd = {name: tensor for name, shape in songunet_shapes(cfg).items()}
    F_x = songunet_forward(sd, cfg, x, noise_labels, class_labels)

cfg holds SongUNet's constructor arguments (img_resolution, in_channels, out_channels required; the rest default as in
EDM). Dropout is that of eval mode (none). Supported: embedding_type 'positional' / 'fourier', encoder_type
'standard' / 'residual', decoder_type 'standard' (EDM's DDPM++ and NCSN++ networks).

Precision: everything runs in the input's dtype (float64 in the tests). EDM computes the positional frequency table
and 2*pi*freqs in float32 before casting; here they are float64 (the same function without the float32 rounding)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# SongUNet's constructor defaults (EDM training/networks.py).
DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4,
                num_blocks=4, attn_resolutions=(16,), dropout=0.10, label_dropout=0, embedding_type="positional",
                channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=(1, 1))

SKIP_SCALE = math.sqrt(0.5)   # SongUNet's block_kwargs: skip_scale=np.sqrt(0.5) (residual join and attention join)
BLOCK_EPS = 1e-6              # SongUNet's block_kwargs: eps=1e-6; its aux_norm also has eps=1e-6


def full_config(cfg: dict) -> dict:
    out = {**DEFAULTS, **cfg}
    for k in ("img_resolution", "in_channels", "out_channels"):
        if k not in out:
            raise ValueError(f"SongUNet config needs {k}")
    if out["embedding_type"] not in ("positional", "fourier"):
        raise ValueError(out["embedding_type"])
    if out["encoder_type"] not in ("standard", "residual") or out["decoder_type"] != "standard":
        raise ValueError("reference covers encoder 'standard' / 'residual' and decoder 'standard'")
    return out


def fir_filter(taps, dtype=torch.float64) -> torch.Tensor:
    """EDM Conv2d's resample_filter buffer: outer(f, f) / sum(f)^2, shape (1, 1, k, k). [1,1]: 2x2 box (DDPM++);
    [1,3,3,1]: the 4x4 binomial FIR of NCSN++."""
    f = torch.as_tensor(list(taps), dtype=dtype)
    return (f[:, None] * f[None, :] / f.sum() ** 2)[None, None]


def _per_channel(op, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """op (a single-channel convolution) on every channel alone: EDM's depthwise convolution (groups=C, the filter
    tiled over the channels), computed with the channels folded into the batch (float64 depthwise convolutions are
    slow on CPU; the sums are the same)."""
    n, c = h.shape[:2]
    y = op(h.reshape(n * c, 1, *h.shape[2:]), *args, **kwargs)
    return y.reshape(n, c, *y.shape[2:])


def fir_up(h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """EDM Conv2d's 2x up-sampling: transposed depthwise conv with 4 * filter, stride 2, padding (k - 1) // 2."""
    return _per_channel(F.conv_transpose2d, h, f.to(h.dtype) * 4, stride=2, padding=(f.shape[-1] - 1) // 2)


def fir_down(h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """EDM Conv2d's 2x down-sampling: depthwise conv with the filter, stride 2, padding (k - 1) // 2."""
    return _per_channel(F.conv2d, h, f.to(h.dtype), stride=2, padding=(f.shape[-1] - 1) // 2)


# ---- the module layout (EDM's ModuleDict order, which is also the order forward visits them) -----------------------

def layout(cfg: dict):
    """(encoder, decoder): lists of (name, kind, spec) in EDM's insertion order. kind: 'conv' (the first 3x3 conv),
    'block' (UNetBlock), 'aux_residual' (NCSN++'s fused down-sampling 3x3 conv of the input pyramid), 'aux_norm',
    'aux_conv' (the output head, at the full-resolution level of the standard decoder)."""
    c = full_config(cfg)
    mc, nb = c["model_channels"], c["num_blocks"]
    enc, dec = [], []

    def block(cin, cout, up=False, down=False, attn=False):
        # skip conv exists when channels change or the block resamples; SongUNet sets resample_proj=True, so it is
        # always a 1x1 conv (with the block's up/down resampling in front).
        return dict(cin=cin, cout=cout, up=up, down=down, attn=attn, skip=(cin != cout or up or down))

    cout = caux = c["in_channels"]
    for level, mult in enumerate(c["channel_mult"]):
        res = c["img_resolution"] >> level
        if level == 0:
            enc.append((f"{res}x{res}_conv", "conv", dict(cin=cout, cout=mc)))
            cout = mc
        else:
            enc.append((f"{res}x{res}_down", "block", block(cout, cout, down=True)))
            if c["encoder_type"] == "residual":
                enc.append((f"{res}x{res}_aux_residual", "aux_residual", dict(cin=caux, cout=cout)))
                caux = cout
        for idx in range(nb):
            enc.append((f"{res}x{res}_block{idx}", "block",
                        block(cout, mc * mult, attn=res in c["attn_resolutions"])))
            cout = mc * mult
    skips = [spec["cout"] for name, kind, spec in enc if kind != "aux_residual"]

    for level, mult in reversed(list(enumerate(c["channel_mult"]))):
        res = c["img_resolution"] >> level
        if level == len(c["channel_mult"]) - 1:
            # the bottleneck: in0 always has attention, in1 never
            dec.append((f"{res}x{res}_in0", "block", block(cout, cout, attn=True)))
            dec.append((f"{res}x{res}_in1", "block", block(cout, cout)))
        else:
            dec.append((f"{res}x{res}_up", "block", block(cout, cout, up=True)))
        for idx in range(nb + 1):
            cin = cout + skips.pop()
            # decoder attention only in the last block of a level at an attention resolution
            dec.append((f"{res}x{res}_block{idx}", "block",
                        block(cin, mc * mult, attn=idx == nb and res in c["attn_resolutions"])))
            cout = mc * mult
        if level == 0:     # decoder_type 'standard': the output head only at full resolution
            dec.append((f"{res}x{res}_aux_norm", "aux_norm", dict(c=cout)))
            dec.append((f"{res}x{res}_aux_conv", "aux_conv", dict(cin=cout, cout=c["out_channels"])))
    return enc, dec


def songunet_shapes(cfg: dict, buffers: bool = True) -> dict:
    """EDM's state-dict names -> shapes for this config. buffers: include map_noise.freqs (Fourier) and the
    resample_filter buffers of the resampling convolutions (EDM pickles carry them)."""
    c = full_config(cfg)
    emb_ch = c["model_channels"] * c["channel_mult_emb"]
    noise_ch = c["model_channels"] * c["channel_mult_noise"]
    k = len(c["resample_filter"])
    out = {}

    def lin(p, fin, fout, bias=True):
        out[p + ".weight"] = (fout, fin)
        if bias:
            out[p + ".bias"] = (fout,)

    def conv(p, cin, cout, kernel, resample=False):
        out[p + ".weight"] = (cout, cin, kernel, kernel)
        out[p + ".bias"] = (cout,)
        if resample and buffers:
            out[p + ".resample_filter"] = (1, 1, k, k)

    def norm(p, ch):
        out[p + ".weight"] = (ch,)
        out[p + ".bias"] = (ch,)

    if c["embedding_type"] == "fourier" and buffers:
        out["map_noise.freqs"] = (noise_ch // 2,)
    if c["label_dim"]:
        lin("map_label", c["label_dim"], noise_ch)
    if c["augment_dim"]:
        lin("map_augment", c["augment_dim"], noise_ch, bias=False)
    lin("map_layer0", noise_ch, emb_ch)
    lin("map_layer1", emb_ch, emb_ch)
    enc, dec = layout(c)
    for part, entries in (("enc", enc), ("dec", dec)):
        for name, kind, s in entries:
            p = f"{part}.{name}"
            if kind == "conv":
                conv(p, s["cin"], s["cout"], 3)
            elif kind == "aux_residual":
                conv(p, s["cin"], s["cout"], 3, resample=True)
            elif kind == "aux_norm":
                norm(p, s["c"])
            elif kind == "aux_conv":
                conv(p, s["cin"], s["cout"], 3)
            else:
                rs = s["up"] or s["down"]
                norm(p + ".norm0", s["cin"])
                conv(p + ".conv0", s["cin"], s["cout"], 3, resample=rs)
                lin(p + ".affine", emb_ch, s["cout"])     # adaptive_scale=False: one add, not scale+shift
                norm(p + ".norm1", s["cout"])
                conv(p + ".conv1", s["cout"], s["cout"], 3)
                if s["skip"]:
                    conv(p + ".skip", s["cin"], s["cout"], 1, resample=rs)
                if s["attn"]:
                    norm(p + ".norm2", s["cout"])
                    conv(p + ".qkv", s["cout"], 3 * s["cout"], 1)
                    conv(p + ".proj", s["cout"], s["cout"], 1)
    return out


# ---- the forward ----------------------------------------------------------------------------------------------------

def songunet_forward(sd: dict, cfg: dict, x: torch.Tensor, noise_labels: torch.Tensor, class_labels=None,
                     augment_labels=None) -> torch.Tensor:
    """SongUNet.forward(x, noise_labels, class_labels, augment_labels) in eval mode, in x's dtype.
    class_labels: (N, label_dim) vectors (EDM takes one-hot rows; any real vector works)."""
    c = full_config(cfg)
    dt = x.dtype
    taps = fir_filter(c["resample_filter"], dt)

    def W(name):
        return sd[name].to(dt)

    def linear(h, p, bias=True):
        # EDM Linear: x @ W^T (+ b)
        h = h @ W(p + ".weight").t()
        return h + W(p + ".bias") if bias else h

    def gnorm(h, p, eps=BLOCK_EPS):
        # EDM GroupNorm: min(32, C // 4) groups
        groups = min(32, h.shape[1] // 4)
        return F.group_norm(h, groups, W(p + ".weight"), W(p + ".bias"), eps=eps)

    def conv(h, p, up=False, down=False, fused=False):
        """EDM Conv2d. Not fused: optional 2x up (transposed depthwise conv with 4*filter, stride 2, padding
        (k-1)//2) or 2x down (depthwise conv with the filter, stride 2, same padding), then the kxk conv with 'same'
        padding, then the bias. Fused down (NCSN++ aux_residual): the conv with padding w_pad + f_pad first, then the
        stride-2 filter without padding, then the bias."""
        w = W(p + ".weight") if p + ".weight" in sd else None
        b = W(p + ".bias") if p + ".bias" in sd else None
        pad_w = w.shape[-1] // 2 if w is not None else 0
        pad_f = (taps.shape[-1] - 1) // 2
        if fused:
            assert down and w is not None
            h = F.conv2d(h, w, padding=pad_w + pad_f)
            h = _per_channel(F.conv2d, h, taps, stride=2)                # no padding here
        else:
            if up:
                h = fir_up(h, taps)
            if down:
                h = fir_down(h, taps)
            if w is not None:
                h = F.conv2d(h, w, padding=pad_w)
        return h + b[None, :, None, None] if b is not None else h

    def unet_block(h, p, s, emb):
        """EDM UNetBlock with SongUNet's settings: adaptive_scale=False, skip_scale=sqrt(0.5), one attention head,
        resample_proj=True, eps 1e-6."""
        orig = h
        h = conv(F.silu(gnorm(h, p + ".norm0")), p + ".conv0", up=s["up"], down=s["down"])
        h = F.silu(gnorm(h + linear(emb, p + ".affine")[:, :, None, None], p + ".norm1"))   # add, then norm
        h = conv(h, p + ".conv1")                                                           # (dropout: eval)
        h = h + (conv(orig, p + ".skip", up=s["up"], down=s["down"]) if s["skip"] else orig)
        h = h * SKIP_SCALE
        if s["attn"]:
            n, ch, hh, ww = h.shape
            heads = 1
            # qkv's 3*C output channels are laid out (head, channel, q|k|v): reshape (N*heads, C/heads, 3, HW)
            q, k, v = conv(gnorm(h, p + ".norm2"), p + ".qkv").reshape(n * heads, ch // heads, 3, -1).unbind(2)
            # AttentionOp: softmax over keys of q^T k / sqrt(channels per head)
            wts = torch.softmax(torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])), dim=2)
            a = torch.einsum("nqk,nck->ncq", wts, v).reshape(n, ch, hh, ww)
            h = (conv(a, p + ".proj") + h) * SKIP_SCALE
        return h

    # Mapping network.
    nl = noise_labels.to(dt).reshape(-1)
    if c["embedding_type"] == "positional":
        # PositionalEmbedding(endpoint=True): freqs = (1/10000)^(i / (n/2 - 1)), i < n/2; [cos, sin]
        half = c["model_channels"] * c["channel_mult_noise"] // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=dt) / (half - 1))
        arg = nl[:, None] * freqs[None, :]
    else:
        # FourierEmbedding: x * 2*pi*freqs (freqs: the random buffer, N(0, 16^2) at init); [cos, sin]
        arg = nl[:, None] * (2 * math.pi * W("map_noise.freqs"))[None, :]
    emb = torch.cat([arg.cos(), arg.sin()], dim=1)
    emb = torch.cat([emb[:, emb.shape[1] // 2:], emb[:, :emb.shape[1] // 2]], dim=1)  # SongUNet swaps to [sin, cos]
    if c["label_dim"]:
        # class labels scaled by sqrt(label_dim) before map_label (label dropout: training only)
        emb = emb + linear(class_labels.to(dt) * math.sqrt(c["label_dim"]), "map_label")
    if c["augment_dim"] and augment_labels is not None:
        emb = emb + linear(augment_labels.to(dt), "map_augment", bias=False)
    emb = F.silu(linear(emb, "map_layer0"))
    emb = F.silu(linear(emb, "map_layer1"))

    enc, dec = layout(c)
    # Encoder: every non-aux output is a skip; NCSN++'s residual path keeps an input pyramid `aux` that is
    # down-sampled by each level's aux_residual conv (fused FIR down), added to the level's first output (the down
    # block's), the sum scaled by 1/sqrt(2) and used as x, as that skip, and as the next level's aux.
    skips, aux, h = [], x, x
    for name, kind, s in enc:
        p = "enc." + name
        if kind == "aux_residual":
            h = (h + conv(aux, p, down=True, fused=True)) / math.sqrt(2)
            skips[-1] = aux = h
        elif kind == "conv":
            h = conv(h, p)
            skips.append(h)
        else:
            h = unet_block(h, p, s, emb)
            skips.append(h)

    # Decoder: concatenate the latest skip whenever a block's input width differs from h's; the standard decoder's
    # output is aux_conv(silu(aux_norm(h))) at full resolution.
    out = None
    for name, kind, s in dec:
        p = "dec." + name
        if kind == "aux_norm":
            tmp = gnorm(h, p)
        elif kind == "aux_conv":
            tmp = conv(F.silu(tmp), p)
            out = tmp if out is None else tmp + out
        else:
            if h.shape[1] != s["cin"]:
                h = torch.cat([h, skips.pop()], dim=1)
            h = unet_block(h, p, s, emb)
    return out
