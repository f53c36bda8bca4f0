"""Export a cmfast-train checkpoint as a shipped model: the EMA weights alone in fp16 safetensors (with the
checkpoint's config metadata, so cmfast.load_pretrained, or cmfast.training.checkpoint.load_model given the file's
path, rebuilds it) and a JSON model card: data, method, steps, images seen, how and where it trained, and the metric
measured on the exported weights (FD-FMNIST for a Fashion-MNIST model, FID where its Inception weights are found;
otherwise the card says that none was measured, and why).

    python scripts/export_pretrained.py --checkpoint runs/fmnist --name fmnist --device-note "H100, 7 min" \
        --train-command "cmfast-train ..." [--num 10000] [--searched-sigmas 80,0.02]
    python scripts/export_pretrained.py --checkpoint runs/cifar10 --name cifar10-ict --out-dir exported \
        [--metric fid --data-dir DIR]

Any checkpoint cmfast-train writes exports: CIFAR-10, Fashion-MNIST or an image folder, any resolution and channel
count, class-conditional or not. A Fashion-MNIST model's card is the shipped one's (cmfast/assets/fmnist.json);
another model's also names its image shape when its dataset does not imply it, and its class count. An EDM teacher
(--method edm) is scored with EDM's Heun sampler, 18 steps (35 network evaluations), instead of 1 and 2 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from cmfast.cli._common import sigmas_type
from cmfast.metrics import SHAPES, evaluate
from cmfast.pretrained import ASSETS
from cmfast.training.checkpoint import FORMAT, CheckpointError, atomic_write, load_model, load_weights, resolve

METRIC_NOTES = {"fd-fmnist": "FD-FMNIST is cmfast's offline metric (classifier features), not comparable with FID",
                "fid": "FID (Inception-V3, pytorch-fid's weights) against {ref}"}


def _sigmas(text: str) -> tuple[float, ...]:
    """'80,0.02' -> (80.0, 0.02): at least two decreasing positive noise levels."""
    v = sigmas_type("80,0.02")(text)    # the CLIs' --sigmas parser
    if len(v) < 2 or any(x <= 0 for x in v) or any(b >= a for a, b in zip(v, v[1:])):
        raise argparse.ArgumentTypeError(f"expected at least two decreasing positive levels, got {text!r}")
    return v


def image_shape(cfg: dict) -> tuple:
    """(C, H, W) of the images the config's network makes."""
    net = cfg.get("net") or {}
    return (net.get("in_channels"), net.get("img_resolution"), net.get("img_resolution"))


def choose_metric(asked: str, cfg: dict, inception: str | None) -> tuple[str | None, str]:
    """(the metric of the card, or None; why none). FD-FMNIST scores (1, 32, 32) Fashion-MNIST models only (its
    classifier's input and reference set); FID any other model whose Inception weights are here (never downloaded).
    'auto' picks the one that applies; a metric asked for by name that cannot apply is a ValueError."""
    shape, dataset = image_shape(cfg), cfg.get("dataset")
    fmnist = dataset == "fashion-mnist" and shape == SHAPES["fashion-mnist"]
    if asked == "none":
        return None, "--metric none"
    if asked == "fd-fmnist" or (asked == "auto" and fmnist):
        if not fmnist:
            raise ValueError(f"--metric fd-fmnist scores Fashion-MNIST models (1x32x32) only; this one is "
                             f"{dataset} {'x'.join(map(str, shape))}")
        return "fd-fmnist", ""
    from cmfast._inception import find_weights
    try:
        find_weights(inception)
    except FileNotFoundError as e:
        if asked == "fid":
            raise ValueError(str(e)) from None
        return None, f"FD-FMNIST scores Fashion-MNIST models (1x32x32) only; FID: {e}"
    return "fid", ""


