"""Export a cmfast-train checkpoint as a shipped model: the EMA weights alone in fp16 safetensors (with the
checkpoint's config metadata, so cmfast.load_pretrained rebuilds it) and a JSON model card with FD-FMNIST measured
on the exported weights.

    python scripts/export_pretrained.py --checkpoint runs/fmnist --name fmnist --device-note "H100, 7 min" \
        --train-command "cmfast-train ..." [--num 10000] [--searched-sigmas 80,0.02]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from cmfast.cli._common import sigmas_type
from cmfast.metrics import evaluate
from cmfast.pretrained import ASSETS
from cmfast.training.checkpoint import FORMAT, atomic_write, load_model, load_weights, resolve


def _sigmas(text: str) -> tuple[float, ...]:
    """'80,0.02' -> (80.0, 0.02): at least two decreasing positive noise levels."""
    v = sigmas_type("80,0.02")(text)    # the CLIs' --sigmas parser
    if len(v) < 2 or any(x <= 0 for x in v) or any(b >= a for a, b in zip(v, v[1:])):
        raise argparse.ArgumentTypeError(f"expected at least two decreasing positive levels, got {text!r}")
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])   # the first paragraph, whole
    ap.add_argument("--checkpoint", required=True, help="run directory or ckpt-*.safetensors")
    ap.add_argument("--name", required=True, help="shipped model name (cmfast/assets/<name>.safetensors)")
    ap.add_argument("--which", default="ema", help="weights: ema (first rate), ema@RATE or model")
    ap.add_argument("--num", type=int, default=10000, help="samples for the FD-FMNIST numbers of the card")
    ap.add_argument("--train-command", default="", help="the exact command that trained it")
    ap.add_argument("--device-note", default="", help="device and wall time of the training run")
    ap.add_argument("--note", default="", help="anything a user must know about this model")
    ap.add_argument("--searched-sigmas", type=_sigmas, default=None, metavar="S1,S2[,...]",
                    help="levels a search found (e.g. scripts/reference_runs.py's cmfast.metrics.search_sigmas): the "
                         "card then also holds FD-FMNIST at them, as '<steps>-step-searched'")
    ap.add_argument("--out-dir", default=ASSETS, help="where the .safetensors and the card go (default: the "
                                                      "package's assets, where load_pretrained finds them)")
    ap.add_argument("--device", default=None, help="device of the FD-FMNIST evaluation (default cuda if any)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the usual search)")
    a = ap.parse_args(argv)

    from safetensors.torch import save
    wpath = resolve(a.checkpoint)
    modules, meta = load_weights(wpath)
    which = a.which
    if which == "ema" and "ema" not in modules and meta["config"].get("ema"):
        which = f"ema@{float(meta['config']['ema'][0])}"
    if which not in modules:
        print(f"export_pretrained: error: {wpath} has no {which!r} weights ({', '.join(sorted(modules))})", file=sys.stderr)
        return 2
    # Keep the checkpoint layout (module/key) so load_model reads it; only the chosen weights, in fp16.
    flat = {f"ema/{k}": (v.half() if v.is_floating_point() else v).contiguous() for k, v in modules[which].items()}
    cfg = dict(meta["config"], ema=[])
    os.makedirs(a.out_dir, exist_ok=True)
    out = os.path.join(a.out_dir, f"{a.name}.safetensors")
    # Staged beside it and put in place with its card at the end: an export stopped during its evaluation (the
    # reference stage's time limit) left new weights under the previous model's card (or a part of a file).
    staged = os.path.join(a.out_dir, f".{a.name}.export{os.getpid()}.safetensors")
    atomic_write(staged, save(flat, metadata={"format": FORMAT, "step": str(meta["step"]), "config": json.dumps(cfg)}))
    try:
        card = _score_and_card(a, staged, which, meta, cfg)
        os.replace(staged, out)
        atomic_write(os.path.join(a.out_dir, f"{a.name}.json"), json.dumps(card, indent=2).encode())
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    print(json.dumps(card, indent=2))
    return 0


def _score_and_card(a, path, which, meta, cfg) -> dict:
    """The model card of the exported weights at `path`, their FD-FMNIST measured as load_pretrained reads them."""
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(path, which="ema", map_location=device)  # the exported file, as load_pretrained reads it

    fd, sigmas = {}, {}     # the levels each score used, as evaluate reports them (they start at the model's sigma_max)

    def score(key, **kw):
        ev = evaluate(model, "fd-fmnist", num=a.num, seed=0, device=device, data_dir=a.data_dir, **kw)
        fd[key], sigmas[key] = round(float(ev["value"]), 3), [float(v) for v in ev["sigmas"]]
    for s in (1, 2):
        score(f"{s}-step", steps=s)
    if a.searched_sigmas:
        score(f"{len(a.searched_sigmas)}-step-searched", sigmas=a.searched_sigmas)
    card = {
        "name": a.name, "dataset": cfg.get("dataset"), "method": cfg.get("method"), "preset": cfg.get("preset"),
        "parameters": sum(p.numel() for p in model.parameters()), "weights": f"{which} of step {meta['step']}, fp16",
        "steps": meta["step"], "images_seen": meta["step"] * int(cfg.get("batch_size", 0)),
        "training": {"command": a.train_command, "device": a.device_note},
        "fd_fmnist": {**fd, "num_samples": a.num, "sigmas": sigmas,
                      "note": "FD-FMNIST is cmfast's offline metric (classifier features), not comparable with FID"},
        "note": a.note,
    }
    return card


if __name__ == "__main__":
    sys.exit(main())
