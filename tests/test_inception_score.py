"""The Inception Score (Salimans et al. 2016), as the CM paper reports it beside FID on CIFAR-10: the streamed
statistics against a float64 transcription of the original split-wise formula and hand-computed cases; the logits
(FID's Inception-V3, its 1008-way layer without the output bias); evaluate / cmfast-eval --metric is, and the
Inception Score that --metric fid reports from the same network pass. Random weights of the real architecture stand
in for pytorch-fid's file, which cannot be fetched here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmfast import metrics
from _metric_fixtures import ReplayModel, random_fid_inception, tiny_checkpoint

pytest.importorskip("torchvision")


def _reference_is(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """improved-gan's inception_score/model.py, written out: softmax, then per consecutive part
    exp(mean_x sum_y p (log p - log mean_x p)); mean and std (ddof 0) over parts."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n, scores = len(p), []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_streamed_score_equals_the_original_formula_in_uneven_batches_and_parts():
    z = np.random.default_rng(0).standard_normal((23, 1008)) * 3
    for splits in (1, 4, 10):
        stats = metrics.InceptionScoreStats(23, splits)
        for a, b in ((0, 5), (5, 12), (12, 23)):        # batches across the parts' boundaries (23 // 4 ...)
            stats.update(torch.from_numpy(z[a:b]).float() if a == 5 else z[a:b])
        want = _reference_is(np.concatenate([z[:5], z[5:12].astype(np.float32), z[12:]]), splits)
        got = stats.result()
        assert got[0] == pytest.approx(want[0], rel=1e-10) and got[1] == pytest.approx(want[1], rel=1e-8, abs=1e-12)
    assert want[0] > 1.5 and want[1] > 0                 # informative logits: not the trivial score 1


def test_hand_computed_scores():
    big = 60.0      # p of the winning class 1 - 1007 exp(-60): the scores below hold to 1e-20

    def onehot(classes):
        z = np.zeros((len(classes), 1008))
        z[np.arange(len(classes)), classes] = big
        return z
    s = metrics.InceptionScoreStats(10, 1).update(onehot(range(10)))
    assert s.result()[0] == pytest.approx(10.0, rel=1e-12)          # 10 confident, distinct classes
    s = metrics.InceptionScoreStats(8, 2).update(onehot([3, 3, 3, 3, 0, 1, 2, 4]))
    mean, std = s.result()                                           # parts: one class (IS 1), four classes (IS 4)
    assert mean == pytest.approx(2.5, rel=1e-12) and std == pytest.approx(1.5, rel=1e-12)
    s = metrics.InceptionScoreStats(6, 3).update(np.full((6, 1008), 0.7))
    assert s.result() == pytest.approx((1.0, 0.0), abs=1e-12)       # one prediction for all: no information


def test_bad_input_is_one_line():
    s = metrics.InceptionScoreStats(4, 2)
    with pytest.raises(ValueError, match=r"^logits: expected \(N, 1008\), got \(2, 10\)"):
        s.update(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((1, 1008), np.nan))
    s.update(np.zeros((3, 1008)))
    with pytest.raises(ValueError, match=r"^Inception Score of 4 samples: 3 added"):
        s.result()
    with pytest.raises(ValueError, match=r"^logits: 5 rows for an Inception Score of 4 samples"):
        s.update(np.zeros((2, 1008)))
    with pytest.raises(ValueError, match=r"^splits: expected at most num=3 parts, got 4"):
        metrics.InceptionScoreStats(3, 4)
    with pytest.raises(ValueError, match=r"^splits: expected an integer >= 1"):
        metrics.InceptionScoreStats(3, 0)


def test_logits_of_the_real_network_are_pool3_times_the_fc_weights_without_the_bias(tmp_path):
    """Through the whole network (299 x 299, random weights loaded strictly from a file, as pytorch-fid's are), once:
    a random network's pool3 features hardly differ between images, so the scores are checked on the stand-in
    below."""
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    net = random_fid_inception(fc_bias_scale=20)
    torch.save(net.net.state_dict(), path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        f, logits = net(x, logits=True)
        want = f.double() @ net.net.fc.weight.double().t()
        biased = net.net.fc(f)
    assert f.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-5)
    assert float((logits - biased).abs().min()) > 1e-3                  # the bias is not in them
    with torch.no_grad():
        got = metrics.inception_score(x, splits=1, weights=str(path))    # the file loaded strictly, the same net
    assert metrics.inception_score(x, weights=str(path)) == pytest.approx(_reference_is(logits.double().numpy(), 2),
                                                                          rel=1e-6)   # 10 splits of 2 images: 2
    assert got == pytest.approx(_reference_is(logits.double().numpy(), 1), rel=1e-6)


