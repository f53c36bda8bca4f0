"""Algorithm 1 (one and many steps) and the EDM teacher sampler."""
import math

import pytest
import torch

import cmfast
from test_objectives import SmallNet, d64, karras64


@pytest.fixture
def model():
    return cmfast.ConsistencyModel(SmallNet(seed=0)).eval()


def test_one_step_equals_model_at_sigma_max(model):
    z = torch.randn(3, 2, 8, 8)
    assert torch.equal(cmfast.sample(model, z), model(80.0 * z, 80.0))


def test_multistep_follows_algorithm_1(model):
    z = torch.randn(3, 2, 8, 8)
    sigmas = (80.0, 2.5, 0.4)
    got = cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = model(80.0 * z, 80.0)
    for s in sigmas[1:]:
        n = torch.randn(z.shape, generator=g)
        x = model(x + math.sqrt(s**2 - 0.002**2) * n, s)
    assert torch.equal(got, x)
    again = cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, again)
    other = cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(got, other)


def test_given_noise_replaces_the_draws(model):
    z = torch.randn(3, 2, 8, 8)
    sigmas = (80.0, 2.5, 0.4)
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(z.shape, generator=g) for _ in sigmas[1:]]
    got = cmfast.sample(model, z, sigmas, noise=noise)
    assert torch.equal(got, cmfast.sample(model, z, sigmas, generator=torch.Generator().manual_seed(7)))
    for bad in (noise[:1], [noise[0], noise[1][:2]]):
        with pytest.raises(ValueError, match=r"noise: expected 2 tensor\(s\) shaped \(3, 2, 8, 8\)"):
            cmfast.sample(model, z, sigmas, noise=bad)


def test_eager_images_do_not_depend_on_the_batch_size(model):
    """Each image's noise (z and every later level's) is its own: 2-step images drawn in batches of 5 or 2 agree,
    and image 3 of a set is image 3 whatever comes before it in its batch."""
    from cmfast.sampling import generate_batches, image_noise
    model.net.in_channels, model.net.img_resolution = 2, 8

    def images(batch):
        return torch.cat([x for _, x in generate_batches(model, 5, sigmas=(80.0, 0.821), seed=3,
                                                         batch_size=batch, engine="eager")])
    a, b = images(5), images(2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    z = image_noise(3, 0, 5, (2, 8, 8))
    torch.testing.assert_close(image_noise(3, 3, 1, (2, 8, 8))[0], z[3], rtol=0, atol=0)
    assert not torch.equal(image_noise(3, 0, 5, (2, 8, 8), draw=1), z)
    assert not torch.equal(image_noise(4, 0, 5, (2, 8, 8)), z)


@pytest.mark.parametrize("bad", [(80.0, 80.0), (1.0, 2.0), (), (90.0,), (80.0, 0.001), (80.0, float("nan"))])
def test_bad_sigmas(model, bad):
    with pytest.raises(ValueError, match="sigmas"):
        cmfast.sample(model, torch.randn(1, 2, 8, 8), bad)


def test_edm_heun_sampler_matches_transcription():
    net = SmallNet(seed=3)
    den = cmfast.EDMDenoiser(net).eval()
    z = torch.randn(2, 2, 8, 8)
    got = cmfast.edm_sample(den, z, num_steps=4, solver="heun")
    t = karras64(4).flip(0).tolist() + [0.0]
    x = z.double() * t[0]
    evals = 0
    for tc, tn in zip(t[:-1], t[1:]):
        d = (x - d64(net, x, torch.tensor([tc] * 2, dtype=torch.float64))) / tc
        xn = x + (tn - tc) * d
        evals += 1
        if tn > 0:
            d2 = (xn - d64(net, xn, torch.tensor([tn] * 2, dtype=torch.float64))) / tn
            xn = x + (tn - tc) * (d + d2) / 2
            evals += 1
        x = xn
    assert evals == 7  # 2 N - 1
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="steps: EDM's sampler takes 2 or more steps"):     # was 'n: expected ...'
        cmfast.edm_sample(den, z, num_steps=1)


class _LabelProbe(torch.nn.Module):
    """A class-conditional stand-in whose sample is the class label it was given (every pixel)."""
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, label_dim=3):
        super().__init__()
        self.net = torch.nn.Module()
        self.net.in_channels, self.net.img_resolution, self.net.label_dim = 1, 4, label_dim
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        return class_labels.to(x.dtype).reshape(-1, 1, 1, 1).expand_as(x).clone()


