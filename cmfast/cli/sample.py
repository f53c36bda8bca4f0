"""cmfast-sample: images from a checkpoint (or a shipped model) in one or more steps, as a PNG grid and/or .npz.

    cmfast-sample --checkpoint runs/fm --num 64 --steps 2 --grid samples.png
    cmfast-sample --pretrained fmnist --num 10000 --npz samples.npz --steps 3     # 80 and the Karras grid
    cmfast-sample --checkpoint runs/cifar --num 50000 --npz cifar.npz --engine graphed --dtype bf16   # on a GPU
"""
from __future__ import annotations

import argparse
import functools
import sys

from . import _common

PROG = "cmfast-sample"
fail = functools.partial(_common.fail, PROG)


def build_parser():
    ap = _common.Parser(prog=PROG, description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("main")
    _common.add_model_options(g)
    g.add_argument("--num", type=_common.ranged(int, 1), default=64, help="number of images (default: 64)")
    g.add_argument("--steps", type=_common.ranged(int, 1), default=None,
                   help="network evaluations: 1 -> sigma_max, 2 -> sigma_max,0.821, more: the Karras grid, unless "
                        "the checkpoint records its own levels (a shipped model: its card's searched 2-step level); EDM "
                        "teachers: Heun steps (default: 1, EDM 18)")
    g.add_argument("--sigmas", type=_common.sigmas_type("80,0.821"), default=None,
                   help="decreasing noise levels, e.g. 80,0.821")
    g.add_argument("--seed", type=_common.ranged(int, 0), default=0, help="(default: 0)")
    _common.add_clip_denoised(g)
    g.add_argument("--class", dest="class_label", type=_class_arg, default=None,
                   help="class label for conditional models, or the class's name for a run trained on class "
                        "subfolders (default: cycle through classes)")
    p = ap.add_argument_group("performance")
    p.add_argument("--batch-size", type=_common.ranged(int, 1), default=256, help="(default: 256)")
    _common.add_device(p)
    _common.add_engine(p)
    io = ap.add_argument_group("I/O")
    io.add_argument("--grid", "--out", dest="grid", metavar="PNG", help="write a PNG grid of all images")
    io.add_argument("--npz", metavar="PATH", help="write uint8 images (N, H, W, C) as arr_0 in an .npz "
                    "(a class-conditional model's: their labels (N,) as arr_1)")
    return ap


def _class_arg(s):
    """--class: a label >= 0, or a name (resolved against the checkpoint's classes once it is loaded)."""
    return _common.ranged(int, 0)(s) if s.lstrip("+-").isdigit() else s


def _class_by_name(name: str, meta) -> int:
    names = ((meta or {}).get("config") or {}).get("classes") or []
    if name not in names:
        raise ValueError(f"--class {name}: " + (f"not a class of this model ({', '.join(names)})" if names else
                                                "this model names no classes; give a label number"))
    return names.index(name)


def generate(model, num, steps, sigmas, seed, batch_size, class_label, engine, dtype, clip_denoised=False):
    """uint8 (num, H, W, C), batch by batch (cmfast.sampling.generate_batches: the engines and their noise)."""
    import numpy as np
    from ..sampling import generate_batches
    from ..training.images import to_uint8
    return np.concatenate([to_uint8(x) for _, x in generate_batches(
        model, num, sigmas=sigmas, steps=steps, seed=seed, batch_size=batch_size, class_label=class_label,
        engine=engine, dtype=dtype, clip_denoised=clip_denoised)])


@_common.interruptible(PROG)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.grid or args.npz):
        fail("nothing to write: pass --grid PNG and/or --npz PATH")
    _common.check_which(PROG, args)
    _common.check_steps_sigmas(PROG, args.steps, args.sigmas)
    try:
        # Everything the user typed is checked before the first image is sampled.
        if args.grid:
            _common.check_output(args.grid, "--out", (".png",))
        if args.npz:
            _common.check_output(args.npz, "--npz", (".npz",))
        device = _common.pick_device(args.device)
        meta = None
        if args.pretrained is not None:     # its card's searched levels, where it has them, as a checkpoint's own
            from ..pretrained import card_sampling_sigmas, load_pretrained, model_card
            model, kind = load_pretrained(args.pretrained, map_location=device), "cm"
            meta = {"config": {"sampling_sigmas": card_sampling_sigmas(model_card(args.pretrained))}}
        else:
            from ..training.checkpoint import load_model
            from ..training.methods import get_method
            model, meta = load_model(args.checkpoint, which=args.which, map_location=device)
            kind = get_method(meta["config"]["method"]).kind
        if isinstance(args.class_label, str):
            args.class_label = _class_by_name(args.class_label, meta)
        recorded = None if args.sigmas or kind != "cm" else _common.recorded_sigmas(meta, args.steps)
        sigmas = args.sigmas or recorded
        if not sigmas:      # cmfast-eval's defaults: metrics.default_sigmas, starting at the model's sigma_max
            from ..metrics import model_sigmas
            sigmas = model_sigmas(model, args.steps or 1)
        if kind == "edm":
            if args.sigmas:
                raise ValueError("--sigmas: an EDM teacher samples with its Heun schedule; give --steps")
            if args.clip_denoised:
                raise ValueError("--clip-denoised: consistency sampling's option; an EDM teacher samples with its "
                                 "Heun solver")
            sigmas = None
        imgs = generate(model, args.num, args.steps, sigmas, args.seed, args.batch_size, args.class_label,
                        args.engine, _common.torch_dtype(args.dtype), args.clip_denoised)
        if args.grid:
            from ..training.images import grid, png_bytes
            _common.write_output(args.grid, png_bytes(grid(imgs)))
        if args.npz:
            import io
            import numpy as np
            buf = io.BytesIO()
            arrays = {"arr_0": imgs}
            label_dim = int(getattr(getattr(model, "net", None), "label_dim", 0) or 0)
            if label_dim:   # each image's class, as guided-diffusion's samples keep it (generate_batches' labels)
                arrays["arr_1"] = (np.full(len(imgs), args.class_label) if args.class_label is not None
                                   else np.arange(len(imgs)) % label_dim).astype(np.int64)
            np.savez(buf, **arrays)
            _common.write_output(args.npz, buf.getvalue())
    except _common.user_errors() as e:
        fail(_common.first_line(e))
    print(f"{len(imgs)} images {imgs.shape[1:]} -> {', '.join(p for p in (args.grid, args.npz) if p)}"
          + (f" (noise levels {', '.join(f'{s:.4g}' for s in recorded)}, from the "
             f"{'model card' if args.pretrained is not None else 'checkpoint'})" if recorded else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
