"""cmfast-eval: sample a checkpoint (or a shipped model) and score it with FID (and IS), IS or FD-FMNIST (offline).

    cmfast-eval --checkpoint run/ckpt.safetensors --metric fd-fmnist --steps 1 --num 10000 --out results.json
    cmfast-eval --pretrained fmnist --metric fd-fmnist --steps 2 --num 10000
    cmfast-eval --samples cifar.npz --metric fid        # images made elsewhere (cmfast-sample --npz, openai's npz)
"""
import argparse
import functools
import json
import os
import sys
import time

from . import _common

PROG = "cmfast-eval"
_fail = functools.partial(_common.fail, PROG)


def _positive(s):
    try:
        v = int(s)
    except ValueError:      # argparse would name this function: "invalid _positive value"
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def build_parser():
    ap = _common.Parser(prog=PROG, description=__doc__.splitlines()[0])
    g = ap.add_argument_group("main")
    _common.add_model_options(g, samples=True)
    g.add_argument("--metric", required=True, choices=("fid", "is", "fd-fmnist"),
                   help="fid: Inception-V3 (needs pt_inception-2015-12-05-6726825d.pth locally), against the "
                        "reference data; the result also holds the Inception Score of the same samples; is: the "
                        "Inception Score alone (the same network, no reference data); fd-fmnist: cmfast's offline "
                        "metric, not comparable with FID")
    g.add_argument("--steps", type=_positive, default=None,
                   help="network evaluations (default 1; an EDM teacher: Heun steps, default 18)")
    g.add_argument("--sigmas", type=_common.sigmas_type("80,0.821"), default=None,
                   help="decreasing noise levels, e.g. 80,0.821 (default: the levels the checkpoint records "
                        "(a shipped model: its card's searched 2-step level), else the model's sigma_max (80) for 1 step, then 0.821 for 2, the Karras grid for more)")
    g.add_argument("--search-sigmas", action="store_true",
                   help="find the --steps (>= 2) noise levels that minimize the metric (greedy ternary search in "
                        "log sigma, as the CM paper tunes them; the defaults are scored too) and report the best")
    g.add_argument("--search-iters", type=_positive, default=6, help="ternary-search rounds per level (default 6; "
                                                                     "two evaluations each)")
    g.add_argument("--num", type=_positive, default=None, help="number of generated images (default 50000; "
                                                                "--samples: the first NUM, default all)")
    g.add_argument("--precision-recall", type=_positive, nargs="?", const=0, default=None, metavar="N",
                   help="fid, fd-fmnist: also precision and recall (Kynkaanniemi et al. 2019, k = 3, as the CM paper's "
                        "ImageNet 64 / LSUN tables) of the first N samples against N reference images (bare: 10000, "
                        "or --num if fewer; the reference features are cached)")
    g.add_argument("--is-splits", type=_positive, default=10, help="Inception Score: mean and std over this many "
                   "consecutive parts of the samples (default 10, as the original code)")
    g.add_argument("--seed", type=_common.ranged(int, 0), default=0,
                   help="noise seed (default 0); with the same --batch-size and engine, the images cmfast-sample makes")
    _common.add_clip_denoised(g)
    p = ap.add_argument_group("performance")
    p.add_argument("--batch-size", type=_positive, default=256, help="(default 256, as cmfast-sample)")
    _common.add_device(p)
    _common.add_engine(p)
    io = ap.add_argument_group("I/O")
    io.add_argument("--dataset", choices=("fashion-mnist", "cifar10", "folder"), default=None,
                    help="reference data (default: from the checkpoint, else by metric); folder: the images of "
                         "--data-dir (an ImageNet 64x64 or LSUN folder or zip)")
    io.add_argument("--data-dir", default=None, help="default $CMFAST_DATA or ~/.cache/cmfast; --dataset folder: the "
                    "folder or zip of reference images")
    io.add_argument("--inception-weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth "
                    "(default: the torch hub cache)")
    io.add_argument("--ref-stats", metavar="NPZ", default=None, help="fid, fd-fmnist: compare with these reference "
                    "statistics (an npz with mu and sigma: EDM's fid-refs, pytorch-fid's, openai's reference batches "
                    "such as VIRTUAL_imagenet64_labeled.npz) instead of the dataset's; --precision-recall then uses "
                    "the file's own images (arr_0, as openai's batches hold them) where it has them, else the "
                    "dataset's")
    io.add_argument("--out", default=None, help="write the result as JSON here (also printed)")
    return ap


