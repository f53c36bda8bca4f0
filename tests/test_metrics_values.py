"""cmfast.metrics, the FID Inception preprocessing and the shipped-model loader against numbers computed here in
float64 with numpy only (no scipy): closed-form Frechet distances, the unbiased covariance, the 8-bit levels, the
bilinear resize to 299, the feature layer, what evaluate() asks the sampler for and scores, the Karras levels.
(Found by mutation testing: each test fails with a small planted change in the code it names.)"""
import math

import numpy as np
import pytest
import torch

from cmfast import metrics


def _eig_fd(mu1, s1, mu2, s2):
    """FD with tr((S1 S2)^(1/2)) as the sum of the square roots of the (real, >= 0) eigenvalues of S1 S2."""
    ev = np.linalg.eigvals(np.asarray(s1, np.float64) @ np.asarray(s2, np.float64)).real
    d = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, abs=1e-12)
    # diagonal: the sum over coordinates
    fd = metrics.frechet_distance([0, 1, 2], np.diag([1.0, 4, 9]), [0, 0, 0], np.diag([16.0, 1, 0.25]))
    assert fd == pytest.approx(1 + 4 + (1 - 4) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2, abs=1e-12)
    # non-commuting covariances: against the eigenvalues of S1 S2 (and symmetric in its arguments)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 9)), rng.standard_normal((4, 9)) * [[1], [2], [0.5], [3]]
    s1, s2 = a @ a.T / 9, b @ b.T / 9
    mu1, mu2 = rng.standard_normal(4), rng.standard_normal(4)
    want = _eig_fd(mu1, s1, mu2, s2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-10)
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(
        np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum(), rel=1e-10)
    r = metrics.sqrtm_psd(s1)
    np.testing.assert_allclose(r @ r, s1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r, r.T, atol=1e-14)
    assert np.linalg.eigvalsh(r).min() > 0                    # the principal (PSD) root


def test_feature_stats_unbiased_covariance_by_hand():
    s = metrics.FeatureStats(2).update(np.array([[0.0, 1.0], [1.0, 3.0], [2.0, 2.0]]))
    np.testing.assert_allclose(s.mean, [1.0, 2.0], rtol=0, atol=1e-15)
    # sum of centered outer products / (N - 1): [[2, 1], [1, 2]] / 2
    np.testing.assert_allclose(s.cov, [[1.0, 0.5], [0.5, 1.0]], rtol=0, atol=1e-15)
    two = metrics.FeatureStats(1).update(np.array([[1.0]])).merge(metrics.FeatureStats(1).update(np.array([[4.0]])))
    assert two.n == 2 and two.mean[0] == 2.5 and two.cov[0, 0] == pytest.approx(4.5, abs=1e-15)


def test_quantize_levels():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.99999, 1.0, 1.3])
    u8 = np.clip(np.floor(x.double().numpy() * 127.5 + 128), 0, 255)
    assert u8.tolist() == [0, 0, 0, 128, 191, 255, 255, 255]
    torch.testing.assert_close(metrics._quantize(x), torch.from_numpy(u8 / 127.5 - 1).float(), rtol=0, atol=1e-6)


