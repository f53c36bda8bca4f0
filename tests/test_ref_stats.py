"""FID / FD against given reference statistics (evaluate(ref_stats=...), score_samples, cmfast-eval --ref-stats): an
npz with mu and sigma, as EDM's fid-refs and openai's reference batches hold them, the papers' protocol; the dataset's
statistics are then not computed. FD-FMNIST's network ships, so it stands for the metric."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _metric_fixtures import ReplayModel
from cmfast import metrics
from cmfast._fd_classifier import FEATURE_DIM


@pytest.fixture
def ref(tmp_path, monkeypatch):
    """openai's reference-batch layout: images (arr_0), mu / sigma and the spatial mu_s / sigma_s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((FEATURE_DIM, FEATURE_DIM))
    mu, sigma = rng.standard_normal(FEATURE_DIM) * 0.1, a @ a.T / FEATURE_DIM
    path = tmp_path / "VIRTUAL_ref_batch.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (5, 32, 32, 1), dtype=np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(7), sigma_s=np.eye(7))
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: pytest.fail("the dataset's statistics computed"))
    return str(path), mu, sigma


def _images(n=10):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _want(x, mu, sigma):
    from cmfast._fd_classifier import ASSET, load_classifier
    net, _ = load_classifier(ASSET, "cpu")
    with torch.no_grad():
        f = net.features(metrics._quantize(x)).double()
    stats = metrics.FeatureStats(FEATURE_DIM).update(f)
    return metrics.frechet_distance(stats.mean, stats.cov, mu, sigma)


def test_reference_batch_statistics_are_read_and_used(ref):
    path, mu, sigma = ref
    got_mu, got_sigma, meta = metrics.load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert meta == {}                           # the images and spatial statistics are not metadata
    x = _images()
    res = metrics.evaluate(ReplayModel(x), "fd-fmnist", steps=1, num=10, batch_size=4, ref_stats=path)
    assert res["value"] == pytest.approx(_want(x, mu, sigma), rel=1e-6) and res["value"] > 0.1
    assert res["ref_stats"] == path and res["dataset"] is None and f"vs {path} (? images)" in res["mode"]
    arr = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    res2 = metrics.score_samples(arr, "fd-fmnist", ref_stats=path)
    assert res2["value"] == pytest.approx(_want(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1, mu,
                                                sigma), rel=1e-6)
    assert res2["ref_stats"] == path


def test_bad_reference_statistics_are_one_line_before_sampling(ref, tmp_path):
    path, mu, sigma = ref

    class Refuses(ReplayModel):
        def forward(self, *a, **k):
            raise AssertionError("sampled before the reference was checked")
    np.savez(tmp_path / "small.npz", mu=np.zeros(16), sigma=np.eye(16))
    (tmp_path / "cut.npz").write_bytes(open(path, "rb").read()[:200])
    for ref_stats, needle in ((str(tmp_path / "small.npz"), r"holds 16-d statistics; fd-fmnist's features are 128-d"),
                              (str(tmp_path / "cut.npz"), "not a statistics npz with mu and sigma"),
                              (str(tmp_path / "none.npz"), r"^ref_stats: .*none.npz not found")):
        with pytest.raises(ValueError, match=needle):
            metrics.evaluate(Refuses(_images()), "fd-fmnist", steps=1, num=10, ref_stats=ref_stats)
    with pytest.raises(ValueError, match="^ref_stats: the Inception Score compares with no reference"):
        metrics.evaluate(Refuses(_images().expand(-1, 3, -1, -1)), "is", steps=1, num=10, ref_stats=path)


def test_cmfast_eval_ref_stats(ref, tmp_path):
    from cmfast.cli.eval import main
    path, mu, sigma = ref
    x = _images(6)
    arr = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "s.npz", arr)
    out = tmp_path / "r.json"
    assert main(["--samples", str(tmp_path / "s.npz"), "--metric", "fd-fmnist", "--ref-stats", path,
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ref_stats"] == path and res["value"] == pytest.approx(
        _want(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1, mu, sigma), rel=1e-6)


def test_precision_recall_use_the_reference_files_own_images(ref, monkeypatch):
    """openai's reference batches hold their images (arr_0), which their evaluator's precision / recall use: so do
    cmfast's with --ref-stats, without the dataset."""
    path, mu, sigma = ref
    monkeypatch.setattr(metrics, "reference_features", lambda *a, **k: pytest.fail("the dataset's images read"))
    from cmfast._fd_classifier import ASSET, load_classifier
    net, _ = load_classifier(ASSET, "cpu")
    with np.load(path) as f:
        imgs = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.cat([imgs[:2], torch.ones(2, 1, 32, 32), _images(6)])     # 2 reference copies, 2 white images first
    res = metrics.evaluate(ReplayModel(x), "fd-fmnist", steps=1, num=10, batch_size=4, ref_stats=path, pr_num=4)
    with torch.no_grad():
        want = metrics.precision_recall(net.features(imgs[:4]), net.features(metrics._quantize(x[:4])))
    assert (res["precision"], res["recall"]) == pytest.approx(want, abs=1e-12)
    assert res["precision"] == 0.5          # the copies inside the reference's manifold, the white images outside
    assert res["precision_recall"]["reference"] == 4 and res["dataset"] is None
    res = metrics.evaluate(ReplayModel(x), "fd-fmnist", steps=1, num=10, batch_size=4, ref_stats=path, pr_num=8)
    assert res["precision_recall"]["reference"] == 5            # all the file has
    with pytest.raises(ValueError, match=r"need more than k=5 reference images; VIRTUAL_ref_batch.npz has 5"):
        metrics.evaluate(ReplayModel(x), "fd-fmnist", steps=1, num=10, ref_stats=path, pr_num=8, pr_k=5)
