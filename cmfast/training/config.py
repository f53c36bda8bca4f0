"""Training configuration: built-in defaults, the papers' runs as named presets (--config), and resolution
(explicit flag > --config preset > default) into one JSON-able dict that the loop, the checkpoints and
--dry-run share."""
from __future__ import annotations

import math
from fractions import Fraction

# Imports nothing heavy at module level (the method registry and the networks' package import torch): cmfast-train
# builds its parser from DEFAULTS, COMPILE_MODES and CONFIGS for --help without torch's 4 s import.

DEFAULTS = dict(
    dataset="cifar10", data_dir=None, xflip=None, cond=False, method="ict", preset="tiny", dropout=None,
    teacher=None, init_from_teacher=True, loss=None, method_args={},
    batch_size=32, batch_gpu=None, lr=1e-3, lr_rampup_kimg=0.0, optimizer="radam", betas=(0.9, 0.999),
    total_steps=None, kimg=None, time_budget=None, ema=(0.9999,), precision="fp32", grad_clip=0.0, seed=0, nan_limit=20,
    sigma_data=0.5, sigma_min=0.002, sigma_max=80.0,
    output_dir="runs/cmfast", resume=None, stop_at=None, time_limit=None, sample_every=1000, sample_num=64,
    ckpt_every=1000, keep=3, log_every=50, backend="auto", device=None, compile="none", cuda_graph=False,
)

# --compile: torch.compile modes of the per-step networks ('none': eager, nothing compiled).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")

# The papers' CIFAR-10 runs (PAPER.md; CM paper Table 3 / Appendix C, with the optimizer and dropout of
# openai/consistency_models_cifar10 configs/cifar10_ve_cd.py and cifar10_ve_ct_adaptive.py: RAdam at a constant rate,
# dropout 0, no clipping; iCT Sec. 3.1 and 5; EDM Table 7 for the teacher). Those configs set a 10M-image warm-up
# (optim.warmup), but their code builds the warm-up schedule for Adam only: its RAdam branch (jcm/losses.py
# get_optimizer) scales by the constant lr, so the runs had none, and neither do these.
# net_args: the preset's network arguments the run changes (iCT: NCSN++ with Fourier frequencies of std 0.02, not
# 16, "reduced sensitivity" to the noise level, iCT Sec. 3.1).
CONFIGS = {
    "cd-cifar10": dict(dataset="cifar10", method="cd", preset="ncsnpp-cifar10", dropout=0.0, loss="lpips",
                       batch_size=512, lr=4e-4, optimizer="radam", total_steps=800_000,
                       ema=(0.9999,), method_args=dict(num_scales=18, mu=0.0, solver="heun")),
    "ct-cifar10": dict(dataset="cifar10", method="ct", preset="ncsnpp-cifar10", dropout=0.0, loss="lpips",
                       batch_size=512, lr=2e-4, optimizer="radam", total_steps=800_000,
                       ema=(0.9999,), method_args=dict(s0=2, s1=150, mu0=0.9)),
    "ict-cifar10": dict(dataset="cifar10", method="ict", preset="ncsnpp-cifar10", dropout=0.3, loss="pseudo_huber",
                        batch_size=1024, lr=1e-4, optimizer="radam", total_steps=400_000, ema=(0.99993,),
                        method_args=dict(s0=10, s1=1280, p_mean=-1.1, p_std=2.0),
                        net_args=dict(fourier_scale=0.02)),
    # ImageNet 64x64, class-conditional (openai/consistency_models scripts/launch.sh: ADM, RAdam without warm-up,
    # dropout 0, batch 2048, EMA rates 0.999 / 0.9999 / 0.9999432, fp16, random horizontal flips (cm_train.py's
    # load_data, random_flip=True by default; the LSUN runs too); CD: N = 40, target EMA 0.95, lr 8e-6,
    # 600k steps, teacher EDM's ImageNet 64 ADM; CT: N 2 -> 200, mu0 0.95, lr 1e-4, 800k steps). --data-dir: an
    # ImageNet 64x64 folder or zip with EDM's dataset.json labels.
    "cd-imagenet64": dict(dataset="folder", cond=True, xflip=True, method="cd", preset="adm-imagenet64",
                          dropout=0.0, loss="lpips", batch_size=2048, lr=8e-6, optimizer="radam", total_steps=600_000,
                          ema=(0.999, 0.9999, 0.9999432189950708), precision="fp16",
                          method_args=dict(num_scales=40, mu=0.95, solver="heun")),
    "ct-imagenet64": dict(dataset="folder", cond=True, xflip=True, method="ct", preset="adm-imagenet64",
                          dropout=0.0, loss="lpips", batch_size=2048, lr=1e-4, optimizer="radam", total_steps=800_000,
                          ema=(0.999, 0.9999, 0.9999432189950708), precision="fp16",
                          method_args=dict(s0=2, s1=200, mu0=0.95)),
    # LSUN 256x256 (bedroom, cat), unconditional, from the same file: batch 256, EMA rates 0.9999 / 0.99994 /
    # 0.9999432; CD lr 1e-5, 600k steps; CT N 2 -> 150, lr 5e-5, 1M steps. --data-dir: an LSUN folder or zip.
    "cd-lsun256": dict(dataset="folder", xflip=True, method="cd", preset="adm-lsun256", dropout=0.0, loss="lpips",
                       batch_size=256, lr=1e-5, optimizer="radam", total_steps=600_000,
                       ema=(0.9999, 0.99994, 0.9999432189950708), precision="fp16",
                       method_args=dict(num_scales=40, mu=0.95, solver="heun")),
    "ct-lsun256": dict(dataset="folder", xflip=True, method="ct", preset="adm-lsun256", dropout=0.0, loss="lpips",
                       batch_size=256, lr=5e-5, optimizer="radam", total_steps=1_000_000,
                       ema=(0.9999, 0.99994, 0.9999432189950708), precision="fp16",
                       method_args=dict(s0=2, s1=150, mu0=0.95)),
    "edm-cifar10": dict(dataset="cifar10", method="edm", preset="ddpmpp-cifar10", batch_size=512, lr=1e-3,
                        lr_rampup_kimg=10_000, optimizer="adam", kimg=200_000, ema=(0.99929,),
                        method_args=dict(p_mean=-1.2, p_std=1.2)),
}

