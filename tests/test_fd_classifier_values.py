"""The FD-FMNIST classifier (cmfast/_fd_classifier.py) defines the metric's feature space: its features are held to a
float64 transcription of the network written out here from the shipped weights (3x3 convolution, BatchNorm with its
running statistics and eps 1e-5, ReLU, 2x2 max pooling; global mean), and load_classifier gives it in eval mode (a
BatchNorm in training mode would make each image's features depend on its batch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cmfast._fd_classifier import FEATURE_DIM, load_classifier


def _features64(sd: dict, x: torch.Tensor) -> torch.Tensor:
    h = x.double()
    for i, k in enumerate((0, 2, 4, 6)):            # body.<k> = (conv, bn, relu); a max pool after the first three
        w = sd[f"body.{k}.0.weight"].double()
        mean, var = sd[f"body.{k}.1.running_mean"].double(), sd[f"body.{k}.1.running_var"].double()
        gamma, beta = sd[f"body.{k}.1.weight"].double(), sd[f"body.{k}.1.bias"].double()
        h = F.conv2d(h, w, padding=1)
        h = (h - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * gamma[:, None, None] \
            + beta[:, None, None]
        h = h.clamp_min(0)
        if i < 3:
            h = F.max_pool2d(h, 2)
    return h.mean((2, 3))


def test_features_and_logits_equal_a_float64_transcription():
    net, meta = load_classifier()
    assert not net.training and all(not m.training for m in net.modules())
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 1, 32, 32, generator=g) * 2 - 1)
    x[:2] = -1
    x[0, 0, 8:24, 10:22] = 0.6                       # a garment-like block on the -1 background
    want = _features64(sd, x)
    with torch.no_grad():
        got = net.features(x)
        logits = net(x)
    assert got.shape == (6, FEATURE_DIM)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double(), want @ sd["head.weight"].double().T + sd["head.bias"].double(),
                               rtol=1e-5, atol=1e-5)
    # eval mode: one image's features do not depend on the batch it comes in
    with torch.no_grad():
        torch.testing.assert_close(net.features(x[3:4]), got[3:4], rtol=1e-6, atol=1e-6)
