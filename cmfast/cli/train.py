"""cmfast-train: train a consistency model (CD, CT, iCT, sCT, sCD) or its EDM teacher; --resume latest continues.

    cmfast-train --dataset fashion-mnist --preset tiny --method ict --steps 300 --batch-size 32 --output-dir runs/fm
    cmfast-train --config ct-cifar10 --output-dir runs/ct           # the CM paper's CIFAR-10 CT run
    torchrun --nproc_per_node 8 -m cmfast.cli.train --config cd-cifar10 --teacher runs/edm --output-dir runs/cd
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from . import _common

PROG = "cmfast-train"


fail = functools.partial(_common.fail, PROG)


def _rates(s):
    try:
        rates = tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates like 0.9999,0.999, got {s!r}") from None
    if not all(0 <= r < 1 for r in rates):
        raise argparse.ArgumentTypeError(f"expected EMA rates in [0, 1), got {s}")
    return rates


def _key_value(s):
    k, sep, v = s.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


# The choices of --method, --preset, --dataset and --loss as their modules define them, for --help and argument errors
# without torch's import (about 4 s; those modules import it): once a module is imported, its own names (a method or
# preset a user registered before calling main() included), else the built-in ones written here
# (tests/test_lazy_import.py checks they are the modules' names).
BUILTIN_NAMES = {
    ("cmfast.training.methods", "METHODS"): ("cd", "ct", "edm", "ict", "scd", "sct"),
    ("cmfast.nets.presets", "PRESETS"): ("adm-imagenet64", "adm-lsun256", "ddpmpp-64", "ddpmpp-cifar10", "fmnist-small",
                                         "ncsnpp-cifar10", "tiny"),
    ("cmfast.data", "DATASETS"): ("cifar10", "fashion-mnist", "folder"),
    ("cmfast.objectives", "DISTANCES"): ("l2", "l1", "pseudo_huber", "lpips"),
}


def _names(module: str, attr: str) -> tuple:
    loaded = sys.modules.get(module)
    if loaded is None or not hasattr(loaded, attr):
        return BUILTIN_NAMES[module, attr]
    names = getattr(loaded, attr)
    return tuple(sorted(names)) if isinstance(names, dict) else tuple(names)


def build_parser():
    from ..training.config import COMPILE_MODES, CONFIGS, DEFAULTS
    METHODS, PRESETS = _names("cmfast.training.methods", "METHODS"), _names("cmfast.nets.presets", "PRESETS")
    DATASETS, DISTANCES = _names("cmfast.data", "DATASETS"), _names("cmfast.objectives", "DISTANCES")
    D = DEFAULTS

    def d(key, text=""):
        v = ",".join(map(str, D[key])) if isinstance(D[key], tuple) else D[key]
        return f"{text} (default: {v})".strip()

    ap = _common.Parser(prog=PROG, description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("main")
    g.add_argument("--config", choices=sorted(CONFIGS), help="a paper's run; explicit flags override its values")
    g.add_argument("--dataset", choices=DATASETS, help=d("dataset"))
    g.add_argument("--data-dir", help="dataset folder (folder: the image folder or zip) (default: $CMFAST_DATA or "
                                      "~/.cache/cmfast)")
    g.add_argument("--method", choices=METHODS, help=d("method"))
    g.add_argument("--preset", choices=PRESETS, help=d("preset", "network"))
    g.add_argument("--teacher", metavar="PATH", help="EDM teacher checkpoint or run dir (--method cd, scd)")
    g.add_argument("--cond", action="store_const", const=True, help="class-conditional on the dataset's labels")
    g.add_argument("--xflip", action=argparse.BooleanOptionalAction, help="mirror half the training images "
                   "horizontally, at random (default: on for cifar10, off otherwise)")
    g.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit: the "
                   "config.json the run would write, refusing what it would refuse before its first step; an image "
                   "folder or zip is peeked at (its file list, labels and the headers of a few images), not loaded; "
                   "--teacher is checked (header and weights), not built; --output-dir is checked, not made, and the "
                   "checkpoint --resume would continue from is checked (weights one tensor at a time, the training "
                   "state loaded), not loaded into a model")

    h = ap.add_argument_group("hyperparameters")
    h.add_argument("--loss", choices=DISTANCES, help="distance d (default: the method's: lpips for cd/ct, "
                                                     "pseudo_huber for ict)")
    h.add_argument("--batch-size", type=_common.ranged(int, 1), help=d("batch_size", "global batch"))
    h.add_argument("--lr", type=_common.ranged(float, 0, lo_open=True), help=d("lr"))
    h.add_argument("--lr-rampup-kimg", type=_common.ranged(float, 0), help=d("lr_rampup_kimg", "linear warm-up"))
    h.add_argument("--optimizer", choices=("adam", "radam"), help=d("optimizer"))
    length = h.add_mutually_exclusive_group()
    length.add_argument("--steps", dest="total_steps", type=_common.ranged(int, 1),
                        help="training steps K (default 1000)")
    length.add_argument("--kimg", type=_common.ranged(float, 0, lo_open=True),
                        help="training length in thousands of images")
    length.add_argument("--time-budget", type=_common.ranged(float, 0.0, lo_open=True), metavar="MINUTES",
                        help="training length K chosen to fill this many minutes on this machine: after a probe "
                             "(2 untimed, then 8 timed steps) K = the steps that fit, so the schedules (CT/iCT N(k), "
                             "sCT's warm-up with warmup_frac, the EMA warm-up) run to their end; the plan is logged, "
                             "kept in config.json and checkpoints, and resume keeps it")
    h.add_argument("--ema", type=_rates, help=d("ema", "evaluation EMA rates, comma-separated; each step's rate is "
                                                      "min(rate, (1 + k) / (10 + k)), a warm-up for short runs (the "
                                                      "CM reference code keeps the rate fixed)"))
    h.add_argument("--dropout", type=_common.ranged(float, 0, 1), help="override the preset's dropout")
    h.add_argument("--net-arg", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="a network argument over the preset's (cmfast.UNet's, e.g. fourier_scale=0.02, iCT's for "
                        "NCSN++)")
    h.add_argument("--num-scales", type=_common.ranged(int, 2), help="cd: N (default 18)")
    h.add_argument("--mu", type=_common.ranged(float, 0, 1), help="cd: target EMA rate (default 0)")
    h.add_argument("--s0", type=_common.ranged(int, 1), help="ct/ict: initial N (default 2 / 10)")
    h.add_argument("--s1", type=_common.ranged(int, 1), help="ct/ict: final N (default 150 / 1280)")
    h.add_argument("--mu0", type=_common.ranged(float, 0, 1), help="ct: initial target EMA rate (default 0.9)")
    h.add_argument("--method-arg", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="any other method hyperparameter (see cmfast.training.methods)")
    h.add_argument("--grad-clip", type=_common.ranged(float, 0), help=d("grad_clip", "max grad norm, 0 = off"))
    h.add_argument("--seed", type=_common.ranged(int, 0), help=d("seed"))

    p = ap.add_argument_group("performance")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help=d("precision", "backbone autocast; "
                                                                            "fp16 uses loss scaling"))
    p.add_argument("--batch-gpu", type=_common.ranged(int, 1), help="per-rank chunk (gradient accumulation) "
                                                             "(default: the whole per-rank batch)")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"),
                   help="cmfast.ops (default: $CMFAST_BACKEND, else auto)")
    p.add_argument("--device", help="default: cuda if available (cuda:LOCAL_RANK under torchrun), else cpu")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the networks that run every step (the student's backbone; the target's and "
                        "the teacher's where the method has them) in this mode: default, reduce-overhead (CUDA "
                        "graphs), max-autotune-no-cudagraphs (autotuned kernels), max-autotune (both), or none; "
                        "bare --compile = default. On CUDA the CUDA-graph modes refuse CD / CT / iCT with dropout "
                        "(their target pass replays the dropout masks). "
                        "Inside the compiled networks --backend auto is the torch ops (inductor fuses them); a "
                        "backend named by --backend runs its kernels between graphs. Checkpoints are the same as "
                        "without; the first logged interval includes the compile time (compile_warmup in "
                        "stats.jsonl) (default: none)")
    p.add_argument("--cuda-graph", action="store_const", const=True,
                   help="capture the step's forward, loss, backward and gradient clipping in one CUDA graph, "
                        "replayed every step (the optimizer and EMA updates stay eager): for small networks, whose "
                        "eager step is bound by the host. Every method (sct / scd with jvp=fd); one process, one GPU, no "
                        "--batch-gpu accumulation, no fp16, no --compile. Noise comes from the default generator "
                        "(seeded by --seed) and the target pass reuses the online pass's recorded dropout masks, "
                        "so the run draws other numbers than without it. The first logged interval includes the "
                        "capture (compile_warmup in stats.jsonl)")
    p.add_argument("--nan-limit", type=_common.ranged(int, 1), help=d("nan_limit", "stop after this many consecutive "
                                                                            "non-finite steps"))

    io = ap.add_argument_group("I/O")
    io.add_argument("--output-dir", help=d("output_dir"))
    io.add_argument("--resume", metavar="latest|auto|PATH",
                    help="continue from the newest checkpoint in --output-dir (auto: only if there is one) or a "
                         "checkpoint file")
    io.add_argument("--stop-at", type=_common.ranged(int, 1), help="stop (with a checkpoint) at this step, e.g. to "
                                                            "split a run into jobs")
    io.add_argument("--time-limit", type=_common.ranged(float, 0.0, lo_open=True), metavar="MINUTES",
                    help="stop (with a checkpoint) after this many minutes of training, e.g. inside a job's "
                         "wall-time limit; --resume latest continues")
    io.add_argument("--sample-every", type=_common.ranged(int, 1), help=d("sample_every", "steps between sample grids"))
    io.add_argument("--sample-num", type=_common.ranged(int, 0), help=d("sample_num", "images per grid, 0 = no grids"))
    io.add_argument("--ckpt-every", type=_common.ranged(int, 1), help=d("ckpt_every", "steps between checkpoints"))
    io.add_argument("--keep", type=_common.ranged(int, 0), help=d("keep", "checkpoints kept, 0 = all"))
    io.add_argument("--log-every", type=_common.ranged(int, 1), help=d("log_every", "steps per stats.jsonl row"))
    return ap


def main(argv=None) -> int:
    """The command; a torchrun rank that started a process group ends here with os._exit (its exit status kept, its
    output flushed), skipping the interpreter's shutdown, during which gloo's worker threads, kept alive by DDP, can
    abort the rank (training/loop.py: _GROUP)."""
    try:
        code = _main(argv)
    except SystemExit as e:         # fail(): its line is printed
        if not _created_group():
            raise
        code = e.code if isinstance(e.code, int) else 1
    if _created_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _created_group() -> bool:
    loop = sys.modules.get("cmfast.training.loop")      # not imported: no group
    return loop is not None and loop.created_process_group()


def _dry_config(args: dict) -> dict:
    """--dry-run's config: what the run would write to config.json (before --time-budget's plan), refusing with the
    run's line what the run would refuse before training. An image folder (--data-dir) is peeked at, not loaded
    (data.peek_folder: its labels and a few images' headers) for the image shape, the classes and their names; the
    network is built on the meta device (no memory), for its own checks (an image size its levels cannot halve). Then
    the run's start-up checks (training.loop.startup_checks, dry): the teacher (its header and weights read, nothing
    built; its time scale taken), the output folder (writable, nothing made; checkpoints without --resume; the one
    --resume would continue from: its weights, read one tensor at a time, and its training state, loaded in full, fitted
    to the models built on the meta device, its sampler's position to the folder's image count). Checks of this
    machine's devices (--device, --backend, --compile) are left to the run, which may be on another machine."""
    from ..training.config import resolve
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, count = resolve(args, world), None
    if cfg["dataset"] == "folder":
        if cfg["data_dir"] is None:     # a paper's config (--config cd-imagenet64) shown before its data is at hand
            if not _common.other_rank():
                print(f"{PROG}: note: no --data-dir: the folder's images decide net (size, channels, classes); "
                      f"the teacher and the output folder are not checked", file=sys.stderr)
            return cfg
        from ..data import peek_folder
        peek = peek_folder(cfg["data_dir"])
        cfg, count = resolve(args, world, peek.shape, peek.num_classes, peek.classes), peek.count
    import torch
    from ..nets import UNet
    from ..training.loop import startup_checks
    with torch.device("meta"):
        UNet(**cfg["net"])
    net = cfg["net"]
    startup_checks(cfg, (net["in_channels"], net["img_resolution"], net["img_resolution"]), dry=True, count=count)
    return cfg


@_common.interruptible(PROG, " (checkpoints written so far are kept: --resume latest continues from them)")
def _main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    dry = args.pop("dry_run")
    margs = dict(args.pop("method_arg") or [])
    for k in ("num_scales", "mu", "s0", "s1", "mu0"):
        if args.get(k) is not None:
            margs[k] = args[k]
        args.pop(k)
    args["method_args"] = margs
    args["net_args"] = dict(args.pop("net_arg") or [])
    from ..data import DataError
    from ..training.checkpoint import CheckpointError
    from ..training.config import resolve
    try:
        if dry:
            text = json.dumps(_dry_config(args), indent=2)
            if not _common.other_rank():    # under torchrun rank 0's copy: each rank's made N configs in one stream
                print(text)
            return 0
        resolve(args, int(os.environ.get("WORLD_SIZE", "1")))     # user mistakes before any process group
        if args.get("device"):
            _common.check_device(args["device"])
        from ..training.loop import TrainingError, train
        try:
            train(args)
        except TrainingError as e:
            fail(str(e), code=1)
    except (DataError, CheckpointError, ValueError, OSError, ImportError) as e:     # OSError: a full disk, too
        if os.environ.get("CMFAST_DEBUG") == "1":
            raise
        fail(_common.first_line(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