DATASET_SHAPES = {"cifar10": (3, 32, 32), "fashion-mnist": (1, 32, 32), "folder": None}
NUM_CLASSES = {"cifar10": 10, "fashion-mnist": 10}


FROM_DATA = ("in_channels", "img_resolution", "label_dim")      # the network arguments the data sets


def _net_args(net_args: dict) -> dict:
    """--net-arg KEY=VALUE: cmfast.UNet arguments over the preset's, except those the data sets (the values are
    checked where the network is built: --dry-run builds it too)."""
    import inspect
    from ..nets import UNet
    settable = set(inspect.signature(UNet.__init__).parameters) - {"self", *FROM_DATA}
    for k in net_args:
        if k in FROM_DATA:
            raise ValueError(f"--net-arg {k}: set by the data (its channels, resolution and, with --cond, classes)")
        if k not in settable:
            raise ValueError(f"--net-arg {k}: not an argument of cmfast.UNet; it has {', '.join(sorted(settable))}")
    return dict(net_args)


def resolve(args: dict, world_size: int = 1, image_shape=None, num_classes: int = 0, classes=None) -> dict:
    """Merge explicit values (None = not given) over the --config preset over DEFAULTS; fill derived fields. The data's
    image shape (C, H, W), class count and class names (an image folder's class subfolders), where known, give `net`
    (and `classes` for --cond)."""
    from ..nets.presets import preset_config
    from .methods import check_arg_types, get_method
    preset = CONFIGS[args["config"]] if args.get("config") else {}
    cfg = {}
    for k, v in DEFAULTS.items():
        given = args.get(k)
        cfg[k] = given if given is not None else preset.get(k, v)
    cfg["config"] = args.get("config")
    if args.get("backend") is None and "backend" not in preset:
        # as for the other commands and the library: $CMFAST_BACKEND when --backend is not given (it was overridden
        # by the default 'auto': CMFAST_BACKEND=triton trained on torch without a word)
        from ..ops import get_backend
        try:
            cfg["backend"] = get_backend()
        except ValueError as e:
            raise ValueError(f"CMFAST_BACKEND: {e}") from None
    if cfg["compile"] not in COMPILE_MODES:
        raise ValueError(f"--compile: expected one of {', '.join(COMPILE_MODES)}, got {cfg['compile']!r}")
    net_args = _net_args(args.get("net_args") or {})
    method = get_method(cfg["method"])
    cfg["method_args"] = {**method.defaults, **preset.get("method_args", {}), **(args.get("method_args") or {})}
    unknown = set(cfg["method_args"]) - set(method.defaults)
    if unknown:
        raise ValueError(f"method {cfg['method']!r} has no hyperparameter {', '.join(sorted(unknown))}; "
                         f"it has {', '.join(method.defaults) or 'none'}")
    check_arg_types(cfg["method_args"], method.defaults)
    if hasattr(method, "check_args"):      # the method's own checks of its hyperparameters' values
        method.check_args(cfg["method_args"])
    levels = method.sampling_sigmas(cfg)
    if levels:                             # e.g. sCT / sCD: two steps at the sCM paper's t = 1.1
        cfg["sampling_sigmas"] = levels
    cfg["loss"] = cfg["loss"] or method.default_loss
    cfg["ema"] = [float(r) for r in cfg["ema"]]
    cfg["betas"] = [float(b) for b in cfg["betas"]]
    if cfg["xflip"] is None:
        cfg["xflip"] = cfg["dataset"] == "cifar10"
    # Length: --steps, or --kimg (images) rounded up to whole steps, or --time-budget (planned in the loop after a
    # probe; until then the default K stands in, for the probe's few steps).
    given = [k for k in ("total_steps", "kimg", "time_budget") if args.get(k) is not None]
    if given == ["kimg"]:       # an explicit --kimg beats a --config preset's step count
        cfg["total_steps"] = None
    if "time_budget" in given and len(given) > 1:
        raise ValueError("--time-budget sets the length: it excludes --steps and --kimg")
    if "time_budget" in given:
        cfg["total_steps"] = cfg["kimg"] = None
    if cfg["total_steps"] is None:
        # in exact decimals, as written: kimg * 1000 in floats is off by an ulp (16.12 * 1000 = 16120.000000000002),
        # which the rounding up made one step more (--kimg 16.12 --batch-size 8: 2016 steps, not 16,120 / 8 = 2015)
        kimg = Fraction(repr(float(cfg["kimg"]))) if cfg["kimg"] else None
        cfg["total_steps"] = math.ceil(kimg * 1000 / cfg["batch_size"]) if kimg else 1000
    cfg["kimg"] = cfg["total_steps"] * cfg["batch_size"] / 1000
    if cfg["batch_size"] % world_size:
        raise ValueError(f"--batch-size {cfg['batch_size']} is not divisible by the {world_size} ranks")
    local = cfg["batch_size"] // world_size
    cfg["batch_gpu"] = cfg["batch_gpu"] or local
    if local % cfg["batch_gpu"]:
        raise ValueError(f"--batch-gpu {cfg['batch_gpu']} does not divide the per-rank batch {local}")
    cfg["world_size"] = world_size
    from .cuda_graph import check_cuda_graph
    check_cuda_graph(cfg, method, world_size)
    if method.needs_teacher and not cfg["teacher"]:
        raise ValueError(f"--method {cfg['method']} needs --teacher PATH (a checkpoint trained with --method edm)")
    shape = image_shape or DATASET_SHAPES.get(cfg["dataset"])
    cfg["net"] = None
    if shape is not None:
        if shape[1] != shape[2]:    # the nets are square: a 30x40 folder failed at the first step, after config.json
            raise ValueError(f"{cfg['data_dir'] or cfg['dataset']}: expected square images, got {shape[1]}x{shape[2]} "
                             "(height x width); crop or resize them")
        over = dict(preset.get("net_args", {}), in_channels=shape[0], img_resolution=shape[1])
        if cfg["dropout"] is not None:
            over["dropout"] = cfg["dropout"]
        over.update(net_args)           # --net-arg over the --config's and the preset's
        if cfg["cond"]:
            over["label_dim"] = NUM_CLASSES.get(cfg["dataset"]) or num_classes
            if not over["label_dim"]:
                raise ValueError("--cond: this dataset has no labels: an image folder needs one subfolder a class "
                                 "(cats/001.png, dogs/001.png) or dataset.json at its top, "
                                 "{\"labels\": [[\"cats/001.png\", 0], ...]} (paths relative to the folder)")
        cfg["net"] = preset_config(cfg["preset"], **over)
        cfg["net"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["net"].items()}
    if cfg["cond"] and classes:             # an image folder's class subfolders: their names, by label
        cfg["classes"] = list(classes)
    return cfg


# Keys that define the model and the data: a resumed run must agree with its checkpoint on these.
IDENTITY = ("dataset", "method", "net", "sigma_data", "sigma_min", "sigma_max")
