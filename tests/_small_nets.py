"""Small backbones for the training-maths value tests (test_training_values.py, test_scm_values.py)."""
from __future__ import annotations

import torch
from torch import nn


class CondNet(nn.Module):
    """A small backbone F(x_in, c_noise, labels) with spatial mixing, time dependence (a Linear of c_noise itself, so
    that c_noise and t give different F and dF/dt) and (label_dim > 0) a class embedding that moves the output: a
    dropped label changes every number. A 3x3 conv to `hidden` channels, the time (and label) added, tanh, a 3x3 conv;
    every parameter N(0, scale^2) from `seed`."""

    def __init__(self, ch=2, seed=0, label_dim=0, hidden=8, scale=0.3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(ch, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, ch, 3, padding=1)
        self.emb = nn.Linear(1, hidden)
        self.label = nn.Embedding(label_dim, hidden) if label_dim else None
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * scale)

    def forward(self, x, c_noise, labels=None):
        h = self.conv1(x) + self.emb(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        if self.label is not None:
            h = h + self.label(labels).to(x.dtype)[:, :, None, None]
        return self.conv2(torch.tanh(h))


def _v(t):
    return t.reshape(-1, 1, 1, 1)
