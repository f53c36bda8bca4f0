"""Shipped models: cmfast/assets/<name>.safetensors (a cmfast checkpoint file, EMA weights) and <name>.json, its
model card (dataset, method, steps, metric). Offline: nothing is downloaded."""
from __future__ import annotations

import json
import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def available() -> list[str]:
    """Names of the shipped models: a .safetensors checkpoint with its .json model card (other assets, such as the
    FD-FMNIST classifier, have no card)."""
    if not os.path.isdir(ASSETS):
        return []
    return sorted(f[:-len(".safetensors")] for f in os.listdir(ASSETS)
                  if f.endswith(".safetensors") and os.path.isfile(os.path.join(ASSETS, f[:-len(".safetensors")] + ".json")))


def model_card(name: str) -> dict:
    path = os.path.join(ASSETS, f"{name}.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def card_sampling_sigmas(card: dict) -> dict:
    """A model card's own noise levels by step count, as a checkpoint config's sampling_sigmas: {"2": the 2-step
    levels the reference run's search found for this model (card fd_fmnist.sigmas["2-step-searched"])}, or {} where
    the card records none. cmfast-sample and cmfast-eval --pretrained use them for that many steps unless --sigmas
    is given."""
    levels = (((card or {}).get("fd_fmnist") or {}).get("sigmas") or {}).get("2-step-searched")
    return {"2": [float(s) for s in levels]} if levels else {}


def load_pretrained(name: str, map_location="cpu"):
    """A shipped model by name, in eval mode, its model card attached as `model.card`: 'fmnist' -> ConsistencyModel
    (iCT), 'fmnist-sct' -> cmfast.trigflow.TrigFlowModel (sCT). Both sample with cmfast.sample or, on a GPU, the
    CUDA-graph sampler."""
    names = available()
    if name not in names:
        raise ValueError(f"no shipped model {name!r}; available: {', '.join(names) if names else 'none yet'}")
    from .training.checkpoint import load_model
    path = os.path.join(ASSETS, f"{name}.safetensors")
    model, meta = load_model(path, which="ema", map_location=map_location)
    model.card = {**model_card(name), "step": meta["step"]}
    return model
