"""Precision and recall (Kynkaanniemi et al. 2019, k = 3), as the CM paper's ImageNet 64 and LSUN tables report them,
from evaluate(pr_num=...) and cmfast-eval --precision-recall: the first pr_num samples against pr_num reference
images (a seed-0 draw) in the metric's features, the reference features cached. A small stand-in feature function
takes the Inception network's place (its weights cannot be fetched here)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cmfast import metrics
from _metric_fixtures import ReplayModel, tiny_checkpoint
from train_fixtures import write_png_folder


def _feats(x):
    """9 features of [-1, 1] images at 8 bits (as the real extractors see them)."""
    x = (x.float() * 127.5 + 128).clamp(0, 255).floor() / 127.5 - 1
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, :8].mean((2, 3))], dim=1)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    arrs = write_png_folder(tmp_path / "ref", n=10, size=16)
    ref = torch.from_numpy(arrs).permute(0, 3, 1, 2).float() / 127.5 - 1
    monkeypatch.setenv("CMFAST_DATA", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"stand-in weights")
    monkeypatch.setattr(metrics, "_weights_path", lambda metric, weights_=None: str(weights))
    monkeypatch.setattr(metrics, "_extractor", lambda metric, device, weights_=None: (_feats, 9, "stand-in"))
    # half the samples are copies of reference images (inside the real manifold), half one white image (far outside)
    fakes = torch.cat([ref[:5], torch.ones(5, 3, 16, 16)])
    return ref, fakes, str(tmp_path / "ref")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_precision_recall_of_the_samples_against_the_reference(setup, monkeypatch, capsys, device):
    ref, fakes, folder = setup
    run = lambda n, **kw: metrics.evaluate(ReplayModel(fakes.to(device)), "fid", steps=1, num=10, batch_size=4,
                                           dataset="folder", data_dir=folder, pr_num=n, device=device, **kw)
    res = run(10)
    assert res["precision"] == pytest.approx(0.5, abs=1e-12)        # the 5 copies in, the 5 white images out
    want = metrics.precision_recall(_feats(ref), _feats(fakes))
    assert (res["precision"], res["recall"]) == pytest.approx(want, abs=1e-12) and res["recall"] >= 0.5
    assert res["precision_recall"] == {"k": 3, "samples": 10, "reference": 10, "method": res["precision_recall"]
                                       ["method"]} and "Kynkaanniemi" in res["precision_recall"]["method"]
    # 6 of 10: the first 6 samples, and 6 reference images drawn with seed 0 (reference_stats' draw)
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:6]
    res6 = run(6)
    want6 = metrics.precision_recall(_feats(ref[idx]), _feats(fakes[:6]))
    assert (res6["precision"], res6["recall"]) == pytest.approx(want6, abs=1e-12)
    assert res6["precision_recall"]["samples"] == 6 and res6["precision_recall"]["reference"] == 6
    assert res6["value"] == pytest.approx(res["value"], rel=1e-9)       # FID itself still over all 10 samples
    assert res6["precision"] != res["precision"]
    # cached: neither the reference statistics nor the features are computed again
    import cmfast.data    # (reference_batches is not patched: its source is part of the cache files' names)
    monkeypatch.setattr(cmfast.data, "load_folder", lambda *a, **k: pytest.fail("reference images read again"))
    again = run(6)
    assert (again["precision"], again["recall"]) == (res6["precision"], res6["recall"])
    assert "inception_score" not in res       # the stand-in is not the Inception network


def test_a_damaged_feature_cache_is_computed_again(setup, capsys):
    ref, fakes, folder = setup
    feats = metrics.reference_features("fid", "folder", folder, num=10)
    np.testing.assert_allclose(feats, _feats(ref).numpy(), rtol=1e-6, atol=1e-7)
    path = [os.path.join(r, f) for r, _, fs in os.walk(os.environ["CMFAST_DATA"]) for f in fs
            if f.endswith("_features.npy")]
    assert len(path) == 1 and "_n10_" in path[0]
    with open(path[0], "wb") as f:
        f.write(b"\x93NUMPY garbage")
    capsys.readouterr()
    again = metrics.reference_features("fid", "folder", folder, num=10)
    np.testing.assert_array_equal(again, feats)
    assert "cached reference features unreadable" in capsys.readouterr().err


def test_bad_precision_recall_arguments_are_one_line(setup):
    ref, fakes, folder = setup
    common = dict(steps=1, num=10, batch_size=4, dataset="folder", data_dir=folder)
    with pytest.raises(ValueError, match=r"^pr_num: precision / recall compare with reference images"):
        metrics.evaluate(ReplayModel(fakes), "is", pr_num=5, **common)
    with pytest.raises(ValueError, match=r"^pr_num: expected at most num=10 samples, got 11"):
        metrics.evaluate(ReplayModel(fakes), "fid", pr_num=11, **common)
    with pytest.raises(ValueError, match=r"^pr_num: expected an integer >= 4, got 3"):
        metrics.evaluate(ReplayModel(fakes), "fid", pr_num=3, **common)


def test_cmfast_eval_precision_recall(setup, tmp_path, capsys):
    from cmfast.cli.eval import main
    ref, fakes, folder = setup
    cm, ckpt = tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "pr.json"
    argv = ["--checkpoint", ckpt, "--metric", "fid", "--dataset", "folder", "--data-dir", folder, "--num", "8",
            "--batch-size", "4"]
    assert main(argv + ["--precision-recall", "--out", str(out)]) == 0      # bare: min(10000, --num)
    res = json.loads(out.read_text())
    want = metrics.evaluate(cm, "fid", steps=1, num=8, batch_size=4, dataset="folder", data_dir=folder, pr_num=8)
    assert res["precision_recall"]["samples"] == 8
    assert (res["precision"], res["recall"]) == pytest.approx((want["precision"], want["recall"]), abs=1e-12)
    for extra, needle in ((["--precision-recall", "9"], "--precision-recall 9: at most --num (8) samples"),
                          (["--metric", "is", "--precision-recall"], "use it with --metric fid")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1


def test_a_reference_too_small_for_the_k_nn_radii_is_refused_before_sampling(setup, tmp_path):
    ref, fakes, folder = setup
    write_png_folder(tmp_path / "tiny", n=3, size=16)

    class Refuses(ReplayModel):
        def forward(self, *a, **k):
            raise AssertionError("sampled before the reference was checked")
    with pytest.raises(ValueError, match=r"^pr_num: precision / recall need more than k=3 reference images; folder "
                                         r"has 3"):
        metrics.evaluate(Refuses(fakes), "fid", steps=1, num=10, batch_size=4, dataset="folder",
                         data_dir=str(tmp_path / "tiny"), pr_num=4)
