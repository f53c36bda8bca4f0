"""cmfast-edit: zero-shot editing with a consistency model (CM paper Algorithm 4), PNG in, PNG out.

    cmfast-edit inpaint --checkpoint run/ckpt.safetensors --input imgs/ --mask mask.png --out edited/
    cmfast-edit super-resolve --pretrained fmnist --input img.png --factor 4 --steps 20 --out edited/
    cmfast-edit interpolate --pretrained fmnist --pairs 4 --alphas 9 --out edited/

Writes <stem>_<task>.png per input (pair<p>_<i>.png for interpolate) and <task>_grid.png (before | after).
"""
import argparse
import functools
import os
import sys

from . import _common
from .sample import _class_arg, _class_by_name

PROG = "cmfast-edit"
TASKS = ("inpaint", "colorize", "super-resolve", "stroke", "interpolate", "denoise")
DEFAULT_STEPS = {"inpaint": 20, "colorize": 20, "super-resolve": 20, "stroke": 2, "interpolate": 1}


_fail = functools.partial(_common.fail, PROG)


def _positive(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return v


class _Help(_common.DefaultsHelp, argparse.RawDescriptionHelpFormatter):
    """Each option's default, and the examples of the module docstring as written."""


def build_parser():
    ap = _common.Parser(prog=PROG, description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                        formatter_class=_Help)
    ap.add_argument("task", choices=TASKS)
    g = ap.add_argument_group("main")
    _common.add_model_options(g)
    g.add_argument("--input", help="a PNG or a directory of PNGs at the model's resolution (super-resolve: also "
                   "1/factor of it), or fashion-mnist[:SPLIT[:N]] (the first N images of a Fashion-MNIST split, "
                   "default test and 8); not used by interpolate")
    g.add_argument("--mask", help="inpaint: PNG at the model's resolution, white (>= 128) = known pixel, black = "
                   "to generate; unset: the central half-size square is generated")
    g.add_argument("--factor", type=_positive, help="super-resolve: the upsampling factor (divides the resolution)")
    g.add_argument("--steps", type=_positive, default=None, help="network evaluations on a Karras grid; unset: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()))
    g.add_argument("--sigmas", type=_common.sigmas_type("80,10,2"), default=None,
                   help="decreasing noise levels, e.g. 80,10,2 (stroke: the first is the start level)")
    g.add_argument("--sigma-start", type=float, default=2.0, help="stroke: the SDEdit start level with --steps")
    g.add_argument("--sigma", type=float, default=0.5, help="denoise: the noise level added to the input")
    g.add_argument("--pairs", type=_positive, default=4, help="interpolate: number of noise pairs (rows)")
    g.add_argument("--alphas", type=_positive, default=9, help="interpolate: points from 0 to 1 (columns)")
    g.add_argument("--seed", type=_common.ranged(int, 0), default=0, help="seed of the noise the edit draws")
    g.add_argument("--class", dest="class_label", type=_class_arg, default=None,
                   help="the class label of a class-conditional model (every image), or the class's name for a run "
                        "trained on class subfolders, as cmfast-sample's")
    p = ap.add_argument_group("performance")
    p.add_argument("--batch-size", type=_positive, default=64, help="images edited at once")
    _common.add_device(p)
    io = ap.add_argument_group("I/O")
    io.add_argument("--out", required=True, help="output directory")
    io.add_argument("--grid-scale", type=_positive, default=1, help="nearest upscaling of the grid PNG")
    return ap


DATASET_INPUT = "fashion-mnist"


def dataset_input(spec: str, channels: int):
    """--input fashion-mnist[:SPLIT[:N]]: (names, (N, channels, 32, 32) in [-1, 1]), the first N images of the split
    (default test, 8), padded to 32x32 as the models were trained (cmfast.data.load_fashion_mnist)."""
    parts = spec.split(":")
    if parts[0] != DATASET_INPUT or len(parts) > 3:
        raise ValueError(f"--input {spec}: expected {DATASET_INPUT}[:SPLIT[:N]], e.g. {DATASET_INPUT}:test:16")
    split = parts[1] if len(parts) > 1 and parts[1] else "test"
    try:
        n = int(parts[2]) if len(parts) > 2 else 8
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--input {spec}: expected a number of images >= 1 after the split, got {parts[2]!r}")
    import torch

    from ..data import load_fashion_mnist
    ds = load_fashion_mnist(split=split)
    if n > len(ds) and len(parts) > 2:    # asked for images that are not there (they were capped without a word)
        raise ValueError(f"--input {spec}: the {split} split has {len(ds)} images; ask for at most that many")
    n = min(n, len(ds))                  # the default (8) where a split holds fewer
    x = ds.batch(torch.arange(n))[0]
    return [f"fmnist-{split}-{i:05d}.png" for i in range(n)], x.expand(-1, channels, -1, -1).contiguous()


def load(args, device):
    """(model, meta) from --checkpoint (cmfast.training.checkpoint.load_model) or --pretrained."""
    if args.pretrained:
        from .. import load_pretrained
        return load_pretrained(args.pretrained).to(device).eval(), {}
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    from ..training.checkpoint import load_model
    model, meta = load_model(args.checkpoint, which=args.which, map_location=device)
    return model.to(device).eval(), meta


def karras_levels(steps, sigma_min, top):
    """`steps` decreasing levels of the Karras grid from `top` down to (not including) sigma_min, whose step would
    be the identity f(x, sigma_min) = x."""
    from ..schedules import karras_sigmas
    return tuple(karras_sigmas(steps + 1, sigma_min, top).flip(0)[:-1].tolist())


def center_mask(h, w):
    """(1, 1, h, w): 1 = known everywhere except the central half-size square."""
    import torch
    m = torch.ones(1, 1, h, w)
    m[..., h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 0
    return m


def run(model, task, images=None, *, sigmas, mask=None, factor=None, sigma=0.5, pairs=4, alphas=9,
        generator=None, noise=None):
    """One task on a batch: (results (N, C, H, W), grid rows [[before..., after]]). images: (N, C, H, W) in
    [-1, 1] (None for interpolate); sigmas: the levels (stroke: the first is the start); noise: None (drawn with
    `generator`) or one tensor shaped like the results per level (denoise: one), not for interpolate."""
    import torch
    from .. import editing as E
    dev = images.device if images is not None else next(model.parameters()).device
    if task == "inpaint":
        m = center_mask(*images.shape[2:]).to(dev) if mask is None else mask.to(dev)
        out = E.inpaint(model, images, m, sigmas, generator, noise=noise)
        before = [images, images * m]             # unknown pixels shown as 0 (mid-gray)
    elif task == "colorize":
        out = E.colorize(model, images, sigmas, generator, noise=noise)
        w = torch.tensor(E.LUMINANCE, device=dev).reshape(1, 3, 1, 1)
        before = [(images.expand(-1, 3, -1, -1) * w).sum(1, keepdim=True)]
    elif task == "super-resolve":
        out = E.super_resolve(model, images, factor, sigmas, generator, noise=noise)
        low = images.shape[-1] != out.shape[-1]     # a low-res input is its own patch means
        means = images if low else torch.nn.functional.avg_pool2d(images, factor)
        before = ([] if low else [images]) + [means.repeat_interleave(factor, 2).repeat_interleave(factor, 3)]
    elif task == "stroke":
        out = E.stroke_guided(model, images, sigmas[0], sigmas[1:], generator, noise=noise)
        before = [images]
    elif task == "denoise":
        n = torch.randn(images.shape, generator=generator, device=dev, dtype=images.dtype) if noise is None else \
            noise[0].to(dev, images.dtype)
        noisy = images + sigma * n
        out = E.denoise(model, noisy, sigma)
        before = [images, noisy]
    elif task == "interpolate":
        C, H, W = E.image_shape(model)
        z = torch.randn((2, pairs, C, H, W), generator=generator, device=dev)
        a = torch.linspace(0, 1, alphas).tolist()
        out = E.interpolate(model, z[0], z[1], a, sigmas=sigmas, generator=generator)   # (A, pairs, C, H, W)
        return out.transpose(0, 1).reshape(-1, C, H, W), [list(r) for r in out.transpose(0, 1)]
    else:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    return out, [[b[i] for b in before] + [out[i]] for i in range(out.shape[0])]


@_common.interruptible(PROG)
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.task != "interpolate" and not args.input:
        _fail(f"{args.task} needs --input (a PNG or a directory of PNGs)")
    if args.mask and args.task != "inpaint":
        _fail("--mask is only used by inpaint")
    if args.task == "super-resolve" and not args.factor:
        _fail("super-resolve needs --factor")
    if args.task == "denoise" and ((args.steps or 1) != 1 or args.sigmas):
        _fail("denoise is one step at --sigma: --steps / --sigmas do not apply")
    _common.check_which(PROG, args)
    _common.check_steps_sigmas(PROG, args.steps, args.sigmas)
    import torch
    from .. import editing as E
    from ..sampling import image_noise
    from ._png import grid, load_png, png_files, save_png
    try:
        _common.check_output_dir(args.out, "--out")
        device = _common.pick_device(args.device)
        model, meta = load(args, device)
        if isinstance(args.class_label, str):       # --class dogs, as cmfast-sample takes it
            args.class_label = _class_by_name(args.class_label, meta)
        from ..precond import EDMDenoiser
        if isinstance(model, EDMDenoiser) and args.task != "denoise":
            raise ValueError("an EDM teacher is a denoiser, not a consistency model: Algorithm 4 edits with a "
                             "consistency model (train one from it: cmfast-train --method cd --teacher ...)")
        if getattr(model.net, "label_dim", 0) and args.class_label is None:
            raise ValueError(f"this model is class-conditional ({model.net.label_dim} classes): pass --class")
        if args.class_label is not None:
            model = E.with_class(model, args.class_label)
        chw = E.image_shape(model)
        if chw is None:
            raise ValueError("the model does not say its image shape (expected .net.in_channels / img_resolution)")
        C, H, W = chw
        smin, smax = E.noise_range(model)
        if args.task == "stroke" and not smin < args.sigma_start <= smax:
            raise ValueError(f"--sigma-start {args.sigma_start}: expected a level in ({smin:g}, {smax:g}]")
        if args.task == "denoise" and not smin <= args.sigma <= smax:
            raise ValueError(f"--sigma {args.sigma}: expected a level in [{smin:g}, {smax:g}]")
        top = args.sigma_start if args.task == "stroke" else smax
        sigmas = args.sigmas or karras_levels(args.steps or DEFAULT_STEPS.get(args.task, 1), smin, top)
        files, images, mask = [], None, None
        if args.task != "interpolate":
            ch = 3 if args.task == "colorize" else C
            if args.input.split(":")[0] == DATASET_INPUT and not os.path.exists(args.input):
                files, images = dataset_input(args.input, ch)
                images = images.to(device)
                if tuple(images.shape[2:]) != (H, W) and args.task != "super-resolve":
                    raise ValueError(f"--input {args.input}: 32x32 images, the model takes {W}x{H}")
            else:
                files = png_files(args.input)
                size = None if args.task == "super-resolve" else (H, W)
                loaded = [load_png(f, ch, size) for f in files]
                odd = [k for k, t in enumerate(loaded) if t.shape != loaded[0].shape]
                if odd:     # super-resolve takes either size, but one for the whole folder
                    (w0, h0), (w1, h1) = (tuple(loaded[k].shape[:0:-1]) for k in (0, odd[0]))
                    raise ValueError(f"{args.input}: expected PNGs of one size, got {w0}x{h0} ("
                                     f"{os.path.basename(files[0])}) and {w1}x{h1} ({os.path.basename(files[odd[0]])})")
                images = torch.stack(loaded).to(device)
            if args.task == "super-resolve" and tuple(images.shape[2:]) not in ((H, W), (H // args.factor,
                                                                                         W // args.factor)):
                raise ValueError(f"{args.input}: expected {W}x{H} or {W // args.factor}x{H // args.factor} pixels "
                                 f"for factor {args.factor}, got {images.shape[3]}x{images.shape[2]}")
        if args.mask:
            mask = (load_png(args.mask, 1, (H, W)) > 0).float()[None]     # 128..255 -> known
        gen = torch.Generator(device).manual_seed(args.seed)
        rows, n = [], (args.pairs if args.task == "interpolate" else len(files))
        for i in range(0, n, args.batch_size if args.task != "interpolate" else n):
            batch = None if images is None else images[i:i + args.batch_size]
            noise = None if batch is None else [      # each image's own (seed, index, level), whatever --batch-size
                image_noise(args.seed, i, len(batch), (3 if args.task == "colorize" else C, H, W), draw=k).to(device)
                for k in range(1 if args.task == "denoise" else len(sigmas))]
            out, r = run(model, args.task, batch, sigmas=sigmas, mask=mask, factor=args.factor, sigma=args.sigma,
                         pairs=args.pairs, alphas=args.alphas, generator=gen, noise=noise)
            rows += r
            os.makedirs(args.out, exist_ok=True)    # after the first batch: a task that refuses the model leaves none
            for j, x in enumerate(out):
                name = (f"pair{(j // args.alphas) + i}_{j % args.alphas}" if args.task == "interpolate"
                        else f"{os.path.splitext(os.path.basename(files[i + j]))[0]}_{args.task}")
                save_png(x, os.path.join(args.out, name + ".png"))
        save_png(grid(rows), os.path.join(args.out, f"{args.task}_grid.png"), scale=args.grid_scale)
    except _common.user_errors() as e:
        _fail(_common.first_line(e))
    n = len(rows) if args.task != "interpolate" else args.pairs * args.alphas
    print(f"{PROG}: wrote {n} image{'s' if n != 1 else ''} and {args.task}_grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