class _StandIn(torch.nn.Module):
    """FIDInception's interface (8-bit input, features, logits=True) on a cheap network whose predictions differ
    between images: 16 'features' = a fixed projection of the 4 x 4 average pool, logits = features @ W."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj, self.w = torch.randn(48, 16, generator=g), torch.randn(1008, 16, generator=g) * 0.5

    def forward(self, x, logits=False):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = (x.float() * 127.5 + 128).clamp(0, 255).floor() / 127.5 - 1
        f = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj
        return (f, f @ self.w.t()) if logits else f


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """The stand-in as the Inception network (a FIDInception to evaluate) and its 'weights' file."""
    import cmfast._inception as inc
    cls = type("StandInInception", (_StandIn, inc.FIDInception), {})
    net = cls()
    path = tmp_path / "w.pth"
    path.write_bytes(b"stand-in")
    monkeypatch.setattr(inc, "load_fid_inception", lambda p=None, device="cpu": net)
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights=None: (net, 16, "stand-in"))
    return net, str(path)


def _images(n, seed):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_inception_score_and_evaluate_is_equal_the_formula(stand_in, monkeypatch):
    net, path = stand_in
    x = _images(12, 2)
    logits = net(x, logits=True)[1].double().numpy()
    want = _reference_is(logits, 3)
    assert want[0] > 2 and want[1] > 0.01              # informative: the images' predictions differ
    assert metrics.inception_score(x, splits=3, batch_size=5, weights=path) == pytest.approx(want, rel=1e-6)
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: pytest.fail("IS needs no reference data"))
    res = metrics.evaluate(ReplayModel(x), "is", steps=1, num=12, batch_size=5, weights=path, is_splits=3)
    assert res["metric"] == "IS" and res["splits"] == 3 and res["dataset"] is None
    assert (res["value"], res["std"]) == pytest.approx(want, rel=1e-6)
    assert "without the output bias" in res["implementation"] and "12 samples (8-bit), 3 splits" in res["mode"]
    x = x[:6]
    res = metrics.evaluate(ReplayModel(x), "is", steps=1, num=6, batch_size=4, weights=path)     # 10 splits > 6 samples
    assert res["splits"] == 6 and res["value"] == pytest.approx(_reference_is(logits[:6], 6)[0], rel=1e-6)
    with pytest.raises(ValueError, match=r"^is_splits: expected an integer >= 1"):
        metrics.evaluate(ReplayModel(x), "is", num=6, weights=path, is_splits=0)
    with pytest.raises(ValueError, match=r"^is scores 1- or 3-channel images"):
        metrics.evaluate(ReplayModel(torch.zeros(6, 4, 16, 16)), "is", num=6, weights=path)


def test_fid_reports_the_inception_score_of_its_samples(stand_in, monkeypatch):
    """--metric fid: FID against the reference and, from the same pass, the samples' Inception Score (the CM paper's
    CIFAR-10 table has both), equal to --metric is on the same images."""
    net, path = stand_in
    x = _images(8, 3)
    mu, cov = np.full(16, 0.3), np.eye(16) * 2
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: (mu, cov, {"n": 9}))
    res = metrics.evaluate(ReplayModel(x), "fid", steps=1, num=8, batch_size=3, weights=path, is_splits=2)
    f, logits = net(x, logits=True)
    stats = metrics.FeatureStats(16).update(f.double())
    assert res["metric"] == "FID"
    assert res["value"] == pytest.approx(metrics.frechet_distance(stats.mean, stats.cov, mu, cov), rel=1e-6)
    want = _reference_is(logits.double().numpy(), 2)
    got = res["inception_score"]
    assert (got["mean"], got["std"], got["splits"]) == pytest.approx((*want, 2), rel=1e-6)
    is_res = metrics.evaluate(ReplayModel(x), "is", steps=1, num=8, batch_size=3, weights=path, is_splits=2)
    assert is_res["value"] == pytest.approx(got["mean"], rel=1e-9)


def test_fd_fmnist_has_no_inception_score(monkeypatch, tmp_path):
    from cmfast._fd_classifier import FEATURE_DIM
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: (np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM), {}))
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    res = metrics.evaluate(ReplayModel(x), "fd-fmnist", steps=1, num=4, batch_size=4)
    assert res["metric"] == "FD-FMNIST" and "inception_score" not in res


def test_cmfast_eval_metric_is(stand_in, tmp_path, capsys):
    from cmfast.cli.eval import main
    _, path = stand_in
    cm, ckpt = tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "is.json"
    assert main(["--checkpoint", ckpt, "--metric", "is", "--num", "6", "--batch-size", "4", "--is-splits", "2",
                 "--inception-weights", path, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    want = metrics.evaluate(cm, "is", steps=1, num=6, batch_size=4, weights=path, is_splits=2)
    assert res["metric"] == "IS" and res["splits"] == 2 and res["value"] == pytest.approx(want["value"], rel=1e-6)
    assert res["value"] > 1.0 + 1e-6
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", ckpt, "--metric", "is", "--steps", "2", "--search-sigmas"])
    assert e.value.code == 2 and "the Inception Score is higher-better" in capsys.readouterr().err
