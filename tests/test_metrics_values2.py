"""The Inception Score, precision / recall and score_samples in values, against hand-computed numbers and a numpy
transcription of Kynkaanniemi et al. 2019, on cheap stand-ins for the Inception network (a FIDInception whose
prediction is one confident class read off the image's mean level) and the feature function (per-channel means).
Each test was seen failing on the mutation it names (a review's mutation run)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _metric_fixtures import ReplayModel, tiny_checkpoint
from cmfast import metrics
from cmfast._inception import FIDInception
from train_fixtures import write_png_folder

BIG = 1000.0    # exp(-1000) is 0 in float64: the other classes' probabilities are exactly 0


class _ClassOfMean(FIDInception):
    """FIDInception's interface (isinstance included, so evaluate takes its logits); features (N, 2): the image mean
    and its square; logits: BIG on class round(10 (mean + 1)), 0 elsewhere. A constant image at 8-bit level
    round(12.75 c) is class c."""

    def __init__(self):
        torch.nn.Module.__init__(self)

    def forward(self, x, logits=False):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        m = x.float().mean((1, 2, 3))
        f = torch.stack([m, m * m], 1)
        if not logits:
            return f
        z = torch.zeros(len(x), 1008)
        z[torch.arange(len(x)), torch.round((m + 1) * 10).long()] = BIG
        return f, z


def _levels(classes, channels=1, size=8):
    """uint8 (N, size, size, channels) constant images of the given classes."""
    v = np.array([round(12.75 * c) for c in classes], np.uint8)
    return np.broadcast_to(v[:, None, None, None], (len(v), size, size, channels)).copy()


def _float(arr):
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def _exp_entropy(counts):
    """The IS of confident one-class predictions: exp of the entropy of the class histogram."""
    p = np.asarray(counts, np.float64) / sum(counts)
    return math.exp(-sum(q * math.log(q) for q in p))


@pytest.fixture
def inception(monkeypatch, tmp_path):
    import cmfast._inception as inc
    net = _ClassOfMean()
    path = tmp_path / "w.pth"
    path.write_bytes(b"stand-in")
    monkeypatch.setattr(inc, "load_fid_inception", lambda p=None, device="cpu": net)
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights=None: (net, 2, "stand-in"))
    return str(path)


def test_confident_predictions_with_zero_probabilities():
    """(mutations: no max subtraction before exp (exp(1000) = inf), log of a zero mean probability (0 * -inf))"""
    z = np.zeros((10, 1008))
    z[np.arange(10), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]] = BIG
    assert metrics.InceptionScoreStats(10, 1).update(z).result() == pytest.approx((5.0, 0.0), rel=1e-12, abs=1e-12)
    want = _exp_entropy([2, 2, 1])            # each half: classes 0 0 1 1 2 | 2 3 3 4 4
    got = metrics.InceptionScoreStats(10, 2).update(z[:3]).update(z[3:]).result()
    assert got == pytest.approx((want, 0.0), rel=1e-12, abs=1e-12) and want == pytest.approx(2.8717, abs=1e-4)


def test_inception_score_of_1_channel_images_in_splits(inception):
    """inception_score(): 1-channel images (the network repeats the channel), `splits` consecutive parts across the
    batches, std with ddof 0 (mutations: 1 channel refused, splits ignored, ddof 1, geometric mean)."""
    x = _float(_levels([0, 1, 2, 3, 5, 5, 6, 6]))
    assert x.shape == (8, 1, 8, 8)
    assert metrics.inception_score(x, splits=2, batch_size=3, weights=inception) == \
        pytest.approx((3.0, 1.0), rel=1e-12)                  # parts: 4 classes (IS 4), 2 classes (IS 2)
    assert metrics.inception_score(x, splits=4, batch_size=5, weights=inception) == \
        pytest.approx((1.5, 0.5), rel=1e-12)                  # 2, 2, 1, 1


def test_evaluate_is_of_a_1_channel_model_default_splits(inception):
    """evaluate(metric='is'): a 1-channel model's samples (mutation: 1 channel refused), 10 parts by default."""
    classes = [c for k in range(10) for c in (k, k + 10)]     # each part of 2: two classes
    x = _float(_levels(classes))
    res = metrics.evaluate(ReplayModel(x), "is", steps=1, num=20, batch_size=6, weights=inception)
    assert res["metric"] == "IS" and res["splits"] == 10 and res["dataset"] is None
    assert (res["value"], res["std"]) == pytest.approx((2.0, 0.0), abs=1e-12)
    res = metrics.evaluate(ReplayModel(x), "is", steps=1, num=20, batch_size=6, weights=inception, is_splits=3)
    want = [_exp_entropy([1] * 6), _exp_entropy([1] * 7), _exp_entropy([1] * 7)]    # parts [0, 6), [6, 13), [13, 20)
    assert (res["value"], res["std"]) == pytest.approx((np.mean(want), np.std(want)), rel=1e-12)


