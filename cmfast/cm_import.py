"""The CM paper's released PyTorch checkpoints (openai/consistency_models: cd_imagenet64_lpips.pt, cd_imagenet64_l2.pt,
ct_imagenet64.pt, the LSUN 256x256 ones such as cd_bedroom256_lpips.pt and ct_cat256.pt, and their EDM teachers
edm_*_ema.pt) as cmfast checkpoints, so cmfast's engine samples, edits, scores and distills from the paper's own
models.

Those files are state dicts of guided-diffusion's UNetModel (cm/unet.py): the ADM network, which EDM re-implements
as DhariwalUNet and cmfast as UNet(arch="adm"). The weights map one to one, in order: time_embed.0 / .2 ->
map_layer0 / map_layer1, label_emb (an embedding table) -> map_label (its transpose), input_blocks -> enc,
middle_block -> dec.<res>_in0 (with its attention) and _in1, output_blocks -> the decoder's blocks, each level's
upsampling ResBlock -> the next level's _up block, out -> out_norm / out_conv. A ResBlock's in_layers / emb_layers
/ out_layers / skip_connection are norm0, conv0 / affine / norm1, conv1 / skip; an AttentionBlock's norm / qkv /
proj_out are norm2 / qkv / proj, its qkv rows reordered from the flash-attention layout those models were trained
with, (q|k|v, head, channel), to cmfast's (head, channel, q|k|v); 1-D convolutions become 1x1 ones. The ImageNet
models modulate with scale and shift, the LSUN ones add the embedding (adaptive_scale=False). The networks
take the time 1000 ln(sigma) / 4 (karras_diffusion.py), so the UNet gets noise_scale=1000; the consistency models'
preconditioning (sigma_min 0.002, sigma_data 0.5) is cmfast's ConsistencyModel, the teacher's EDM's.

    python -m cmfast.cm_import cd_imagenet64_lpips.pt cd-imagenet64.safetensors           # --kind cm (default)
    python -m cmfast.cm_import edm_imagenet64_ema.pt edm-imagenet64.safetensors --kind edm
    python -m cmfast.cm_import ct_bedroom256.pt ct-bedroom256.safetensors --image-size 256

A consistency model's checkpoint also records the paper's two-step levels for that model (`sampling_sigmas` in its
config; `--two-step-sigma` sets or overrides them), which cmfast-sample and cmfast-eval use for --steps 2 where no
--sigmas is given.
"""
from __future__ import annotations

import json
import sys

import torch

HEAD_CHANNELS = 64          # num_head_channels of every released model (scripts/launch.sh)
# The CM paper's two-step sampling of each released consistency model (scripts/launch.sh, "Multistep sampling":
# --sampler multistep --ts T --steps N): evaluations at the levels of ts[:-1] in the N-level Karras grid counted from
# sigma_max down (the last index is sigma_min, where cm/karras_diffusion.py's stochastic_iterative_sampler adds no
# more noise). Keyed by the released file's name.
PAPER_TWO_STEP = {"cd_imagenet64_lpips": ((0, 22, 39), 40), "cd_imagenet64_l2": ((0, 22, 39), 40),
                  "ct_imagenet64": ((0, 106, 200), 201), "cd_bedroom256_lpips": ((0, 17, 39), 40),
                  "cd_bedroom256_l2": ((0, 18, 39), 40), "ct_bedroom256": ((0, 67, 150), 151),
                  "ct_cat256": ((0, 62, 150), 151)}


def paper_two_step(path: str) -> tuple[float, float] | None:
    """(sigma_max, second level) of the paper's two-step sampling for a released file name, or None."""
    from pathlib import Path

    from .schedules import paper_step_sigmas
    found = PAPER_TWO_STEP.get(Path(path).stem)
    return None if found is None else paper_step_sigmas(found[0][:-1], found[1])


class CMCheckpointError(ValueError):
    """A file that is not a guided-diffusion UNetModel state dict cmfast can map (one line)."""


