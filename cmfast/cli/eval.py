"""cmfast-eval: sample a checkpoint and score it with FID or FD-FMNIST (cmfast's offline metric).

    cmfast-eval --checkpoint run/ckpt.safetensors --metric fd-fmnist --steps 1 --num 10000 --out results.json
"""
import argparse
import json
import os
import sys

PROG = "cmfast-eval"


class _Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line, exit 2 (DESIGN.md 2)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _positive(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def _sigmas(s):
    try:
        return tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 80,0.821, got {s!r}") from None


def build_parser():
    ap = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    g = ap.add_argument_group("main")
    g.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (its newest) of cmfast-train")
    g.add_argument("--metric", required=True, choices=("fid", "fd-fmnist"),
                   help="fid: Inception-V3 (needs pt_inception-2015-12-05-6726825d.pth locally); fd-fmnist: "
                        "cmfast's offline metric, not comparable with FID")
    g.add_argument("--steps", type=_positive, default=None,
                   help="network evaluations (default 1; an EDM teacher: Heun steps, default 18)")
    g.add_argument("--sigmas", type=_sigmas, default=None,
                   help="decreasing noise levels, e.g. 80,0.821 (default: 80 for 1 step, 80,0.821 for 2)")
    g.add_argument("--num", type=_positive, default=50000, help="number of generated images (default 50000)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0); with the same --batch-size, the images cmfast-sample makes")
    g.add_argument("--which", default="ema", help="weights to load: ema (default), ema@<rate>, model or target")
    p = ap.add_argument_group("performance")
    p.add_argument("--batch-size", type=_positive, default=256, help="(default 256, as cmfast-sample)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    io = ap.add_argument_group("I/O")
    io.add_argument("--dataset", choices=("fashion-mnist", "cifar10"), default=None,
                    help="reference data (default: from the checkpoint, else by metric)")
    io.add_argument("--data-dir", default=None, help="default $CMFAST_DATA or ~/.cache/cmfast")
    io.add_argument("--inception-weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth "
                    "(default: the torch hub cache)")
    io.add_argument("--out", default=None, help="write the result as JSON here (also printed)")
    return ap


def _dataset_from_meta(meta):
    cfg = meta.get("config", meta) if isinstance(meta, dict) else {}
    name = cfg.get("dataset") if isinstance(cfg, dict) else None
    return {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}.get(name, name)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.checkpoint):
        _fail(f"checkpoint not found: {args.checkpoint}")
    if args.steps and args.sigmas and args.steps != len(args.sigmas):
        _fail(f"--steps {args.steps} but --sigmas has {len(args.sigmas)} values")
    import torch
    from ..metrics import evaluate
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from ..training.checkpoint import load_model
        model, meta = load_model(args.checkpoint, which=args.which, map_location=device)
        dataset = args.dataset or _dataset_from_meta(meta)
        if dataset not in (None, "fashion-mnist", "cifar10"):
            dataset = None
        result = evaluate(model, args.metric, steps=args.steps, num=args.num, batch_size=args.batch_size,
                          seed=args.seed, sigmas=args.sigmas, dataset=dataset, device=device,
                          data_dir=args.data_dir, weights=args.inception_weights, progress=True)
    except (ValueError, TypeError, FileNotFoundError, KeyError, ImportError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    result["checkpoint"] = os.path.abspath(args.checkpoint)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def _fail(msg):
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