def test_class_labels_cycle_over_the_whole_set_whatever_the_batch():
    """Image i of a conditional set gets class i mod label_dim, whatever batch it falls in (restarting the cycle at
    every batch skewed the classes and made the images depend on batch_size); class_label fixes every image's."""
    from cmfast.sampling import generate_batches
    model = _LabelProbe(3)
    for batch in (7, 3, 2):
        got = torch.cat([x for _, x in generate_batches(model, 7, sigmas=(80.0,), batch_size=batch, engine="eager")])
        assert got[:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 0], batch
    got = torch.cat([x for _, x in generate_batches(model, 4, sigmas=(80.0,), batch_size=3, class_label=2,
                                                    engine="eager")])
    assert got[:, 0, 0, 0].tolist() == [2, 2, 2, 2]


def _modes(m):
    return [sub.training for sub in m.modules()]


def test_a_model_in_train_mode_samples_without_dropout_and_keeps_its_modes():
    """sample / edm_sample in train mode drew new dropout masks at every evaluation (the same seed gave other images
    each call); they run the model in eval mode and put back each submodule's own mode (a mixed one included)."""
    torch.manual_seed(0)
    net = cmfast.UNet.from_preset("tiny", in_channels=2, img_resolution=8, dropout=0.5)
    z = torch.randn(2, 2, 8, 8)
    for wrap, run in ((cmfast.ConsistencyModel,
                       lambda m: cmfast.sample(m, z, (80.0, 1.0), generator=torch.Generator().manual_seed(1))),
                      (cmfast.EDMDenoiser, lambda m: cmfast.edm_sample(m, z, num_steps=3))):
        m = wrap(net).eval()
        want = run(m)
        m.train()
        m.net.map_layer0.eval()             # a mixed state, as a user may leave it
        modes = _modes(m)
        assert torch.equal(run(m), want)
        assert _modes(m) == modes and m.training and not m.net.map_layer0.training


def test_bad_noise_and_levels_are_one_clear_error(model):
    """NaN noise gave NaN images without a word (CPU: checked, no device sync there); integer extra noise was cast;
    sigmas='80' was read as the levels (8, 0) and a 2-D tensor failed inside float(); edm_sample returned an int64
    'image' for an integer z and named num_steps=2.0 'n' (karras_sigmas' argument)."""
    z = torch.randn(2, 2, 8, 8)
    nan = z.clone()
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^z: expected finite noise, got NaN / inf values$"):
        cmfast.sample(model, nan)
    with pytest.raises(ValueError, match=r"^noise\[0\]: expected finite noise"):
        cmfast.sample(model, z, (80.0, 1.0), noise=[nan])
    with pytest.raises(TypeError, match=r"^noise\[0\]: expected a floating-point tensor"):
        cmfast.sample(model, z, (80.0, 1.0), noise=[torch.zeros(2, 2, 8, 8, dtype=torch.long)])
    for bad in ("80", torch.tensor([[80.0, 1.0]]), [80.0, "x"]):
        with pytest.raises(TypeError, match=r"^sigmas: expected a number or a 1-D sequence of numbers"):
            cmfast.sample(model, z, bad)
    assert torch.equal(cmfast.sample(model, z, torch.tensor([80.0, 1.0]), generator=torch.Generator().manual_seed(0)),
                       cmfast.sample(model, z, (80.0, 1.0), generator=torch.Generator().manual_seed(0)))
    teacher = cmfast.EDMDenoiser(model.net).eval()
    with pytest.raises(TypeError, match=r"^z: expected a floating-point tensor"):
        cmfast.edm_sample(teacher, z.long(), num_steps=2)
    with pytest.raises(ValueError, match=r"^z: expected finite noise"):
        cmfast.edm_sample(teacher, nan, num_steps=2)
    with pytest.raises(TypeError, match=r"^num_steps: expected an integer, got 2\.0$"):
        cmfast.edm_sample(teacher, z, num_steps=2.0)
    import numpy as np
    assert torch.equal(cmfast.edm_sample(teacher, z, num_steps=np.int64(3)), cmfast.edm_sample(teacher, z, num_steps=3))


def test_noise_on_another_device_than_the_model_is_one_clear_error(model):
    """z on the CPU for a model on another device (CUDA; 'meta' stands in here) failed inside the network's first
    layer ('Tensor on device meta is not on the expected device cpu!', on a GPU 'Input type (torch.FloatTensor) and
    weight type (torch.cuda.FloatTensor) should be the same'); a generator=<seed> inside torch.randn."""
    import copy
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match=r"^z: expected a tensor on meta \(the model's device\), got one on cpu$"):
        cmfast.sample(meta, torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"^z: expected a tensor on meta"):
        cmfast.edm_sample(cmfast.EDMDenoiser(meta.net), torch.randn(1, 2, 8, 8), num_steps=2)
    with pytest.raises(ValueError, match=r"^z: expected a tensor on cpu \(the model's device\), got one on meta$"):
        cmfast.sample(model, torch.randn(1, 2, 8, 8, device="meta"))
    with pytest.raises(TypeError, match=r"^generator: expected a torch\.Generator or None, got int$"):
        cmfast.sample(model, torch.randn(1, 2, 8, 8), (80.0, 1.0), generator=0)
