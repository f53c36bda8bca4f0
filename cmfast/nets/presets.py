"""Named network configurations. DDPM++ / NCSN++ are EDM's CIFAR-10 networks (EDM Table 7 / train.py --arch)."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # EDM --arch=ddpmpp: 55.7M parameters, positional embedding, box resampling.
    "ddpmpp-cifar10": dict(img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                           num_blocks=4, attn_resolutions=(16,), dropout=0.13, embedding_type="positional",
                           channel_mult_noise=1, encoder_type="standard", resample_filter=(1, 1)),
    # EDM --arch=ncsnpp: 56.4M parameters, Fourier embedding, residual encoder, FIR (1, 3, 3, 1) resampling.
    "ncsnpp-cifar10": dict(img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                           num_blocks=4, attn_resolutions=(16,), dropout=0.13, embedding_type="fourier",
                           channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1)),
    # EDM's 64x64 DDPM++ (FFHQ/AFHQ config): the 64x64 network of the benchmarks.
    "ddpmpp-64": dict(img_resolution=64, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                      num_blocks=4, attn_resolutions=(16,), dropout=0.05, embedding_type="positional"),
    # EDM's ImageNet 64x64 network (ADM, EDM Table 7; the CM paper's ImageNet 64 architecture): 295.9M parameters
    # with label_dim=1000 (cmfast-train --cond sets it from the data).
    "adm-imagenet64": dict(img_resolution=64, in_channels=3, arch="adm", model_channels=192,
                           channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10),
    # The CM paper's LSUN 256x256 network (openai/consistency_models scripts/launch.sh: guided-diffusion's ADM without
    # scale-shift norm, 256 channels, 2 blocks a level, 64 channels a head), unconditional.
    "adm-lsun256": dict(img_resolution=256, in_channels=3, arch="adm", adaptive_scale=False, model_channels=256,
                        channel_mult=(1, 1, 2, 2, 4, 4), num_blocks=2, attn_resolutions=(32, 16, 8), dropout=0.10),
    # The shipped Fashion-MNIST model: 1 channel, 32x32 (28 padded), 1.07M parameters, so that every checkpoint file
    # of a CT run (model, target and EMA in fp32; Adam's two moments) stays under 16 MiB (reference-runs issue).
    "fmnist-small": dict(img_resolution=32, in_channels=1, model_channels=24, channel_mult=(1, 2, 2),
                         num_blocks=2, attn_resolutions=(8,), dropout=0.1, adaptive_scale=True),
    # CPU tests and examples: a few hundred thousand parameters, every block type (attention, up/down).
    "tiny": dict(img_resolution=32, in_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(16,), dropout=0.0, channel_mult_emb=2, adaptive_scale=True),
}


def preset_config(name: str, **overrides) -> dict:
    """The preset's UNet arguments with `overrides`. At another img_resolution the attention layers stay at fixed
    resolutions (as EDM's); where none of the net's levels has one of them (tiny at 64x64: levels 64 and 32, attention
    at 16), they move to the same levels as in the preset, instead of vanishing without a word."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    cfg = {**PRESETS[name], **overrides}
    base, res = PRESETS[name]["img_resolution"], cfg["img_resolution"]
    attn = PRESETS[name].get("attn_resolutions") or ()
    if ("attn_resolutions" not in overrides and attn and res != base and isinstance(res, int)
            and isinstance(cfg["channel_mult"], (list, tuple))):     # else UNet names what is wrong
        levels = [res >> i for i in range(len(cfg["channel_mult"]))]
        if not set(levels) & set(attn):
            cfg["attn_resolutions"] = tuple(r * res // base for r in attn if r * res // base in levels)
    return cfg
