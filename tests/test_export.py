"""Serving without Python's eager overhead: a consistency model goes through torch.export (the graph AOTInductor and
ExecuTorch take) with a dynamic batch and class labels, and the exported program computes what the model computes,
saved and loaded again. Under export the default backend 'auto' is the torch composition (cmfast/ops: export runs
with torch.compiler.is_compiling() true)."""
from __future__ import annotations

import pytest
import torch

import cmfast

pytestmark = pytest.mark.slow


def _net(seed):
    torch.manual_seed(seed)
    net = cmfast.UNet.from_preset("tiny", label_dim=3)
    with torch.no_grad():           # a zero-initialized output layer would make every output the skip term alone
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def test_exported_model_equals_the_model_at_other_batch_sizes_after_save_and_load(tmp_path):
    model = cmfast.ConsistencyModel(_net(0)).eval()
    g = torch.Generator().manual_seed(1)
    x, sigma, labels = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([80.0, 2.0, 0.05]), torch.tensor([0, 2, 1])
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        ep = torch.export.export(model, (x, sigma, labels), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    for n in (1, 5):
        xn = torch.randn(n, 3, 32, 32, generator=g)
        sn = torch.exp(torch.empty(n).uniform_(-6.0, 4.3, generator=g))       # 0.0025 .. 74
        yn = torch.randint(0, 3, (n,), generator=g)
        with torch.no_grad():
            want = model(xn, sn, yn)
            got = loaded(xn, sn, yn)
        assert want.abs().max() > 0.1 and (want - xn).abs().max() > 0.05      # a network term, not the skip alone
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