def _bilinear_np(img, out):
    """PyTorch's bilinear, align_corners=False (half-pixel centres, edges clamped), separable, float64."""
    def weights(n_in):
        src = np.maximum((np.arange(out) + 0.5) * n_in / out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1, w = np.minimum(i0 + 1, n_in - 1), src - np.floor(src)
        m = np.zeros((out, n_in))
        np.add.at(m, (np.arange(out), i0), 1 - w)
        np.add.at(m, (np.arange(out), i1), w)
        return m
    h, w = img.shape[-2:]
    return weights(h) @ img @ weights(w).T


def test_fid_inception_preprocessing_and_feature_layer():
    """The layers run in order up to Mixed_7c, then a global average pool; the first sees the 8-bit levels of the
    [-1, 1] input (grey expanded to RGB), resized bilinearly to 299 x 299 and still in [-1, 1]."""
    pytest.importorskip("torchvision")
    from cmfast._inception import FIDInception
    with torch.device("meta"):
        net = FIDInception()
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    seen = []

    class Add(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            seen.append((self.k, x.clone()))
            return x + 2.0 ** self.k
    for k, name in enumerate(names):
        setattr(net.net, name, Add(k))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 7, 5, generator=g) * 2.2 - 1.1
    out = net(x)
    assert [k for k, _ in seen] == list(range(18))
    first = seen[0][1]
    assert first.shape == (2, 3, 299, 299)
    levels = np.clip(np.floor(x.double().numpy() * 127.5 + 128), 0, 255) / 127.5 - 1
    want = np.stack([_bilinear_np(levels[i, 0], 299) for i in range(2)])
    for c in range(3):
        np.testing.assert_allclose(first[:, c].numpy(), want, rtol=0, atol=2e-6)
    total = sum(2.0 ** k for k in range(18))
    np.testing.assert_allclose(out.numpy(), want.mean((1, 2))[:, None].repeat(3, 1) + total, rtol=1e-6)
    # larger than 299 (a 320 x 310 image): the plain bilinear taps too, no antialiasing (pytorch-fid's resize);
    # atol: torch computes the 320 / 299 scale in float32
    seen.clear()
    big = torch.rand(1, 3, 320, 310, generator=g) * 2 - 1
    net(big)
    lv = np.clip(np.floor(big.numpy() * np.float32(127.5) + np.float32(128)), 0, 255) / 127.5 - 1   # float32 levels
    for c in range(3):
        np.testing.assert_allclose(seen[0][1][0, c].numpy(), _bilinear_np(lv[0, c], 299), rtol=0, atol=2e-4)


class _Const(torch.nn.Module):
    sigma_min, sigma_max = 0.002, 70.0

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        return x


def _stub_pipeline(monkeypatch, batches, dim=3):
    """evaluate with a fake sampler (recording its arguments), identity-ish features and known reference stats."""
    import cmfast.sampling as sampling
    calls = []

    def gen(model, num, **kw):
        calls.append(dict(kw, num=num))
        start = 0
        for b in batches:
            yield start, b
            start += len(b)
    monkeypatch.setattr(sampling, "generate_batches", gen)
    mu_ref, s_ref = np.array([0.1, -0.2, 0.3]), np.diag([0.5, 2.0, 1.0])
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: (mu_ref, s_ref, {"n": 7}))
    monkeypatch.setattr(metrics, "_extractor", lambda *a, **k: (lambda x: x.flatten(1)[:, :dim], dim, "stub"))
    return calls, mu_ref, s_ref


def test_evaluate_asks_the_sampler_for_num_seed_batches_and_scores_every_image(monkeypatch):
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, 1, 2, 2, generator=g) * 2 - 1 for _ in range(2)] + [torch.rand(1, 1, 2, 2, generator=g)]
    calls, mu_ref, s_ref = _stub_pipeline(monkeypatch, batches)
    m = _Const()
    res = metrics.evaluate(m, "fd-fmnist", num=5, batch_size=2, seed=11)
    kw = calls[0]
    assert kw["num"] == 5 and kw["batch_size"] == 2 and kw["seed"] == 11 and kw["steps"] is None
    assert tuple(kw["sigmas"]) == (70.0,) and kw["dtype"] == torch.float32 and kw["shape"] == (1, 32, 32)
    assert res["steps"] == 1 and res["sigmas"] == [70.0] and res["num"] == 5 and res["seed"] == 11
    f = np.concatenate([np.clip(np.floor(b.double().numpy() * 127.5 + 128), 0, 255) / 127.5 - 1
                        for b in batches]).reshape(5, -1)[:, :3]
    want = _eig_fd(f.mean(0), np.cov(f, rowvar=False, ddof=1), mu_ref, s_ref)
    assert res["value"] == pytest.approx(want, rel=1e-5)
    # explicit levels pass through; two steps default to (sigma_max, 0.821)
    metrics.evaluate(m, "fd-fmnist", num=5, batch_size=2, sigmas=(5.0, 1.0))
    metrics.evaluate(m, "fd-fmnist", num=5, batch_size=2, steps=2)
    assert tuple(calls[1]["sigmas"]) == (5.0, 1.0) and tuple(calls[2]["sigmas"]) == (70.0, 0.821)


