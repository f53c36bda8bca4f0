"""torch.func over a consistency model: vmap of the model equals the batched call, and per-sample gradients
(vmap(grad)), the usual way to get them, equal one gradient per sample, class labels included. vmap refused the
model's sigma check (a value-dependent branch), the class-index range check (.tolist()) and the torch GroupNorm's
channels-last query."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

import cmfast


def _model():
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", img_resolution=16, label_dim=3)
    with torch.no_grad():           # away from the zero-initialized output layer: the network term counts
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cmfast.ConsistencyModel(net).eval()


# torch's own note that SDPA has no vmap batching rule on CPU (it loops): not ours to act on
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_vmap_and_per_sample_gradients_equal_the_batched_and_one_at_a_time_results():
    m = _model()
    g = torch.Generator().manual_seed(1)
    x, s, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([80.0, 2.0, 0.01]), torch.tensor([0, 2, 1])
    with torch.no_grad():
        want = m(x, s, y)
        got = vmap(lambda xi, si, yi: m(xi[None], si[None], yi[None])[0])(x, s, y)
    assert (want - x).abs().max() > 0.05                       # a network term, not the skip alone
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, xi, si, yi):
        return functional_call(m, p, (xi[None], si[None], yi[None])).pow(2).mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, s, y)
    for i in range(3):
        one = grad(loss)(params, x[i], s[i], y[i])
        assert sum(float(v.abs().sum()) for v in one.values()) > 0
        for k in one:
            torch.testing.assert_close(per_sample[k][i], one[k], rtol=1e-4, atol=1e-6, msg=lambda m_: f"{k}: {m_}")