def _load(path: str) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CMCheckpointError(f"{path}: not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign or truncated files
        # torch's own messages do not help here ("KeyError: '101'" for a text file; for a pickle of other objects,
        # advice to load it unsafely): say what the file is not
        raise CMCheckpointError(f"{path}: unreadable: not a PyTorch weights file (torch.load with weights_only=True, "
                                f"which reads the paper's released .pt files, raised {type(e).__name__})") from None
    if not isinstance(sd, dict) or "time_embed.0.weight" not in sd or "input_blocks.0.0.weight" not in sd:
        raise CMCheckpointError(f"{path}: not a state dict of openai/consistency_models' UNetModel "
                                f"(no time_embed / input_blocks weights)")
    odd = next((k for k in sd if not isinstance(k, str)), None)
    if odd is not None:     # torch.save keeps any key: an int one was an AttributeError traceback in the layout reading
        raise CMCheckpointError(f"{path}: not a state dict of openai/consistency_models' UNetModel (a key that is "
                                f"no weight name: {odd!r})")
    from .training.checkpoint import bad_weight
    why = bad_weight(sd)        # integer, bool or complex values were cast silently, NaN / inf written as weights
    if why:
        raise CMCheckpointError(f"{path}: {why}")
    return sd


def _blocks(sd: dict, prefix: str) -> list[list[str]]:
    """The sub-module kinds of each TimestepEmbedSequential under `prefix` ('input_blocks', ...): 'conv', 'res',
    'attn' in order."""
    out = []
    for i in range(10_000):
        if not any(k.startswith(f"{prefix}.{i}.") for k in sd):
            break
        kinds = []
        for j in range(8):
            p = f"{prefix}.{i}.{j}."
            if f"{p}in_layers.2.weight" in sd:
                kinds.append("res")
            elif f"{p}qkv.weight" in sd:
                kinds.append("attn")
            elif f"{p}weight" in sd:
                kinds.append("conv")
            elif not any(k.startswith(p) for k in sd):
                break
            else:
                kinds.append("?")
        out.append(kinds)
    return out


# guided-diffusion's (and openai/consistency_models') channel_mult for an image size when none is given
# (script_util.create_model): the released models use these, so their levels tell their resolution.
RESOLUTION_OF_MULT = {(1, 2, 3, 4): 64, (1, 1, 2, 3, 4): 128, (1, 1, 2, 2, 4, 4): 256}


def infer_config(sd: dict, img_resolution: int | None = None) -> dict:
    """cmfast UNet arguments of the UNetModel a state dict comes from. The resolution places the attention levels
    and cannot be read off the weights themselves: None takes it from the channel multipliers where they are
    guided-diffusion's defaults for a size (RESOLUTION_OF_MULT: the ImageNet 64 and LSUN 256 models), else 64."""
    mc = sd["time_embed.0.weight"].shape[1]
    emb = sd["time_embed.0.weight"].shape[0]
    enc, dec = _blocks(sd, "input_blocks"), _blocks(sd, "output_blocks")
    if not dec or any("?" in b for b in enc + dec):
        raise CMCheckpointError("an unknown block layout (expected guided-diffusion's ResBlock / AttentionBlock)")
    ups = [j for j, b in enumerate(dec) if b.count("res") == 2]       # a level's last block ends with its up block
    n = ups[0] if ups else len(dec) - 1                                 # ResBlocks a level, num_res_blocks
    levels = len(dec) // (n + 1)
    if levels * (n + 1) != len(dec) or len(enc) != levels * (n + 1):
        raise CMCheckpointError(f"{len(enc)} input and {len(dec)} output blocks do not make a UNet of equal levels")
    mult, attn_levels, i = [], set(), 1
    for level in range(levels):
        mult.append(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])     # the level's channels
        for _ in range(n):
            if "attn" in enc[i]:
                attn_levels.add(level)
            i += 1
        if level < levels - 1:
            i += 1                                                      # the down block
    if any(m % mc for m in mult):
        raise CMCheckpointError(f"channel counts {mult} are not multiples of model_channels {mc}")
    if img_resolution is None:      # (a 256 model converted without --image-size came out as 64x64, silently)
        img_resolution = RESOLUTION_OF_MULT.get(tuple(m // mc for m in mult), 64)
    attn = {img_resolution >> level for level in attn_levels}
    scale_shift = (sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
                   == 2 * sd["input_blocks.1.0.out_layers.3.weight"].shape[0])    # False: the LSUN models
    cfg = dict(img_resolution=int(img_resolution), in_channels=int(sd["input_blocks.0.0.weight"].shape[1]),
               out_channels=int(sd["out.2.weight"].shape[0]), arch="adm", model_channels=int(mc),
               channel_mult=[m // mc for m in mult], channel_mult_emb=emb // mc, num_blocks=n,
               attn_resolutions=sorted(attn, reverse=True), dropout=0.0, noise_scale=1000.0,
               adaptive_scale=bool(scale_shift))
    if "label_emb.weight" in sd:
        cfg["label_dim"] = int(sd["label_emb.weight"].shape[0])
    return cfg


def _qkv(w: torch.Tensor, order: str) -> torch.Tensor:
    """qkv rows from (q|k|v, head, channel) ('flash') or (head, q|k|v, channel) ('legacy') to cmfast's
    (head, channel, q|k|v); a 1-D convolution's weight becomes a 1x1 one."""
    C3 = w.shape[0]
    C = C3 // 3
    H = C // HEAD_CHANNELS
    rest = w.shape[1:]
    if order == "flash":
        w = w.reshape(3, H, HEAD_CHANNELS, *rest).permute(1, 2, 0, *range(3, 3 + len(rest)))
    else:
        w = w.reshape(H, 3, HEAD_CHANNELS, *rest).permute(0, 2, 1, *range(3, 3 + len(rest)))
    return w.reshape(C3, *rest)


def _res(src: str, dst: str) -> dict:
    names = {"in_layers.0": "norm0", "in_layers.2": "conv0", "emb_layers.1": "affine", "out_layers.0": "norm1",
             "out_layers.3": "conv1", "skip_connection": "skip"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _attn(src: str, dst: str) -> dict:
    names = {"norm": "norm2", "qkv": "qkv", "proj_out": "proj"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def convert(sd: dict, img_resolution: int | None = None, qkv_order: str = "flash") -> tuple[dict, dict]:
    """(cmfast UNet state dict, UNet config) of a UNetModel state dict."""
    from .nets import UNet
    if qkv_order not in ("flash", "legacy"):
        raise ValueError(f"qkv_order: expected 'flash' or 'legacy', got {qkv_order!r}")
    cfg = infer_config(sd, img_resolution)
    net = UNet(**cfg)
    from .nets.layers import GroupNorm
    small = sorted({m.weight.shape[0] for m in net.modules() if isinstance(m, GroupNorm) and m.num_groups != 32})
    if small:       # guided-diffusion normalizes in 32 groups always, EDM (and cmfast) in min(32, C / 4)
        raise CMCheckpointError(f"GroupNorms of {small} channels: guided-diffusion uses 32 groups there, EDM's "
                                f"DhariwalUNet {min(32, small[0] // 4)} (models of 128 channels and more agree)")
    names = {"time_embed.0.weight": "map_layer0.weight", "time_embed.0.bias": "map_layer0.bias",
             "time_embed.2.weight": "map_layer1.weight", "time_embed.2.bias": "map_layer1.bias",
             "out.0.weight": "out_norm.weight", "out.0.bias": "out_norm.bias",
             "out.2.weight": "out_conv.weight", "out.2.bias": "out_conv.bias"}
    enc_keys, dec_keys = list(net.enc.keys()), list(net.dec.keys())
    names["input_blocks.0.0.weight"], names["input_blocks.0.0.bias"] = (f"enc.{enc_keys[0]}.weight",
                                                                        f"enc.{enc_keys[0]}.bias")
    for i, key in enumerate(enc_keys[1:], start=1):
        names.update(_res(f"input_blocks.{i}.0", f"enc.{key}"))
        names.update(_attn(f"input_blocks.{i}.1", f"enc.{key}"))
    names.update(_res("middle_block.0", f"dec.{dec_keys[0]}"))
    names.update(_attn("middle_block.1", f"dec.{dec_keys[0]}"))
    names.update(_res("middle_block.2", f"dec.{dec_keys[1]}"))
    rest = iter(dec_keys[2:])
    for j, kinds in enumerate(_blocks(sd, "output_blocks")):
        key = next(rest)
        names.update(_res(f"output_blocks.{j}.0", f"dec.{key}"))
        if "attn" in kinds:
            names.update(_attn(f"output_blocks.{j}.1", f"dec.{key}"))
        if kinds.count("res") == 2:                                    # this level's up block: the next EDM key
            names.update(_res(f"output_blocks.{j}.{len(kinds) - 1}", f"dec.{next(rest)}"))
    own = net.state_dict()
    out, used = {}, set()
    for src, dst in names.items():
        if src in sd and dst in own:
            t = sd[src].float()
            if dst.endswith((".qkv.weight", ".qkv.bias")):
                t = _qkv(t, qkv_order)
            if t.dim() == 3 and own[dst].dim() == 4:                  # conv1d (attention) -> 1x1 conv2d
                t = t[..., None]
            out[dst] = t
            used.add(src)
    if "label_emb.weight" in sd:
        out["map_label.weight"] = sd["label_emb.weight"].float().t().contiguous()
        used.add("label_emb.weight")
    missing = sorted(set(own) - set(out))
    unused = sorted(set(sd) - used)
    if missing or unused:
        raise CMCheckpointError(f"the weights do not map onto UNet(arch='adm') (unfilled {missing[:3]}, unused "
                                f"{unused[:3]})")
    bad = [k for k in own if own[k].shape != out[k].shape]
    if bad:
        raise CMCheckpointError(f"{bad[0]}: shape {tuple(out[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
    return out, cfg


def load_cm_checkpoint(path: str, kind: str = "cm", img_resolution: int | None = None, qkv_order: str = "flash",
                       map_location="cpu", two_step_sigma: float | None = None):
    """(ConsistencyModel for kind 'cm', EDMDenoiser for 'edm'; cmfast training config) of a released checkpoint.
    A consistency model's config records its two-step levels (sampling_sigmas): (80, two_step_sigma) where given,
    else the paper's for a released file name (PAPER_TWO_STEP)."""
    from .nets import UNet
    from .precond import ConsistencyModel, EDMDenoiser
    if kind not in ("cm", "edm"):
        raise ValueError(f"kind: expected 'cm' (a consistency model) or 'edm' (the teacher), got {kind!r}")
    sd = _load(path)
    try:
        weights, net_cfg = convert(sd, img_resolution, qkv_order)
    except CMCheckpointError as e:
        raise CMCheckpointError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    except (KeyError, IndexError, RuntimeError, TypeError) as e:   # a weight missing or of another rank: a traceback
        raise CMCheckpointError(f"{path}: the weights do not make a UNetModel ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if net_cfg["out_channels"] != net_cfg["in_channels"]:      # (it imported, and failed at the first forward)
        raise CMCheckpointError(f"{path}: {net_cfg['out_channels']} output channels for {net_cfg['in_channels']} "
                                f"input channels: a model that also predicts its variance (guided-diffusion's "
                                f"learn_sigma); a consistency model or an EDM teacher predicts the image alone")
    cfg = {"method": "cd" if kind == "cm" else "edm", "dataset": None, "net": net_cfg, "sigma_data": 0.5,
           "sigma_min": 0.002, "sigma_max": 80.0, "imported_from": str(path)}
    if two_step_sigma is not None:
        if kind != "cm" or not 0.002 < two_step_sigma < 80.0:
            raise ValueError(f"two_step_sigma: a consistency model's second level, between sigma_min 0.002 and "
                             f"sigma_max 80, got {two_step_sigma!r}" + (" for an EDM teacher" if kind != "cm" else ""))
        cfg["sampling_sigmas"] = {"2": [80.0, float(two_step_sigma)]}
    elif kind == "cm" and paper_two_step(path):
        cfg["sampling_sigmas"] = {"2": list(paper_two_step(path))}
    net = UNet(**net_cfg)
    net.load_state_dict(weights)
    model = (ConsistencyModel if kind == "cm" else EDMDenoiser)(net, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    return model.requires_grad_(False).eval().to(map_location), cfg


def main(argv=None) -> int:
    """python -m cmfast.cm_import CKPT.pt OUT.safetensors [--kind cm|edm]: a cmfast checkpoint of a released model."""
    import argparse
    from safetensors.torch import save
    from .training.checkpoint import FORMAT, atomic_write
    ap = argparse.ArgumentParser(prog="python -m cmfast.cm_import", description=main.__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--kind", choices=("cm", "edm"), default="cm",
                    help="cm: a consistency model (cd_*, ct_*); edm: the EDM teacher (edm_*_ema.pt)")
    ap.add_argument("--image-size", type=int, default=None, help="the model's resolution (default: read from its "
                    "channel multipliers where they are guided-diffusion's defaults for a size, as in the released "
                    "ImageNet 64 and LSUN 256 models; else 64)")
    ap.add_argument("--qkv-order", choices=("flash", "legacy"), default="flash",
                    help="the attention weights' row layout: flash (q|k|v, head, channel), that of every released "
                         "consistency model, whichever attention_type it was trained with (default); legacy (head, "
                         "q|k|v, channel), guided-diffusion's QKVAttentionLegacy")
    ap.add_argument("--two-step-sigma", type=float, default=None, metavar="SIGMA",
                    help="the second noise level of two-step sampling, recorded in the checkpoint (default: the "
                         "paper's for a released file name, e.g. 1.38 for cd_imagenet64_*)")
    a = ap.parse_args(argv)
    try:
        model, cfg = load_cm_checkpoint(a.ckpt, a.kind, a.image_size, a.qkv_order, two_step_sigma=a.two_step_sigma)
    except (CMCheckpointError, ValueError) as e:
        msg = str(e)
        if msg.startswith("img_resolution:"):       # UNet's argument is this command's --image-size, for this file
            msg = f"{a.ckpt}: --image-size{msg[len('img_resolution'):]}"
        print(f"cmfast.cm_import: error: {msg}", file=sys.stderr)
        return 2
    tensors = {f"ema/{k}": v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(a.out, save(tensors, metadata={"format": FORMAT, "step": "0", "config": json.dumps(cfg)}))
    n = sum(p.numel() for p in model.parameters())
    two = cfg.get("sampling_sigmas", {}).get("2")
    print(f"{a.ckpt} -> {a.out} ({n / 1e6:.1f}M parameters, {cfg['method']}; {json.dumps(cfg['net'])})"
          + (f"; two-step levels {two[0]:g}, {two[1]:.4g}" if two else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