def test_fid_reports_the_is_of_its_samples_in_values(inception, monkeypatch):
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: (np.zeros(2), np.eye(2), {"n": 5}))
    x = _float(_levels([0, 1, 2, 3, 4, 4], channels=3))
    res = metrics.evaluate(ReplayModel(x), "fid", steps=1, num=6, batch_size=4, weights=inception, is_splits=2)
    got = res["inception_score"]
    want = [_exp_entropy([1, 1, 1]), _exp_entropy([1, 2])]
    assert (got["mean"], got["std"], got["splits"]) == pytest.approx((np.mean(want), np.std(want), 2), rel=1e-12)


def test_argument_errors_come_before_the_reference_statistics(inception, monkeypatch):
    """fid with a bad is_splits / pr_num: the error, not the reference statistics first (mutations: is_splits left to
    the scoring, the checks after the reference statistics)."""
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: pytest.fail("reference statistics computed"))
    monkeypatch.setattr(metrics, "reference_features", lambda *a, **k: pytest.fail("reference features computed"))
    x = _float(_levels([0, 1, 2, 3, 4, 5], channels=3))
    for kw, needle in ((dict(is_splits=0), r"^is_splits: expected an integer >= 1, got 0"),
                       (dict(pr_num=3), r"^pr_num: expected an integer >= 4, got 3"),
                       (dict(pr_num=7), r"^pr_num: expected at most num=6 samples, got 7")):
        with pytest.raises(ValueError, match=needle):
            metrics.evaluate(ReplayModel(x), "fid", steps=1, num=6, weights=inception, **kw)
        with pytest.raises(ValueError, match=needle):
            metrics.score_samples(_levels([0, 1, 2, 3, 4, 5], channels=3), "fid", weights=inception, **kw)


def test_score_samples_is_in_values(inception):
    """score_samples(metric='is') of uint8 1-channel images: the hand-computed score; no reference dataset in the
    result (mutation: the default dataset reported)."""
    arr = _levels([7, 7, 8, 9, 9, 9], size=4)
    res = metrics.score_samples(arr, "is", is_splits=1, weights=inception, label="mine")
    assert res["metric"] == "IS" and res["dataset"] is None and res["samples"] == "mine" and res["num"] == 6
    assert (res["value"], res["std"]) == pytest.approx((_exp_entropy([2, 1, 3]), 0.0), rel=1e-12, abs=1e-12)


def test_load_samples_reads_an_npy_and_a_zip(tmp_path):
    """An .npy of uint8 images is read; an .npy of something else is one ValueError naming it (it was a TypeError,
    "'numpy.ndarray' object does not support the context manager protocol"). A zip of PNGs is read as a folder
    (mutation: a zip read as an .npz); the shape in a refusal is (C, H, W) (mutation: H and W swapped)."""
    import zipfile
    imgs = write_png_folder(tmp_path / "imgs", n=3, size=8)
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as z:
        for f in sorted((tmp_path / "imgs").iterdir()):
            z.write(f, f.name)
    np.testing.assert_array_equal(metrics.load_samples(str(tmp_path / "s.zip")), imgs)
    with pytest.raises(ValueError, match=r"the samples are \(1, 32, 16\)"):
        metrics.score_samples(np.zeros((4, 32, 16, 1), np.uint8), "fd-fmnist")
    with pytest.raises(TypeError, match=r"^samples: expected a path .* got uint8 \(4, 8, 8, 4\)"):
        metrics.score_samples(np.zeros((4, 8, 8, 4), np.uint8), "is")      # (mutation: any channel count taken)
    with pytest.raises(ValueError, match=r"^samples: expected at least 2 images to score, got 1$"):
        metrics.score_samples(np.zeros((1, 8, 8, 3), np.uint8), "is")      # it said 'num: ... got 1', no num given
    arr = _levels([1, 2, 3], channels=3)
    np.save(tmp_path / "s.npy", arr)
    np.testing.assert_array_equal(metrics.load_samples(str(tmp_path / "s.npy")), arr)
    np.save(tmp_path / "f.npy", arr.astype(np.float32))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'f.npy'}: expected uint8 images .* got float32"):
        metrics.load_samples(str(tmp_path / "f.npy"))


# ---------------------------------------------------------------- precision / recall in values

def _channel_means(x):
    return ((x.float() * 127.5 + 128).clamp(0, 255).floor() / 127.5 - 1).mean((2, 3))


def _pr_numpy(real, fake, k):
    """Kynkaanniemi et al. 2019 written out: a point's radius is the distance to its k-th nearest other point of its
    set; a sample is inside a set when within the radius of any of its points."""
    def inside(query, ref):
        d_ref = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))
        radii = np.sort(d_ref, 1)[:, k]                         # column 0: the point itself
        d = np.sqrt(((query[:, None] - ref[None]) ** 2).sum(-1))
        return float((d <= radii[None] + 1e-6).any(1).mean())
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return inside(fake, real), inside(real, fake)