def run_note(wpath: str, step: int, images: int) -> str:
    """--device-note's default: '<device>, <m> min of training, <n> images', as reference_runs.py writes it, from the
    run folder beside the checkpoint (the device its log.txt names, the wall time its stats.jsonl's elapsed_s, which
    counts from each start or resume, up to `step`); '' when the folder does not say."""
    d = os.path.dirname(os.path.abspath(wpath))
    try:
        with open(os.path.join(d, "stats.jsonl")) as f:
            rows = [r for r in map(json.loads, filter(str.strip, f)) if r["step"] <= step and "elapsed_s" in r]
        with open(os.path.join(d, "log.txt")) as f:
            devices = re.findall(r" rank\(s\) on ([^,\s]+),", f.read())
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if not rows or not devices:
        return ""
    # a stretch (one start or resume) ends where the next row's elapsed_s starts again lower
    wall = sum(r["elapsed_s"] for r, nxt in zip(rows, rows[1:] + [None])
               if nxt is None or nxt["elapsed_s"] < r["elapsed_s"])
    return f"{devices[-1]}, {wall / 60:.1f} min of training, {images} images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])   # the first paragraph, whole
    ap.add_argument("--checkpoint", required=True, help="run directory or ckpt-*.safetensors")
    ap.add_argument("--name", required=True, help="shipped model name (cmfast/assets/<name>.safetensors)")
    ap.add_argument("--which", default="ema", help="weights: ema (first rate), ema@RATE or model")
    ap.add_argument("--metric", choices=("auto", "fd-fmnist", "fid", "none"), default="auto",
                    help="the card's metric: auto (default) is FD-FMNIST for a 1x32x32 Fashion-MNIST model, else FID "
                         "if its Inception weights are found, else none (the card says why)")
    ap.add_argument("--num", type=int, default=10000, help="samples for the metric's numbers in the card")
    ap.add_argument("--train-command", default="", help="the exact command that trained it")
    ap.add_argument("--device-note", default=None, help="device and wall time of the training run (default: what "
                                                        "the run folder's log.txt and stats.jsonl say)")
    ap.add_argument("--note", default="", help="anything a user must know about this model")
    ap.add_argument("--searched-sigmas", type=_sigmas, default=None, metavar="S1,S2[,...]",
                    help="levels a search found (e.g. scripts/reference_runs.py's cmfast.metrics.search_sigmas): the "
                         "card then also holds the metric at them, as '<steps>-step-searched'")
    ap.add_argument("--out-dir", default=ASSETS, help="where the .safetensors and the card go (default: the "
                                                      "package's assets, where load_pretrained finds them)")
    ap.add_argument("--device", default=None, help="device of the evaluation (default cuda if any)")
    ap.add_argument("--data-dir", default=None, help="the metric's reference data: Fashion-MNIST or CIFAR-10 folder "
                                                     "(default: the usual search), or the image folder (default: the "
                                                     "one the model trained on)")
    ap.add_argument("--inception", default=None, help="FID's Inception weights (default: the torch hub cache)")
    a = ap.parse_args(argv)

    from safetensors.torch import save
    try:
        wpath = resolve(a.checkpoint)
        modules, meta = load_weights(wpath)
        metric, why_none = choose_metric(a.metric, meta["config"], a.inception)
        if a.searched_sigmas and meta["config"].get("method") == "edm":
            raise ValueError("--searched-sigmas: an EDM teacher samples with its Heun schedule, not at given levels")
    except (CheckpointError, ValueError) as e:
        print(f"export_pretrained: error: {e}", file=sys.stderr)
        return 2
    which = a.which
    if which == "ema" and "ema" not in modules and meta["config"].get("ema"):
        which = f"ema@{float(meta['config']['ema'][0])}"
    if which not in modules:
        print(f"export_pretrained: error: {wpath} has no {which!r} weights ({', '.join(sorted(modules))})",
              file=sys.stderr)
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
        device_note = a.device_note if a.device_note is not None else \
            run_note(wpath, meta["step"], meta["step"] * int(cfg.get("batch_size", 0)))
        try:
            card = _score_and_card(a, staged, which, meta, cfg, metric, why_none, device_note)
        except (ValueError, OSError) as e:      # the metric's data or weights (DataError is a ValueError)
            print(f"export_pretrained: error: {metric + ': ' if metric else ''}"
                  f"{(str(e).splitlines() or [repr(e)])[0]}", file=sys.stderr)
            return 2
        os.replace(staged, out)
        atomic_write(os.path.join(a.out_dir, f"{a.name}.json"), json.dumps(card, indent=2).encode())
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    print(json.dumps(card, indent=2))
    return 0


def _score_and_card(a, path, which, meta, cfg, metric, why_none, device_note) -> dict:
    """The model card of the exported weights at `path`, their metric measured as load_pretrained reads them."""
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(path, which="ema", map_location=device)  # the exported file, as load_pretrained reads it
    dataset, shape, classes = cfg.get("dataset"), image_shape(cfg), int((cfg.get("net") or {}).get("label_dim") or 0)
    card = {
        "name": a.name, "dataset": dataset, "method": cfg.get("method"), "preset": cfg.get("preset"),
        "parameters": sum(p.numel() for p in model.parameters()), "weights": f"{which} of step {meta['step']}, fp16",
        "steps": meta["step"], "images_seen": meta["step"] * int(cfg.get("batch_size", 0)),
    }
    if shape != SHAPES.get(dataset):        # a folder's, or another resolution: not implied by the dataset's name
        card["image_shape"] = list(shape)
    if classes:
        card["classes"] = classes
    card["training"] = {"command": a.train_command, "device": device_note}
    if metric is None:
        card["metric"] = f"none measured: {why_none}"
    else:
        card[metric.replace("-", "_")] = _scores(a, model, metric, cfg, device)
    card["note"] = a.note
    return card


def _scores(a, model, metric, cfg, device) -> dict:
    """The card's metric block: 1 and 2 steps (and the searched levels) and the levels each score used, as evaluate
    reports them (they start at the model's sigma_max). An EDM teacher (--method edm) has no one-step sampler: it is
    scored with EDM's Heun sampler, 18 steps = 35 network evaluations, as the reference runs score it."""
    kw = dict(num=a.num, seed=0, device=device, data_dir=a.data_dir)
    ref = "Fashion-MNIST train"
    if metric == "fid":
        folder = cfg.get("dataset") == "folder"
        kw.update(dataset=cfg.get("dataset"), weights=a.inception,
                  data_dir=a.data_dir or (cfg.get("data_dir") if folder else None))
        ref = f"the image folder {kw['data_dir']}" if folder else f"{cfg.get('dataset')} train"
    note = METRIC_NOTES[metric].format(ref=ref)
    if cfg.get("method") == "edm":     # the levels are EDM's Karras schedule: evaluate reports none
        ev = evaluate(model, metric, **kw, steps=18)
        return {"heun-18": round(float(ev["value"]), 3), "num_samples": a.num,
                "sampler": "EDM Heun, 18 steps (35 network evaluations)", "note": note}
    value, sigmas = {}, {}

    def score(key, **steps_or_sigmas):
        ev = evaluate(model, metric, **kw, **steps_or_sigmas)
        value[key], sigmas[key] = round(float(ev["value"]), 3), [float(v) for v in ev["sigmas"]]
    for s in (1, 2):
        score(f"{s}-step", steps=s)
    if a.searched_sigmas:
        score(f"{len(a.searched_sigmas)}-step-searched", sigmas=a.searched_sigmas)
    return {**value, "num_samples": a.num, "sigmas": sigmas, "note": note}


if __name__ == "__main__":
    sys.exit(main())
