"""Values of the scripts no other test checked: scripts/make_edit_figures.py (the README's docs/edit_*.png: the test
images it reads, the stroke inputs, each task's levels and settings, its command line), scripts/train_fmnist_classifier.py
(the FD-FMNIST classifier's training and the file it writes) and scripts/triton_compile_check.py (exit status, the
shared-memory limit per GPU, --only). Small synthetic inputs; the expensive parts replaced where the checked values
do not depend on them."""
import gzip
import importlib.util
import os
import types

import numpy as np
import pytest
import torch

from _repo import ROOT

import cmfast


def _load(name):
    spec = importlib.util.spec_from_file_location(f"cmfast_script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- make_edit_figures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mef():
    return _load("make_edit_figures")


def _idx3(path, images, magic=b"\x00\x00\x08\x03"):
    n, h, w = images.shape
    with gzip.open(path, "wb") as f:
        f.write(magic + b"".join(v.to_bytes(4, "big") for v in (n, h, w)) + images.astype(np.uint8).tobytes())


def test_test_images_are_the_first_ones_padded_to_32_in_minus_1_to_1(mef, tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (4, 28, 28))
    raw[0, 0, 0], raw[0, 0, 1] = 0, 255
    _idx3(tmp_path / "t.gz", raw)
    x = mef.fmnist_test_images(3, str(tmp_path / "t.gz"))
    want = np.full((3, 1, 32, 32), -1.0)
    want[:, 0, 2:30, 2:30] = raw[:3] / 127.5 - 1
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), want, rtol=0, atol=1e-6)
    assert x[0, 0, 2, 2] == -1 and x[0, 0, 2, 3] == 1
    _idx3(tmp_path / "labels.gz", raw, magic=b"\x00\x00\x08\x01")
    with pytest.raises(ValueError, match="expected an idx3 uint8 file, got magic 00000801"):
        mef.fmnist_test_images(1, str(tmp_path / "labels.gz"))


def test_strokes_are_4x4_cell_means_quantised_at_plus_minus_half(mef):
    """Each 4 x 4 cell's mean -> -1 below -0.5, 0 between, 1 above 0.5 (black / gray / white), over the whole cell."""
    means = torch.tensor([[-0.8, -0.3], [0.45, 0.7]])
    x = means.repeat_interleave(4, 0).repeat_interleave(4, 1)[None, None].clone()
    # a zero-mean pattern inside each cell: 2 x 2 sub-blocks of +-0.4 (a 2-pixel cell would see them)
    x += 0.4 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1).repeat(2, 2)
    want = torch.tensor([[-1.0, 0.0], [0.0, 1.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(mef.strokes_from(x)[0, 0], want)


def _karras_desc(steps, smin, top, rho=7.0):
    """The first `steps` of steps + 1 Karras levels from top down to smin (numpy)."""
    i = np.arange(steps + 1) / steps
    s = (top ** (1 / rho) + i * (smin ** (1 / rho) - top ** (1 / rho))) ** rho
    return s[:-1]


def test_each_task_gets_its_levels_and_settings(mef, tmp_path, monkeypatch, capsys):
    """A 1-channel 16 px model: the 32 px test images area-averaged to 16 px; colorize skipped; the CLI's default
    steps per task from sigma_max (stroke: from 2.0, on the stroke painting), noise seeded by `seed`, sigma 0.5,
    min(num, 4) interpolation pairs of 9 alphas, the given factor; one PNG per task at `scale`."""
    import cmfast.cli._png as png
    import cmfast.cli.edit as edit
    x32 = torch.linspace(-1, 1, 5 * 32 * 32).reshape(5, 1, 32, 32).sin()
    monkeypatch.setattr(mef, "fmnist_test_images", lambda num: x32[:num])
    calls, saved = [], []

    def run(model, task, images, **kw):
        calls.append((task, images, kw, kw["generator"].initial_seed()))
        return None, [[torch.zeros(1, 16, 16)] * 2]
    monkeypatch.setattr(edit, "run", run)
    monkeypatch.setattr(png, "save_png", lambda t, path, scale=1: saved.append((path, scale)))
    model = torch.nn.Module()
    model.p = torch.nn.Parameter(torch.zeros(1))
    model.net = types.SimpleNamespace(in_channels=1, img_resolution=16)
    model.sigma_min, model.sigma_max = 0.002, 80.0
    written = mef.make_figures(model, str(tmp_path), num=5, seed=7, factor=2, scale=2)
    assert "colorize: skipped" in capsys.readouterr().out
    tasks = ["inpaint", "super-resolve", "stroke", "interpolate", "denoise"]
    assert [c[0] for c in calls] == tasks
    x16 = torch.nn.functional.avg_pool2d(x32, 2)
    for task, images, kw, seed in calls:
        steps = edit.DEFAULT_STEPS.get(task, 1)
        np.testing.assert_allclose(kw["sigmas"], _karras_desc(steps, 0.002, 2.0 if task == "stroke" else 80.0),
                                   rtol=1e-9)
        assert seed == 7 and kw["factor"] == 2 and kw["sigma"] == 0.5 and kw["pairs"] == 4 and kw["alphas"] == 9
        if task == "interpolate":
            assert images is None
        else:
            torch.testing.assert_close(images, mef.strokes_from(x16) if task == "stroke" else x16)
    assert len(calls[0][2]["sigmas"]) == 20 and len(calls[2][2]["sigmas"]) == 2
    paths = [str(tmp_path / f"edit_{t.replace('-', '_')}.png") for t in tasks]
    assert written == paths and saved == [(p, 2) for p in paths]
    calls.clear()
    mef.make_figures(model, str(tmp_path), num=2, steps=3, tasks=("inpaint", "stroke"))
    assert [len(c[2]["sigmas"]) for c in calls] == [3, 3] and [c[2]["pairs"] for c in calls] == [2, 2]
    assert [c[3] for c in calls] == [0, 0] and calls[0][2]["factor"] == 4


def test_command_line_loads_the_ema_weights_and_passes_its_settings(mef, tmp_path, monkeypatch, capsys):
    from cmfast.pretrained import ASSETS
    from cmfast.training.checkpoint import load_weights, save_checkpoint
    modules, meta = load_weights(f"{ASSETS}/fmnist.safetensors")
    ema = {k: v.float() for k, v in modules["ema"].items()}
    online = {k: v + 1 for k, v in ema.items()}
    ckpt = save_checkpoint(str(tmp_path), 5, {"model": online, "ema": ema}, meta["config"], {})
    got = []
    monkeypatch.setattr(mef, "make_figures", lambda model, *a: got.append((model, a)))
    assert mef.main(["--checkpoint", ckpt, "--device", "cpu"]) == 0
    model, args = got[-1]
    torch.testing.assert_close(model.net.out_conv.weight, ema["net.out_conv.weight"], rtol=0, atol=0)
    assert not model.training and args == ("docs", 8, None, 0, 4)
    assert mef.main(["--pretrained", "fmnist", "--out", "o", "--num", "3", "--steps", "2", "--seed", "5",
                     "--factor", "2", "--device", "cpu"]) == 0
    model, args = got[-1]
    assert isinstance(model, cmfast.ConsistencyModel) and args == ("o", 3, 2, 5, 2)
    capsys.readouterr()
    assert mef.main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("make_edit_figures: error: ")
    if not torch.cuda.is_available():
        assert mef.main(["--checkpoint", ckpt, "--device", "cuda"]) == 2
        assert "map_location 'cuda'" in capsys.readouterr().err