@pytest.fixture
def folder_ref(tmp_path, monkeypatch):
    ref = write_png_folder(tmp_path / "ref", n=10, size=8, seed=3)
    monkeypatch.setenv("CMFAST_DATA", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"stand-in weights")
    monkeypatch.setattr(metrics, "_weights_path", lambda metric, weights_=None: str(weights))
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights_=None: (_channel_means, 3, "stand-in"))
    return _float(ref), str(tmp_path / "ref")


def test_precision_recall_with_k_1_against_a_smaller_reference_folder(folder_ref, monkeypatch):
    """pr_num 12 samples against a folder of 10 images: all 10 are the reference ("reference": 10), read back from
    the cache next time; pr_k = 1 is used (mutations: k = 3 always, "reference" = pr_num, a cache of fewer than
    pr_num features computed again)."""
    ref, folder = folder_ref
    other = _float(np.random.default_rng(7).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    fakes = torch.cat([ref[:6], other])
    want = _pr_numpy(_channel_means(ref), _channel_means(fakes), k=1)
    assert want != pytest.approx(_pr_numpy(_channel_means(ref), _channel_means(fakes), k=3), abs=1e-9)
    run = lambda: metrics.evaluate(ReplayModel(fakes), "fid", steps=1, num=12, batch_size=5, dataset="folder",
                                   data_dir=folder, pr_num=12, pr_k=1)
    res = run()
    assert (res["precision"], res["recall"]) == pytest.approx(want, abs=1e-12)
    assert res["precision_recall"]["k"] == 1 and res["precision_recall"]["samples"] == 12
    assert res["precision_recall"]["reference"] == 10
    import cmfast.data
    monkeypatch.setattr(cmfast.data, "load_folder", lambda *a, **k: pytest.fail("reference images read again"))
    again = run()
    assert (again["precision"], again["recall"]) == (res["precision"], res["recall"])


# ---------------------------------------------------------------- cmfast-eval: what reaches the scoring


def _capture(monkeypatch, name):
    seen = {}

    def fake(*a, **kw):
        seen.update(kw, args=a)
        return {"metric": "stand-in", "value": 0.0}
    monkeypatch.setattr(metrics, name, fake)
    return seen


def test_cmfast_eval_samples_passes_its_defaults(tmp_path, monkeypatch, capsys):
    """--samples: bare --precision-recall is min(10000, images), --is-splits defaults to 10 and is passed on, --num
    is the first NUM (mutations: bare = all images, --is-splits dropped, --num ignored); the sampling flags with a
    default (--seed, --engine, --dtype) are refused as the others are, not ignored."""
    from cmfast.cli.eval import main
    path = tmp_path / "s.npz"
    np.savez(path, np.zeros((10001, 2, 2, 1), np.uint8))
    np.savez(tmp_path / "one.npz", np.zeros((1, 2, 2, 1), np.uint8))
    with pytest.raises(SystemExit) as e:
        main(["--samples", str(tmp_path / "one.npz"), "--metric", "is"])
    assert e.value.code == 2 and "samples: expected at least 2 images to score, got 1" in capsys.readouterr().err
    seen = _capture(monkeypatch, "score_samples")
    assert main(["--samples", str(path), "--metric", "fid", "--precision-recall"]) == 0
    assert seen["pr_num"] == 10000 and seen["is_splits"] == 10 and seen["num"] is None     # None: all of them
    assert main(["--samples", str(path), "--metric", "fid", "--precision-recall", "--num", "40",
                 "--is-splits", "3"]) == 0
    assert seen["pr_num"] == 40 and seen["is_splits"] == 3 and seen["num"] == 40
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--samples", str(path), "--metric", "fid", "--precision-recall", "41", "--num", "40"])
    assert e.value.code == 2 and "--precision-recall 41: at most the 40 images scored" in capsys.readouterr().err
    for extra in (["--seed", "3"], ["--engine=eager"], ["--dtype", "bf16"]):     # were taken and ignored
        with pytest.raises(SystemExit) as e:
            main(["--samples", str(path), "--metric", "is", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{extra[0].split('=')[0]}: --samples scores given images" in err, err


def test_cmfast_eval_model_passes_its_defaults(tmp_path, monkeypatch, capsys):
    """A checkpoint: bare --precision-recall is min(10000, --num), --is-splits defaults to 10 (mutations: bare =
    --num, default 5)."""
    from cmfast.cli.eval import main
    cm, ckpt = tiny_checkpoint(tmp_path / "run")
    seen = _capture(monkeypatch, "evaluate")
    assert main(["--checkpoint", ckpt, "--metric", "fid", "--num", "20000", "--precision-recall"]) == 0
    assert seen["pr_num"] == 10000 and seen["is_splits"] == 10 and seen["num"] == 20000
    assert json.loads(capsys.readouterr().out)["checkpoint"] == ckpt
