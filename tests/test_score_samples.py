"""Scoring images made elsewhere: cmfast.metrics.score_samples / cmfast-eval --samples read an .npz (uint8 (N, H, W, C)
as arr_0: cmfast-sample --npz and openai's sample files, whose arr_1 labels are ignored) or an image folder, and score
them as evaluate scores a model's samples. FD-FMNIST (its network ships) against a cached reference of random
statistics, so the dataset is not needed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmfast import metrics
from train_fixtures import write_png_folder


@pytest.fixture
def ref(tmp_path):
    from cmfast._fd_classifier import FEATURE_DIM
    stats = metrics.FeatureStats(FEATURE_DIM).update(np.random.default_rng(0).standard_normal((300, FEATURE_DIM)))
    stats.save(metrics.reference_cache_path("fd-fmnist", "fashion-mnist", str(tmp_path), 60000))
    return str(tmp_path)


def _images(n=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)


def _float(arr):
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_an_npz_scores_as_the_same_images_do(ref, tmp_path):
    arr = _images()
    path = tmp_path / "s.npz"
    np.savez(path, arr, np.arange(12))                   # arr_0 images, arr_1 labels (openai's layout)
    res = metrics.score_samples(str(path), "fd-fmnist", batch_size=5, data_dir=ref)
    want = metrics.fd_fmnist(_float(arr), data_dir=ref)
    assert res["metric"] == "FD-FMNIST" and res["value"] == pytest.approx(want, rel=1e-6) and res["value"] > 1
    assert res["num"] == 12 and res["samples"] == str(path) and f"from {path}" in res["mode"]
    first = metrics.score_samples(str(path), "fd-fmnist", num=7, data_dir=ref)
    assert first["num"] == 7 and first["value"] == pytest.approx(metrics.fd_fmnist(_float(arr[:7]), data_dir=ref),
                                                                 rel=1e-6)
    arr_res = metrics.score_samples(arr, "fd-fmnist", data_dir=ref, label="mine")
    assert arr_res["value"] == pytest.approx(res["value"], rel=1e-9) and arr_res["samples"] == "mine"
    for bad in (13, 1, "7"):
        with pytest.raises(ValueError, match=r"^num: expected an integer in \[2, 12\]"):
            metrics.score_samples(arr, "fd-fmnist", num=bad, data_dir=ref)
    with pytest.raises(ValueError, match=r"^fd-fmnist scores \(1, 32, 32\) images .* the samples are \(3, 32, 32\)"):
        metrics.score_samples(np.zeros((4, 32, 32, 3), np.uint8), "fd-fmnist", data_dir=ref)
    with pytest.raises(TypeError, match=r"^samples: expected a path .* got float32 \(4, 32, 32, 1\)"):
        metrics.score_samples(np.zeros((4, 32, 32, 1), np.float32), "fd-fmnist", data_dir=ref)


def test_load_samples_reads_the_files_users_have_and_names_the_bad_ones(tmp_path):
    arr = _images(5)
    np.savez(tmp_path / "one.npz", images=arr)              # a single array under another name
    np.testing.assert_array_equal(metrics.load_samples(str(tmp_path / "one.npz")), arr)
    folder = write_png_folder(tmp_path / "imgs", n=4, size=16)
    np.testing.assert_array_equal(metrics.load_samples(str(tmp_path / "imgs")), folder)
    np.savez(tmp_path / "two.npz", a=arr, b=arr)
    np.savez(tmp_path / "nchw.npz", np.zeros((4, 3, 32, 32), np.uint8))
    np.savez(tmp_path / "float.npz", arr.astype(np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "one.npz").read_bytes()[:100])
    for name, needle in (("two.npz", "no arr_0 among \\['a', 'b'\\]"),
                         ("nchw.npz", r"expected uint8 images \(N, H, W, C\) with C 1 or 3 as arr_0, got uint8 "
                                      r"\(4, 3, 32, 32\)"),
                         ("float.npz", "got float32"), ("cut.npz", "not a samples .npz"),
                         ("missing.npz", "samples not found")):
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: .*{needle}"):
            metrics.load_samples(str(tmp_path / name))


def test_cmfast_eval_samples(ref, tmp_path, capsys):
    from cmfast.cli.eval import main
    arr = _images()
    path = tmp_path / "s.npz"
    np.savez(path, arr)
    out = tmp_path / "r.json"
    assert main(["--samples", str(path), "--metric", "fd-fmnist", "--data-dir", ref, "--num", "10",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["samples"] == str(path) and res["num"] == 10
    assert res["value"] == pytest.approx(metrics.fd_fmnist(_float(arr[:10]), data_dir=ref), rel=1e-6)
    for extra, needle in ((["--steps", "2"], "--steps: --samples scores given images"),
                          (["--which", "model"], "--which: --samples scores given images"),
                          (["--metric", "is", "--precision-recall"], "use it with --metric fid"),
                          (["--precision-recall", "13"], "--precision-recall 13: at most the 12 images scored")):
        argv = ["--samples", str(path), "--metric", "fd-fmnist", "--data-dir", ref, *extra]
        if "is" in extra:
            argv.remove("fd-fmnist"), argv.remove("--metric")
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--samples", str(tmp_path / "none.npz"), "--metric", "fd-fmnist"])
    assert "samples not found" in capsys.readouterr().err
