"""CD, CT and iCT losses against a direct float64 transcription of the papers' equations, with the same draws."""
import copy
import math

import pytest
import torch
from torch import nn

import cmfast
from cmfast import objectives as O


class SmallNet(nn.Module):
    """A deterministic backbone F(x_in, c_noise) with real spatial mixing and time dependence."""

    def __init__(self, ch=2, seed=0, dropout=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(ch, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, ch, 3, padding=1)
        self.emb = nn.Linear(1, 8)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.dropout = dropout

    def forward(self, x, c_noise, labels=None):
        h = self.conv1(x) + self.emb(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        h = nn.functional.dropout(torch.tanh(h), self.dropout, self.training)
        return self.conv2(h)


def f64(net, x, t, smin=0.002, sd=0.5):
    """The consistency function in float64, written out (CM paper Appendix C)."""
    net = copy.deepcopy(net).double()
    t = t.double().view(-1, 1, 1, 1)
    c_skip = sd**2 / ((t - smin) ** 2 + sd**2)
    c_out = sd * (t - smin) / torch.sqrt(sd**2 + t**2)
    c_in = 1 / torch.sqrt(t**2 + sd**2)
    return c_skip * x + c_out * net(c_in * x, torch.log(t.view(-1)) / 4)


def d64(net, x, t, sd=0.5):
    """EDM denoiser in float64 (sigma_min = 0 in the skip scalings)."""
    return f64(net, x, t, smin=0.0, sd=sd)


def karras64(n, smin=0.002, smax=80.0, rho=7.0):
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return (smin ** (1 / rho) + (i - 1) / (n - 1) * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 2, 8, 8, generator=g) * 2 - 1


def test_ct_loss_equals_algorithm_3(data):
    online, target = SmallNet(seed=0), SmallNet(seed=1)
    model, tmodel = cmfast.ConsistencyModel(online), cmfast.ConsistencyModel(target)
    N = 7
    got = O.ct_loss(model, tmodel, data, N, loss="l2", generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    n = torch.randint(0, N - 1, (6,), generator=g)           # pair (t_n, t_{n+1}), 0-based
    z = torch.randn(data.shape, generator=g)
    t = karras64(N)
    x, z = data.double(), z.double()
    pred = f64(online, x + t[n + 1].view(-1, 1, 1, 1) * z, t[n + 1])
    tgt = f64(target, x + t[n].view(-1, 1, 1, 1) * z, t[n])
    want = ((pred - tgt) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-7)
    assert got.requires_grad


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_cd_loss_equals_algorithm_2(data, solver):
    online, target, teacher = SmallNet(seed=0), SmallNet(seed=1), SmallNet(seed=2)
    model, tmodel = cmfast.ConsistencyModel(online), cmfast.ConsistencyModel(target)
    tea = cmfast.EDMDenoiser(teacher)
    N = 5
    got = O.cd_loss(model, tmodel, tea, data, N, solver=solver, loss="l1", generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    n = torch.randint(0, N - 1, (6,), generator=g)
    z = torch.randn(data.shape, generator=g).double()
    t = karras64(N)
    x = data.double()
    hi, lo = t[n + 1].view(-1, 1, 1, 1), t[n].view(-1, 1, 1, 1)
    x_hi = x + hi * z
    d = (x_hi - d64(teacher, x_hi, t[n + 1])) / hi                 # EDM ODE: dx/dt = (x - D(x, t)) / t
    x_e = x_hi + (lo - hi) * d                                     # Euler (CM paper: the CD-Euler ablation)
    d2 = (x_e - d64(teacher, x_e, t[n])) / lo
    x_lo = x_hi + (lo - hi) * (d + d2) / 2 if solver == "heun" else x_e
    want = (f64(online, x_hi, t[n + 1]) - f64(target, x_lo, t[n])).abs().flatten(1).mean(1)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)


def test_ict_loss_equals_transcription(data):
    online = SmallNet(seed=0)
    model = cmfast.ConsistencyModel(online)
    N = 11
    got = O.ict_loss(model, data, N, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    t = karras64(N)
    e = torch.erf((torch.log(t) + 1.1) / (math.sqrt(2) * 2.0))
    p = (e[1:] - e[:-1]) / (e[1:] - e[:-1]).sum()
    n = torch.multinomial(p, 6, replacement=True, generator=g)
    z = torch.randn(data.shape, generator=g).double()
    x = data.double()
    pred = f64(online, x + t[n + 1].view(-1, 1, 1, 1) * z, t[n + 1])
    tgt = f64(online, x + t[n].view(-1, 1, 1, 1) * z, t[n])
    c = 0.00054 * math.sqrt(2 * 8 * 8)
    want = (torch.sqrt(((pred - tgt) ** 2).flatten(1).sum(1) + c * c) - c) / (t[n + 1] - t[n])
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)


def test_online_and_target_share_dropout_masks(data):
    net = SmallNet(seed=0, dropout=0.5).train()
    model = cmfast.ConsistencyModel(net)
    t = torch.full((6,), 3.0)
    pair = O.Pair(data, t, data.clone(), t)
    # Same input, same net, dropout on: only equal masks make the loss exactly zero.
    loss = O.consistency_pair_loss(model, model, pair, loss="l2")
    assert torch.equal(loss, torch.zeros(6))
    a, b = model(data, t), model(data, t)
    assert not torch.equal(a, b)  # dropout is really active


def test_edm_loss_weighting(data):
    den = cmfast.EDMDenoiser(SmallNet(seed=0))
    g = torch.Generator().manual_seed(4)
    got = O.edm_loss(den, data, generator=torch.Generator().manual_seed(4))
    sigma = (torch.randn(6, generator=g) * 1.2 - 1.2).exp().double()
    n = torch.randn(data.shape, generator=g).double()
    x = data.double()
    D = d64(den.net, x + sigma.view(-1, 1, 1, 1) * n, sigma)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(got.double(), lam * ((D - x) ** 2).flatten(1).mean(1), rtol=2e-4, atol=1e-6)


def test_gradients_flow_only_to_online(data):
    online, target = SmallNet(seed=0), SmallNet(seed=1)
    model, tmodel = cmfast.ConsistencyModel(online), cmfast.ConsistencyModel(target)
    O.ct_loss(model, tmodel, data, 5, loss="pseudo_huber", generator=torch.Generator().manual_seed(0)).mean().backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in target.parameters())


def test_errors(data):
    model = cmfast.ConsistencyModel(SmallNet())
    with pytest.raises(ValueError, match="unknown loss"):
        O.ct_loss(model, model, data, 5, loss="l3")
    with pytest.raises(ValueError, match="solver"):
        O.cd_loss(model, model, cmfast.EDMDenoiser(SmallNet()), data, 5, solver="rk4", loss="l2")
    with pytest.raises(ValueError, match="lpips_model"):
        O.ct_loss(model, model, data, 5, loss="lpips")


def test_lpips_missing_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        O.LPIPS("vgg")


def test_lpips_distance_random_backbone(data):
    pytest.importorskip("lpips")
    lp = O.LPIPS("alex", pretrained_backbone=False)  # pnet_rand: no weights needed
    x = data[:, :1]
    d = O.distance(x, x, "lpips", lpips_model=lp)
    assert d.shape == (6,) and torch.allclose(d, torch.zeros(6), atol=1e-6)
    assert (O.distance(x, -x, "lpips", lpips_model=lp) > 0).all()


def test_lpips_inputs_are_gray_repeated_and_upsampled_to_224():
    """What the network sees (CM paper Appendix C): 1-channel images as 3 equal channels, images under 256 pixels
    bilinearly resized to 224 (align_corners=False); 256 and up as they are. Checked by recording the lpips network's
    inputs against the same images prepared by hand."""
    pytest.importorskip("lpips")
    lp = O.LPIPS("alex", pretrained_backbone=False)
    seen = []
    real = lp.model.forward
    lp.model.forward = lambda a, b, **k: (seen.append((a, b)), real(a, b, **k))[1]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1, torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    d = lp(x, y)
    a, b = seen[-1]
    assert a.shape == (2, 3, 224, 224) and torch.equal(a[:, 0], a[:, 2])
    # A 32 -> 224 bilinear resize (scale 7, half-pixel centres) by hand: output pixel i samples (i + 0.5) / 7 - 0.5
    pos = ((torch.arange(224) + 0.5) / 7 - 0.5).clamp(min=0)
    i0 = pos.floor().long().clamp(max=31)
    i1, w = (i0 + 1).clamp(max=31), (pos - pos.floor())

    def resize(img):
        rows = img[..., i0, :] * (1 - w)[:, None] + img[..., i1, :] * w[:, None]
        return rows[..., i0] * (1 - w) + rows[..., i1] * w
    torch.testing.assert_close(a[:, 1], resize(x[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b[:, 1], resize(y[:, 0]), atol=1e-5, rtol=0)
    assert d.shape == (2,) and (d > 0).all()
    big = torch.rand(1, 3, 256, 256, generator=g)
    lp(big, big.flip(-1))
    assert torch.equal(seen[-1][0], big)                 # 256 and up: no resize, no copy of the values