def _dataset_from_meta(meta):
    cfg = meta.get("config", meta) if isinstance(meta, dict) else {}
    name = cfg.get("dataset") if isinstance(cfg, dict) else None
    return {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}.get(name, name)


@_common.interruptible(PROG)
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.samples is not None:
        return _score_samples(args, sys.argv[1:] if argv is None else argv)
    args.num = 50000 if args.num is None else args.num
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        _fail(f"checkpoint not found: {args.checkpoint}")
    _common.check_which(PROG, args)
    _common.check_steps_sigmas(PROG, args.steps, args.sigmas)
    if args.precision_recall == 0:     # bare (N >= 1 when given)
        args.precision_recall = min(10000, args.num)
    if args.precision_recall is not None and args.metric == "is":
        _fail("--precision-recall compares with reference images: use it with --metric fid (or fd-fmnist)")
    if args.precision_recall is not None and args.precision_recall > args.num:
        _fail(f"--precision-recall {args.precision_recall}: at most --num ({args.num}) samples")
    if args.search_sigmas and args.metric == "is":
        _fail("--search-sigmas minimizes a distance (fid, fd-fmnist); the Inception Score is higher-better")
    if args.search_sigmas and (args.steps or len(args.sigmas or ())) < 2:
        _fail("--search-sigmas needs --steps 2 or more (one step samples at sigma_max only)")
    if args.dataset == "folder" and not args.data_dir:
        _fail("--dataset folder needs --data-dir: the folder or zip of reference images")
    from ..metrics import evaluate, model_sigmas, search_sigmas
    try:
        if args.out:        # before the evaluation: a typo must not cost its result
            _common.check_output(args.out, "--out")
        device = _common.pick_device(args.device)
        if args.pretrained is not None:     # a shipped model: its card names the dataset it was trained on
            from ..pretrained import card_sampling_sigmas, load_pretrained, model_card
            model, card = load_pretrained(args.pretrained, map_location=device), model_card(args.pretrained)
            meta = {"config": {"dataset": card.get("dataset"), "sampling_sigmas": card_sampling_sigmas(card)}}
        else:
            from ..training.checkpoint import load_model
            model, meta = load_model(args.checkpoint, which=args.which, map_location=device)
        dataset = args.dataset or _dataset_from_meta(meta)
        data_dir = args.data_dir
        if not args.dataset and dataset == "folder" and args.metric == "fid" and not args.ref_stats:
            # FID of a model of one's own images is against them (the metric's default, CIFAR-10, was taken silently)
            trained_on = (meta.get("config") or {}).get("data_dir")
            data_dir = data_dir or trained_on
            if not data_dir or not os.path.exists(data_dir):
                _fail(f"the checkpoint was trained on the image folder {trained_on!r}, not found here: pass "
                      f"--dataset folder --data-dir with its reference images")
        elif not args.dataset and dataset not in ("fashion-mnist", "cifar10"):
            dataset = None          # e.g. an imported checkpoint: the metric's default reference
        common = dict(num=args.num, batch_size=args.batch_size, seed=args.seed, dataset=dataset, device=device,
                      data_dir=data_dir, weights=args.inception_weights, engine=args.engine,
                      dtype=_common.torch_dtype(args.dtype), is_splits=args.is_splits, ref_stats=args.ref_stats,
                      clip_denoised=args.clip_denoised)
        from ..precond import EDMDenoiser
        recorded = None if args.sigmas or isinstance(model, EDMDenoiser) else \
            _common.recorded_sigmas(meta, args.steps)
        if recorded:    # the checkpoint's own levels for this step count (e.g. the paper's, cmfast.cm_import)
            args.sigmas, args.steps = recorded, None
        search = None
        if args.search_sigmas:
            if isinstance(model, EDMDenoiser):
                _fail("--search-sigmas: an EDM teacher samples with its Heun schedule; give a consistency model")
            steps = args.steps or len(args.sigmas)
            start = tuple(args.sigmas) if args.sigmas else model_sigmas(model, steps)
            t_search = time.perf_counter()
            search = search_sigmas(lambda sg: evaluate(model, args.metric, sigmas=sg, **common)["value"], steps,
                                   model.sigma_min, model.sigma_max, args.search_iters, start=start,
                                   log=lambda m: print(f"{PROG}: {m}", flush=True))
            args.sigmas, args.steps = tuple(search["sigmas"]), None
            search_s = time.perf_counter() - t_search
        result = evaluate(model, args.metric, steps=args.steps, sigmas=args.sigmas, progress=True,
                          pr_num=args.precision_recall, **common)     # precision / recall: the final evaluation only
        if search is not None:
            # "seconds" of the result is the final evaluation's; the search's own trials took these
            result["search"] = {"method": "greedy ternary search in log sigma", "iters": args.search_iters,
                                "trials": search["trials"], "seconds": round(search_s, 1)}
        if recorded:    # where the levels (or the search's start) came from
            (result if search is None else result["search"])["sigmas_from"] = \
                "model card (2-step-searched)" if args.pretrained is not None else "checkpoint (sampling_sigmas)"
    except _common.user_errors() as e:
        _fail(_common.first_line(e))
    if args.pretrained is not None:
        result["pretrained"] = args.pretrained
    else:
        result["checkpoint"] = os.path.abspath(args.checkpoint)
    return _report(args, result)