def test_evaluate_edm_teacher_defaults_to_18_heun_steps(monkeypatch):
    from cmfast import EDMDenoiser
    from cmfast.nets import UNet
    calls, _, _ = _stub_pipeline(monkeypatch, [torch.rand(3, 1, 2, 2) * 2 - 1])
    edm = EDMDenoiser(UNet.from_preset("tiny", in_channels=1, out_channels=1))
    res = metrics.evaluate(edm, "fd-fmnist", num=3, batch_size=4)
    assert calls[0]["steps"] == 18 and calls[0]["sigmas"] is None and res["steps"] == 18
    assert "EDM Heun, 18 steps" in res["mode"]
    metrics.evaluate(edm, "fd-fmnist", num=3, batch_size=4, steps=5)
    assert calls[1]["steps"] == 5


def test_default_sigmas_are_the_karras_grid_by_hand():
    lo, hi, rho = 0.002, 80.0, 7.0
    for steps in (3, 5):
        n = steps + 1
        grid = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
        np.testing.assert_allclose(metrics.default_sigmas(steps), grid[:steps], rtol=1e-6)
    assert metrics.default_sigmas(1) == (80.0,) and metrics.default_sigmas(2) == (80.0, 0.821)


def test_pretrained_loads_the_ema_weights_in_float32():
    from safetensors.torch import load_file

    import cmfast
    from cmfast.pretrained import ASSETS
    raw = load_file(f"{ASSETS}/fmnist.safetensors")
    model = cmfast.load_pretrained("fmnist")
    sd = model.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    for k, v in raw.items():
        assert k.startswith("ema/")
        torch.testing.assert_close(sd[k[len("ema/"):]], v.float(), rtol=0, atol=0)
    assert model.card["step"] >= 1 and not model.training


def test_feature_stats_covariance_needs_two_rows():
    one = metrics.FeatureStats(2).update(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        one.cov


def test_fid_and_fd_fmnist_pass_count_weights_and_dataset_on(monkeypatch):
    seen = []

    def ref(metric, dataset, data_dir=None, num=50000, batch_size=250, device="cpu", weights=None):
        seen.append(("ref", metric, dataset, data_dir, num, weights))
        return np.zeros(3), np.eye(3), {}

    def ext(metric, device, weights=None):
        seen.append(("ext", metric, weights))
        return (lambda x: x.flatten(1)[:, :3]), 3, "stub"
    monkeypatch.setattr(metrics, "reference_stats", ref)
    monkeypatch.setattr(metrics, "_extractor", ext)
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    v = metrics.fid(x, dataset="folder", num_ref=123, data_dir="imgs", weights="w.pth", batch_size=4)
    assert seen == [("ref", "fid", "folder", "imgs", 123, "w.pth"), ("ext", "fid", "w.pth")]
    f = x.double().flatten(1)[:, :3].numpy()
    assert v == pytest.approx(_eig_fd(f.mean(0), np.cov(f, rowvar=False), np.zeros(3), np.eye(3)), rel=1e-5)
    seen.clear()
    metrics.fd_fmnist(torch.zeros(2, 1, 32, 32), batch_size=4)
    assert seen[0][1:5] == ("fd-fmnist", "fashion-mnist", None, 60000)


def test_evaluate_reference_count_and_dtype_reach_their_callees(monkeypatch):
    import cmfast.sampling as sampling
    calls, _, _ = _stub_pipeline(monkeypatch, [torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2) * 0.5])
    nums = []
    monkeypatch.setattr(metrics, "reference_stats",
                        lambda *a, **k: (nums.append(k["num"]), (np.zeros(3), np.eye(3), {}))[1])
    monkeypatch.setattr(sampling, "resolve_engine", lambda engine, model, dtype: "graphed")
    metrics.evaluate(_Const(), "fd-fmnist", num=4, batch_size=2, dtype=torch.bfloat16)
    metrics.evaluate(_Const(), "fid", num=4, batch_size=2)
    assert nums == [60000, 50000] and calls[0]["dtype"] == torch.bfloat16 and calls[0]["engine"] == "graphed"


