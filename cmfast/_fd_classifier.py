"""The small Fashion-MNIST CNN whose penultimate features define FD-FMNIST (cmfast's offline quality metric).

FD-FMNIST is a Frechet distance like FID, but in the features of this classifier (trained by
scripts/train_fmnist_classifier.py, shipped as cmfast/assets/fmnist_classifier.safetensors); its numbers are
not comparable with FID. Small on purpose: 60k images through it take seconds on a CPU.
"""
import os

import torch
from torch import nn

ASSET = os.path.join(os.path.dirname(__file__), "assets", "fmnist_classifier.safetensors")
FEATURE_DIM = 128


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FMNISTClassifier(nn.Module):
    """[-1, 1] images (N, 1, 32, 32) -> logits (N, 10); features() gives the (N, 128) penultimate activations."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            _block(1, 32), nn.MaxPool2d(2),      # 32 -> 16
            _block(32, 48), nn.MaxPool2d(2),     # 16 -> 8
            _block(48, 96), nn.MaxPool2d(2),     # 8 -> 4
            _block(96, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


def load_classifier(path=ASSET, device="cpu"):
    """The shipped classifier in eval mode (float32) and its safetensors metadata (test accuracy etc.)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FD-FMNIST classifier weights not found at {path}: "
                                f"run scripts/train_fmnist_classifier.py to create them")
    try:    # a truncated file, another model's weights (cmfast-eval --inception-weights with fd-fmnist): one line
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = {k: v.float() for k, v in load_file(path).items()}
        net = FMNISTClassifier()
        net.load_state_dict(state, strict=True)
    except Exception as e:     # noqa: BLE001 - safetensors and torch raise several types here
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why if len(why) <= 160 else why[:157] + "..."
        raise ValueError(f"{path}: not the FD-FMNIST classifier weights ({why})") from None
    return net.eval().to(device), meta