def _score_samples(args, argv) -> int:
    """--samples: score the images of a file or folder; the sampling options have nothing to act on there (those with
    a default, --seed, --engine and --dtype, were taken and ignored: looked for in argv)."""
    given = {a.split("=", 1)[0] for a in argv if isinstance(a, str) and a.startswith("--")}
    for flag, value in (("--steps", args.steps), ("--sigmas", args.sigmas), ("--which", args.which),
                        ("--search-sigmas", args.search_sigmas or None),
                        ("--clip-denoised", args.clip_denoised or None),
                        *((f, f in given or None) for f in ("--seed", "--engine", "--dtype"))):
        if value is not None:
            _fail(f"{flag}: --samples scores given images; there is no model to sample")
    if args.precision_recall is not None and args.metric == "is":
        _fail("--precision-recall compares with reference images: use it with --metric fid (or fd-fmnist)")
    if args.dataset == "folder" and not args.data_dir:
        _fail("--dataset folder needs --data-dir: the folder or zip of reference images")
    if not os.path.exists(args.samples):
        _fail(f"samples not found: {args.samples}")
    from ..metrics import load_samples, score_samples
    try:
        if args.out:
            _common.check_output(args.out, "--out")
        images = load_samples(args.samples)
        num = args.num or len(images)
        pr = args.precision_recall
        pr = min(10000, num) if pr == 0 else pr
        if pr is not None and pr > num:
            _fail(f"--precision-recall {pr}: at most the {num} images scored")
        result = score_samples(images, args.metric, num=args.num, dataset=args.dataset, batch_size=args.batch_size,
                               device=_common.pick_device(args.device), data_dir=args.data_dir,
                               weights=args.inception_weights, is_splits=args.is_splits, pr_num=pr, progress=True,
                               label=os.path.abspath(args.samples), ref_stats=args.ref_stats)
    except _common.user_errors() as e:
        _fail(_common.first_line(e))
    return _report(args, result)


def _report(args, result) -> int:
    """Print the result as JSON, and write it to --out first."""
    text = json.dumps(result, indent=2)
    unwritten = None
    if args.out:    # before the print: a stdout whose reader has gone (`| head -1`) ends the command there (141)
        try:
            _common.write_output(args.out, (text + "\n").encode())
        except OSError as e:
            unwritten = _common.first_line(e)
    try:
        print(text)     # the text and its newline in two writes: a write cut short by the reader's exit (unbuffered,
    except OSError:     # more than the pipe holds) is followed by one that fails, so the loss is reported (141)
        if unwritten is None:
            raise
    if unwritten is not None:   # the result was printed; the file's error is the one to report
        _fail(unwritten)
    return 0


if __name__ == "__main__":
    sys.exit(main())