def test_inception_weights_from_the_environment_load_in_eval_mode(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from cmfast._inception import FIDInception, find_weights, load_fid_inception
    with torch.device("meta"):
        net = FIDInception()
    path = tmp_path / "w.pth"
    torch.save(net.to_empty(device="cpu").net.state_dict(), path)
    monkeypatch.setenv("CMFAST_INCEPTION_WEIGHTS", str(path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "none"))
    assert find_weights() == str(path)
    loaded = load_fid_inception()
    assert not any(m.training for m in loaded.modules())


def _hubconf():
    import importlib.util

    from _repo import ROOT
    spec = importlib.util.spec_from_file_location("cmfast_hubconf_values", ROOT / "hubconf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hub_consistency_model_reads_ema_by_default_and_untrained_fmnist_is_in_eval_mode(tmp_path):
    from cmfast.pretrained import ASSETS
    from cmfast.training.checkpoint import load_weights, save_checkpoint
    hub = _hubconf()
    modules, meta = load_weights(f"{ASSETS}/fmnist.safetensors")
    ema = {k: v.float() for k, v in modules["ema"].items()}
    online = {k: v + 1 for k, v in ema.items()}
    path = save_checkpoint(str(tmp_path), 5, {"model": online, "ema": ema}, meta["config"], {})
    got = hub.consistency_model(path)
    torch.testing.assert_close(got.net.out_conv.weight, ema["net.out_conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(hub.consistency_model(path, which="model").net.out_conv.weight,
                               online["net.out_conv.weight"], rtol=0, atol=0)
    fresh = hub.fmnist(pretrained=False)
    assert not any(m.training for m in fresh.modules())
    assert isinstance(hub.unet(preset="tiny"), torch.nn.Module)
    assert hub.unet.__defaults__ == ("ddpmpp-cifar10",)


def test_search_sigmas_three_steps_finds_each_level_below_the_one_before():
    """steps=3: both later levels are searched (each below the one before it: every trial strictly decreasing)."""
    score = lambda s: (math.log(s[1]) - math.log(2.0)) ** 2 + 1e-3 * (math.log(s[2]) - math.log(0.5)) ** 2
    res = metrics.search_sigmas(score, steps=3, iters=25)
    assert res["sigmas"][0] == 80.0
    np.testing.assert_allclose(res["sigmas"][1:], [2.0, 0.5], rtol=2e-2)
    assert all(a > b for t, _ in res["trials"] for a, b in zip(t, t[1:]))


def test_fid_network_pools_mixed_7b_by_average_and_mixed_7c_by_max():
    """pytorch-fid's graph: Mixed_7b's pool branch averages 3x3 windows without the zero padding (TensorFlow's), and
    Mixed_7c's max-pools (the TF graph's quirk). Checked on the network FIDInception builds, against F.avg_pool2d /
    F.max_pool2d here; test_metrics' pooling test builds its own block, so an average pool in the built Mixed_7c
    passed it."""
    import torch.nn.functional as F

    from cmfast._inception import FIDInception
    torch.manual_seed(0)
    net = FIDInception().net.eval()
    g = torch.Generator().manual_seed(1)
    for block, channels, pool in ((net.Mixed_7b, 1280, lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
                                  (net.Mixed_7c, 2048, lambda x: F.max_pool2d(x, 3, 1, 1))):
        x = torch.randn(1, channels, 4, 4, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(block(x)[:, -192:], block.branch_pool(pool(x)))


def test_fd_fmnist_metric_refuses_other_datasets():
    """evaluate(metric='fd-fmnist') scores against Fashion-MNIST only: another dataset is one ValueError before any
    sampling (the classifier knows only Fashion-MNIST's classes)."""
    def no_sampling(*a, **k):
        raise AssertionError("sampled before the dataset check")
    with pytest.raises(ValueError, match="fd-fmnist compares with Fashion-MNIST only, got dataset 'cifar10'"):
        metrics.evaluate(no_sampling, "fd-fmnist", num=4, dataset="cifar10")


def test_one_image_is_refused_before_the_reference_statistics(monkeypatch):
    """A single image has no covariance: one ValueError from the image check, before the reference statistics (up to
    60,000 images through the feature network) are computed."""
    def ref(*a, **k):
        raise AssertionError("reference statistics computed for one image")
    monkeypatch.setattr(metrics, "reference_stats", ref)
    for score, x in ((metrics.fd_fmnist, torch.zeros(1, 1, 32, 32)), (metrics.fid, torch.zeros(1, 3, 8, 8))):
        with pytest.raises(ValueError, match="need at least 2 images for a covariance, got 1"):
            score(x)
