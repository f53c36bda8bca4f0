"""What the cmfast-* command lines share: one-line errors with exit status 2 (DESIGN.md 2), the options that pick
a model (checkpoint or shipped model, which weights, device) and the --sigmas parser."""
from __future__ import annotations

import argparse
import sys


def fail(prog: str, message: str, code: int = 2):
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def first_line(e: Exception) -> str:
    """An exception as one error line: its message's first line, else its type's name."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `PROG: error: ...` and exit 2, not the usage text."""

    def error(self, message):
        fail(self.prog, message)


def sigmas_type(example: str):
    """A --sigmas type: comma-separated numbers as a tuple of floats; `example` shows the format in the error."""
    def parse(s):
        try:
            return tuple(float(v) for v in s.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}, got {s!r}") from None
    return parse


def add_model_options(group, pretrained: bool = True) -> None:
    """--checkpoint (or, with `pretrained`, exactly one of --checkpoint / --pretrained) and --which."""
    ckpt = dict(metavar="PATH", help="checkpoint file written by cmfast-train, or its run directory (the newest)")
    if pretrained:
        src = group.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", **ckpt)
        src.add_argument("--pretrained", metavar="NAME", help="a shipped model, e.g. fmnist (cmfast.load_pretrained)")
    else:
        group.add_argument("--checkpoint", required=True, **ckpt)
    group.add_argument("--which", default="ema", help="weights to load: ema, ema@RATE, model or target (default: %(default)s)")


def add_device(group) -> None:
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}   # --dtype's names of torch dtypes


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def add_engine(group) -> None:
    """--engine and --dtype of cmfast-sample and cmfast-eval (cmfast.sampling.generate_batches)."""
    group.add_argument("--engine", choices=("auto", "graphed", "eager"), default="auto",
                       help="graphed: the CUDA-graph sampler (GPU; noise drawn on the GPU, so images depend on "
                            "--batch-size); eager: one network call at a time, any device (default auto: graphed "
                            "for a consistency model on CUDA, else eager)")
    group.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                       help="network precision of the graphed engine (default fp32; bf16 is fastest)")


def check_steps_sigmas(prog: str, steps, sigmas) -> None:
    if steps and sigmas and steps != len(sigmas):
        fail(prog, f"--steps {steps} but --sigmas has {len(sigmas)} values")


def pick_device(name: str | None) -> str:
    """--device as given, else cuda where a CUDA device is present, else cpu."""
    import torch
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def recorded_sigmas(meta: dict | None, steps: int | None) -> tuple | None:
    """The checkpoint's own noise levels for `steps` evaluations (its config's sampling_sigmas: e.g. the CM paper's
    two-step levels that cmfast.cm_import records for a released model), or None."""
    cfg = (meta or {}).get("config") or {}
    levels = (cfg.get("sampling_sigmas") or {}).get(str(steps or 1)) if isinstance(cfg, dict) else None
    return tuple(float(s) for s in levels) if levels else None
