"""README figures of zero-shot editing (CM paper Sec. 6.3) on Fashion-MNIST test images, one PNG per task.

    python scripts/make_edit_figures.py --pretrained fmnist --out docs
    python scripts/make_edit_figures.py --checkpoint run/ckpt.safetensors --num 8 --steps 20

Writes <out>/edit_<task>.png: one row per test image, columns before... | after (interpolate: rows of noise
pairs, columns alpha 0..1). Colorize needs an RGB model and is skipped for a 1-channel one. Test images are the
first --num of t10k, padded 28 -> 32 (and resized when the model has another resolution).
"""
import argparse
import gzip
import os
import sys

import numpy as np
import torch

FMNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
TASKS = ("inpaint", "colorize", "super-resolve", "stroke", "interpolate", "denoise")


def fmnist_test_images(num, path=FMNIST_TEST):
    """(num, 1, 32, 32) float32 in [-1, 1]: the first `num` t10k images, zero-padded 28 -> 32 (DESIGN.md 2)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:4] != b"\x00\x00\x08\x03":
        raise ValueError(f"{path}: expected an idx3 uint8 file, got magic {raw[:4].hex()}")
    n, h, w = (int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, h, w)[:num]
    x = torch.from_numpy(np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))).float()
    return x / 127.5 - 1


def strokes_from(images, cell=4):
    """A stroke painting stand-in: cell x cell means quantised to black / gray / white (SDEdit's input kind)."""
    m = torch.nn.functional.avg_pool2d(images, cell)
    q = torch.bucketize(m, torch.tensor([-0.5, 0.5], device=m.device)).float() - 1
    return q.repeat_interleave(cell, 2).repeat_interleave(cell, 3)


def make_figures(model, out_dir, num=8, steps=None, seed=0, factor=4, scale=3, tasks=TASKS):
    """Run every task that fits the model on `num` test images; returns the paths written."""
    from cmfast import editing as E
    from cmfast.cli.edit import DEFAULT_STEPS, karras_levels, run
    from cmfast.cli._png import grid, save_png
    C, H, W = E.image_shape(model)
    dev = next(model.parameters()).device
    x = fmnist_test_images(num)
    if (H, W) != (32, 32):
        x = torch.nn.functional.interpolate(x, size=(H, W), mode="area")
    x = x.expand(-1, C, -1, -1).to(dev)
    smin, smax = E.noise_range(model)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for task in tasks:
        if task == "colorize" and C != 3:
            print(f"colorize: skipped (needs an RGB model, this one has {C} channel)")
            continue
        gen = torch.Generator(dev).manual_seed(seed)
        n = steps or DEFAULT_STEPS.get(task, 1)
        if task == "stroke":
            sigmas = karras_levels(n, smin, 2.0)
            images = strokes_from(x)
        else:
            sigmas, images = karras_levels(n, smin, smax), (x if task != "interpolate" else None)
        _, rows = run(model, task, images, sigmas=sigmas, factor=factor, sigma=0.5, pairs=min(num, 4),
                      alphas=9, generator=gen)
        path = os.path.join(out_dir, f"edit_{task.replace('-', '_')}.png")
        save_png(grid(rows), path, scale=scale)
        written.append(path)
        print(f"{task}: {path} (" + ("sigma 0.5, one evaluation" if task == "denoise" else
                                     "sigmas " + ", ".join(f"{v:.3g}" for v in sigmas)) + ")")
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint written by cmfast-train (EMA weights)")
    src.add_argument("--pretrained", help="shipped model name, e.g. fmnist")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--num", type=int, default=8, help="test images per figure")
    ap.add_argument("--steps", type=int, default=None, help="override every task's step count")
    ap.add_argument("--factor", type=int, default=4, help="super-resolution factor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        if args.pretrained:
            import cmfast
            model = cmfast.load_pretrained(args.pretrained)
        else:
            from cmfast.training.checkpoint import load_model
            model, _ = load_model(args.checkpoint, which="ema", map_location=args.device)
        make_figures(model.to(args.device).eval(), args.out, args.num, args.steps, args.seed, args.factor)
    except (ValueError, TypeError, FileNotFoundError, ImportError, AttributeError) as e:
        print(f"make_edit_figures: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
